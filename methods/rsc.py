"""Representation self-challenging (RSC): training with the most predictive features muted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def rsc_mask(features: torch.Tensor, logits: torch.Tensor, head, y: torch.Tensor, f_drop: float,
             b_drop: float) -> torch.Tensor:
    """RSC's mask over ``features`` (Huang et al., Eqs. 1–3 and Sec. 3.3, as DomainBed computes them).

    Per example, features whose gradient of the true-class logit is at or above the ``1 − f_drop`` quantile
    (linear interpolation, numpy's default) are muted; then examples whose true-class probability drops less under
    that muting than the ``1 − b_drop`` quantile of the batch's drops keep every feature.
    """
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    grads = torch.autograd.grad((logits * onehot).sum(), features, retain_graph=True)[0]
    cut = torch.quantile(grads.float(), 1 - f_drop, dim=1, keepdim=True)
    mask_f = (grads < cut).to(features.dtype)
    with torch.no_grad():
        drop = (logits.softmax(1) * onehot).sum(1) - (head(features * mask_f).softmax(1) * onehot).sum(1)
        mask_b = (drop < torch.quantile(drop.float(), 1 - b_drop)).to(features.dtype)[:, None]
    return torch.maximum(mask_f, mask_b)


@METHODS.register("rsc")
class RSC(ERM):
    """RSC (Huang, Wang, Xing & Huang, "Self-Challenging Improves Cross-Domain Generalization", ECCV 2020), as in
    DomainBed: the cross-entropy of the head on the pooled batch's features times ``rsc_mask``, which mutes each
    example's most predictive features (``rsc_f_drop_factor``) on the share ``rsc_b_drop_factor`` of examples that
    the muting hurts most, so the model must also predict from the rest. Needs class logits, hence classification
    only. Defaults and ranges are DomainBed's.
    """

    TASKS = ("classification",)
    HPARAMS = {
        "rsc_f_drop_factor": HParam(1 / 3, uniform(0.0, 0.5)),
        "rsc_b_drop_factor": HParam(1 / 3, uniform(0.0, 0.5)),
    }

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        features = self.model.featurizer(batch["x"])
        if not features.requires_grad:  # a frozen (or parameter-free) featurizer: the mask still needs ∂logit/∂z
            features = features.detach().requires_grad_(True)
        logits = self.model.head(features)
        mask = rsc_mask(features, logits, self.model.head, batch["y"], float(self.hparams["rsc_f_drop_factor"]),
                        float(self.hparams["rsc_b_drop_factor"]))  # fmt: skip
        loss = self.task.loss(self.model.head(features * mask), batch)
        self.step_on(loss)
        return {"loss": loss.detach()}
