"""Square-root inverse-frequency group re-weighting."""

from __future__ import annotations

import torch

from shiftbench.methods.reweight import ReWeight, normalised
from shiftbench.registry import METHODS


@METHODS.register("sqrtreweight")
class SqrtReWeight(ReWeight):
    """SqrtReWeight: ReWeight with ``w_g ∝ 1 / sqrt(n_g)`` (the square-root smoothing of Mahajan et al., "Exploring
    the Limits of Weakly Supervised Pretraining", ECCV 2018; by group as in SubpopBench, Yang et al., ICML 2023):
    between ERM's uniform weights and ReWeight's full inverse frequency."""

    def group_weights(self, counts: torch.Tensor) -> torch.Tensor:
        return normalised(counts.clamp_min(1).rsqrt(), counts)
