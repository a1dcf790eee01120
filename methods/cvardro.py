"""Conditional value-at-risk DRO over examples."""

from __future__ import annotations

import math

import torch

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, Rule, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def cvar(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """The mean of the worst ``α`` fraction of ``losses``: the CVaR at level α over the empirical distribution,
    ``sup {E_q[loss] : q ≤ p / α}`` with ``p`` uniform over the batch (Levy, Carmon, Duchi & Sidford, 2020, Sec. 2).

    The maximising ``q`` puts ``1 / (α n)`` on each of the ``k = ⌊α n⌋`` largest losses and the remaining mass
    ``1 − k / (α n)`` on the next one, so a fractional ``α n`` is exact and ``α n < 1`` gives the maximum.
    """
    n = len(losses)
    m = alpha * n
    k = min(n, int(math.floor(m + 1e-9)))
    top = torch.topk(losses, min(n, k + 1)).values
    total = top[:k].sum()
    if k < n and m > k:
        total = total + (m - k) * top[k]
    return total / m


@METHODS.register("cvardro")
class CVaRDRO(ERM):
    """CVaR DRO (Levy, Carmon, Duchi & Sidford, "Large-Scale Methods for Distributionally Robust Optimization",
    NeurIPS 2020; Duchi & Namkoong, 2021): minimise the CVaR at level α of the per-example losses of the pooled
    batch, i.e. the mean of its worst α fraction; groups are not needed. The unregularised (no entropy term) batch
    estimator, as SubpopBench (Yang et al., ICML 2023) configures it; default α = 0.1 and range ``10^U(−2, 0)``
    are SubpopBench's.
    """

    HPARAMS = {"cvar_alpha": HParam(0.1, log_uniform(-2, 0), Rule("in (0, 1]", lambda v: 0 < v <= 1))}

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        losses = self.task.loss(self.task.scores(self.model, batch), batch, reduction="none")
        loss = cvar(losses, float(self.hparams["cvar_alpha"]))
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": losses.mean().detach()}
