"""Helpers the method tests share: a linear model with hand-set weights, a method built with its defaults, and tiny
environment batches (conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import torch
from torch import nn

from shiftbench.tasks import Classification


def defaults(cls, **overrides) -> dict:
    """The default hyperparameters of ``cls`` with ``overrides``."""
    return {**{k: v.default for k, v in cls.hparam_space().items()}, **overrides}


class Linear(nn.Module):
    """featurizer (identity or given) -> linear head, weights set by hand (bias, when asked for, zero)."""

    def __init__(self, weight: torch.Tensor, bias: bool = False, featurizer: nn.Module | None = None):
        super().__init__()
        self.featurizer = featurizer or nn.Identity()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if bias:
                self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.featurizer(x))


def make(cls, model=None, n_envs=2, task=None, **overrides):
    """Method ``cls`` on ``model`` (default: the 2x2 identity ``Linear``) with its default hyperparameters."""
    model = Linear(torch.eye(2)) if model is None else model
    return cls(model, task or Classification(), n_envs, defaults(cls, **overrides))


def env_batches(seed: int = 0, n_envs: int = 2, n: int = 6, d: int = 3, k: int = 3) -> list[dict]:
    """``n_envs`` classification batches of ``n`` examples (``d`` features, ``k`` classes), environment e shifted by e."""
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, d, generator=g) + e, "y": torch.randint(0, k, (n,), generator=g),
             "idx": torch.arange(n)} for e in range(n_envs)]  # fmt: skip


def pref_batches(seed: int = 0, n_envs: int = 2, n: int = 5, d: int = 4) -> list[dict]:
    """``n_envs`` preference batches of ``n`` (chosen, rejected) pairs of ``d`` features."""
    g = torch.Generator().manual_seed(seed)
    return [{"chosen": torch.randn(n, d, generator=g) + e, "rejected": torch.randn(n, d, generator=g),
             "idx": torch.arange(n)} for e in range(n_envs)]  # fmt: skip
