"""Class-balanced loss (by effective number of samples), over groups."""

from __future__ import annotations

import torch

from shiftbench.hparams import HParam, between
from shiftbench.methods.reweight import ReWeight, normalised
from shiftbench.registry import METHODS


def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """``(1 − β) / (1 − β^n)`` per count ``n``: the inverse of the effective number of samples ``(1 − β^n)/(1 − β)``
    (Cui et al., 2019, Eq. 3), unnormalised; β = 0 gives uniform weights, β → 1 inverse frequency."""
    return (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=counts.dtype), counts.clamp_min(1)))


@METHODS.register("cbloss")
class CBLoss(ReWeight):
    """Class-balanced loss (Cui, Jia, Lin, Song & Belongie, "Class-Balanced Loss Based on Effective Number of
    Samples", CVPR 2019) with softmax cross-entropy: ReWeight with ``w_g ∝ (1 − β) / (1 − β^{n_g})``, by group as
    SubpopBench (Yang et al., ICML 2023) applies it. Default β = 0.9999 and range ``1 − 10^U(−5, −2)`` are
    SubpopBench's."""

    HPARAMS = {"cb_beta": HParam(0.9999, lambda r: float(1 - 10 ** r.uniform(-5, -2)), between(0.0, 0.999999999))}

    def group_weights(self, counts: torch.Tensor) -> torch.Tensor:
        return normalised(effective_number_weights(counts, float(self.hparams["cb_beta"])), counts)
