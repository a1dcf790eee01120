"""Fishr: matching the domains' variances of per-example gradients of the head."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from shiftbench.data import Batch
from shiftbench.featurewise import env_features, scores_from_features
from shiftbench.hparams import HParam, log_uniform, uniform
from shiftbench.methods.irm import AnnealedPenalty
from shiftbench.registry import METHODS
from shiftbench.tasks import Task


def per_example_head_grads(head: torch.nn.Module, task: Task, batch: Batch, features: torch.Tensor) -> torch.Tensor:
    """``(n, P)``: row i is the gradient of example i's loss with respect to the head's P parameters (flattened in
    ``named_parameters`` order), kept differentiable in the features and the head (torch.func in place of the
    BackPACK extension DomainBed uses).

    ``features`` is laid out as ``featurewise.input_features`` (a preference pair's two responses in two blocks).
    """
    keys, n = task.input_keys, len(batch[task.input_keys[0]])
    names = [k for k, _ in head.named_parameters()]
    params = dict(head.named_parameters())
    rows = {k: v for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0 and len(v) == n and k not in keys}
    blocks = features.reshape(len(keys), n, *features.shape[1:])

    def loss_of_one(p, row, feats):
        one = {**{k: v[None] for k, v in row.items()}, **{k: feats[j][None] for j, k in enumerate(keys)}}
        return task.loss(task.scores(lambda z: functional_call(head, p, (z,)), one), one)

    g = vmap(grad(loss_of_one), in_dims=(None, 0, 1))(params, rows, blocks)
    return torch.cat([g[k].reshape(n, -1) for k in names], dim=1)


def gradient_variance(grads: torch.Tensor) -> torch.Tensor:
    """Per-coordinate population variance over examples: ``mean_i (g_i − ḡ)²`` (the Fisher's diagonal, centred)."""
    return (grads - grads.mean(0, keepdim=True)).pow(2).mean(0)


@METHODS.register("fishr")
class Fishr(AnnealedPenalty):
    """Fishr (Rame, Dancette & Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution Generalization",
    ICML 2022), as in DomainBed: gradients of the head only (the paper's Sec. 3.3, for tractability).

    Per environment e the variance v_e of the per-example head gradients is smoothed by an exponential moving
    average, ``m_e ← ema · m_e + (1 − ema) · v_e``, used as ``m_e / (1 − ema)`` (DomainBed's correction, which keeps
    the gradient reaching v_e independent of ``ema``; m_e starts at 0). The penalty is
    ``mean_e mean_j (m_ej/(1−ema) − mean_e' m_e'j/(1−ema))²``, the variance across domains of the gradient
    variances. Loss: mean per-example loss over the pooled batch + w · penalty, with w = 0 before
    ``fishr_penalty_anneal_iters`` and ``fishr_lambda`` after (Adam cleared at the switch). The averages are a
    buffer, so checkpoints carry them. DomainBed's ``lambda``, ``penalty_anneal_iters`` and ``ema`` are
    ``fishr_lambda``, ``fishr_penalty_anneal_iters`` and ``fishr_ema`` here, with its defaults and ranges.
    """

    HPARAMS = {
        "fishr_lambda": HParam(1000.0, log_uniform(1, 4)),
        "fishr_penalty_anneal_iters": HParam(1500, lambda r: int(r.uniform(0, 5000))),
        "fishr_ema": HParam(0.95, uniform(0.90, 0.99)),
    }
    LAMBDA_KEY = "fishr_lambda"
    ANNEAL_KEY = "fishr_penalty_anneal_iters"

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        n_params = sum(p.numel() for p in model.head.parameters())
        device = next(model.parameters()).device
        self.register_buffer("grad_var_ema", torch.zeros(n_envs, n_params, device=device))

    def penalty_weight(self, step: int) -> float:
        return float(self.hparams[self.LAMBDA_KEY]) if step >= self.hparams[self.ANNEAL_KEY] else 0.0

    def fishr_penalty(self, features: list[torch.Tensor], minibatches: list[Batch]) -> torch.Tensor:
        """The penalty of this step; advances the moving averages."""
        ema = float(self.hparams["fishr_ema"])
        smoothed = []
        for e, (f, b) in enumerate(zip(features, minibatches)):
            v = gradient_variance(per_example_head_grads(self.model.head, self.task, b, f).float())
            m = ema * self.grad_var_ema[e] + (1 - ema) * v
            self.grad_var_ema[e] = m.detach()
            smoothed.append(m / (1 - ema))
        smoothed = torch.stack(smoothed)
        return (smoothed - smoothed.mean(0, keepdim=True)).pow(2).mean(1).mean()

    def update(self, minibatches, step):
        features = env_features(self.model, self.task, minibatches)
        losses = [self.task.loss(scores_from_features(self.model.head, self.task, b, f), b, reduction="none")
                  for b, f in zip(minibatches, features)]  # fmt: skip
        nll = torch.cat(losses).mean()
        penalty = self.fishr_penalty(features, minibatches)
        loss = nll + self.penalty_weight(step) * penalty
        if step == self.hparams[self.ANNEAL_KEY]:
            self.reset_optimizer()
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
