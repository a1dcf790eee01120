"""Input-space attacks, generic over a task's continuous inputs (``Task.input_keys``) and a valid input range.

* **PGD** (projected gradient descent; Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018): from a random start in the ε-ball, ``steps`` ascent steps on the
  per-example loss (the sign of the gradient for L∞, the unit-L2 gradient for L2), each followed by projection onto
  the ε-ball and clipping to the valid range. The default step size is 2.5·ε/steps (Madry et al.'s rule: enough
  steps of that size reach the ball's boundary from any start).
* **spatial** (Engstrom, Tran, Tsipras, Schmidt & Madry, "Exploring the Landscape of Spatial Robustness", ICML
  2019): the worst of ``k`` random rotations (±``max_rotation`` degrees) and translations (±``max_shift`` of the
  image side) per example, resampled bilinearly with zero fill; their defaults (±30°, ±3 of 28–32 pixels ≈ 10%,
  worst-of-10) are ours. Needs image inputs (N, C, H, W).

Every input key is perturbed, each within its own ε-ball (for a preference pair: the chosen and the rejected
response). With ``restarts`` > 1 each example keeps the attempt that fools the model, else the one with the highest
loss, so accuracy under attack counts an example correct only if no attempt fooled it.

The clean inputs must lie in the valid range; then clipping keeps every perturbation inside its ε-ball (clipping
toward a point of the box only shortens each coordinate's move).

Written for this project: torchattacks pins an old ``requests`` and AutoAttack is not on PyPI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .data import Batch
from .errors import UserError
from .tasks import Task

ScoresFn = Callable[[Batch], torch.Tensor]
JudgeFn = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]
"""A batch's per-example (loss, correct) under the model."""
THREATS = ("linf", "l2", "spatial")


@dataclass(frozen=True)
class Threat:
    """What an attack may do to an input.

    Attributes:
        kind: ``linf`` or ``l2`` (PGD in that ε-ball) or ``spatial`` (worst of k rotations/translations).
        eps: radius of the ε-ball (PGD only).
        steps: PGD ascent steps.
        step_size: PGD step; None means 2.5·eps/steps.
        restarts: independent attempts per example (PGD random starts, or k more spatial draws).
        random_start: PGD starts from a uniform point of the ε-ball (else from the clean input).
        bounds: valid input range ``(lo, hi)`` every perturbed input is clipped to; None: unbounded.
        max_rotation: spatial: largest rotation in degrees, either way.
        max_shift: spatial: largest translation per axis, as a fraction of the image side.
        k: spatial: random transforms tried per attempt.
    """

    kind: str = "linf"
    eps: float = 0.1
    steps: int = 7
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    bounds: tuple[float, float] | None = (0.0, 1.0)
    max_rotation: float = 30.0
    max_shift: float = 0.1
    k: int = 10

    def __post_init__(self) -> None:
        if self.kind not in THREATS:
            raise UserError(f"unknown threat {self.kind!r}: use one of {', '.join(THREATS)}")
        if not (self.eps >= 0 and self.steps >= 0 and self.restarts >= 1 and self.k >= 1):
            raise UserError(f"threat {self.kind}: eps and steps must be >= 0, restarts and k >= 1 (got {self})")
        if self.bounds is not None and not self.bounds[0] < self.bounds[1]:
            raise UserError(f"threat bounds {self.bounds} must be (lo, hi) with lo < hi")

    @property
    def alpha(self) -> float:
        """The PGD step size."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / max(self.steps, 1)

    def describe(self) -> dict[str, float | int | str]:
        """The settings that matter for this kind, for records."""
        if self.kind == "spatial":
            return {"threat": "spatial", "max_rotation": self.max_rotation, "max_shift": self.max_shift, "k": self.k,
                    "restarts": self.restarts}
        return {"threat": self.kind, "eps": self.eps, "steps": self.steps, "step_size": self.alpha,
                "restarts": self.restarts, "random_start": int(self.random_start)}


def parse_bounds(text: str) -> tuple[float, float] | None:
    """``"0:1"`` -> (0.0, 1.0); ``"none"`` -> None (unbounded)."""
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"input bounds {text!r} must be 'lo:hi' (e.g. 0:1) or 'none'") from None
    return lo, hi


# ------------------------------------------------------------------------------------------------------ geometry


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The nearest point of the ε-ball (per example) to ``delta``."""
    if kind == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta)).clamp(max=1.0)


def _clip(x: torch.Tensor, bounds: tuple[float, float] | None) -> torch.Tensor:
    return x if bounds is None else x.clamp(*bounds)


def random_in_ball(like: torch.Tensor, kind: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform draw from the ε-ball per example (L2: a uniform direction times ε·U^(1/d))."""
    if kind == "linf":
        return (2 * torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype) - 1) * eps
    d = like[0].numel()
    direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    u = torch.rand(len(like), generator=generator, device=like.device, dtype=like.dtype)
    radius = eps * u.pow(1.0 / d).view(-1, *([1] * (like.dim() - 1)))
    return direction / _flat_norm(direction) * radius


# ------------------------------------------------------------------------------------------------------- attacks


def _with(batch: Batch, inputs: dict[str, torch.Tensor]) -> Batch:
    return {**batch, **inputs}


def pgd(loss_fn: Callable[[Batch], torch.Tensor], batch: Batch, keys: tuple[str, ...], threat: Threat,
        generator: torch.Generator | None = None) -> Batch:
    """One PGD attempt: ``batch`` with every ``keys`` entry moved to (locally) maximise ``loss_fn(batch).sum()``.

    Args:
        loss_fn: per-example losses (N,) of a batch; differentiable in its inputs.
        batch: the clean batch.
        keys: the continuous inputs to perturb.
        threat: a ``linf`` or ``l2`` threat.
        generator: source of the random start (None: torch's global generator).

    Returns:
        A new batch (detached inputs); other entries are shared with ``batch``.
    """
    clean = {k: batch[k].detach() for k in keys}
    delta = {k: random_in_ball(v, threat.kind, threat.eps, generator) if threat.random_start else torch.zeros_like(v)
             for k, v in clean.items()}
    delta = {k: _clip(clean[k] + d, threat.bounds) - clean[k] for k, d in delta.items()}
    for _ in range(threat.steps):
        for d in delta.values():
            d.requires_grad_(True)
        loss = loss_fn(_with(batch, {k: clean[k] + d for k, d in delta.items()})).sum()
        grads = torch.autograd.grad(loss, list(delta.values()))
        with torch.no_grad():
            for (k, d), g in zip(list(delta.items()), grads):
                step = g.sign() if threat.kind == "linf" else g / _flat_norm(g)
                moved = project(d + threat.alpha * step, threat.kind, threat.eps)
                delta[k] = _clip(clean[k] + moved, threat.bounds) - clean[k]
    return _with(batch, {k: (clean[k] + d).detach() for k, d in delta.items()})


def _transform(x: torch.Tensor, angle_deg: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates (counter-clockwise, degrees) and translates (fraction of the side, per axis) every image."""
    a = torch.deg2rad(angle_deg)
    c, s = torch.cos(a), torch.sin(a)
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of f of the side is 2f normalised units
    theta = torch.stack([torch.stack([c, -s, -2 * shift[:, 0]], -1), torch.stack([s, c, -2 * shift[:, 1]], -1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def spatial(judge_fn: JudgeFn, batch: Batch, keys: tuple[str, ...], threat: Threat,
            generator: torch.Generator | None = None) -> Batch:
    """One worst-of-k attempt: per example, the random rotation + translation that fools the model, else the one
    with the highest loss. The same transform is applied to every input key of an example."""
    for k in keys:
        if batch[k].dim() != 4:
            raise UserError(f"the spatial threat needs image inputs (N, C, H, W); {k!r} has shape "
                            f"{tuple(batch[k].shape)}: use threat linf or l2")
    ref = batch[keys[0]]
    best: tuple[Batch, torch.Tensor, torch.Tensor] | None = None
    with torch.no_grad():
        for _ in range(threat.k):
            u = torch.rand(len(ref), 3, generator=generator, device=ref.device, dtype=ref.dtype)
            angle = (2 * u[:, 0] - 1) * threat.max_rotation
            shift = (2 * u[:, 1:] - 1) * threat.max_shift
            cand = _with(batch, {k: _clip(_transform(batch[k], angle, shift), threat.bounds) for k in keys})
            best = _keep_worse(best, cand, *judge_fn(cand), keys)
    return best[0]


def _keep_worse(best: tuple[Batch, torch.Tensor, torch.Tensor] | None, cand: Batch, loss: torch.Tensor,
                correct: torch.Tensor, keys: tuple[str, ...]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """Per example, the worse of the kept attempt and ``cand``: one that fools the model beats one that does not,
    then the higher loss wins (ties keep the earlier attempt)."""
    wrong, loss = correct.detach() < 0.5, loss.detach()
    if best is None:
        return cand, wrong, loss
    kept, kept_wrong, kept_loss = best
    take = (wrong & ~kept_wrong) | ((wrong == kept_wrong) & (loss > kept_loss))
    merged = {k: torch.where(take.view(-1, *([1] * (cand[k].dim() - 1))), cand[k], kept[k]) for k in keys}
    return _with(kept, merged), torch.where(take, wrong, kept_wrong), torch.where(take, loss, kept_loss)


def perturb(scores_fn: ScoresFn, task: Task, batch: Batch, threat: Threat,
            generator: torch.Generator | None = None) -> Batch:
    """The worst of ``threat.restarts`` attempts per example under ``threat``, on the task's input keys.

    Args:
        scores_fn: the model's scores of a batch (``task.scores(model, ·)`` or ``Algorithm.scores``); the caller
            sets train/eval mode.
        task: supplies the per-example loss and correctness.
        batch: the clean batch.
        threat: what the attack may do.
        generator: source of every random draw (None: torch's global generator).

    Returns:
        The attacked batch (inputs detached); labels and metadata are those of ``batch``.
    """
    keys = tuple(task.input_keys)

    def loss_fn(b: Batch) -> torch.Tensor:
        return task.loss(scores_fn(b), b, reduction="none").float()

    def judge_fn(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        # one forward pass gives both the loss and the correctness an attempt is ranked by
        scores = scores_fn(b)
        return task.loss(scores, b, reduction="none").float(), task.outputs(scores, b)["correct"]

    best: tuple[Batch, torch.Tensor, torch.Tensor] | None = None
    for _ in range(threat.restarts):
        if threat.kind == "spatial":
            cand = spatial(judge_fn, batch, keys, threat, generator)
        else:
            cand = pgd(loss_fn, batch, keys, threat, generator)
        if threat.restarts == 1:
            return cand
        with torch.no_grad():
            best = _keep_worse(best, cand, *judge_fn(cand), keys)
    return best[0]


def data_bounds(tensors: list[torch.Tensor]) -> tuple[float, float] | None:
    """The smallest box holding every value of ``tensors`` (a valid range for datasets that declare none)."""
    vals = [t for t in tensors if t.numel() and t.is_floating_point()]
    if not vals:
        return None
    lo, hi = min(float(t.min()) for t in vals), max(float(t.max()) for t in vals)
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) and lo < hi else None
