"""What a coordination dataset gives its methods: partner splits, and evaluation by playing with each partner.

A :class:`PartnerSplit` holds partner ids (``partner``: an agent of the dataset's population, or -1 for "the learner
itself"), so the trainer's ``batch_at`` draws partners. Every split of a dataset carries the same :class:`World`
(the game, the frozen partner bank, the evaluation protocol), which coordination methods pick up in ``setup``.

Evaluation (:meth:`World.evaluate`) plays ``eval_episodes`` episodes with each partner, from start states and with
action draws fixed by a constant seed, so it never touches torch's global generator and repeats exactly. The
learner takes seat 0 in even episodes and seat 1 in odd ones. Per partner it returns the mean return, the return
normalised by the game's optimum (the task's ``correct``), and the most frequent outcome (the lever pulled, the
corner met on; -1 for none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from shiftbench.data import Batch, Split
from shiftbench.hparams import seed_hash

from .games import Game
from .learners import Lineup, one_thread, play, policy
from .population import PolicyBank

SELF = -1
"""Partner id meaning "a copy of the learner" (self-play return)."""
EVAL_SEED = 20200306
"""Seed of evaluation start states and action draws (fixed: every learner meets the same situations)."""


@dataclass
class World:
    """The game, the partners and the evaluation protocol shared by a coordination dataset's splits.

    Attributes:
        game: the game.
        bank: the partner population (rows = agent x checkpoint).
        eval_episodes: episodes per partner at evaluation.
        greedy: evaluate with argmax actions (learner and partners) instead of sampling.
    """

    game: Game
    bank: PolicyBank
    eval_episodes: int
    greedy: bool

    def evaluate(self, model: nn.Module, kind: str, partners: torch.Tensor) -> torch.Tensor:
        """Plays the learner (``model``, trained by learner ``kind``) with each partner id.

        Returns:
            ``(len(partners), 3)``: mean return, normalised return, most frequent outcome.
        """
        partners = partners.cpu()
        gen = torch.Generator().manual_seed(EVAL_SEED)
        n, e = len(partners), self.eval_episodes
        start = self.game.reset(e, gen)
        state = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in start.items()}
        seat = (torch.arange(n * e) % e) % 2
        pid = partners.repeat_interleave(e)
        other = torch.where(pid == SELF, SELF, self.bank.row(pid.clamp(min=0), -1))
        row = torch.where(seat[:, None] == torch.arange(2), SELF, other[:, None])
        act = policy(model, kind, self.greedy, gen)
        roll = play(self.game, Lineup(row), act, lambda r, o: self.bank.act(r, o, self.greedy, gen), seat=seat,
                    state=state)
        ret = roll.returns.reshape(n, e).mean(1)
        mode = roll.outcome.reshape(n, e).mode(1).values.float()
        return torch.stack([ret, ret / self.game.optimum, mode], 1)


def crossplay(game: Game, agents: list[tuple[nn.Module, str]], episodes: int, greedy: bool) -> torch.Tensor:
    """The return of every ordered pair of agents ``(model, learner kind)``: entry (i, j) has i in seat 0 of even
    episodes and seat 1 of odd ones; the diagonal is self-play. Same fixed seeds as :meth:`World.evaluate`."""
    out = torch.zeros(len(agents), len(agents))
    seat = torch.arange(episodes) % 2
    pair = torch.where(seat[:, None] == torch.arange(2), SELF, 0)
    with one_thread(), torch.no_grad():
        for i, (mi, ki) in enumerate(agents):
            for j, (mj, kj) in enumerate(agents):
                gen = torch.Generator().manual_seed(EVAL_SEED)
                start = game.reset(episodes, gen)
                partner = policy(mj, kj, greedy, gen)
                row = torch.full((episodes, 2), SELF) if i == j else pair
                roll = play(game, Lineup(row), policy(mi, ki, greedy, gen), lambda r, o: partner(o), seat=seat,
                            state=start)
                out[i, j] = roll.returns.mean()
    return out


class PartnerSplit(Split):
    """Partner ids (and their metadata) of one environment part; training batches draw them with replacement.

    Args:
        tensors: ``partner`` and ``idx`` (int64, equal length), plus any metadata (e.g. the agent's ``seed``).
        world: the dataset's world (the same object for every split).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], world: World):
        self.tensors = dict(tensors)
        self.n = len(tensors["partner"])
        self.world = world

    def __len__(self) -> int:
        return self.n

    def batch_at(self, k: int, batch_size: int, seed: int, keys: tuple[str, ...] | None = None) -> Batch:
        # With replacement, so a step plays batch_size episodes however few partners the split holds.
        g = torch.Generator().manual_seed(seed_hash(seed, k))
        pick = torch.randint(self.n, (batch_size,), generator=g)
        keys = tuple(self.tensors) if keys is None else keys
        return {key: self.tensors[key][pick] for key in keys if key in self.tensors}

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, self.n, batch_size):
            yield {key: t[i : i + batch_size] for key, t in self.tensors.items()}

    def to(self, device: torch.device) -> "PartnerSplit":
        return self  # games and partners run on the CPU; only the learner's network follows the device
