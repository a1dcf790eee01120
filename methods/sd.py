"""Spectral decoupling (SD): cross-entropy plus an L2 penalty on the logits."""

from __future__ import annotations

import torch

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def logits_of(task, scores: torch.Tensor) -> torch.Tensor:
    """The scores a task's loss reads as logits: all of them, or, for a task that packs extra columns into its
    scores (preference: the reward sum beside the difference), the first part its ``split_scores`` returns."""
    split = getattr(task, "split_scores", None)
    return split(scores)[0] if split is not None else scores


@METHODS.register("sd")
class SD(ERM):
    """Spectral decoupling (Pezeshki et al., "Gradient Starvation: A Learning Proclivity in Neural Networks",
    NeurIPS 2021, Eq. 25, as in DomainBed): the pooled loss plus ``sd_reg · mean(logits²)``, which keeps a feature
    learned early from starving the gradient of the others.

    The mean is over every logit of the pooled batch (n × classes); for a reward model the logit is the Bradley–Terry
    reward difference. Defaults and ranges are DomainBed's.
    """

    HPARAMS = {"sd_reg": HParam(0.1, log_uniform(-5, -1))}

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        scores = self.task.scores(self.model, batch)
        nll = self.task.loss(scores, batch)
        penalty = logits_of(self.task, scores).float().pow(2).mean()
        loss = nll + self.hparams["sd_reg"] * penalty
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
