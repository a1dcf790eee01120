"""Fish: gradient matching across domains by a first-order meta-update (Reptile-style) over sequential domain steps."""

from __future__ import annotations

import copy

import torch

from shiftbench.algorithm import Algorithm
from shiftbench.hparams import HParam, choice
from shiftbench.registry import METHODS


@METHODS.register("fish")
class Fish(Algorithm):
    """Fish (Shi, Seely, Torr, Siddharth, Hannun, Usunier & Synnaeve, "Gradient Matching for Domain
    Generalization", ICLR 2022, Algorithm 2), as in DomainBed.

    Every step copies the weights θ into an inner model θ̃, takes one optimizer step on each training environment
    in turn (environment order, as DomainBed; the paper shuffles), then moves the weights to θ + ε(θ̃ − θ) with ε =
    ``meta_lr``. To first order this ascends the inner product of the domains' gradients, which favours directions
    every domain agrees on (the paper's Sec. 3.2), without second derivatives.

    The inner model's Adam keeps its moments across steps (DomainBed saves and reloads its state), so it is the
    optimizer checkpoints hold; the inner model is a submodule, so its weights are in ``state_dict`` too, though
    each step overwrites them. Floating buffers (BatchNorm statistics) are interpolated like parameters, as
    DomainBed interpolates the whole state dict; integer ones (batch counters) take the inner model's.
    Defaults and ranges are DomainBed's.
    """

    HPARAMS = {"meta_lr": HParam(0.5, choice([0.05, 0.1, 0.5]))}

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.inner = copy.deepcopy(model)
        self.optimizer = self.make_optimizer(self.inner.parameters())

    def update(self, minibatches, step):
        outer, inner = self.model.state_dict(), self.inner.state_dict()
        with torch.no_grad():
            for k, v in outer.items():
                inner[k].copy_(v)
        losses = []
        for batch in minibatches:
            loss = self.task.loss(self.task.scores(self.inner, batch), batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.detach())
        eps = float(self.hparams["meta_lr"])
        with torch.no_grad():
            for k, v in outer.items():
                if v.is_floating_point():
                    v.add_(eps * (inner[k] - v))
                else:
                    v.copy_(inner[k])
        return {"loss": torch.stack(losses).mean()}
