"""Other-Play: self-play with the partner relabelled by a random symmetry of the game."""

from __future__ import annotations

from shiftbench.coordination.learners import selfplay_lineup
from shiftbench.coordination.method import CoordinationMethod, n_episodes
from shiftbench.registry import METHODS


@METHODS.register("otherplay")
class OtherPlay(CoordinationMethod):
    """Other-Play (Hu, Lerer, Peysakhovich & Foerster, "'Other-Play' for Zero-Shot Coordination", ICML 2020):
    maximises E_φ J(π, φ(π)), self-play averaged over the game's symmetries φ (relabellings of equivalent states
    and actions: the lever game's nine 1.0 levers, the rendezvous grid's rotations and reflections).

    Each episode draws φ uniformly; seat 1 sees the observation of the relabelled state and its action is mapped
    back, so conventions that hinge on arbitrary labels stop paying. The network learns from both seats in their own
    frames (parameter sharing). In the lever game the optimum is the 0.9 lever: 0.9 against 1/9 for any 1.0 lever.
    """

    def lineup(self, minibatches, step):
        return selfplay_lineup(self.world.game, n_episodes(minibatches), relabel=True)
