"""Hand-worked checks of ERM, GroupDRO, IRM and V-REx on tiny cases (CPU, fast), and every registered method on a
tiny preference task.

Shared hand values. The "identity" linear model has logits z = x (W = I, no bias). Environment 0 holds x = [1, 0],
environment 1 holds x = [0, 1], both with label 0, so
    risk_0 = CE([1, 0], 0) = log(1 + e^-1) = 0.3132617
    risk_1 = CE([0, 1], 0) = log(1 + e)    = 1.3132617
and risk_1 - risk_0 = log((1 + e) / (1 + e^-1)) = log(e) = 1 exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shiftbench.algorithm import Algorithm
from shiftbench.config import supports_task
from shiftbench.methods.erm import ERM
from shiftbench.methods.groupdro import GroupDRO, groupdro_weights
from shiftbench.methods.irm import IRM, AnnealedPenalty, irm_penalty
from shiftbench.methods.vrex import VREx, vrex_penalty
from shiftbench.models import build_model
from shiftbench.registry import METHODS
from shiftbench.tasks import Classification, Preference

from methodkit import Linear, defaults

R0 = math.log(1 + math.exp(-1))
R1 = math.log(1 + math.e)


def identity_envs() -> list[dict]:
    """The two one-example environments of the module docstring."""
    return [
        {"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])},
        {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])},
    ]


def make(cls, weight=None, **overrides):
    model = Linear(torch.eye(2) if weight is None else weight)
    return cls(model, Classification(), 2, defaults(cls, **overrides))


def test_registered_with_domainbed_defaults():
    expected = {
        "groupdro": (GroupDRO, {"groupdro_eta": 1e-2}),
        "irm": (IRM, {"irm_lambda": 1e2, "irm_penalty_anneal_iters": 500}),
        "vrex": (VREx, {"vrex_lambda": 1e1, "vrex_penalty_anneal_iters": 500}),
    }
    for name, (cls, hp) in expected.items():
        assert METHODS.get(name) is cls
        space = cls.hparam_space()
        assert "lr" in space  # inherited from Algorithm
        for k, v in hp.items():
            assert space[k].default == v
    lam = IRM.hparam_space()["irm_lambda"].sample(np.random.RandomState(0))
    anneal = VREx.hparam_space()["vrex_penalty_anneal_iters"].sample(np.random.RandomState(0))
    eta = GroupDRO.hparam_space()["groupdro_eta"].sample(np.random.RandomState(0))
    assert 1e-1 <= lam <= 1e5 and isinstance(anneal, int) and 1 <= anneal <= 1e4 and 1e-3 <= eta <= 1e-1


# ---------------------------------------------------------------- ERM


def test_erm_loss_and_gradient_by_hand():
    algo = make(ERM, lr=0.1)
    stats = algo.update(identity_envs(), 0)
    # mean risk = (R0 + R1) / 2 = 0.8132617
    assert stats["loss"].item() == pytest.approx((R0 + R1) / 2, abs=1e-6)
    # dCE/dW = (softmax(z) - onehot(y)) x^T, averaged over the 2 examples (s = sigmoid(1) = 0.7310586):
    #   env0: p - e0 = [s - 1, 1 - s] = [-0.2689,  0.2689] in column 0 (x = e0)
    #   env1: p - e0 = [-s, s]        = [-0.7311,  0.7311] in column 1 (x = e1)
    s = 1 / (1 + math.exp(-1))
    grad = 0.5 * torch.tensor([[s - 1, -s], [1 - s, s]])
    assert torch.allclose(algo.model.head.weight.grad, grad, atol=1e-6)
    # Adam's first step is -lr * g / (|g| + eps) = -lr * sign(g): row 0 goes up, row 1 goes down by 0.1.
    expected = torch.eye(2) - 0.1 * grad.sign()
    assert torch.allclose(algo.model.head.weight.detach(), expected, atol=1e-5)


# ---------------------------------------------------------------- GroupDRO


def test_groupdro_weights_move_to_higher_risk_env_by_hand():
    algo = make(GroupDRO, groupdro_eta=0.5)
    assert torch.equal(algo.q, torch.tensor([0.5, 0.5]))
    stats = algo.update(identity_envs(), 0)
    # q_e ∝ 0.5 * exp(0.5 * risk_e), so q_1 = 1 / (1 + exp(-0.5 * (R1 - R0))) = sigmoid(0.5) = 0.6224593
    q1 = 1 / (1 + math.exp(-0.5))
    assert torch.allclose(algo.q, torch.tensor([1 - q1, q1]), atol=1e-6)
    # loss = q0 R0 + q1 R1 = R0 + q1 (R1 - R0) = 0.3132617 + 0.6224593 = 0.9357210 (q from this step's update)
    assert stats["loss"].item() == pytest.approx(R0 + q1, abs=1e-6)
    assert stats["nll"].item() == pytest.approx((R0 + R1) / 2, abs=1e-6)


def test_groupdro_weights_function_and_checkpoint():
    # risks [0, log 3], eta 1 from uniform: q ∝ [1, 3] -> [0.25, 0.75]
    q = groupdro_weights(torch.tensor([0.5, 0.5]), torch.tensor([0.0, math.log(3)]), 1.0)
    assert torch.allclose(q, torch.tensor([0.25, 0.75]))
    algo = make(GroupDRO, groupdro_eta=0.5)
    for step in range(3):
        algo.update(identity_envs(), step)
    state = algo.checkpoint_state()
    assert "q" in state["module"]
    fresh = make(GroupDRO, groupdro_eta=0.5)
    assert not torch.equal(fresh.q, algo.q)
    fresh.load_checkpoint_state(state)
    assert torch.equal(fresh.q, algo.q)
    assert torch.equal(fresh.model.head.weight, algo.model.head.weight)


# ---------------------------------------------------------------- IRM

# Binary logits z = [a, 0]: (softmax(z) - onehot(y)) . z = (sigmoid(a) - [y == 0]) * a.
IRM_Z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [math.log(3), 0.0]])
IRM_Y = torch.tensor([0, 1, 0, 1])


def irm_closed_form(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/ds CE(s z, y) at s = 1 is mean_i (softmax(z_i) - onehot(y_i)) . z_i; the penalty multiplies the
    even-half and odd-half values."""
    per = ((z.softmax(1) - nn.functional.one_hot(y, z.shape[1])) * z).sum(1)
    return per[0::2].mean() * per[1::2].mean()


def test_irm_penalty_value_by_hand():
    batch = {"x": torch.zeros(4, 2), "y": IRM_Y, "idx": torch.arange(4)}
    # even rows (0, 2): ((sigmoid(1) - 1) * 1 + (sigmoid(-1) - 1) * -1) / 2 = (-0.268941 + 0.731059) / 2 = 0.231059
    # odd rows (1, 3):  (sigmoid(2) * 2 + sigmoid(log 3) * log 3) / 2 = (1.761594 + 0.75 * 1.098612) / 2 = 1.292777
    # penalty = 0.231059 * 1.292777 = 0.298707
    value = irm_penalty(Classification(), IRM_Z, batch)
    assert value.item() == pytest.approx(0.2987071, abs=1e-6)
    assert value.item() == pytest.approx(irm_closed_form(IRM_Z, IRM_Y).item(), abs=1e-6)


def test_irm_penalty_gradient_matches_closed_form():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2])
    batch = {"x": x, "y": y, "idx": torch.arange(6), "group": torch.arange(6)}  # extra metadata key is split too
    weight = torch.randn(3, 3)
    model_a, model_b = Linear(weight), Linear(weight)
    irm_penalty(Classification(), model_a(x), batch).backward()
    irm_closed_form(model_b(x), y).backward()
    assert torch.allclose(model_a.head.weight.grad, model_b.head.weight.grad, atol=1e-5)
    assert model_a.head.weight.grad.abs().sum() > 0


def test_irm_penalty_preference_closed_form_with_margin():
    # Bradley–Terry: d/ds -log sigmoid(s d - m) at s = 1 is (sigmoid(d - m) - 1) * d.
    d, m = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.0, 1.0, 0.5, -1.0])
    batch = {"chosen": torch.zeros(4, 1), "rejected": torch.zeros(4, 1), "idx": torch.arange(4), "margin": m}
    per = (torch.sigmoid(d - m) - 1) * d
    assert irm_penalty(Preference(), d, batch).item() == pytest.approx((per[0::2].mean() * per[1::2].mean()).item())
    with pytest.raises(ValueError):
        irm_penalty(Preference(), d[:1], {k: v[:1] for k, v in batch.items()})


@pytest.mark.parametrize("cls", [IRM, VREx])
def test_penalty_schedule_and_optimizer_reset(cls):
    lam, anneal = 100.0, 3
    algo = make(cls, **{cls.LAMBDA_KEY: lam, cls.ANNEAL_KEY: anneal})
    assert issubclass(cls, AnnealedPenalty)
    assert [algo.penalty_weight(s) for s in (0, 2, 3, 10)] == [1.0, 1.0, lam, lam]
    envs = [
        {"x": torch.randn(4, 2), "y": torch.tensor([0, 1, 0, 1]), "idx": torch.arange(4)},
        {"x": torch.randn(4, 2), "y": torch.tensor([1, 1, 0, 0]), "idx": torch.arange(4)},
    ]
    state_sizes = []
    step_on = algo.step_on
    algo.step_on = lambda loss: (state_sizes.append(len(algo.optimizer.state)), step_on(loss))
    adam_steps = []
    for step in range(5):
        stats = algo.update(envs, step)
        w = 1.0 if step < anneal else lam
        # loss = nll + w * penalty, w = 1 before step 3 and lambda from it
        assert stats["loss"].item() == pytest.approx((stats["nll"] + w * stats["penalty"]).item(), rel=1e-5)
        adam_steps.append(int(algo.optimizer.state[algo.model.head.weight]["step"]))
    # The optimizer holds state before each step except the first and the switch step, where it was cleared.
    assert state_sizes == [0, 1, 1, 0, 1]
    assert adam_steps == [1, 2, 3, 1, 2]


# ---------------------------------------------------------------- V-REx


def test_vrex_penalty_by_hand():
    # risks 0.2, 0.6: mean 0.4, deviations +-0.2, population variance (0.04 + 0.04) / 2 = 0.04
    assert vrex_penalty([torch.tensor(0.2), torch.tensor(0.6)]).item() == pytest.approx(0.04)
    # risks 1, 2, 3: mean 2, variance (1 + 0 + 1) / 3 = 2/3 (population, not the unbiased 1)
    assert vrex_penalty(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(2 / 3)


def test_vrex_update_by_hand():
    algo = make(VREx)
    stats = algo.update(identity_envs(), 0)
    # risks R0, R1 with R1 - R0 = 1: variance = (1/2)^2 = 0.25; before annealing the weight is 1, so
    # loss = (R0 + R1) / 2 + 0.25 = 0.8132617 + 0.25 = 1.0632617
    assert stats["penalty"].item() == pytest.approx(0.25, abs=1e-6)
    assert stats["nll"].item() == pytest.approx((R0 + R1) / 2, abs=1e-6)
    assert stats["loss"].item() == pytest.approx((R0 + R1) / 2 + 0.25, abs=1e-6)


# ---------------------------------------------------------------- every method on a preference task


def preference_envs(n_envs: int = 2, n: int = 16) -> list[dict]:
    """Separable pairs: the chosen item has feature 0 = +1, the rejected one -1; the rest is noise."""
    g = torch.Generator().manual_seed(0)
    envs = []
    for e in range(n_envs):
        chosen, rejected = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
        chosen[:, 0], rejected[:, 0] = 1.0 + 0.1 * e, -1.0
        envs.append({"chosen": chosen, "rejected": rejected, "idx": torch.arange(n)})
    return envs


def preference_methods() -> list:
    """Every registered method that trains on preference data (the registry is the list: a new method is in with no
    edit here). One that needs more than the per-environment batches, i.e. the trainer's ``setup`` context
    (reference models, data streams) or batch keys these pairs lack (groups), is skipped with that reason: the
    method contract (tests/test_method_contract.py) trains it through the real trainer."""
    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if not supports_task(cls, "preference"):
            continue
        reason = None
        if cls.setup is not Algorithm.setup:
            reason = f"{name} sets itself up from the trainer's MethodContext"
        elif cls.BATCH_KEYS:
            reason = f"{name} needs batch keys {list(cls.BATCH_KEYS)} that these pairs lack"
        if reason:
            reason += "; tests/test_method_contract.py trains it through the trainer where a tiny dataset suits it"
        out.append(pytest.param(cls, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def learning_rates(cls) -> dict[str, float]:
    """lr = 1e-3, and no other learning rate (``*_lr``: ERM++'s linear probe, EQRM's second phase) below it: ten
    steps is a small budget. Step fractions above it (Fish's meta_lr = 0.5) stay as they are."""
    space = cls.hparam_space()
    return {"lr": 1e-3, **{k: max(1e-3, float(space[k].default)) for k in space if k.endswith("_lr")}}


@pytest.mark.parametrize("cls", preference_methods())
def test_methods_learn_a_preference_task(cls):
    torch.manual_seed(0)
    task = Preference()
    model = build_model("mlp", (4,), 1, {})
    algo = cls(model, task, 2, defaults(cls, **learning_rates(cls)))
    envs = preference_envs()

    def mean_risk() -> float:
        # the method's own scores (MTL's domain-embedding head, ERM++'s weight average); for ERM and the
        # penalties these are the model's, i.e. what env_scores gives
        with torch.no_grad():
            return torch.stack([task.loss(algo.scores(b), b) for b in envs]).mean().item()

    before = mean_risk()
    losses = [algo.update(envs, step)["loss"].item() for step in range(10)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert mean_risk() < 0.9 * before
