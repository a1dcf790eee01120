"""SAND-mask: a smooth AND-mask whose strength grows with agreement and with low gradient variance."""

from __future__ import annotations

import torch

from shiftbench.hparams import HParam, log_uniform, uniform
from shiftbench.methods.andmask import masked_step
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def sand_mask(grads: torch.Tensor, tau: float, k: float) -> torch.Tensor:
    """``max(0, tanh(k · (|mean_e sign(g_e)| − τ) / Var_e(g_e)))`` per component (``grads`` stacked over
    environments on dimension 0; the unbiased variance, 1e-17 where it is undefined with one environment)."""
    var = grads.var(0) if len(grads) > 1 else torch.full_like(grads[0], 1e-17)
    var = torch.nan_to_num(var, nan=1e-17)
    mask = torch.tanh(k * (grads.sign().mean(0).abs() - tau) / var).clamp_min(0)
    return torch.nan_to_num(mask, nan=1e-17)


@METHODS.register("sandmask")
class SANDMask(ERM):
    """SAND-mask (Shahtalebi, Gagnon-Audet, Laleh, Faramarzi, Ahuja & Rish, "SAND-mask: An Enhanced Gradient
    Masking Strategy for the Discovery of Invariances in Domain Generalization", arXiv:2106.02266), as in DomainBed:
    AND-mask's step (``masked_step``) with the continuous ``sand_mask`` in [0, 1) instead of the 0/1 AND-mask.

    ``sandmask_k`` and the range of ``sandmask_tau`` are DomainBed's. Its default τ = 1 makes the mask identically 0
    (agreement never exceeds 1, and tanh of a non-positive number is clipped to 0), so a default trial would never
    move; the default here is the middle of DomainBed's range U(0, 1), 0.5.
    """

    HPARAMS = {
        "sandmask_tau": HParam(0.5, uniform(0.0, 1.0)),
        "sandmask_k": HParam(10.0, log_uniform(-3, 5)),
    }

    def mask(self, grads: torch.Tensor) -> torch.Tensor:
        return sand_mask(grads, float(self.hparams["sandmask_tau"]), float(self.hparams["sandmask_k"]))

    def update(self, minibatches, step):
        risks = self.risks(minibatches)
        masked_step(self, risks, self.mask)
        return {"loss": torch.stack(risks).mean().detach()}
