"""Stacked parameters and the vectorised step: K copies of one architecture as one ``torch.func`` program.

The parameters of K models of one architecture are stacked along a new leading dimension
(``{name: (K, ...)}``, as ``torch.func.stack_module_state`` does); one model module serves as the stateless
template that ``torch.func.functional_call`` runs with one slice of them, and ``torch.func.vmap`` maps that over
the K slices, their K batches, hyperparameters and method states.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn


class FunctionalModel:
    """A callable standing in for ``template`` with the parameters ``params`` (what ``task.scores`` calls)."""

    def __init__(self, template: nn.Module, params: dict[str, torch.Tensor]):
        self.template, self.params = template, params

    def __call__(self, *args):
        return torch.func.functional_call(self.template, self.params, args)


def model_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot be stacked (None: it can): it must hold no buffers (no running statistics updated in
    place) and no dropout with p > 0 (a trial's masks come from its own position in the global RNG stream, which a
    vmapped program does not reproduce)."""
    if any(True for _ in model.buffers()):
        return "its model has buffers (e.g. BatchNorm running statistics)"
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"its model uses dropout (p={m.p})"
    return None


def stack_params(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """``{name: (K, ...)}``, detached copies of every model's parameters in ``named_parameters`` order."""
    names = [n for n, _ in models[0].named_parameters()]
    per = [dict(m.named_parameters()) for m in models]
    return {n: torch.stack([p[n].detach() for p in per]).clone() for n in names}


@torch.no_grad()
def write_params(stacked: dict[str, torch.Tensor], models: Sequence[nn.Module]) -> None:
    """Copies slice k of every stacked parameter into ``models[k]``."""
    for k, m in enumerate(models):
        for n, p in m.named_parameters():
            p.copy_(stacked[n][k])


def stack_trees(trees: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``[{key: tensor}] * K`` -> ``{key: (K, ...)}`` (nested lists of dicts are stacked element-wise)."""
    return {k: torch.stack([torch.as_tensor(t[k]) for t in trees]) for k in trees[0]}


def vectorised_step(objective: Callable, task, template: nn.Module) -> Callable:
    """``(params, minibatches, hp, state, step) -> (grads, loss, stats, new_state)``, all stacked over K.

    ``objective`` is a method's pure step loss (``Algorithm.objective``). The K losses come from one ``vmap`` of it
    over the slices; the gradients from one ordinary backward pass of their sum. Slice k's parameters enter only
    loss k, so its gradient is that of its own loss, as ``loss.backward()`` gives it in a trial alone (the sum's
    backward hands each loss a gradient of exactly 1). On this project's CPU that was 1-12% faster per step for
    ERM and 9-20% for IRM than ``vmap(grad(...))`` (which threads a gradient transform through every operation of
    every slice) at K = 18, width 64, with bit-identical gradients; IRM's inner ``torch.func.grad`` stays
    differentiable under it.
    """

    def one(params, minibatches, hp, state, step):
        model = FunctionalModel(template, params)
        loss, stats, new_state = objective(lambda b: task.scores(model, b), minibatches, step, hp, state)
        return loss, {k: v.detach() for k, v in stats.items()}, new_state

    forward = torch.func.vmap(one, in_dims=(0, 0, 0, 0, None))

    def run(params, minibatches, hp, state, step):
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss, stats, new_state = forward(leaves, minibatches, hp, state, step)
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), loss.detach(), stats, {k: v.detach() for k, v in new_state.items()}

    return run
