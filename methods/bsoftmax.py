"""Balanced softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.methods.erm import ERM
from shiftbench.methods.groups import training_counts
from shiftbench.registry import METHODS


@METHODS.register("bsoftmax")
class BSoftmax(ERM):
    """Balanced softmax (Ren, Yu, Sheng, Ma, Zhao, Yi & Li, "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020, Eq. 4): training cross-entropy on ``z + log π``, ``π`` the class prior of the
    training ``in`` splits, so the model's own logits estimate the label-balanced posterior; prediction uses the
    plain logits. A class absent from training gets the count 1 (a finite, tiny prior). No hyperparameters of its
    own; class counts need labels only, not groups.
    """

    TASKS = ("classification",)

    def setup(self, context: MethodContext) -> None:
        counts = training_counts(context, "y", int(self.model.head.out_features)).clamp_min(1)
        self.log_prior = (counts / counts.sum()).log().float().to(context.device)

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        logits = self.task.scores(self.model, batch).float()
        loss = F.cross_entropy(logits + self.log_prior, batch["y"])
        self.step_on(loss)
        return {"loss": loss.detach()}
