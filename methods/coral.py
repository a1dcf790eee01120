"""Deep CORAL: matching the means and covariances of the training environments' features."""

from __future__ import annotations

import torch

from shiftbench.methods.mmd import MMD
from shiftbench.registry import METHODS


def coral_discrepancy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``mean((μ_x − μ_y)²) + mean((C_x − C_y)²)``: mean squared differences of the feature means and of the
    unbiased (n − 1) covariance matrices, averaged over entries (DomainBed's form; Sun & Saenko's loss is the
    covariance term scaled by 1/(4d²) instead)."""
    mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cx, cy = x - mx, y - my
    cov_x, cov_y = cx.T @ cx / (len(x) - 1), cy.T @ cy / (len(y) - 1)
    return (mx - my).pow(2).mean() + (cov_x - cov_y).pow(2).mean()


@METHODS.register("coral")
class CORAL(MMD):
    """Deep CORAL (Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV workshops
    2016), for domain generalisation as in DomainBed: ``MMD`` with ``coral_discrepancy`` between every pair of
    training environments' features, weighted by ``mmd_gamma`` (DomainBed's name, default and range)."""

    @staticmethod
    def discrepancy(x, y):
        return coral_discrepancy(x, y)
