"""The base class of coordination methods: they decide who the learner plays with; a learner does the rest.

``update(minibatches, step)`` gets one batch of partner ids per training environment (partner population), asks the
method for a :class:`Lineup` (who sits in each seat of each episode), plays those episodes, and lets the learner
(``ppo`` or ``vdn``, the ``learner`` hyperparameter) optimise the shared network on the learner's seats.
Evaluation plays the learner with every partner of a split (see :mod:`shiftbench.coordination.world`).

State lives in modules and buffers (the network, the learner's value head or target network, method weights) and
randomness comes from torch's global generator, both of which the trainer checkpoints, so trials resume exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from shiftbench.algorithm import Algorithm, MethodContext
from shiftbench.data import Batch
from shiftbench.errors import UserError
from shiftbench.hparams import HParam, choice, fixed, log_uniform, log_uniform_int

from .learners import LEARNERS, Lineup, Rollout, one_thread, play
from .world import World


class CoordinationMethod(Algorithm):
    """Trains one network for every seat it controls (parameter sharing) with partners the subclass chooses."""

    TASKS = ("coordination",)
    HPARAMS: ClassVar[dict[str, HParam]] = {
        "learner": HParam("ppo", fixed("ppo")),
        "lr": HParam(3e-3, log_uniform(-3.5, -2)),
        "weight_decay": HParam(0.0, fixed(0.0)),
        "batch_size": HParam(32, log_uniform_int(4, 7, base=2)),  # episodes per training environment per step
        "gamma": HParam(0.99, choice([0.95, 0.99])),
        "gae_lambda": HParam(0.95, choice([0.9, 0.95, 1.0])),
        "ppo_clip": HParam(0.2, choice([0.1, 0.2, 0.3])),
        "ppo_epochs": HParam(4, choice([2, 4, 8])),
        "value_coef": HParam(0.5, fixed(0.5)),
        "entropy_coef": HParam(0.01, log_uniform(-3, -1.5)),
        "max_grad_norm": HParam(1.0, fixed(1.0)),
        "vdn_epsilon": HParam(0.05, choice([0.02, 0.05, 0.1])),
        "vdn_epochs": HParam(4, choice([2, 4, 8])),
        "vdn_target_every": HParam(10, choice([5, 10, 20])),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        kind = self.hparams["learner"]
        if kind not in LEARNERS:
            raise UserError(f"unknown learner {kind!r}: use one of {', '.join(sorted(LEARNERS))}")
        self.learner = LEARNERS[kind](model, self.hparams)
        self.optimizer = self.make_optimizer(list(model.parameters()) + self.learner.extra_parameters())
        self.world: World | None = None

    def setup(self, context: MethodContext) -> None:
        worlds = {id(w): w for w in (getattr(s, "world", None) for s in context.splits.values()) if w is not None}
        if len(worlds) != 1:
            raise UserError(f"method {getattr(self, 'registry_name', type(self).__name__)} needs a coordination "
                            "dataset (its splits carry the game and the partners)")  # fmt: skip
        self.world = next(iter(worlds.values()))

    def lineup(self, minibatches: list[Batch], step: int) -> Lineup:
        """Who plays each seat of this step's episodes (one episode per drawn partner id, environments in order)."""
        raise NotImplementedError

    def episode_weights(self, roll: Rollout, minibatches: list[Batch]) -> torch.Tensor | None:
        """Per-episode weights (mean 1) for the learner's loss; None: uniform."""
        return None

    def update(self, minibatches, step):
        with one_thread():
            lineup = self.lineup(minibatches, step)
            roll = play(self.world.game, lineup, self.learner.acting(self.model, step), self.world.bank.act,
                        explore=self.learner.exploration(step))
            stats = self.learner.train_on(self.model, self.optimizer, roll, lineup.learner_seats, step,
                                          self.episode_weights(roll, minibatches))  # fmt: skip
        stats["return"] = roll.returns.mean()
        return stats

    def scores(self, batch):
        with one_thread():
            return self.world.evaluate(self.model, self.hparams["learner"], batch["partner"])


def n_episodes(minibatches: list[Batch]) -> int:
    return sum(len(b["partner"]) for b in minibatches)
