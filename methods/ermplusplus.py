"""ERM++: ERM with a linear-probing warm-up and a uniform average of the weights for prediction."""

from __future__ import annotations

import copy

import torch

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, fixed, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


@METHODS.register("ermplusplus")
class ERMPlusPlus(ERM):
    """ERM++ (Teterwak, Saito, Tsiligkaridis, Saenko & Plummer, "ERM++: An Improved Baseline for Domain
    Generalization", WACV 2025, arXiv:2304.01973), the parts DomainBed's version runs with its defaults:

    - linear probing first: for ``erm_linear_steps`` steps only the head moves, with its own Adam at
      ``erm_linear_lr``; then the whole model trains with the usual Adam at ``lr``;
    - weight averaging (SWA-style): from step ``erm_sma_start - 1`` the averaged model is the uniform mean of the
      weights after every step since (before that it follows the weights), and it is the model that is scored.
      Floating buffers (BatchNorm statistics) are averaged like weights.

    Left out, as they need more than a method: DomainBed's validation-loss learning-rate schedule (it reads the
    validation loaders), LARS and ImageNet-specific backbones; DomainBed's extra forward pass refreshing the
    averaged model's BatchNorm statistics. Both optimizers and the average are in checkpoints. DomainBed's
    ``linear_lr`` and ``linear_steps`` are ``erm_linear_lr`` and ``erm_linear_steps``; its fixed SMA start
    (iteration 600) is ``erm_sma_start``.
    """

    HPARAMS = {
        "erm_linear_lr": HParam(5e-5, log_uniform(-5, -3.5)),
        "erm_linear_steps": HParam(500, fixed(500)),
        "erm_sma_start": HParam(600, fixed(600)),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.average = copy.deepcopy(model).requires_grad_(False)
        self.linear_optimizer = torch.optim.Adam(model.head.parameters(), lr=self.hparams["erm_linear_lr"],
                                                 weight_decay=self.hparams["weight_decay"])
        self.register_buffer("sma_count", torch.zeros((), dtype=torch.long, device=next(model.parameters()).device))

    def optimizers(self):
        return {"optimizer": self.optimizer, "linear_optimizer": self.linear_optimizer}

    def scores(self, batch):
        return self.task.scores(self.average, batch)

    @torch.no_grad()
    def update_average(self, step: int) -> None:
        src, dst = self.model.state_dict(), self.average.state_dict()
        averaging = step + 1 >= self.hparams["erm_sma_start"]
        if averaging:
            self.sma_count += 1
        c = float(self.sma_count)
        for k, v in src.items():
            if averaging and v.is_floating_point():
                dst[k].mul_(c / (c + 1)).add_(v, alpha=1 / (c + 1))  # running mean of c + 1 iterates
            else:
                dst[k].copy_(v)

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        loss = self.task.loss(self.task.scores(self.model, batch), batch)
        opt = self.linear_optimizer if step < self.hparams["erm_linear_steps"] else self.optimizer
        self.model.zero_grad(set_to_none=True)  # the featurizer's gradients of a probing step must not pile up
        loss.backward()
        opt.step()
        self.update_average(step)
        return {"loss": loss.detach()}
