"""Empirical Quantile Risk Minimization (EQRM): descend a high quantile of the environment risks."""

from __future__ import annotations

import torch

from shiftbench.hparams import HParam, log_uniform, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def kde_quantile(risks: torch.Tensor, alpha: float, n_steps: int = 60) -> torch.Tensor:
    """The α-quantile of a Gaussian kernel density estimate of ``risks``, differentiable in them.

    The KDE's CDF is ``F(q) = mean_i Φ((q − r_i) / h)`` with Scott-style bandwidth ``h = 1.06 σ n^(−1/5)`` (σ the
    unbiased standard deviation; DomainBed's "Gauss-optimal" rule). ``F(q) = α`` is solved by bisection without a
    graph between ``min r + h Φ⁻¹(α)`` and ``max r + h Φ⁻¹(α)`` (where ``F ≤ α`` and ``F ≥ α``); one Newton step
    ``q + (α − F(q)) / f(q)`` with the density ``f`` held constant then carries the implicit-function gradient
    ``dq/dθ = −(∂F/∂θ) / f(q)``, where DomainBed lets the gradient flow through the bisection's arithmetic. With
    fewer than two risks or zero spread the plain (interpolated) quantile is returned.
    """
    n = len(risks)
    if n < 2:
        return risks.mean()
    h = 1.06 * risks.std() * n ** -0.2
    if not bool(h > 0):
        return torch.quantile(risks, alpha)
    normal = torch.distributions.Normal(torch.zeros((), dtype=risks.dtype, device=risks.device), 1.0)

    def cdf(q, r, bw):
        return normal.cdf((q - r) / bw).mean()

    with torch.no_grad():
        r, bw = risks.detach(), h.detach()
        z = normal.icdf(torch.tensor(alpha, dtype=risks.dtype, device=risks.device))
        lo, hi = r.min() + bw * z, r.max() + bw * z
        for _ in range(n_steps):  # torch.where, not if: no host sync per step on a GPU
            mid = (lo + hi) / 2
            above = cdf(mid, r, bw) > alpha
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        q = (lo + hi) / 2
        density = normal.log_prob((q - r) / bw).exp().mean() / bw
    return q + (alpha - cdf(q, risks, h)) / density


@METHODS.register("eqrm")
class EQRM(ERM):
    """EQRM (Eastwood, Robey, Singh, von Kügelgen, Hassani, Pappas & Schölkopf, "Probable Domain Generalization via
    Quantile Risk Minimization", NeurIPS 2022, Algorithm 1), as in DomainBed.

    For ``eqrm_burnin_iters`` steps the loss is the mean environment risk (ERM); from then on it is
    ``kde_quantile(risks, eqrm_quantile)``, the α-quantile of the estimated distribution of risks over domains,
    which trades average for worst-case performance as α → 1. At the switch Adam's state is cleared and its
    learning rate set to ``eqrm_lr`` (DomainBed rebuilds Adam with it; the rate lives in the optimizer's state, so
    checkpoints carry it). Defaults and ranges are DomainBed's (the burn-in drawn as an integer).
    """

    HPARAMS = {
        "eqrm_quantile": HParam(0.75, uniform(0.5, 0.99)),
        "eqrm_burnin_iters": HParam(2500, lambda r: int(10 ** r.uniform(2.5, 3.5))),
        "eqrm_lr": HParam(1e-6, log_uniform(-7, -5)),
    }

    def update(self, minibatches, step):
        risks = torch.stack(self.risks(minibatches))
        if step < self.hparams["eqrm_burnin_iters"]:
            loss = risks.mean()
        else:
            loss = kde_quantile(risks, float(self.hparams["eqrm_quantile"]))
        if step == self.hparams["eqrm_burnin_iters"]:
            self.optimizer.state.clear()
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.hparams["eqrm_lr"])
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": risks.mean().detach()}
