"""Defining effects of the DomainBed algorithms of issue 17 (second half), each on a tiny case worked out by hand or
by an independent (numpy / scipy / plain-autograd loop) computation.

Shared fixture: the "identity" linear model (featurizer = identity, head with weights set by hand), so features are
the inputs and logits are ``x @ W.T``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from shiftbench.methods.ib_erm import IBERM, ib_penalty
from shiftbench.methods.ib_irm import IBIRM
from shiftbench.methods.irm import irm_penalty
from shiftbench.registry import METHODS
from shiftbench.tasks import Classification, Preference


def defaults(cls, **overrides) -> dict:
    return {**{k: v.default for k, v in cls.hparam_space().items()}, **overrides}


class Linear(nn.Module):
    """featurizer (identity or given) -> linear head, weights set by hand."""

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
    model = Linear(torch.eye(2)) if model is None else model
    return cls(model, task or Classification(), n_envs, defaults(cls, **overrides))


def env_batches(seed: int = 0, n_envs: int = 2, n: int = 6, d: int = 3, k: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(n, d, generator=g) + e, "y": torch.randint(0, k, (n,), generator=g),
             "idx": torch.arange(n)} for e in range(n_envs)]  # fmt: skip


def pref_batches(seed: int = 0, n_envs: int = 2, n: int = 5, d: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"chosen": torch.randn(n, d, generator=g) + e, "rejected": torch.randn(n, d, generator=g),
             "idx": torch.arange(n)} for e in range(n_envs)]  # fmt: skip


def test_registered_with_domainbed_defaults():
    expected = {
        "ib_erm": {"ib_lambda": 1e2, "ib_penalty_anneal_iters": 500},
        "ib_irm": {"ib_lambda": 1e2, "ib_penalty_anneal_iters": 500, "irm_lambda": 1e2,
                   "irm_penalty_anneal_iters": 500},
    }  # fmt: skip
    for name, hp in expected.items():
        space = METHODS.get(name).hparam_space()
        for k, v in hp.items():
            assert space[k].default == v, (name, k)


# ---------------------------------------------------------------- IB-ERM, IB-IRM

# env 0: x = [0, 0], [2, 0]: per-dimension unbiased variances [2, 0], mean 1
# env 1: x = [1, 1], [1, 3]: variances [0, 2], mean 1          -> ib_penalty = 1
IB_ENVS = [
    {"x": torch.tensor([[0.0, 0.0], [2.0, 0.0]]), "y": torch.tensor([0, 1]), "idx": torch.arange(2)},
    {"x": torch.tensor([[1.0, 1.0], [1.0, 3.0]]), "y": torch.tensor([1, 0]), "idx": torch.arange(2)},
]


def test_ib_penalty_is_the_feature_variance():
    assert ib_penalty([b["x"] for b in IB_ENVS]).item() == pytest.approx(1.0)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    assert ib_penalty([x]).item() == pytest.approx(np.var(x.numpy(), axis=0, ddof=1).mean(), rel=1e-6)


def test_ib_erm_weight_is_zero_then_lambda():
    algo = make(IBERM, ib_lambda=10.0, ib_penalty_anneal_iters=1)
    nll = np.mean([nn.functional.cross_entropy(b["x"], b["y"]).item() for b in IB_ENVS])  # W = I: logits = x
    stats = algo.update(IB_ENVS, 0)  # before the switch: weight 0, loss = nll
    assert stats["penalty"].item() == pytest.approx(1.0)
    assert stats["loss"].item() == pytest.approx(nll, abs=1e-6)
    stats = algo.update(IB_ENVS, 1)  # from the switch: loss = nll + 10 * penalty
    assert stats["loss"].item() == pytest.approx(stats["nll"].item() + 10 * stats["penalty"].item(), rel=1e-6)
    assert len(algo.optimizer.state) == 1 and int(algo.optimizer.state[algo.model.head.weight]["step"]) == 1


def test_ib_irm_adds_both_penalties():
    algo = make(IBIRM, ib_lambda=3.0, ib_penalty_anneal_iters=0, irm_lambda=5.0, irm_penalty_anneal_iters=10)
    irm = np.mean([irm_penalty(Classification(), b["x"], b).item() for b in IB_ENVS])
    nll = np.mean([nn.functional.cross_entropy(b["x"], b["y"]).item() for b in IB_ENVS])
    stats = algo.update(IB_ENVS, 0)  # irm weight 1 (before its switch), ib weight 3 (from its switch at 0)
    assert stats["penalty"].item() == pytest.approx(irm, abs=1e-6)
    assert stats["ib_penalty"].item() == pytest.approx(1.0)
    assert stats["loss"].item() == pytest.approx(nll + irm + 3.0, abs=1e-5)
