"""Label-distribution-aware margin loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.hparams import POSITIVE, HParam, choice, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.methods.groups import training_counts
from shiftbench.registry import METHODS


def ldam_margins(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    """Per-class margins ``Δ_j ∝ n_j^(−1/4)`` scaled so the largest is ``max_margin`` (Cao et al., 2019, Eq. 12); a
    class without training examples gets margin 0 (it never appears as a label)."""
    m = torch.where(counts > 0, counts.clamp_min(1) ** -0.25, torch.zeros_like(counts))
    return m * (max_margin / m.max())


def ldam_loss(logits: torch.Tensor, y: torch.Tensor, margins: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-example ``CE(s · (z − Δ_y e_y), y)``: the true class's logit lowered by its margin, then scaled."""
    shifted = logits - F.one_hot(y, logits.shape[1]).to(logits.dtype) * margins.to(logits.dtype)[y][:, None]
    return F.cross_entropy(scale * shifted, y, reduction="none")


@METHODS.register("ldam")
class LDAM(ERM):
    """LDAM loss (Cao, Wei, Gaidon, Arechiga & Ma, "Learning Imbalanced Datasets with Label-Distribution-Aware
    Margin Loss", NeurIPS 2019), without the deferred re-weighting: per-class margins ``∝ n_j^(−1/4)`` of the
    training ``in`` splits' class counts, the largest ``ldam_max_margin``, enforced on logits scaled by
    ``ldam_scale``. As in SubpopBench (Yang et al., ICML 2023) the scale multiplies the model's raw logits (the paper
    normalises features and weights first). Defaults and ranges are SubpopBench's (max_m 0.5, 10^U(−1, −0.1); scale
    30, from {10, 30}). Class margins need labels only, not groups.
    """

    TASKS = ("classification",)
    HPARAMS = {
        "ldam_max_margin": HParam(0.5, log_uniform(-1, -0.1), POSITIVE),
        "ldam_scale": HParam(30.0, choice([10.0, 30.0]), POSITIVE),
    }

    def setup(self, context: MethodContext) -> None:
        counts = training_counts(context, "y", int(self.model.head.out_features))
        self.margins = ldam_margins(counts, float(self.hparams["ldam_max_margin"])).float().to(context.device)

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        logits = self.task.scores(self.model, batch).float()
        loss = ldam_loss(logits, batch["y"], self.margins, float(self.hparams["ldam_scale"])).mean()
        self.step_on(loss)
        return {"loss": loss.detach()}
