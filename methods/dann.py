"""Domain-adversarial training (DANN): features from which a discriminator cannot tell the environment."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shiftbench.featurewise import env_features, scores_from_features
from shiftbench.hparams import HParam, choice, log_uniform, log_uniform_int
from shiftbench.methods.erm import ERM
from shiftbench.models import MLP, feature_width, output_width
from shiftbench.registry import METHODS


@METHODS.register("dann")
class DANN(ERM):
    """DANN (Ganin, Ustinova, Ajakan, Germain, Larochelle, Laviolette, Marchand & Lempitsky, "Domain-Adversarial
    Training of Neural Networks", JMLR 2016), in DomainBed's alternating form.

    A discriminator (an MLP of ``dann_mlp_depth`` linear layers on the model's ``n_features``) predicts each
    example's training environment from its features. Steps alternate: ``dann_d_steps_per_g_step`` discriminator
    steps on its cross-entropy ``D`` (plus ``dann_grad_penalty`` × the squared input gradient), then one model step
    on ``risk − dann_lambda · D``: the discriminator's loss enters the featurizer's gradient with its sign flipped
    (the gradient reversal), so features move to where environments are indistinguishable. Step k (0-based) is a
    discriminator step when ``(k + 1) mod (1 + d) < d``, DomainBed's count. The model and the discriminator have
    their own Adam optimizers with β = (``dann_beta1``, 0.9); the model's learning rate and weight decay are ``lr``
    and ``weight_decay`` (DomainBed's ``lr_g``, ``weight_decay_g``, same defaults and ranges).

    A preference pair contributes both responses' features, labelled with its environment. Defaults and ranges are
    DomainBed's (its names without the ``dann_`` prefix).
    """

    HPARAMS = {
        "dann_lambda": HParam(1.0, log_uniform(-2, 2)),
        "dann_lr_d": HParam(1e-3, log_uniform(-4.5, -2.5)),
        "dann_weight_decay_d": HParam(0.0, log_uniform(-6, -2)),
        "dann_d_steps_per_g_step": HParam(1, log_uniform_int(0, 3, base=2)),
        "dann_grad_penalty": HParam(0.0, log_uniform(-2, 1)),
        "dann_beta1": HParam(0.5, choice([0.0, 0.5])),
        "dann_mlp_width": HParam(256, log_uniform_int(6, 10, base=2)),
        "dann_mlp_depth": HParam(3, choice([3, 4, 5])),
        "dann_mlp_dropout": HParam(0.0, choice([0.0, 0.1, 0.5])),
    }
    CONDITIONAL: ClassVar[bool] = False
    """CDANN: the discriminator sees features plus a learned embedding of the class, with class-balanced weights."""

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        h, d = self.hparams, feature_width(model)
        width = int(h["dann_mlp_width"])
        self.discriminator = nn.Sequential(
            MLP((d,), width=width, depth=int(h["dann_mlp_depth"]) - 1, dropout=float(h["dann_mlp_dropout"])),
            nn.Linear(width, n_envs),
        )
        disc_params = list(self.discriminator.parameters())
        if self.CONDITIONAL:
            self.class_embeddings = nn.Embedding(output_width(model), d)
            disc_params += list(self.class_embeddings.parameters())
        betas = (float(h["dann_beta1"]), 0.9)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=h["lr"], weight_decay=h["weight_decay"], betas=betas)
        self.disc_optimizer = torch.optim.Adam(disc_params, lr=h["dann_lr_d"], weight_decay=h["dann_weight_decay_d"],
                                               betas=betas)  # fmt: skip

    def optimizers(self):
        return {"optimizer": self.optimizer, "disc_optimizer": self.disc_optimizer}

    def is_discriminator_step(self, step: int) -> bool:
        d = int(self.hparams["dann_d_steps_per_g_step"])
        return (step + 1) % (1 + d) < d

    def discriminator_loss(self, features: torch.Tensor, envs: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Cross-entropy of the environment labels (class-balanced for CDANN) plus the gradient penalty."""
        disc_in = features + self.class_embeddings(y) if self.CONDITIONAL else features
        out = self.discriminator(disc_in)
        if self.CONDITIONAL:
            counts = torch.bincount(y, minlength=self.class_embeddings.num_embeddings)
            weights = 1.0 / (counts[y] * len(counts)).float()
            loss = (weights * F.cross_entropy(out, envs, reduction="none")).sum()
        else:
            loss = F.cross_entropy(out, envs)
        gp = float(self.hparams["dann_grad_penalty"])
        if gp > 0:
            grad = torch.autograd.grad(F.cross_entropy(out, envs, reduction="sum"), [disc_in], create_graph=True)[0]
            loss = loss + gp * grad.pow(2).sum(1).mean()
        return loss

    def update(self, minibatches, step):
        feats = env_features(self.model, self.task, minibatches)
        envs = torch.cat([torch.full((len(f),), e, dtype=torch.long, device=f.device) for e, f in enumerate(feats)])
        y = torch.cat([b["y"] for b in minibatches]) if self.CONDITIONAL else None
        features = torch.cat(feats)
        if self.is_discriminator_step(step):
            features = features.detach().requires_grad_(float(self.hparams["dann_grad_penalty"]) > 0)
        disc_loss = self.discriminator_loss(features, envs, y)
        risk = torch.stack([self.task.loss(scores_from_features(self.model.head, self.task, b, f), b)
                            for b, f in zip(minibatches, feats)]).mean()  # fmt: skip
        if self.is_discriminator_step(step):
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            (risk - self.hparams["dann_lambda"] * disc_loss).backward()
            self.optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)  # the model step's gradient is not the discriminator's
        return {"loss": risk.detach(), "disc_loss": disc_loss.detach()}
