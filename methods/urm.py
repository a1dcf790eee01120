"""Uniform Risk Minimization (URM): features pushed towards a uniform distribution by a discriminator."""

from __future__ import annotations

import torch
from torch import nn

from shiftbench.algorithm import concat_batches
from shiftbench.errors import UserError
from shiftbench.featurewise import input_features, scores_from_features
from shiftbench.hparams import HParam, choice, fixed, log_uniform, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS

OUTPUTS = {"tanh": (nn.Tanh, -1.0, 1.0), "relu": (nn.ReLU, 0.0, 1.0), "sigmoid": (nn.Sigmoid, 0.0, 1.0)}
"""Feature output activation -> (module, the uniform target's range [a, b))."""


@METHODS.register("urm")
class URM(ERM):
    """URM (Krishnamachari, Ng & Foo, "Uniformly Distributed Feature Representations for Fair and Robust
    Learning", TMLR 2024), as in DomainBed.

    The features get an output activation (``urm_generator_output``: tanh, relu or sigmoid, bounding them to
    [a, b]) and a discriminator D (MLP d → 100 → (100 →)×``urm_discriminator_hidden_layers`` → 1, LeakyReLU)
    learns to tell U[a, b)^d noise (label 1) from features (label 0). The model descends
    ``loss + urm_adv_lambda · BCE(D(z), 1)`` (fool D: look uniform); then D descends
    ``BCE(D(u), 1) + urm_adv_lambda · BCE(D(z), 0)`` with its own Adam (``urm_discriminator_lr``) on detached
    features, optionally with labels smoothed to U[1 − s, 1] and U[0, s]. Scores are ``head(activation(f(x)))``,
    so evaluation sees the same features as training. Noise comes from torch's global generator, which the
    trainer checkpoints. Defaults and ranges are DomainBed's for small images; its single-choice ``urm`` and
    ``urm_discriminator_optimizer`` settings (adversarial, Adam) are fixed.
    """

    HPARAMS = {
        "urm_adv_lambda": HParam(0.1, uniform(0.0, 0.2)),
        "urm_discriminator_label_smoothing": HParam(0.0, fixed(0.0)),
        "urm_discriminator_hidden_layers": HParam(1, choice([1, 2, 3])),
        "urm_generator_output": HParam("tanh", choice(["tanh", "relu"])),
        "urm_discriminator_lr": HParam(1e-3, log_uniform(-5.5, -3.5)),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        name = self.hparams["urm_generator_output"]
        if name not in OUTPUTS:
            raise UserError(f"urm_generator_output={name!r}: use one of {', '.join(OUTPUTS)}")
        act, self.low, self.high = OUTPUTS[name]
        self.activation = act()
        layers = [nn.Linear(model.head.in_features, 100), nn.LeakyReLU()]
        for _ in range(int(self.hparams["urm_discriminator_hidden_layers"])):
            layers += [nn.Linear(100, 100), nn.LeakyReLU()]
        self.discriminator = nn.Sequential(*layers, nn.Linear(100, 1)).to(next(model.parameters()).device)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams["urm_discriminator_lr"],
                                               weight_decay=self.hparams["weight_decay"])

    def optimizers(self):
        return {"optimizer": self.optimizer, "disc_optimizer": self.disc_optimizer}

    def features(self, batch) -> torch.Tensor:
        return self.activation(input_features(self.model, self.task, batch))

    def scores(self, batch):
        return scores_from_features(self.model.head, self.task, batch, self.features(batch))

    def targets(self, n: int, real: bool, like: torch.Tensor) -> torch.Tensor:
        """Discriminator labels: 1 for noise, 0 for features, smoothed into [1 − s, 1] / [0, s] when s > 0."""
        s = float(self.hparams["urm_discriminator_label_smoothing"])
        if s == 0:
            return torch.full((n,), 1.0 if real else 0.0, dtype=like.dtype, device=like.device)
        u = torch.rand(n, dtype=like.dtype, device=like.device) * s
        return 1 - u if real else u

    def update(self, minibatches, step):
        lam = float(self.hparams["urm_adv_lambda"])
        bce = nn.functional.binary_cross_entropy_with_logits
        batch = concat_batches(minibatches)
        z = self.features(batch)
        nll = self.task.loss(scores_from_features(self.model.head, self.task, batch, z), batch)
        fool = bce(self.discriminator(z)[:, 0], torch.ones(len(z), dtype=z.dtype, device=z.device))
        loss = nll + lam * fool
        self.step_on(loss)
        z = z.detach()
        noise = self.low + (self.high - self.low) * torch.rand_like(z)
        d_loss = (bce(self.discriminator(noise)[:, 0], self.targets(len(z), True, z))
                  + lam * bce(self.discriminator(z)[:, 0], self.targets(len(z), False, z)))  # fmt: skip
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_optimizer.step()
        return {"loss": loss.detach(), "nll": nll.detach(), "fool": fool.detach(), "disc_loss": d_loss.detach()}
