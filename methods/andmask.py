"""AND-mask: descend only along gradient components on whose sign the training environments agree."""

from __future__ import annotations

from typing import Callable

import torch

from shiftbench.hparams import HParam, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def and_mask(grads: torch.Tensor, tau: float) -> torch.Tensor:
    """1 where ``|mean_e sign(g_e)| ≥ τ`` (``grads`` stacked over environments on dimension 0), else 0."""
    return (grads.sign().mean(0).abs() >= tau).to(grads.dtype)


def masked_mean_gradient(grads: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean gradient on the kept components, scaled up by the inverse kept share (so a sparse mask does not
    shrink the step; 1e-10 guards an empty mask)."""
    return mask * grads.mean(0) / (1e-10 + mask.mean())


def masked_step(algorithm: ERM, risks: list[torch.Tensor], mask: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Sets every model parameter's gradient to the masked mean of its per-environment risk gradients (``mask``
    maps gradients stacked over environments to a mask), then steps the optimizer."""
    params = [p for p in algorithm.model.parameters() if p.requires_grad]
    per_env = [torch.autograd.grad(r, params, retain_graph=True, allow_unused=True) for r in risks]
    algorithm.optimizer.zero_grad(set_to_none=True)
    for i, p in enumerate(params):
        grads = torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per_env])
        p.grad = masked_mean_gradient(grads, mask(grads))
    algorithm.optimizer.step()


@METHODS.register("andmask")
class ANDMask(ERM):
    """AND-mask (Parascandolo, Neitz, Orvieto, Gresele & Schölkopf, "Learning explanations that are hard to vary",
    ICLR 2021), as in DomainBed: every parameter's per-environment risk gradients are stacked, components whose
    signs agree across a share below ``andmask_tau`` are zeroed (``and_mask``), and the optimizer steps on the
    rescaled mean of the rest (``masked_mean_gradient``). ``andmask_tau = 1`` keeps only unanimous components.
    Defaults and ranges are DomainBed's (its hyperparameter ``tau``).
    """

    HPARAMS = {"andmask_tau": HParam(1.0, uniform(0.5, 1.0))}

    def mask(self, grads: torch.Tensor) -> torch.Tensor:
        return and_mask(grads, float(self.hparams["andmask_tau"]))

    def update(self, minibatches, step):
        risks = self.risks(minibatches)
        masked_step(self, risks, self.mask)
        return {"loss": torch.stack(risks).mean().detach()}
