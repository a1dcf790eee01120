"""Focal loss."""

from __future__ import annotations

import torch

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import NON_NEGATIVE, HParam
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def focal_loss(nll: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example ``−(1 − p)^γ log p`` from the per-example ``−log p`` (p = exp(−nll), the true class's
    probability); γ = 0 is the plain loss."""
    return (1.0 - torch.exp(-nll)).clamp_min(0) ** gamma * nll


@METHODS.register("focal")
class Focal(ERM):
    """Focal loss (Lin, Goyal, Girshick, He & Dollár, "Focal Loss for Dense Object Detection", ICCV 2017), without
    the α class weights, as SubpopBench (Yang et al., ICML 2023) runs it: the mean of ``(1 − p)^γ · (−log p)``,
    which down-weights examples the model already gets right. ``p`` is ``exp(−loss)`` of the task's per-example
    loss, so the method is the same for class probabilities and Bradley–Terry preference probabilities. Default
    γ = 1 and range ``0.5 · 10^U(0, 1)`` are SubpopBench's.
    """

    HPARAMS = {"focal_gamma": HParam(1.0, lambda r: float(0.5 * 10 ** r.uniform(0, 1)), NON_NEGATIVE)}

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        nll = self.task.loss(self.task.scores(self.model, batch), batch, reduction="none")
        loss = focal_loss(nll, float(self.hparams["focal_gamma"])).mean()
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.mean().detach()}
