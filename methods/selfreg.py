"""Self-supervised contrastive regularisation (SelfReg): same-class examples pulled together, without negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shiftbench.algorithm import concat_batches
from shiftbench.methods.erm import ERM
from shiftbench.models import feature_width
from shiftbench.registry import METHODS

FEATURE_WEIGHT = 0.3
"""Weight of the feature terms against the logit terms (DomainBed's constant)."""


def same_class_partners(y: torch.Tensor) -> torch.Tensor:
    """For each example, a random example of its class (a random permutation within every class)."""
    partner = torch.empty_like(y)
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        partner[idx] = idx[torch.randperm(len(idx), device=y.device)]
    return partner


def selfreg_regulariser(logits: torch.Tensor, features: torch.Tensor, projected: torch.Tensor, lam: torch.Tensor,
                        p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """``λ·(L_ind_logit + L_ind_feat) + (1 − λ)·(L_hdl_logit + L_hdl_feat)``: mean squared errors between each
    example's logits and a same-class partner's (``p1``), and between its features and the partner's projected
    features (weighted ``FEATURE_WEIGHT``); the ``hdl`` terms use the λ-mixture of partners ``p1`` and ``p2``."""
    mixed_logits = lam * logits[p1] + (1 - lam) * logits[p2]
    mixed_proj = lam * projected[p1] + (1 - lam) * projected[p2]
    individual = F.mse_loss(logits, logits[p1]) + FEATURE_WEIGHT * F.mse_loss(features, projected[p1])
    hetero = F.mse_loss(logits, mixed_logits) + FEATURE_WEIGHT * F.mse_loss(features, mixed_proj)
    return lam * individual + (1 - lam) * hetero


@METHODS.register("selfreg")
class SelfReg(ERM):
    """SelfReg (Kim, Yoo, Park, Kim & Lee, "SelfReg: Self-supervised Contrastive Regularization for Domain
    Generalization", ICCV 2021), as in DomainBed: the cross-entropy on the pooled batch plus
    ``min(CE, 1) × selfreg_regulariser``, whose partners are random same-class examples of the pooled batch and
    whose projection is a three-layer MLP with BatchNorm (hidden width ``2·n_features``, or ``n_features`` when that
    is 2048, DomainBed's rule) trained with the model. λ ~ Beta(0.5, 0.5) per step, from torch's generator.
    Same-class partners need class labels, hence classification only. No hyperparameters beyond the base class's.
    DomainBed's optimizer (built by its ERM before the projection exists) leaves the projection at its random
    initialisation; the paper trains it, and so does this one.
    """

    TASKS = ("classification",)

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        d = feature_width(model)
        h = d if d == 2048 else 2 * d
        self.projection = nn.Sequential(
            nn.Linear(d, h), nn.BatchNorm1d(h), nn.ReLU(),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(),
            nn.Linear(h, d), nn.BatchNorm1d(d),
        )  # fmt: skip
        self.optimizer = self.make_optimizer(list(model.parameters()) + list(self.projection.parameters()))

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        y = batch["y"]
        lam = torch.distributions.Beta(torch.tensor(0.5), torch.tensor(0.5)).sample().to(y.device)
        features = self.model.featurizer(batch["x"])
        logits = self.model.head(features)
        reg = selfreg_regulariser(logits, features, self.projection(features), lam, same_class_partners(y),
                                  same_class_partners(y))  # fmt: skip
        ce = self.task.loss(logits, batch)
        loss = ce + min(ce.item(), 1.0) * reg
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": ce.detach(), "penalty": reg.detach()}
