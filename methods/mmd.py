"""Maximum mean discrepancy between the training environments' feature distributions (MMD)."""

from __future__ import annotations

from typing import Sequence

import torch

from shiftbench.featurewise import env_features_and_scores
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS

GAMMAS = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
"""Bandwidths of the summed Gaussian kernels (DomainBed's): a mixture spares choosing one for unknown features."""


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, gammas: Sequence[float] = GAMMAS) -> torch.Tensor:
    """The biased (V-statistic) squared MMD of two samples under ``k(a, b) = Σ_γ exp(−γ‖a − b‖²)``:
    ``mean K(x, x) + mean K(y, y) − 2 mean K(x, y)`` (Gretton et al., JMLR 2012, Eq. 5)."""
    def kernel(a, b):
        # squared distances, expanded; clamped since rounding can make ‖a‖² + ‖b‖² − 2ab slightly negative
        d = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(1e-30)
        return sum(torch.exp(-g * d) for g in gammas)

    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


@METHODS.register("mmd")
class MMD(ERM):
    """MMD matching (Li, Pan, Wang & Kot, "Domain Generalization with Adversarial Feature Learning", CVPR 2018),
    as DomainBed implements it: the mean environment risk plus ``mmd_gamma`` times the mean, over pairs of training
    environments, of the discrepancy between their penultimate features (``gaussian_mmd``; CORAL swaps in its own).

    The features of a preference pair are those of both responses, so each domain's response distribution is
    matched. Defaults and ranges are DomainBed's; the penalty weight is constant (no annealing).
    """

    HPARAMS = {"mmd_gamma": HParam(1.0, log_uniform(-1, 1))}

    @staticmethod
    def discrepancy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gaussian_mmd(x, y)

    def penalty(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Mean discrepancy over the pairs of environments (0 with one environment)."""
        pairs = [(i, j) for i in range(len(features)) for j in range(i + 1, len(features))]
        if not pairs:
            return features[0].new_zeros(())
        return torch.stack([self.discrepancy(features[i], features[j]) for i, j in pairs]).mean()

    def update(self, minibatches, step):
        features, scores = env_features_and_scores(self.model, self.task, minibatches)
        nll = torch.stack([self.task.loss(s, b) for s, b in zip(scores, minibatches)]).mean()
        penalty = self.penalty(features)
        loss = nll + self.hparams["mmd_gamma"] * penalty
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
