"""Variance Risk Extrapolation (V-REx)."""

from __future__ import annotations

from typing import Sequence

import torch

from shiftbench.hparams import HParam, log_uniform, log_uniform_int
from shiftbench.methods.irm import AnnealedPenalty
from shiftbench.registry import METHODS


def vrex_penalty(risks: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The population variance of the per-environment risks: ``mean_e (risk_e - mean risk)^2``.

    The population (biased, divide-by-n) variance is what Krueger et al. and DomainBed use; the unbiased one
    would only rescale the penalty by ``n / (n - 1)``, i.e. shift λ, and is undefined for one environment.
    """
    r = torch.stack(list(risks)) if not torch.is_tensor(risks) else risks
    return ((r - r.mean()) ** 2).mean()


@METHODS.register("vrex")
class VREx(AnnealedPenalty):
    """V-REx (Krueger et al., "Out-of-Distribution Generalization via Risk Extrapolation (REx)", ICML 2021).

    Loss: mean environment risk + w * ``vrex_penalty(risks)``, with w = 1 before ``vrex_penalty_anneal_iters``
    and ``vrex_lambda`` after (see ``AnnealedPenalty`` for the schedule and the optimizer reset). Defaults and
    ranges are DomainBed's.
    """

    HPARAMS = {
        "vrex_lambda": HParam(1e1, log_uniform(-1, 5)),
        "vrex_penalty_anneal_iters": HParam(500, log_uniform_int(0, 4)),
    }
    LAMBDA_KEY = "vrex_lambda"
    ANNEAL_KEY = "vrex_penalty_anneal_iters"
    PACKABLE = True

    def penalty(self, scores, minibatches, risks):
        return vrex_penalty(risks)
