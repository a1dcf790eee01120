"""Learning from Failure: a deliberately biased model tells the debiased one which examples are hard."""

from __future__ import annotations

import copy

import torch

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, between, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def generalized_ce(nll: torch.Tensor, q: float) -> torch.Tensor:
    """Per-example generalised cross-entropy ``(1 − p^q) / q`` from ``−log p`` (Zhang & Sabuncu, NeurIPS 2018): its
    gradient is ``p^q`` times cross-entropy's, so it leans on the examples the model already finds easy."""
    return (1.0 - torch.exp(-q * nll)) / q


def relative_difficulty(ce_biased: torch.Tensor, ce_debiased: torch.Tensor) -> torch.Tensor:
    """``W(x) = CE_b / (CE_b + CE_d)`` (Nam et al., 2020, Eq. 1), detached: near 1 where the biased model fails."""
    return (ce_biased / (ce_biased + ce_debiased + 1e-8)).detach()


@METHODS.register("lff")
class LfF(ERM):
    """Learning from Failure (Nam, Cha, Ahn, Lee & Shin, "Learning from Failure: Training Debiased Classifier from
    Biased Classifier", NeurIPS 2020), Algorithm 1 with per-step losses (SubpopBench's form; the paper smooths each
    example's losses with an EMA). No groups needed.

    A second network of the same architecture (``biased``, re-initialised) trains with the generalised
    cross-entropy, which amplifies whatever is easiest (the spurious cue); the trial's model (what is evaluated)
    trains with cross-entropy weighted by the relative difficulty ``W = CE_b / (CE_b + CE_d)``. Both step on one
    backward pass, each with its own Adam (both in ``optimizers``, so both in checkpoints). ``p = exp(−loss)`` of
    the task's per-example loss, so preference tasks work too. Default q = 0.7, range U(0.05, 0.95) (SubpopBench).
    """

    HPARAMS = {"lff_q": HParam(0.7, uniform(0.05, 0.95), between(1e-6, 1.0))}

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.biased = copy.deepcopy(model)
        for m in self.biased.modules():  # a separate initialisation, as the paper's two networks
            if m is not self.biased and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.biased_optimizer = self.make_optimizer(self.biased.parameters())

    def optimizers(self):
        return {"optimizer": self.optimizer, "biased_optimizer": self.biased_optimizer}

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        ce_d = self.task.loss(self.task.scores(self.model, batch), batch, reduction="none")
        ce_b = self.task.loss(self.task.scores(self.biased, batch), batch, reduction="none")
        w = relative_difficulty(ce_b, ce_d)
        loss_d = (w * ce_d).mean()
        loss_b = generalized_ce(ce_b, float(self.hparams["lff_q"])).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.biased_optimizer.zero_grad(set_to_none=True)
        (loss_d + loss_b).backward()
        self.optimizer.step()
        self.biased_optimizer.step()
        return {"loss": loss_d.detach(), "gce": loss_b.detach(), "weight": w.mean()}
