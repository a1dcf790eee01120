"""Adaptive risk minimisation (ARM-CML): a context network adapts the model to each batch's domain."""

from __future__ import annotations

import math

import torch
from torch import nn

from shiftbench.data import Batch
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def context_net(input_shape: tuple[int, ...]) -> nn.Module:
    """Maps one input to a context of the input's shape (images: one channel, broadcast over the channels). Images:
    DomainBed's three 5×5 convolutions (64, 64, 1 channels, BatchNorm and ReLU between); other inputs: an MLP with
    one hidden layer of 64."""
    if len(input_shape) == 3:
        c = input_shape[0]
        return nn.Sequential(
            nn.Conv2d(c, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 1, 5, padding=2),
        )  # fmt: skip
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, d), nn.Unflatten(1, input_shape))


def support_sets(batch: Batch, size: int) -> list[Batch]:
    """The batch cut into consecutive support sets of ``size`` examples if it divides evenly, else one set (as
    DomainBed's ``ARM.predict``)."""
    n = len(next(v for v in batch.values() if torch.is_tensor(v) and v.dim() > 0))
    if n % size or n == size:
        return [batch]
    per = lambda v: torch.is_tensor(v) and v.dim() > 0 and len(v) == n  # noqa: E731
    return [{k: v[s:s + size] if per(v) else v for k, v in batch.items()} for s in range(0, n, size)]


@METHODS.register("arm")
class ARM(ERM):
    """ARM-CML (Zhang, Marklund, Dhawan, Gupta, Levine & Finn, "Adaptive Risk Minimization: Learning to Adapt to
    Domain Shift", NeurIPS 2021), as in DomainBed: a context network (``context_net``, built from the model's
    ``input_shape``) embeds every input of a support set (one environment's batch in training; consecutive chunks of
    ``batch_size`` examples when scoring, the whole batch if it does not divide), the embeddings are averaged, and
    the model scores ``x + c``: each prediction adapts to its batch's domain from unlabelled inputs alone. Both
    networks train on the mean environment risk through one optimizer.

    DomainBed concatenates the context to the image as an extra channel, which changes the model's input shape;
    the model here is built by the trainer for the dataset's inputs, so the context is added instead (for a linear
    first layer, a concatenation whose context weights are tied to the input's). The context network is the
    method's, not the model's: saved model weights alone do not reproduce scores. Every hyperparameter is the
    base class's (DomainBed's ARM adds none).
    """

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise TypeError("ARM builds its context network from model.input_shape, which this model lacks "
                            "(models from shiftbench.models.build_model record it)")
        self.context_net = context_net(tuple(shape))
        self.optimizer = self.make_optimizer(list(model.parameters()) + list(self.context_net.parameters()))

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        """The model on ``x`` plus the support set's mean context (``x`` is one support set's inputs)."""
        return self.model(x + self.context_net(x).mean(0, keepdim=True))

    def env_scores(self, minibatches):
        return [self.task.scores(self.adapted, b) for b in minibatches]

    def update(self, minibatches, step):
        loss = torch.stack([self.task.loss(s, b) for s, b in zip(self.env_scores(minibatches), minibatches)]).mean()
        self.step_on(loss)
        return {"loss": loss.detach()}

    def scores(self, batch):
        sets = support_sets(batch, int(self.hparams["batch_size"]))
        return torch.cat([self.task.scores(self.adapted, s) for s in sets])
