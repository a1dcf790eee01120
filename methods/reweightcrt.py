"""Classifier re-training on a frozen ERM featurizer, with group re-weighting."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.methods.crt import CRT
from shiftbench.methods.groups import GROUP, training_counts
from shiftbench.methods.reweight import normalised
from shiftbench.registry import METHODS


@METHODS.register("reweightcrt")
class ReWeightCRT(CRT):
    """ReWeightCRT (SubpopBench, Yang et al., ICML 2023): CRT's frozen featurizer and re-initialised head, trained
    on the trial's natural (imbalanced) batches with ReWeight's group weights ``w_g ∝ 1 / n_g`` instead of
    group-balanced sampling."""

    def setup_data(self, context: MethodContext) -> None:
        counts = training_counts(context, GROUP)
        self.weights = normalised(1.0 / counts.clamp_min(1), counts).float().to(context.device)

    def head_batch(self, minibatches, step):
        batch = concat_batches(minibatches)
        with torch.no_grad():
            z = self.task.features(self.model, batch)
        return z, batch["y"], batch

    def head_loss(self, logits, y, batch):
        g = batch[GROUP].long()
        w = self.weights[g.clamp(0, len(self.weights) - 1)] * ((g >= 0) & (g < len(self.weights)))
        return (w * F.cross_entropy(logits.float(), y, reduction="none")).mean()
