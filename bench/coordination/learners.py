"""Playing batches of episodes, and the two learners: PPO with parameter sharing, and independent Q-learning with VDN.

Both learners train one network (the trial's model: observation -> policy logits or Q-values) that every
learner-controlled seat shares, and keep whatever else they need (a value head, a target network) as submodules,
so the trainer's checkpoints hold all of it. Randomness during training comes from torch's global generator (which
the trainer checkpoints); evaluation passes its own seeded generator.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .games import Game, invert

Act = Callable[[torch.Tensor], torch.Tensor]
"""obs ``(m, obs_dim)`` -> actions ``(m,)``."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs torch ops single-threaded for the duration (then restores the count).

    Games step batches of small tensors, where intra-op threads only add synchronisation: a rendezvous self-play
    step took 0.36 s with 2 threads against 0.04 s with 1 on a loaded 2-core machine.
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


@dataclass
class Lineup:
    """Who plays each seat of ``n`` episodes, and through which relabelling.

    Attributes:
        row: ``(n, 2)`` int64: -1 for the learner, otherwise a row of the partner bank.
        obs_perm: ``(n, 2, obs_dim)`` observation permutations per seat (Other-Play's relabelling), or None.
        act_perm: ``(n, 2, n_actions)`` matching action permutations, or None.
    """

    row: torch.Tensor
    obs_perm: torch.Tensor | None = None
    act_perm: torch.Tensor | None = None

    @property
    def learner_seats(self) -> torch.Tensor:
        return self.row < 0


@dataclass
class Rollout:
    """``T`` steps of ``n`` episodes, as the acting networks saw them (relabelled observations and actions).

    Attributes:
        obs: ``(T, n, 2, obs_dim)``.
        act: ``(T, n, 2)`` int64.
        reward: ``(T, n)`` shared reward, zero after an episode's end.
        alive: ``(T, n)`` bool: step t was played.
        returns: ``(n,)`` episode returns.
        outcome: ``(n,)`` int64: the game's label of what each episode ended on (-1: nothing).
    """

    obs: torch.Tensor
    act: torch.Tensor
    reward: torch.Tensor
    alive: torch.Tensor
    returns: torch.Tensor
    outcome: torch.Tensor


def selfplay_lineup(game: Game, n: int, relabel: bool = False) -> Lineup:
    """``n`` episodes of the learner with itself; with ``relabel``, seat 1 plays through a symmetry drawn uniformly
    per episode (Other-Play's partner φ(π)). Draws from torch's global generator."""
    lineup = Lineup(torch.full((n, 2), -1, dtype=torch.long))
    if relabel:
        obs_perm, act_perm = game.sample_symmetries(n)
        lineup.obs_perm = torch.stack([torch.arange(game.obs_dim).expand(n, -1), obs_perm], 1)
        lineup.act_perm = torch.stack([torch.arange(game.n_actions).expand(n, -1), act_perm], 1)
    return lineup


def play(game: Game, lineup: Lineup, learner: Act, partners: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
         | None = None, generator: torch.Generator | None = None, seat: torch.Tensor | None = None,
         state: dict | None = None, explore: float = 0.0) -> Rollout:
    """Plays ``len(lineup.row)`` episodes to their end.

    Args:
        game: the game.
        lineup: who plays each seat.
        learner: the learner's action function (sampling, greedy or epsilon-greedy as the caller wants).
        partners: ``(rows, obs) -> actions`` for bank seats; needed when ``lineup.row`` has any row >= 0.
        generator: source of the game's own randomness (start states) and of team exploration; None: torch's
            global generator.
        seat: ``(n,)`` the seat whose outcome is recorded (default 0).
        state: start states (default: ``game.reset``).
        explore: team exploration: at each step of each episode, with this probability every learner seat takes
            the same uniformly random action (in its own, possibly relabelled, frame) instead of its own choice.

    Returns:
        The rollout.
    """
    n = len(lineup.row)
    state = game.reset(n, generator) if state is None else state
    mine = lineup.learner_seats
    inv = invert(lineup.act_perm) if lineup.act_perm is not None else None
    seat = torch.zeros(n, dtype=torch.long) if seat is None else seat
    obs_t, act_t, rew_t, alive_t = [], [], [], []
    alive = torch.ones(n, dtype=torch.bool)
    outcome = torch.full((n,), -1, dtype=torch.long)
    for _ in range(game.horizon):
        obs = game.observe(state)
        if lineup.obs_perm is not None:
            obs = obs.gather(2, lineup.obs_perm)
        act = torch.empty(n, 2, dtype=torch.long)
        if mine.any():
            act[mine] = learner(obs[mine])
            if explore > 0:
                team = torch.rand(n, generator=generator) < explore
                joint = torch.randint(game.n_actions, (n,), generator=generator)
                act = torch.where(team[:, None] & mine, joint[:, None], act)
        if (~mine).any():
            act[~mine] = partners(lineup.row[~mine], obs[~mine])
        executed = inv.gather(2, act[:, :, None])[:, :, 0] if inv is not None else act
        state, reward, terminated, truncated = game.step(state, executed)
        outcome = torch.where(alive, game.outcome(state, executed, seat), outcome)
        obs_t.append(obs), act_t.append(act), rew_t.append(reward * alive), alive_t.append(alive)
        alive = alive & ~(terminated | truncated)
        if not alive.any():
            break
    reward = torch.stack(rew_t)
    return Rollout(torch.stack(obs_t), torch.stack(act_t), reward, torch.stack(alive_t), reward.sum(0), outcome)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.multinomial(logits.float().softmax(-1), 1, generator=generator)[:, 0]


def policy(model: nn.Module, kind: str, greedy: bool = False, generator: torch.Generator | None = None) -> Act:
    """How a trained network acts: ``ppo`` networks give logits (sampled, or argmax when ``greedy``); ``vdn``
    networks give Q-values (always argmax: VDN explores through :func:`play`'s ``explore``). Observations and
    actions live on the CPU."""
    device = next(model.parameters()).device

    def act(obs: torch.Tensor) -> torch.Tensor:
        out = model(obs.to(device)).float().cpu()
        return sample(out, generator) if kind == "ppo" and not greedy else out.argmax(-1)

    return act


def _to(device: torch.device, roll: Rollout, trained: torch.Tensor, weights: torch.Tensor | None):
    if device.type == "cpu":
        return roll, trained, weights
    moved = Rollout(*(getattr(roll, f).to(device) for f in ("obs", "act", "reward", "alive", "returns", "outcome")))
    return moved, trained.to(device), None if weights is None else weights.to(device)


def _clip(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


class Learner(nn.Module):
    """How a shared network acts and learns from rollouts; subclasses hold their extra modules."""

    NAME: ClassVar[str] = ""

    def __init__(self, model: nn.Module, hparams: dict):
        super().__init__()
        self.hparams = hparams

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters besides the model's that the optimizer trains."""
        return []

    def acting(self, model: nn.Module, step: int | None, greedy: bool = False,
               generator: torch.Generator | None = None) -> Act:
        """The action function at training ``step``, or for evaluation (step None)."""
        raise NotImplementedError

    def exploration(self, step: int) -> float:
        """The team-exploration probability :func:`play` applies at training ``step``."""
        return 0.0

    def train_on(self, model: nn.Module, optimizer: torch.optim.Optimizer, roll: Rollout, trained: torch.Tensor,
                 step: int, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Optimises on ``roll``, using the seats where ``trained`` ``(n, 2)`` is set; ``weights`` ``(n,)`` weigh
        episodes (mean 1). Returns detached scalars, ``loss`` first."""
        raise NotImplementedError


class PPO(Learner):
    """Proximal policy optimisation (Schulman et al., "Proximal Policy Optimization Algorithms", 2017): clipped
    surrogate ``min(ρA, clip(ρ, 1±ε)A)``, GAE(γ, λ) advantages (Schulman et al., 2016), a value head on the shared
    features, an entropy bonus. Every learner seat shares the network (parameter sharing, as in MAPPO/IPPO; Yu et
    al., 2022); each step collects fresh episodes and takes ``ppo_epochs`` full-batch gradient steps on them.

    The policy's output layer starts at zero, so the initial policy is uniform (a near-zero last layer is one of
    the choices that matter in Andrychowicz et al., "What Matters in On-Policy Reinforcement Learning?", ICLR
    2021): an untrained partner is then a random walker, not an arbitrary convention."""

    NAME = "ppo"

    def __init__(self, model, hparams):
        super().__init__(model, hparams)
        self.value = nn.Linear(model.featurizer.n_outputs, 1)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()

    def extra_parameters(self):
        return list(self.value.parameters())

    def acting(self, model, step, greedy=False, generator=None):
        return policy(model, "ppo", greedy, generator)

    def _heads(self, model, obs):
        feats = model.featurizer(obs)
        return model.head(feats).float(), self.value(feats)[..., 0].float()

    def train_on(self, model, optimizer, roll, trained, step, weights=None):
        h = self.hparams
        gamma, lam = float(h["gamma"]), float(h["gae_lambda"])
        roll, trained, weights = _to(next(model.parameters()).device, roll, trained, weights)
        t_len, n = roll.reward.shape
        d = roll.obs.shape[-1]
        with torch.no_grad():
            logits, value = self._heads(model, roll.obs.reshape(-1, d))
            logits, value = logits.reshape(t_len, n, 2, -1), value.reshape(t_len, n, 2)
            logp_old = logits.log_softmax(-1).gather(-1, roll.act[..., None])[..., 0]
            live = roll.alive[..., None].float()
            adv = torch.zeros_like(value)
            running = torch.zeros(n, 2, device=value.device)
            for t in reversed(range(t_len)):
                nxt = value[t + 1] * live[t + 1] if t + 1 < t_len else torch.zeros(n, 2, device=value.device)
                cont = live[t + 1] if t + 1 < t_len else torch.zeros(n, 1, device=value.device)
                delta = roll.reward[t][:, None] + gamma * nxt - value[t]
                running = delta + gamma * lam * cont * running
                adv[t] = running
            ret = adv + value
        sel = roll.alive[..., None] & trained[None]
        obs, act, adv, ret, logp_old = roll.obs[sel], roll.act[sel], adv[sel], ret[sel], logp_old[sel]
        w = torch.ones(len(act), device=act.device) if weights is None else weights[None, :, None].expand_as(sel)[sel]
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv
        clip = float(h["ppo_clip"])
        for _ in range(int(h["ppo_epochs"])):
            logits, value = self._heads(model, obs)
            logp_all = logits.log_softmax(-1)
            ratio = (logp_all.gather(-1, act[:, None])[:, 0] - logp_old).exp()
            surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            policy_loss = -(w * surrogate).mean()
            value_loss = (w * (value - ret) ** 2).mean()
            loss = policy_loss + float(h["value_coef"]) * value_loss - float(h["entropy_coef"]) * (w * entropy).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _clip(optimizer, float(h["max_grad_norm"]))
            optimizer.step()
        return {"loss": loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy.mean().detach()}


class VDN(Learner):
    """Independent Q-learning with value decomposition (Sunehag et al., "Value-Decomposition Networks For
    Cooperative Multi-Agent Learning", AAMAS 2018): the team value is the sum of the learner seats' Q(o_i, a_i),
    regressed (Huber) on r + γ Σ_i max_a Q_target(o_i', a); each agent then acts greedily on its own Q
    (centralised training, decentralised execution). The shared network is the trial's model; the target network is
    a copy refreshed every ``vdn_target_every`` steps. No replay: each step learns from the fresh batch of episodes,
    ``vdn_epochs`` gradient steps.

    Exploration is by the team (:func:`play`'s ``explore`` = ``vdn_epsilon``): at a step, with that probability,
    every learner seat takes the same random action in its own frame, so self-play explores joint conventions
    rather than unilateral deviations (a single player trying a new lever is never paid, since its partner is
    elsewhere). This is what lets Other-Play find the lever game's 0.9 lever: pulled by both seats, it pays 0.9
    under any relabelling, while a 1.0 lever pays 1/9; with independent epsilon-greedy exploration a joint trial of
    the 0.9 lever is rare and the learner settles on a 1.0 lever in many seeds. With one learner seat (playing a
    fixed partner) it is plain epsilon-greedy exploration."""

    NAME = "vdn"

    def __init__(self, model, hparams):
        super().__init__(model, hparams)
        if not any(True for _ in model.featurizer.parameters()):
            # A table (no hidden layer, the lever game): PyTorch's default output layer starts its Q-values in ±2,
            # twice the largest payoff. Shrunk to ±0.02, the first greedy choices are still random (self-play seeds
            # still break the symmetry), but a choice that does not pay is unlearned in a few updates, not a hundred.
            with torch.no_grad():
                model.head.weight.mul_(0.01)
                model.head.bias.mul_(0.01)
        self.target = copy.deepcopy(model)
        self.target.requires_grad_(False)

    def acting(self, model, step, greedy=False, generator=None):
        return policy(model, "vdn", generator=generator)

    def exploration(self, step):
        return float(self.hparams["vdn_epsilon"])

    def train_on(self, model, optimizer, roll, trained, step, weights=None):
        h = self.hparams
        if step % int(h["vdn_target_every"]) == 0:
            self.target.load_state_dict(model.state_dict())
        roll, trained, weights = _to(next(model.parameters()).device, roll, trained, weights)
        t_len, n = roll.reward.shape
        d = roll.obs.shape[-1]
        mask = trained[None].float()
        live = roll.alive.float()
        with torch.no_grad():
            q_next = self.target(roll.obs.reshape(-1, d)).float().max(-1).values.reshape(t_len, n, 2)
            nxt = torch.zeros(t_len, n, device=q_next.device)
            nxt[:-1] = (q_next[1:] * mask).sum(-1) * live[1:]
            target = roll.reward + float(h["gamma"]) * nxt
        w = torch.ones(n, device=live.device) if weights is None else weights
        w = (w[None] * live).flatten()
        for _ in range(int(h["vdn_epochs"])):
            q = model(roll.obs.reshape(-1, d)).float().reshape(t_len, n, 2, -1)
            q_tot = (q.gather(-1, roll.act[..., None])[..., 0] * mask).sum(-1)
            td = F.smooth_l1_loss(q_tot.flatten(), target.flatten(), reduction="none")
            loss = (w * td).sum() / live.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _clip(optimizer, float(h["max_grad_norm"]))
            optimizer.step()
        return {"loss": loss.detach(), "q_mean": (q.detach().max(-1).values * mask).sum(-1).mean()}


LEARNERS: dict[str, type[Learner]] = {c.NAME: c for c in (PPO, VDN)}
