"""Meta-learning for domain generalisation (MLDG), first-order."""

from __future__ import annotations

import itertools

import torch
from torch.func import functional_call

from shiftbench.hparams import HParam, choice, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.methods.mixup import head_rows
from shiftbench.registry import METHODS


def meta_splits(n_envs: int, n_meta_test: int) -> list[tuple[int, int]]:
    """(meta-train, meta-test) environment pairs: a random order's last ``n_meta_test`` environments are meta-test,
    cycled over the others. At least one environment stays meta-train (DomainBed's split leaves none, i.e. no update
    at all, when ``n_meta_test`` equals the number of environments); one environment is its own meta-test."""
    if n_envs == 1:
        return [(0, 0)]
    k = min(int(n_meta_test), n_envs - 1)
    perm = torch.randperm(n_envs).tolist()
    return list(zip(perm[: n_envs - k], itertools.cycle(perm[n_envs - k:])))


def adam_first_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float,
                    weight_decay: float, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """The parameters after one step of a freshly built Adam: with bias correction its first update is
    ``lr · g / (|g| + eps)``, ``g`` including the L2 term (what DomainBed's inner optimizer does once per step)."""
    out = {}
    for name, p in params.items():
        g = grads[name] + weight_decay * p
        out[name] = p - lr * g / (g.abs() + eps)
    return out


@METHODS.register("mldg")
class MLDG(ERM):
    """MLDG (Li, Yang, Song & Hospedales, "Learning to Generalize: Meta-Learning for Domain Generalization",
    AAAI 2018, Algorithm 1 / Eq. 3), first-order as in DomainBed: for each (meta-train i, meta-test j) pair of
    ``meta_splits``, θ' is one inner Adam step on ``L_i(θ)`` (``adam_first_step``), and the model's gradient
    accumulates ``(∇L_i(θ) + β ∇L_j(θ')) / n_envs``, with ∇L_j(θ') taken at θ' and not differentiated through the
    inner step (first-order MAML); then the optimizer steps once.

    Meta-train and meta-test batches are cut to the shorter one. The split is drawn with torch's generator, which
    checkpoints carry. Defaults and ranges are DomainBed's (``mldg_beta``, ``n_meta_test``).
    """

    HPARAMS = {
        "mldg_beta": HParam(1.0, log_uniform(-1, 1)),
        "mldg_n_meta_test": HParam(2, choice([1, 2])),
    }

    def env_loss(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        return self.task.loss(self.task.scores(lambda x: functional_call(self.model, params, (x,)), batch), batch)

    def update(self, minibatches, step):
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        theta = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        beta, n_envs = float(self.hparams["mldg_beta"]), len(minibatches)
        key = self.task.input_keys[0]
        total = {n: torch.zeros_like(p) for n, p in theta.items()}
        objective = 0.0
        for i, j in meta_splits(n_envs, self.hparams["mldg_n_meta_test"]):
            n = min(len(minibatches[i][key]), len(minibatches[j][key]))
            b_i, b_j = head_rows(minibatches[i], n), head_rows(minibatches[j], n)
            loss_i = self.env_loss(theta, b_i)
            g_i = dict(zip(names, torch.autograd.grad(loss_i, [theta[n] for n in names], allow_unused=True)))
            g_i = {n: torch.zeros_like(theta[n]) if g is None else g for n, g in g_i.items()}
            inner = adam_first_step({n: p.detach() for n, p in theta.items()}, g_i, float(self.hparams["lr"]),
                                    float(self.hparams["weight_decay"]))
            inner = {n: p.requires_grad_(True) for n, p in inner.items()}
            loss_j = self.env_loss(inner, b_j)
            g_j = torch.autograd.grad(loss_j, [inner[n] for n in names], allow_unused=True)
            for name, gj in zip(names, g_j):
                total[name] += (g_i[name] + (0 if gj is None else beta * gj)) / n_envs
            objective += (loss_i.detach() + beta * loss_j.detach()) / n_envs
        self.optimizer.zero_grad(set_to_none=True)
        for name, p in theta.items():
            p.grad = total[name]
        self.optimizer.step()
        return {"loss": torch.as_tensor(objective)}
