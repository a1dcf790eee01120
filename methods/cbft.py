"""Connectivity-based fine-tuning (CBFT): fine-tune away from the cue-trained model's mechanism."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.finetune import FineTune
from shiftbench.registry import METHODS


class Interpolated:
    """The model with other parameters (e.g. a point θ_t on a path), callable where a task calls ``model(x)``."""

    def __init__(self, model: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.model, self.params = model, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.params, (x,))


def interpolate(theta_a: dict[str, torch.Tensor], theta_b: dict[str, torch.Tensor], t) -> dict[str, torch.Tensor]:
    """θ_t = t·θ_a + (1 − t)·θ_b, parameter by parameter (differentiable in both)."""
    return {n: t * theta_a[n] + (1 - t) * theta_b[n] for n in theta_b}


def class_mean_gap(z_a: torch.Tensor, y_a: torch.Tensor, z_b: torch.Tensor, y_b: torch.Tensor, k: int) -> torch.Tensor:
    """Σ over classes present in both batches of ‖normalise(mean z_a[y_a = c]) − normalise(mean z_b[y_b = c])‖²."""
    def means(z, y):
        onehot = F.one_hot(y, k).to(z.dtype)
        counts = onehot.sum(0)
        return onehot.T @ z / counts.clamp_min(1)[:, None], counts > 0

    m_a, has_a = means(z_a, y_a)
    m_b, has_b = means(z_b, y_b)
    gap = (F.normalize(m_a, dim=1) - F.normalize(m_b, dim=1)).pow(2).sum(1)
    return (gap * (has_a & has_b)).sum()


@METHODS.register("cbft")
class CBFT(FineTune):
    """Connectivity-based fine-tuning (Lubana, Bigelow, Dick, Krueger & Tanaka, "Mechanistic Mode Connectivity",
    ICML 2023, Sec. 5): starting from the cue-trained θ_C (frozen; see ``FineTune`` for how the trial trains it and
    finds D_NC), two SGD updates per step:

    1. barrier: ``|B − CE(f(x_c; θ_t), y_c)|`` on the step's training (cue-carrying) batch, at
       ``θ_t = t·θ_C + (1 − t)·θ`` with ``t = 0.5 + 0.5·clip(N(0, 1), −0.5, 0.5)`` drawn each step; the gradient
       reaches θ only (scaled by 1 − t), pushing the linear path to θ_C over a loss barrier of height B on cue data;
    2. ``CE(f(x_nc; θ), y_nc) + λ · (1/K) · Σ_c ‖n(μ_c^NC) − n(μ_c^C)‖²``: cross-entropy on the D_NC batch plus the
       invariance loss between the normalised class means of the penultimate features on the D_NC and the cue
       batch (classes missing from either batch skipped; K = the number of classes).

    Paper defaults: B = 1, λ = 1, SGD lr 0.01, momentum 0.9, weight decay 1e-4 (inherited from ``FineTune``).
    Without labels ``y`` (e.g. a preference task) the invariance term is zero. On a dataset without a cue-free split
    the cue batches are D_NC itself: there is nothing to separate, the barrier update is skipped and the invariance
    term is zero, so CBFT reduces to naive fine-tuning there.
    """

    HPARAMS = {
        "cbft_barrier": HParam(1.0, log_uniform(-0.5, 0.5)),
        "cbft_lambda": HParam(1.0, log_uniform(-1, 1)),
    }

    def update(self, minibatches, step):
        cue = concat_batches(minibatches)
        nc = self.nc_batch(minibatches, step)
        stats = {}
        if self.nc_stream is not None:  # without a cue-free set the barrier would fight CE over the same examples
            t = 0.5 + 0.5 * torch.randn(()).clamp(-0.5, 0.5).item()
            path = Interpolated(self.model, interpolate(self.theta_c, dict(self.model.named_parameters()), t))
            path_loss = self.task.loss(self.task.scores(path, cue), cue)
            barrier = (self.hparams["cbft_barrier"] - path_loss).abs()
            self.step_on(barrier)
            stats = {"path_loss": path_loss.detach(), "barrier": barrier.detach()}

        nll = self.task.loss(self.task.scores(self.model, nc), nc)
        inv = torch.zeros((), device=nll.device)
        if "y" in nc and "y" in cue:
            k = int(self.model.head.out_features)
            z_nc, z_c = self.task.features(self.model, nc), self.task.features(self.model, cue)
            inv = class_mean_gap(z_nc, nc["y"], z_c, cue["y"], k) / k
        loss = nll + self.hparams["cbft_lambda"] * inv
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "invariance": inv.detach(), **stats}
