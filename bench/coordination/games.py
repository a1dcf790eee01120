"""Two-player, fully cooperative games, batched over episodes in torch, with a PettingZoo-style wrapper.

A :class:`Game` steps ``n`` episodes at once: ``reset(n)`` returns a state (a dict of tensors), ``observe(state)``
the per-agent observations ``(n, 2, obs_dim)``, ``step(state, actions)`` the next state, the shared reward ``(n,)``
and whether each episode has ended. :class:`ParallelEnv` exposes one episode through PettingZoo's parallel API
(``reset(seed) -> observations, infos``; ``step(actions) -> observations, rewards, terminations, truncations,
infos``, all dicts keyed by agent name), for users and tests; training uses the batched form.

A game also knows its symmetries (relabellings of equivalent states and actions that leave the game unchanged,
Other-Play's Φ): ``sample_symmetries`` draws, per episode, an observation permutation ``obs_perm`` and an action
permutation ``act_perm`` such that the observation of the transformed state is ``obs[..., obs_perm]`` and the
transformed action of ``a`` is ``act_perm[a]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch

State = dict[str, torch.Tensor]
AGENTS: tuple[str, str] = ("player_0", "player_1")


class Game:
    """A two-player common-payoff Markov game over batches of episodes.

    Attributes:
        obs_dim: length of each agent's observation vector.
        n_actions: number of discrete actions per agent.
        horizon: maximum episode length (episodes end earlier on success).
        optimum: the best expected return a pair of agents can reach (normalises returns to [0, 1]).
    """

    name: ClassVar[str] = "game"
    obs_dim: int
    n_actions: int
    horizon: int
    optimum: float

    def spec(self) -> dict[str, Any]:
        """Everything that defines the game (hashed into population caches and data versions)."""
        raise NotImplementedError

    def reset(self, n: int, generator: torch.Generator | None = None) -> State:
        raise NotImplementedError

    def observe(self, state: State) -> torch.Tensor:
        """Observations ``(n, 2, obs_dim)`` float32."""
        raise NotImplementedError

    def step(self, state: State, actions: torch.Tensor) -> tuple[State, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Applies ``actions`` ``(n, 2)``; returns (next state, reward ``(n,)``, terminated ``(n,)``, truncated
        ``(n,)``): an episode ends when either is set; truncated means the horizon ran out first."""
        raise NotImplementedError

    def outcome(self, state: State, actions: torch.Tensor, seat: torch.Tensor) -> torch.Tensor:
        """A per-episode label of what the episode converged on (a lever, a meeting cell), -1 for none; called
        after every step with that step's actions and the seat the evaluated agent plays; the last call of an
        episode counts."""
        raise NotImplementedError

    def sample_symmetries(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` symmetries drawn uniformly: (obs_perm ``(n, obs_dim)``, act_perm ``(n, n_actions)``) int64."""
        raise NotImplementedError

    def heldout_baseline(self) -> Fraction | None:
        """The expected return of a best response to independently seeded self-play partners, where the game
        alone decides it (None where it depends on what the partners learned)."""
        return None


def invert(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutations along the last axis."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm))
    return inv


class LeverGame(Game):
    """The lever game of Other-Play (Hu, Lerer, Peysakhovich & Foerster, "'Other-Play' for Zero-Shot Coordination",
    ICML 2020, section 3): each player pulls one of ten levers; both get the lever's payoff if they pull the same one,
    else nothing. Nine levers pay 1.0 and one pays 0.9. One step, no observation (a constant 1).

    Exactly solvable: self-play optima pull one 1.0 lever (return 1.0); two optima picked independently match with
    probability 1/9; the only optimum invariant to relabelling the 1.0 levers pulls the 0.9 lever (0.9 with anyone
    who does the same).
    """

    name = "lever"

    def __init__(self, payoffs: tuple[float, ...] = (1.0,) * 9 + (0.9,)):
        self.payoffs = torch.tensor(payoffs, dtype=torch.float32)
        self.obs_dim, self.n_actions, self.horizon = 1, len(payoffs), 1
        self.optimum = float(self.payoffs.max())
        # Symmetries permute levers of equal payoff among themselves.
        self._classes = [torch.nonzero(self.payoffs == v).flatten() for v in torch.unique(self.payoffs)]

    def spec(self):
        return {"game": self.name, "payoffs": self.payoffs.tolist()}

    def heldout_baseline(self) -> Fraction:
        """The most any policy earns in expectation with a self-play partner trained from an independent seed:
        such a partner pulls one lever of the best payoff, and since relabelling those levers leaves the game and
        the training distribution unchanged, each is equally likely. A policy pulling lever a then earns
        payoff(a) · P(partner pulls a) = max payoff / (number of best levers) for a best lever and 0 for any other,
        and a mixture earns the average: 1/9 on the standard game, the ceiling of a best response to self-play
        partners (Fictitious Co-Play's) against Other-Play's 0.9. Exact, from the payoffs' decimal forms."""
        exact = [Fraction(str(p)) for p in self.payoffs.tolist()]
        best = max(exact)
        return best / sum(1 for p in exact if p == best)

    def reset(self, n, generator=None):
        return {"t": torch.zeros(n, dtype=torch.long)}

    def observe(self, state):
        return torch.ones(len(state["t"]), 2, 1)

    def step(self, state, actions):
        same = actions[:, 0] == actions[:, 1]
        reward = torch.where(same, self.payoffs[actions[:, 0]], torch.zeros(()))
        n = len(actions)
        return {"t": state["t"] + 1}, reward, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)

    def outcome(self, state, actions, seat):
        return actions.gather(1, seat[:, None])[:, 0]

    def sample_symmetries(self, n, generator=None):
        act = torch.arange(self.n_actions).repeat(n, 1)
        for cls in self._classes:
            order = torch.rand(n, len(cls), generator=generator).argsort(1)
            act[:, cls] = cls[order]
        return torch.zeros(n, 1, dtype=torch.long), act


# Moves of the grid: stay, up, down, left, right, as (dx, dy) with y growing downwards.
MOVES = torch.tensor([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]])


def _d4() -> list[tuple[np.ndarray, np.ndarray]]:
    """The eight symmetries of a square: (linear map on centred coordinates, action permutation)."""
    out = []
    for k in range(4):
        rot = np.linalg.matrix_power(np.array([[0, -1], [1, 0]]), k)
        for flip in (np.eye(2, dtype=int), np.array([[-1, 0], [0, 1]])):
            m = rot @ flip
            moves = MOVES.numpy()
            act = np.array([int(np.flatnonzero((moves == m @ d).all(1))[0]) for d in moves])
            out.append((m, act))
    return out


class Rendezvous(Game):
    """A partially observable gridworld where two agents must meet on the same goal cell.

    A ``size`` x ``size`` open grid whose goal cells are the four corners (payoff 1.0 each). Agents start on
    distinct random non-goal cells, move
    (stay / up / down / left / right, walls block) simultaneously, may share a cell, and are paid the goal's
    payoff, once, when both stand on the same goal cell; the episode then ends, or after ``horizon`` steps with 0.

    Each agent observes a frame of the present and of each of the last ``memory`` steps (a frame stack, all zero
    before the episode began): its own cell (one-hot) and its partner's offset when the partner is within ``view``
    cells in both axes (one-hot over the (2·view+1)² window, all zero otherwise); then the elapsed fraction of the
    horizon. With ``view`` >= size - 1 the partner is always seen, and the stack shows where it is heading, which
    is what a partner must read to adapt to a convention it has not met. The corners are interchangeable under the
    square's eight rotations and reflections, which act on cells, offsets and moves alike: self-play settles on an
    arbitrary corner, as it settles on an arbitrary lever.
    """

    name = "rendezvous"

    def __init__(self, size: int = 5, horizon: int = 12, view: int = 1, memory: int = 0):
        if size < 3 or horizon < 1 or view < 0 or memory < 0:
            raise ValueError(f"need size >= 3, horizon >= 1, view >= 0, memory >= 0 (got {size}, {horizon}, {view}, "
                             f"{memory})")  # fmt: skip
        self.size, self.horizon, self.view, self.memory = size, horizon, view, memory
        s, w = size, 2 * view + 1
        self.n_actions = len(MOVES)
        self.frame_dim = s * s + w * w
        self.obs_dim = (memory + 1) * self.frame_dim + 1
        payoff = torch.zeros(s, s)
        for x, y in ((0, 0), (0, s - 1), (s - 1, 0), (s - 1, s - 1)):
            payoff[x, y] = 1.0
        self.payoff = payoff.flatten()  # cell index x * size + y
        self.optimum = float(self.payoff.max())
        self._starts = torch.nonzero(self.payoff == 0).flatten()
        self._symmetries = self._symmetry_perms()

    def spec(self):
        spec = {"game": self.name, "size": self.size, "horizon": self.horizon, "view": self.view}
        return {**spec, "memory": self.memory} if self.memory else spec  # memoryless games keep their old hash

    def _symmetry_perms(self) -> tuple[torch.Tensor, torch.Tensor]:
        s, v = self.size, self.view
        c = (s - 1) / 2
        obs_perms, act_perms = [], []
        for m, act in _d4():
            cell = np.empty(s * s, dtype=np.int64)  # cell[g(i)] = i: the observation of g(state) is obs[cell]
            for x in range(s):
                for y in range(s):
                    gx, gy = (m @ np.array([x - c, y - c]) + c).round().astype(int)
                    cell[gx * s + gy] = x * s + y
            w = 2 * v + 1
            off = np.empty(w * w, dtype=np.int64)
            for dx in range(-v, v + 1):
                for dy in range(-v, v + 1):
                    gx, gy = m @ np.array([dx, dy])
                    off[(gx + v) * w + (gy + v)] = (dx + v) * w + (dy + v)
            frame = np.concatenate([cell, s * s + off])
            frames = [k * self.frame_dim + frame for k in range(self.memory + 1)]
            obs_perms.append(np.concatenate(frames + [[self.obs_dim - 1]]))
            act_perms.append(act)
        return torch.as_tensor(np.stack(obs_perms)), torch.as_tensor(np.stack(act_perms))

    def reset(self, n, generator=None):
        k = len(self._starts)
        a = torch.randint(k, (n,), generator=generator)
        b = (a + 1 + torch.randint(k - 1, (n,), generator=generator)) % k  # a different start cell
        pos = torch.stack([self._starts[a], self._starts[b]], 1)
        past = torch.full((n, self.memory, 2), -1, dtype=torch.long)  # -1: before the episode began
        return {"pos": pos, "t": torch.zeros(n, dtype=torch.long), "past": past}

    def _frame(self, pos: torch.Tensor) -> torch.Tensor:
        """``(n, 2, frame_dim)``: own cell and partner offset of positions ``(n, 2)`` (zero where -1)."""
        n, s, v = len(pos), self.size, self.view
        w = 2 * v + 1
        real = (pos >= 0).all(1)[:, None]
        pos = pos.clamp(min=0)
        frame = torch.zeros(n, 2, self.frame_dim)
        frame.scatter_(2, pos[:, :, None], real[:, :, None].float().expand(n, 2, 1))
        x, y = pos // s, pos % s
        dx, dy = x.flip(1) - x, y.flip(1) - y  # partner minus self
        seen = (dx.abs() <= v) & (dy.abs() <= v) & real
        slot = s * s + (dx + v).clamp(0, w - 1) * w + (dy + v).clamp(0, w - 1)
        frame.scatter_(2, slot[:, :, None], seen[:, :, None].float())
        return frame

    def observe(self, state):
        frames = [self._frame(state["pos"])] + [self._frame(state["past"][:, k]) for k in range(self.memory)]
        t = (state["t"].float() / self.horizon)[:, None, None].expand(-1, 2, 1)
        return torch.cat(frames + [t], 2)

    def step(self, state, actions):
        s = self.size
        pos = state["pos"]
        x = (pos // s + MOVES[actions, 0]).clamp(0, s - 1)
        y = (pos % s + MOVES[actions, 1]).clamp(0, s - 1)
        new = x * s + y
        t = state["t"] + 1
        met = (new[:, 0] == new[:, 1]) & (self.payoff[new[:, 0]] > 0)
        reward = torch.where(met, self.payoff[new[:, 0]], torch.zeros(()))
        past = torch.cat([pos[:, None], state["past"][:, :-1]], 1) if self.memory else state["past"]
        return {"pos": new, "t": t, "past": past}, reward, met, ~met & (t >= self.horizon)

    def outcome(self, state, actions, seat):
        pos = state["pos"]
        met = (pos[:, 0] == pos[:, 1]) & (self.payoff[pos[:, 0]] > 0)
        return torch.where(met, pos[:, 0], torch.full_like(pos[:, 0], -1))

    def sample_symmetries(self, n, generator=None):
        pick = torch.randint(len(self._symmetries[0]), (n,), generator=generator)
        return self._symmetries[0][pick], self._symmetries[1][pick]

    def transform(self, state: State, index: int) -> State:
        """The state mapped by symmetry ``index`` (for tests of equivariance)."""
        to = invert(self._symmetries[0][index, : self.size**2])
        past = torch.where(state["past"] >= 0, to[state["past"].clamp(min=0)], state["past"])
        return {"pos": to[state["pos"]], "t": state["t"], "past": past}


# ------------------------------------------------------------------------------------------- PettingZoo-style API


@dataclass(frozen=True)
class Discrete:
    """A finite action space {0, ..., n-1} (the fields of gymnasium's ``Discrete`` that matter here)."""

    n: int


@dataclass(frozen=True)
class Box:
    """A real vector observation space."""

    low: float
    high: float
    shape: tuple[int, ...]


class ParallelEnv:
    """One episode of a :class:`Game` through PettingZoo's parallel API (dicts keyed by agent name).

    Args:
        game: the game to play.
    """

    possible_agents: list[str] = list(AGENTS)

    def __init__(self, game: Game):
        self.game = game
        self.agents: list[str] = []
        self._state: State | None = None
        self._generator = torch.Generator()

    def observation_space(self, agent: str) -> Box:
        return Box(0.0, 1.0, (self.game.obs_dim,))

    def action_space(self, agent: str) -> Discrete:
        return Discrete(self.game.n_actions)

    def _observations(self) -> dict[str, np.ndarray]:
        obs = self.game.observe(self._state)[0].numpy()
        return {a: obs[i] for i, a in enumerate(AGENTS)}

    def reset(self, seed: int | None = None, options: dict | None = None):
        """Starts an episode; returns (observations, infos)."""
        if seed is not None:
            self._generator.manual_seed(seed)
        self._state = self.game.reset(1, self._generator)
        self.agents = list(AGENTS)
        return self._observations(), {a: {} for a in AGENTS}

    def step(self, actions: dict[str, int]):
        """Applies one action per live agent; returns (observations, rewards, terminations, truncations, infos)."""
        if not self.agents:
            raise RuntimeError("the episode has ended; call reset() first")
        missing = [a for a in AGENTS if a not in actions]
        if missing:
            raise ValueError(f"step() needs an action for every agent; missing {missing}")
        joint = torch.tensor([[int(actions[a]) for a in AGENTS]])
        if (joint < 0).any() or (joint >= self.game.n_actions).any():
            raise ValueError(f"actions must lie in 0..{self.game.n_actions - 1}, got {actions}")
        self._state, reward, terminated, truncated = self.game.step(self._state, joint)
        r, term, trunc = float(reward[0]), bool(terminated[0]), bool(truncated[0])
        obs = self._observations()
        if term or trunc:
            self.agents = []  # PettingZoo empties the live agents when the episode is over
        return (obs, {a: r for a in AGENTS}, {a: term for a in AGENTS}, {a: trunc for a in AGENTS},
                {a: {} for a in AGENTS})
