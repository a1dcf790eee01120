"""Inverse-frequency group re-weighting."""

from __future__ import annotations

import torch

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.methods.erm import ERM
from shiftbench.methods.groups import GROUP, NeedsGroups, training_counts
from shiftbench.registry import METHODS


def normalised(w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Weights scaled to sum to the number of non-empty groups (SubpopBench's normalisation); empty groups get 0."""
    w = torch.where(counts > 0, w, torch.zeros_like(w))
    return w / w.sum() * (counts > 0).sum()


@METHODS.register("reweight")
class ReWeight(NeedsGroups, ERM):
    """ReWeight: the loss of each example times ``w_g ∝ 1 / n_g`` of its group ``g``, ``n_g`` its count in the
    training ``in`` splits (inverse-frequency re-weighting, e.g. Japkowicz & Stephen, "The class imbalance problem",
    2002; by group as in SubpopBench, Yang et al., ICML 2023). The weights are normalised to sum to the number of
    groups and the loss is their mean over the pooled batch, so a group-balanced batch has ERM's loss scale.
    ``group_weights`` is recomputed from the data by ``setup`` (no checkpointed state of its own).
    """

    def group_weights(self, counts: torch.Tensor) -> torch.Tensor:
        return normalised(1.0 / counts.clamp_min(1), counts)

    def setup(self, context: MethodContext) -> None:
        counts = training_counts(context, GROUP)
        self.weights = self.group_weights(counts).float().to(context.device)

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        losses = self.task.loss(self.task.scores(self.model, batch), batch, reduction="none")
        g = batch[GROUP].long()
        w = self.weights[g.clamp(0, len(self.weights) - 1)] * ((g >= 0) & (g < len(self.weights)))
        loss = (w * losses).mean()
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": losses.mean().detach()}
