"""Self-play: the learner's partner is a copy of itself."""

from __future__ import annotations

from shiftbench.coordination.learners import selfplay_lineup
from shiftbench.coordination.method import CoordinationMethod, n_episodes
from shiftbench.registry import METHODS


@METHODS.register("selfplay")
class SelfPlay(CoordinationMethod):
    """Self-play (as in TD-Gammon, Tesauro, CACM 1995; the baseline of zero-shot coordination in Hu et al., ICML
    2020): both seats are the learner, so it maximises J(π, π) and is free to settle on any convention that works
    with itself, e.g. any one of the lever game's nine 1.0 levers.

    The ERM of this workload: the training batches only set how many episodes a step plays (their partner ids are
    not used), just as ERM pools environments without looking at their labels.
    """

    def lineup(self, minibatches, step):
        return selfplay_lineup(self.world.game, n_episodes(minibatches))
