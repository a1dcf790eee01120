"""Partner populations: independently seeded self-play agents and their past checkpoints, trained once and cached.

A population is trained deterministically from its spec (game, learner, seeds, steps, network size) and stored in
a cache folder under the sha256 of that spec (``$SHIFTBENCH_CACHE``, else ``~/.cache/shiftbench``), written
atomically, so a sweep's trials and workers build it once and nothing is trained from the network at test time.
The agents are frozen MLPs; :class:`PolicyBank` runs many of them on one batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from shiftbench.config import canonical_json, sha256_json
from shiftbench.hparams import seed_hash
from shiftbench.io import atomic_write
from shiftbench.models import build_model

from .games import Game
from .learners import LEARNERS, Learner, Lineup, one_thread, play, policy, sample, selfplay_lineup

POPULATION_FORMAT = 2
"""Bumped whenever population training changes, so stale caches are never reused."""

TRAIN_HPARAMS: dict[str, Any] = {
    "lr": 3e-3, "gamma": 0.99, "gae_lambda": 0.95, "ppo_clip": 0.2, "ppo_epochs": 4, "value_coef": 0.5,
    "entropy_coef": 0.01, "max_grad_norm": 1.0, "vdn_epsilon": 0.05, "vdn_epochs": 4,
    "vdn_target_every": 10, "mlp_width": 64, "mlp_depth": 2,
}  # fmt: skip
"""Hyperparameters of the partners' self-play training (a population spec may override any of them)."""
CHECKPOINT_EVAL_SEED = 20210701
"""Seed of the self-play evaluation that ranks an agent's candidate checkpoints."""


def cache_dir() -> Path:
    """Where populations are cached: ``$SHIFTBENCH_CACHE`` or ``~/.cache/shiftbench``, then ``coordination/``."""
    root = os.environ.get("SHIFTBENCH_CACHE") or Path.home() / ".cache" / "shiftbench"
    return Path(root) / "coordination"


def new_agent(game: Game, hparams: dict) -> nn.Module:
    """The network every agent of a game uses: observation -> one output per action."""
    return build_model("mlp", (game.obs_dim,), game.n_actions, hparams)


def selfplay_step(game: Game, model: nn.Module, learner: Learner, optimizer: torch.optim.Optimizer, n: int,
                  step: int, relabel: bool = False) -> dict[str, torch.Tensor]:
    """One self-play update on ``n`` fresh episodes; with ``relabel``, seat 1 plays through a random symmetry per
    episode (Other-Play). Uses torch's global generator."""
    with one_thread():
        lineup = selfplay_lineup(game, n, relabel)
        roll = play(game, lineup, learner.acting(model, step), explore=learner.exploration(step))
        stats = learner.train_on(model, optimizer, roll, lineup.learner_seats, step)
    stats["return"] = roll.returns.mean()
    return stats


@dataclass(frozen=True)
class PopulationSpec:
    """How to train a population; its hash names the cache file.

    Attributes:
        game: the game's ``spec()``.
        seeds: one training seed per agent.
        steps: self-play updates per agent.
        episodes: episodes per update.
        checkpoints: which weights each agent keeps: ``fcp``, Fictitious Co-Play's three (the random
            initialisation, the checkpoint whose self-play return is nearest half the final one, the final
            network; :func:`fcp_choice`), or ``final`` (the final network only).
        candidates: ``fcp`` chooses among the weights after every ``steps / candidates`` updates.
        learner: ``ppo`` or ``vdn``.
        hparams: overrides of :data:`TRAIN_HPARAMS`.
    """

    game: dict
    seeds: tuple[int, ...]
    steps: int
    episodes: int = 64
    checkpoints: str = "fcp"
    candidates: int = 20
    learner: str = "ppo"
    hparams: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"format": POPULATION_FORMAT, "game": self.game, "seeds": list(self.seeds), "steps": self.steps,
                "episodes": self.episodes, "checkpoints": self.checkpoints, "candidates": self.candidates,
                "learner": self.learner, "hparams": dict(self.hparams)}  # fmt: skip

    @property
    def hash(self) -> str:
        return sha256_json(self.to_dict())

    @property
    def train_hparams(self) -> dict[str, Any]:
        """The hyperparameters every agent trains (and is rebuilt) with: :data:`TRAIN_HPARAMS` and the overrides."""
        return {**TRAIN_HPARAMS, **dict(self.hparams), "weight_decay": 0.0}


def fcp_choice(returns: Sequence[float]) -> tuple[int, ...]:
    """Fictitious Co-Play's checkpoints (Strouse et al., NeurIPS 2021, section 3: "the initial, a middle and the
    final checkpoint", the middle one at about half the final reward) among candidates with these self-play
    returns, in training order: the first, the one between whose return is nearest half the last one's (the
    earliest on ties), the last. Fewer than three candidates: all of them."""
    if len(returns) < 3:
        return tuple(range(len(returns)))
    half = returns[-1] / 2
    middle = min(range(1, len(returns) - 1), key=lambda i: (abs(returns[i] - half), i))
    return 0, middle, len(returns) - 1


def selfplay_return(game: Game, model: nn.Module, kind: str, episodes: int = 64) -> float:
    """Mean self-play return of an agent acting as it does as a partner (``ppo`` samples, ``vdn`` argmax), from
    start states and action draws fixed by :data:`CHECKPOINT_EVAL_SEED`."""
    gen = torch.Generator().manual_seed(CHECKPOINT_EVAL_SEED)
    with one_thread(), torch.no_grad():
        lineup = Lineup(torch.full((episodes, 2), -1, dtype=torch.long))
        return float(play(game, lineup, policy(model, kind, generator=gen), generator=gen).returns.mean())


def train_agent(game: Game, spec: PopulationSpec, seed: int) -> tuple[list[dict[str, torch.Tensor]], list[int],
                                                                       list[float]]:  # fmt: skip
    """Trains one self-play agent; returns its kept weights, the steps they were taken at and their self-play
    returns. Leaves the global RNG as it was."""
    hp = spec.train_hparams
    n = 1 if spec.checkpoints == "final" else max(1, spec.candidates)
    marks = sorted({round(i * spec.steps / n) for i in range(n + 1)} - ({0} if n == 1 else set()))
    states, returns = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_hash("partner", seed))
        model = new_agent(game, hp)
        learner = LEARNERS[spec.learner](model, hp)
        optimizer = torch.optim.Adam(list(model.parameters()) + learner.extra_parameters(), lr=hp["lr"])
        for step in range(spec.steps + 1):
            if step in marks:
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                returns.append(selfplay_return(game, model, spec.learner))
            if step < spec.steps:
                selfplay_step(game, model, learner, optimizer, spec.episodes, step)
    keep = fcp_choice(returns) if spec.checkpoints == "fcp" else (len(marks) - 1,)
    return [states[i] for i in keep], [marks[i] for i in keep], [returns[i] for i in keep]


class PolicyBank(nn.Module):
    """Frozen MLP agents (rows = agent x checkpoint) evaluated together: each row's weights act on its episodes.

    Args:
        states: ``states[a][c]`` the ``mlp`` model state dict of agent a at checkpoint c.
        kind: the learner that trained them: ``ppo`` agents sample from their logits, ``vdn`` agents act greedily.
    """

    def __init__(self, states: list[list[dict[str, torch.Tensor]]], kind: str = "ppo"):
        super().__init__()
        self.kind = kind
        self.n_agents, self.n_checkpoints = len(states), len(states[0])
        flat = [s for agent in states for s in agent]
        names = [k[: -len(".weight")] for k in flat[0] if k.endswith(".weight")]
        self.names, self.n_layers = names, len(names)
        for i, name in enumerate(names):
            self.register_buffer(f"w{i}", torch.stack([s[name + ".weight"] for s in flat]))
            self.register_buffer(f"b{i}", torch.stack([s[name + ".bias"] for s in flat]))

    def row(self, agent: torch.Tensor, checkpoint: torch.Tensor | int = -1) -> torch.Tensor:
        """Bank rows of agents at checkpoints (negative checkpoints count from the last)."""
        return agent * self.n_checkpoints + torch.as_tensor(checkpoint) % self.n_checkpoints

    def state_of(self, agent: int, checkpoint: int = -1) -> dict[str, torch.Tensor]:
        """The model state dict of one agent at one checkpoint."""
        r = int(self.row(torch.tensor(agent), checkpoint))
        out = {}
        for i, name in enumerate(self.names):
            out[name + ".weight"], out[name + ".bias"] = getattr(self, f"w{i}")[r], getattr(self, f"b{i}")[r]
        return out

    def outputs(self, rows: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Each row's network output on its observations ``(m, obs_dim)``."""
        out = torch.empty(len(rows), getattr(self, f"b{self.n_layers - 1}").shape[1])
        for r in torch.unique(rows).tolist():
            at = rows == r
            h = obs[at]
            for i in range(self.n_layers):
                h = h @ getattr(self, f"w{i}")[r].T + getattr(self, f"b{i}")[r]
                if i < self.n_layers - 1:
                    h = torch.relu(h)
            out[at] = h
        return out

    def act(self, rows: torch.Tensor, obs: torch.Tensor, greedy: bool = False,
            generator: torch.Generator | None = None) -> torch.Tensor:
        out = self.outputs(rows, obs)
        return out.argmax(-1) if greedy or self.kind == "vdn" else sample(out, generator)


def load_population(game: Game, spec: PopulationSpec) -> PolicyBank:
    """The population of ``spec``: from the cache, or trained now and cached (atomically). The bank's
    ``checkpoint_steps`` and ``checkpoint_returns`` (agent x checkpoint) say which weights were kept."""
    path = cache_dir() / f"{spec.hash[:24]}.pt"
    if path.exists():
        data = torch.load(path, weights_only=True)
    else:
        trained = [train_agent(game, spec, s) for s in spec.seeds]
        data = {"spec": canonical_json(spec.to_dict()), "states": [t[0] for t in trained],
                "steps": [t[1] for t in trained], "returns": [t[2] for t in trained]}  # fmt: skip
        atomic_write(path, lambda f: torch.save(data, f), mode="wb")
    bank = PolicyBank(data["states"], spec.learner)
    bank.checkpoint_steps, bank.checkpoint_returns = data["steps"], data["returns"]
    return bank
