"""Marginal transfer learning (MTL): the head also sees the mean feature of the example's domain."""

from __future__ import annotations

import torch
from torch import nn

from shiftbench.featurewise import env_features, input_features, scores_from_features
from shiftbench.hparams import HParam, choice
from shiftbench.methods.erm import ERM
from shiftbench.models import feature_width, output_width
from shiftbench.registry import METHODS


@METHODS.register("mtl")
class MTL(ERM):
    """MTL (Blanchard, Deshmukh, Dogan, Lee & Scott, "Domain Generalization by Marginal Transfer Learning", JMLR
    2021), the neural version in DomainBed: the head (its own, ``2·n_features`` wide) classifies ``[z, μ]``, a
    feature concatenated with an embedding μ of its domain's feature distribution, the kernel mean embedding with
    the featurizer as kernel map.

    Training: environment e's embedding is ``mtl_ema · mean(z over its batch) + (1 − mtl_ema) · μ_e`` (DomainBed's
    weighting: ``mtl_ema`` weighs the current batch), the gradient flows through the batch mean, and ``μ_e`` (a
    buffer, in checkpoints) keeps it. Evaluation embeds each scored batch by its own mean feature, as DomainBed's
    ``predict`` does: a held-out domain is embedded from its unlabelled test inputs, so scores depend on the batch.
    DomainBed's code overwrites the embedding with N(0, 1) noise (an in-place ``normal_()``); the paper's method,
    implemented here, uses the mean. The loss is the sum over environments, DomainBed's.

    The model's own head goes unused (the saved weights re-score nothing without this head and the batch).
    Defaults and ranges are DomainBed's.
    """

    HPARAMS = {"mtl_ema": HParam(0.99, choice([0.5, 0.9, 0.99, 1.0]))}

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        d = feature_width(model)
        self.mtl_head = nn.Linear(2 * d, output_width(model))
        self.register_buffer("embeddings", torch.zeros(n_envs, d))
        self.optimizer = self.make_optimizer(list(model.featurizer.parameters()) + list(self.mtl_head.parameters()))

    def head_with(self, embedding: torch.Tensor):
        """The head on features concatenated with one domain embedding."""
        return lambda z: self.mtl_head(torch.cat([z, embedding.expand(len(z), -1)], 1))

    def update(self, minibatches, step):
        ema = float(self.hparams["mtl_ema"])
        loss = 0.0
        for e, (b, z) in enumerate(zip(minibatches, env_features(self.model, self.task, minibatches))):
            embedding = ema * z.mean(0) + (1 - ema) * self.embeddings[e]
            with torch.no_grad():
                self.embeddings[e] = embedding.detach()
            loss = loss + self.task.loss(scores_from_features(self.head_with(embedding), self.task, b, z), b)
        self.step_on(loss)
        return {"loss": loss.detach()}

    def scores(self, batch):
        z = input_features(self.model, self.task, batch)
        return scores_from_features(self.head_with(z.mean(0)), self.task, batch, z)
