"""Inter-domain Mixup: training on convex combinations of two environments' examples."""

from __future__ import annotations

import torch

from shiftbench.data import Batch
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS
from shiftbench.tasks import Task


def environment_pairs(n_envs: int) -> list[tuple[int, int]]:
    """Each environment paired with the next one in a random order, cyclically (one environment: itself)."""
    perm = torch.randperm(n_envs).tolist()
    return [(perm[i], perm[(i + 1) % n_envs]) for i in range(n_envs)]


def head_rows(batch: Batch, n: int) -> Batch:
    """The first ``n`` examples of every per-example entry (pairs of batches are cut to the shorter one)."""
    size = len(next(v for v in batch.values() if torch.is_tensor(v) and v.dim() > 0))
    return {k: v[:n] if torch.is_tensor(v) and v.dim() > 0 and len(v) == size else v for k, v in batch.items()}


def mix_inputs(task: Task, a: Batch, b: Batch, lam: torch.Tensor | float) -> Batch:
    """``a`` with every continuous input replaced by ``λ·a + (1 − λ)·b`` (labels and metadata stay ``a``'s)."""
    return {**a, **{k: lam * a[k] + (1 - lam) * b[k] for k in task.input_keys}}


@METHODS.register("mixup")
class Mixup(ERM):
    """Inter-domain Mixup (Xu et al., "Adversarial Domain Adaptation with Domain Mixup", AAAI 2020; Yan et al.,
    "Improve Unsupervised Domain Adaptation with Mixup Training", arXiv:2001.00677; after Zhang et al.'s mixup,
    ICLR 2018), as in DomainBed: each environment is paired with another (``environment_pairs``), both batches are
    cut to the shorter, λ ~ Beta(α, α) is drawn per pair, and the model is scored on ``λ·x_i + (1 − λ)·x_j`` with
    the loss ``λ·L(·, y_i) + (1 − λ)·L(·, y_j)``; the step descends the mean over pairs.

    For a reward model both responses of a pair are mixed (chosen with chosen, rejected with rejected), and the two
    losses read each pair's own margin. λ comes from torch's generator, which checkpoints carry, so resumed trials
    draw the same λ. Defaults and ranges are DomainBed's.
    """

    HPARAMS = {"mixup_alpha": HParam(0.2, log_uniform(-1, 1))}

    def draw_lambda(self) -> torch.Tensor:
        alpha = torch.tensor(float(self.hparams["mixup_alpha"]))
        return torch.distributions.Beta(alpha, alpha).sample()

    def update(self, minibatches, step):
        key = self.task.input_keys[0]
        objective = 0.0
        for i, j in environment_pairs(len(minibatches)):
            n = min(len(minibatches[i][key]), len(minibatches[j][key]))
            a, b = head_rows(minibatches[i], n), head_rows(minibatches[j], n)
            lam = self.draw_lambda().to(a[key].device)
            scores = self.task.scores(self.model, mix_inputs(self.task, a, b, lam))
            objective = objective + lam * self.task.loss(scores, a) + (1 - lam) * self.task.loss(scores, b)
        loss = objective / len(minibatches)
        self.step_on(loss)
        return {"loss": loss.detach()}
