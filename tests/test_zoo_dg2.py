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

from shiftbench.methods.adrmx import ADRMX, fresh_copy, remix_pairs, supcon_lambda
from shiftbench.methods.cad import CAD, cad_bottleneck
from shiftbench.methods.causirl_coral import CausIRLCORAL
from shiftbench.methods.causirl_mmd import CausIRLMMD, split_halves
from shiftbench.methods.eqrm import EQRM, kde_quantile
from shiftbench.methods.ermplusplus import ERMPlusPlus
from shiftbench.methods.fish import Fish
from shiftbench.methods.fishr import Fishr, gradient_variance, per_example_head_grads
from shiftbench.methods.ib_erm import IBERM, ib_penalty
from shiftbench.methods.ib_irm import IBIRM
from shiftbench.methods.irm import irm_penalty
from shiftbench.methods.rdm import GAMMAS as RDM_GAMMAS
from shiftbench.methods.rdm import RDM, rdm_penalties
from shiftbench.methods.condcad import CondCAD
from shiftbench.methods.trm import TRM, neumann_inverse_hvp
from shiftbench.methods.transfer import Transfer, project_to_ball
from shiftbench.methods.urm import URM
from shiftbench.registry import METHODS
from shiftbench.tasks import Classification, Preference

from methodkit import Linear, defaults, env_batches, make, pref_batches


def test_registered_with_domainbed_defaults():
    expected = {
        "ib_erm": {"ib_lambda": 1e2, "ib_penalty_anneal_iters": 500},
        "ib_irm": {"ib_lambda": 1e2, "ib_penalty_anneal_iters": 500, "irm_lambda": 1e2,
                   "irm_penalty_anneal_iters": 500},
        "fish": {"meta_lr": 0.5},
        "fishr": {"fishr_lambda": 1000.0, "fishr_penalty_anneal_iters": 1500, "fishr_ema": 0.95},
        "cad": {"cad_lambda": 0.1, "cad_temperature": 0.1, "cad_flipped": True, "cad_project": False},
        "condcad": {"cad_lambda": 0.1, "cad_temperature": 0.1, "cad_flipped": True, "cad_normalized": False},
        "ermplusplus": {"erm_linear_lr": 5e-5, "erm_linear_steps": 500, "erm_sma_start": 600},
        "transfer": {"t_lambda": 1.0, "transfer_delta": 2.0, "transfer_d_steps_per_g": 10, "transfer_lr_d": 1e-3},
        "urm": {"urm_adv_lambda": 0.1, "urm_discriminator_hidden_layers": 1, "urm_generator_output": "tanh",
                "urm_discriminator_lr": 1e-3, "urm_discriminator_label_smoothing": 0.0},
        "trm": {"trm_cos_lambda": 1e-4, "trm_iters": 200, "trm_groupdro_eta": 1e-2},
        "adrmx": {"lr": 3e-3, "adrmx_cnt_lambda": 1.0, "adrmx_dclf_lambda": 1.0, "adrmx_disc_lambda": 0.75,
                  "adrmx_rmxd_lambda": 1.0, "adrmx_d_steps_per_g_step": 2, "adrmx_beta1": 0.5, "adrmx_mlp_width": 256,
                  "adrmx_mlp_depth": 9},
        "causirl_coral": {"mmd_gamma": 1.0},
        "causirl_mmd": {"mmd_gamma": 1.0},
        "eqrm": {"eqrm_quantile": 0.75, "eqrm_burnin_iters": 2500, "eqrm_lr": 1e-6},
        "rdm": {"rdm_lambda": 5.0, "rdm_penalty_anneal_iters": 1500, "rdm_variance_weight": 0.004, "rdm_lr": 1.5e-5},
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


# ---------------------------------------------------------------- CausIRL


def np_coral(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.mean(0) - b.mean(0)) ** 2).mean() + ((np.cov(a.T) - np.cov(b.T)) ** 2).mean())


def np_mmd(a: np.ndarray, b: np.ndarray, gammas) -> float:
    def k(u, v):
        d = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-g * d) for g in gammas).mean()

    return float(k(a, a) + k(b, b) - 2 * k(a, b))


MMD_GAMMAS = (1e-3, 1e-2, 1e-1, 1, 10, 100, 1e3)


@pytest.mark.parametrize("cls, distance", [(CausIRLCORAL, np_coral),
                                           (CausIRLMMD, lambda a, b: np_mmd(a, b, MMD_GAMMAS))])
def test_causirl_penalty_between_the_two_halves(cls, distance):
    envs = env_batches(seed=2, n=6, d=2, k=2)
    algo = make(cls, mmd_gamma=2.0)
    torch.manual_seed(5)
    cuts = [int(torch.randint(0, 6, ())) for _ in envs]  # what update draws from the same generator state
    x = [b["x"].numpy() for b in envs]
    first = np.concatenate([xe[:c] for xe, c in zip(x, cuts)])
    second = np.concatenate([xe[c:] for xe, c in zip(x, cuts)])
    assert len(first) >= 2 and len(second) >= 2, cuts
    torch.manual_seed(5)
    stats = algo.update(envs, 0)
    nll = np.mean([nn.functional.cross_entropy(torch.tensor(xe) @ torch.eye(2), b["y"]).item()
                   for xe, b in zip(x, envs)])  # fmt: skip
    assert stats["penalty"].item() == pytest.approx(distance(first, second), rel=1e-5)
    assert stats["loss"].item() == pytest.approx(nll + 2.0 * distance(first, second), rel=1e-5)


def test_causirl_halves_keep_a_pairs_responses_together_and_degenerate_halves_give_zero():
    chosen, rejected = torch.arange(8.0).reshape(4, 2), -torch.arange(8.0).reshape(4, 2)
    f = torch.cat([chosen, rejected])  # featurewise layout: chosen rows, then rejected rows
    first, second = split_halves([f], [1], n_inputs=2)
    assert torch.equal(first, torch.stack([chosen[0], rejected[0]]))
    assert torch.equal(second, torch.cat([chosen[1:], rejected[1:]]))
    algo = make(CausIRLCORAL)
    assert algo.penalty([torch.randn(4, 2)], [1]).item() == 0.0  # a half of one example: no covariance, no penalty


# ---------------------------------------------------------------- EQRM


def scipy_kde_quantile(r: np.ndarray, alpha: float) -> float:
    from scipy.optimize import brentq
    from scipy.stats import norm

    h = 1.06 * r.std(ddof=1) * len(r) ** -0.2
    return brentq(lambda q: norm.cdf((q - r) / h).mean() - alpha, r.min() - 10 * h, r.max() + 10 * h, xtol=1e-13)


def test_eqrm_quantile_of_risks_and_its_gradient():
    r = np.array([0.3, 0.9, 0.5, 1.6])
    risks = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    q = kde_quantile(risks, 0.8)
    assert q.item() == pytest.approx(scipy_kde_quantile(r, 0.8), abs=1e-9)
    q.backward()
    eps = 1e-6  # central differences of the scipy quantile, bandwidth re-estimated each time
    fd = [(scipy_kde_quantile(r + eps * e, 0.8) - scipy_kde_quantile(r - eps * e, 0.8)) / (2 * eps) for e in np.eye(4)]
    assert np.allclose(risks.grad.numpy(), fd, atol=1e-5)
    # symmetric risks: the median is the centre
    assert kde_quantile(torch.tensor([1.0, 2.0, 3.0]), 0.5).item() == pytest.approx(2.0, abs=1e-5)
    assert kde_quantile(torch.tensor([0.7, 0.7]), 0.9).item() == pytest.approx(0.7)  # no spread: that value


def test_eqrm_burn_in_then_quantile_with_its_learning_rate():
    envs = env_batches(seed=3, n_envs=3, d=2, k=2)
    algo = make(EQRM, lr=0.01, eqrm_burnin_iters=1, eqrm_quantile=0.9, eqrm_lr=1e-4)
    risks = [nn.functional.cross_entropy(b["x"], b["y"]).item() for b in envs]  # W = I
    assert algo.update(envs, 0)["loss"].item() == pytest.approx(np.mean(risks), abs=1e-6)
    w = algo.model.head.weight.detach().clone()
    risks = np.array([nn.functional.cross_entropy(b["x"] @ w.T, b["y"]).item() for b in envs])
    stats = algo.update(envs, 1)
    assert stats["loss"].item() == pytest.approx(scipy_kde_quantile(risks, 0.9), abs=1e-5)
    assert algo.optimizer.param_groups[0]["lr"] == 1e-4
    # cleared at the switch: Adam's first step again, |Δw| = lr where the gradient is not zero
    moved = (algo.model.head.weight.detach() - w).abs()
    assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], 1e-4), rtol=1e-3)


# ---------------------------------------------------------------- RDM


def test_rdm_matches_worst_domain_losses_to_the_pooled_ones():
    losses = [torch.tensor([0.1, 0.5, 0.3]), torch.tensor([1.0, 0.2, 2.0]), torch.tensor([0.4, 0.4, 0.6])]
    matching, variance, worst = rdm_penalties(losses)
    assert worst == 1  # mean 1.067 against 0.3 and 0.467
    pooled = np.concatenate([t.numpy() for t in losses])
    w = losses[1].numpy()
    assert matching.item() == pytest.approx(np_mmd(w[:, None], pooled[:, None], RDM_GAMMAS), rel=1e-5)
    assert variance.item() == pytest.approx(np.var(pooled, ddof=1) + np.var(w, ddof=1), rel=1e-6)


def test_rdm_update_weights_and_learning_rate_switch():
    envs = env_batches(seed=4, d=2, k=2)
    algo = make(RDM, rdm_penalty_anneal_iters=1, rdm_lambda=2.0, rdm_variance_weight=0.5, rdm_lr=1e-3)
    per = [nn.functional.cross_entropy(b["x"], b["y"], reduction="none") for b in envs]
    stats = algo.update(envs, 0)  # weights 0 before the switch
    assert stats["loss"].item() == pytest.approx(np.mean([p.mean().item() for p in per]), abs=1e-6)
    stats = algo.update(envs, 1)
    expected = stats["nll"] + 2.0 * stats["matching"] + 0.5 * stats["variance"]
    assert stats["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert algo.optimizer.param_groups[0]["lr"] == 1e-3


# ---------------------------------------------------------------- Fish

R0, R1 = math.log(1 + math.exp(-1)), math.log(1 + math.e)


def identity_envs() -> list[dict]:
    """x = e0 and x = e1, both label 0: with W = I the risks are R0 = log(1 + e^-1) and R1 = log(1 + e)."""
    return [{"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])},
            {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])}]  # fmt: skip


def test_fish_meta_update_by_hand():
    algo = make(Fish, lr=0.1, meta_lr=0.5)
    stats = algo.update(identity_envs(), 0)
    # Inner step 1 (env 0, x = e0): only column 0 has a gradient, (softmax([1, 0]) - e0) = [-(1 - s), 1 - s];
    #   Adam's first step moves it by lr * sign: column 0 -> [1.1, -0.1]. Column 1 is untouched, so env 1's logits
    #   are still [0, 1] and its risk is R1.
    # Inner step 2 (env 1, x = e1): column 1's gradient [-s, s] is new: its bias-corrected Adam ratio is
    #   (g / (1 + b1)) / sqrt(g^2 / (1 + b2)) = sqrt(1 + b2) / (1 + b1); column 0 has gradient 0 now, its moments
    #   decay: ratio (b1 g / (1 + b1)) / sqrt(b2 g^2 / (1 + b2)) = b1 / (1 + b1) * sqrt((1 + b2) / b2).
    b1, b2, lr = 0.9, 0.999, 0.1
    new, old = math.sqrt(1 + b2) / (1 + b1), b1 / (1 + b1) * math.sqrt((1 + b2) / b2)  # 0.744130, 0.670062
    inner = torch.tensor([[1 + lr * (1 + old), lr * new], [-lr * (1 + old), 1 - lr * new]])
    assert torch.allclose(algo.inner.head.weight.detach(), inner, atol=1e-6)
    # Meta step: theta + eps (theta_inner - theta) with eps = 0.5.
    assert torch.allclose(algo.model.head.weight.detach(), torch.eye(2) + 0.5 * (inner - torch.eye(2)), atol=1e-6)
    assert stats["loss"].item() == pytest.approx((R0 + R1) / 2, abs=1e-6)


def test_fish_equals_sequential_inner_steps_then_interpolation():
    torch.manual_seed(0)
    model = Linear(torch.randn(3, 4), bias=True, featurizer=nn.Sequential(nn.Linear(3, 4), nn.Tanh()))
    algo = Fish(model, Classification(), 3, defaults(Fish, lr=0.01, meta_lr=0.1))
    envs = env_batches(seed=5, n_envs=3)
    algo.update(envs, 0)  # the inner Adam now has moments; the second step must carry them on
    theta = copy.deepcopy(algo.model.state_dict())
    clone = copy.deepcopy(algo.model)
    opt = torch.optim.Adam(clone.parameters(), lr=0.01)
    opt.load_state_dict(copy.deepcopy(algo.optimizer.state_dict()))  # load_state_dict may share tensors
    for b in envs:
        opt.zero_grad()
        nn.functional.cross_entropy(clone(b["x"]), b["y"]).backward()
        opt.step()
    algo.update(envs, 1)
    for k, v in algo.model.state_dict().items():
        assert torch.allclose(v, theta[k] + 0.1 * (clone.state_dict()[k] - theta[k]), atol=1e-6), k


# ---------------------------------------------------------------- Fishr


def loop_grads(model, batch) -> torch.Tensor:
    """Per-example head gradients by a plain loop of autograd calls (weight then bias), kept differentiable."""
    rows = []
    for i in range(len(batch["y"])):
        loss = nn.functional.cross_entropy(model(batch["x"][i : i + 1]), batch["y"][i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.head.parameters()),
                                                                          create_graph=True)]))
    return torch.stack(rows)


def fishr_model() -> nn.Module:
    torch.manual_seed(1)
    return Linear(torch.randn(3, 4), bias=True, featurizer=nn.Sequential(nn.Linear(3, 4), nn.Tanh()))


def test_fishr_penalty_is_the_variance_across_domains_of_gradient_variances():
    envs = env_batches(seed=6, n_envs=3, n=5)
    model = fishr_model()
    algo = Fishr(model, Classification(), 3, defaults(Fishr, fishr_ema=0.9))
    features = [model.featurizer(b["x"]) for b in envs]
    penalty = algo.fishr_penalty(features, envs)
    # independent: per-example gradients by a loop, each domain's centred variance, their variance across domains
    v = torch.stack([((g - g.mean(0)) ** 2).mean(0) for g in (loop_grads(model, b) for b in envs)])
    expected = ((v - v.mean(0)) ** 2).mean()  # first step: m = (1 - ema) v, used as m / (1 - ema) = v
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    params = list(model.parameters())
    got = torch.autograd.grad(penalty, params)
    want = torch.autograd.grad(expected, params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))
    assert sum(a.abs().sum() for a in got[:2]) > 0  # the featurizer gets a gradient too
    # second step: the moving average, m = 0.9 * (0.1 v) + 0.1 v2, then divided by 0.1
    envs2 = env_batches(seed=7, n_envs=3, n=5)
    v2 = torch.stack([gradient_variance(loop_grads(model, b)) for b in envs2]).detach()
    m = 0.9 * 0.1 * v.detach() + 0.1 * v2
    penalty2 = algo.fishr_penalty([model.featurizer(b["x"]) for b in envs2], envs2)
    assert torch.allclose(algo.grad_var_ema, m, atol=1e-6)
    assert penalty2.item() == pytest.approx(((m / 0.1 - (m / 0.1).mean(0)) ** 2).mean().item(), rel=1e-5)


def test_fishr_per_example_gradients_of_a_reward_model():
    # Bradley-Terry with a linear head: d = w.(z_c - z_r), loss = -log sigmoid(d), so
    # dloss/dw = (sigmoid(d) - 1)(z_c - z_r) and dloss/db = 0 (the bias cancels in the difference)
    envs = pref_batches(n_envs=1, n=4, d=3)
    head = nn.Linear(3, 1)
    b = envs[0]
    feats = torch.cat([b["chosen"], b["rejected"]])
    g = per_example_head_grads(head, Preference(), b, feats)
    diff = b["chosen"] - b["rejected"]
    d = head(b["chosen"])[:, 0] - head(b["rejected"])[:, 0]
    assert torch.allclose(g[:, :3], (torch.sigmoid(d) - 1)[:, None] * diff, atol=1e-6)
    assert torch.allclose(g[:, 3], torch.zeros(4))


def test_fishr_update_uses_lambda_after_anneal():
    envs = env_batches(seed=8, n=4)
    algo = Fishr(fishr_model(), Classification(), 2, defaults(Fishr, fishr_penalty_anneal_iters=1, fishr_lambda=7.0))
    s0 = algo.update(envs, 0)
    assert s0["loss"].item() == pytest.approx(s0["nll"].item())
    s1 = algo.update(envs, 1)
    assert s1["penalty"].item() > 0
    assert s1["loss"].item() == pytest.approx(s1["nll"].item() + 7.0 * s1["penalty"].item(), rel=1e-6)


# ---------------------------------------------------------------- CAD, CondCAD


def np_cad(z, y, d, tau, conditional, flipped):
    """The bottleneck by an explicit loop over anchors, with probabilities (not log-sum-exp)."""
    terms = []
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i and (y[j] == y[i] or not conditional)]
        target = [j for j in others if (d[j] != d[i]) == flipped]
        if not any(y[j] == y[i] for j in range(len(z)) if j != i) or not target:
            continue
        e = {j: math.exp(float(np.dot(z[i], z[j])) / tau) for j in others}
        mass = sum(e[j] for j in target) / sum(e.values())
        terms.append((-1 if flipped else 1) * math.log(mass) * tau / 0.07)
    return float(np.mean(terms)) if terms else 0.0


def test_condcad_bottleneck_by_hand():
    # one class; z0 = [1, 0] (domain 0), z1 = [2, 0] (domain 1), z2 = [0, 3] (domain 0); tau = 1:
    #   anchor 0: s01 = 2, s02 = 0; other domain {1}: -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.126928
    #   anchor 1: both others are in the other domain: -log 1 = 0
    #   anchor 2: s20 = s21 = 0; other domain {1}: -log(1/2) = log 2
    # mean (0.126928 + log 2) / 3 = 0.273358, scaled by tau / 0.07
    z, d = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1, 0])
    y = torch.zeros(3, dtype=torch.long)
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 3 / 0.07
    assert cad_bottleneck(z, y, d, 1.0, conditional=True).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("flipped", [True, False])
def test_cad_bottleneck_matches_a_loop(conditional, flipped):
    g = torch.Generator().manual_seed(9)
    z = torch.randn(8, 3, generator=g)
    y, d = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0]), torch.tensor([0, 1, 0, 1, 1, 1, 0, 0])
    got = cad_bottleneck(z, y, d, 0.5, conditional=conditional, flipped=flipped)
    assert got.item() == pytest.approx(np_cad(z.numpy(), y.numpy(), d.numpy(), 0.5, conditional, flipped), rel=1e-5)


def test_cad_update_adds_the_bottleneck_and_stays_finite_without_partners():
    envs = env_batches(seed=10, d=2, k=2)
    for cls in (CAD, CondCAD):
        algo = make(cls, cad_lambda=0.5)
        stats = algo.update(envs, 0)
        x, y = torch.cat([b["x"] for b in envs]), torch.cat([b["y"] for b in envs])
        d = torch.tensor([0] * 6 + [1] * 6)
        bn = np_cad(x.numpy(), y.numpy(), d.numpy(), 0.1, cls.CONDITIONAL, True)
        assert stats["penalty"].item() == pytest.approx(bn, rel=1e-5)
        assert stats["loss"].item() == pytest.approx(nn.functional.cross_entropy(x, y).item() + 0.5 * bn, rel=1e-5)
    lone = [{"x": torch.randn(2, 2), "y": torch.tensor([0, 1]), "idx": torch.arange(2)}]  # no two share a label
    algo = make(CondCAD, n_envs=1)
    assert algo.update(lone, 0)["penalty"].item() == 0.0
    assert all(torch.isfinite(p).all() for p in algo.model.parameters())


# ---------------------------------------------------------------- ERM++


def small_model(seed: int = 1, d: int = 3, k: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return Linear(torch.randn(k, 4), bias=True, featurizer=nn.Sequential(nn.Linear(d, 4), nn.Tanh()))


def test_ermplusplus_probes_the_head_then_scores_the_uniform_weight_average():
    envs = env_batches(seed=11)
    algo = ERMPlusPlus(small_model(), Classification(), 2,
                       defaults(ERMPlusPlus, lr=0.01, erm_linear_lr=0.05, erm_linear_steps=2, erm_sma_start=3))
    feat0 = copy.deepcopy(algo.model.featurizer.state_dict())
    head0 = algo.model.head.weight.detach().clone()
    iterates = []
    for step in range(5):
        algo.update(envs, step)
        iterates.append({k: v.clone() for k, v in algo.model.state_dict().items()})
        if step == 0:  # probing: the featurizer has not moved, the head moved by Adam's first step, 0.05 * sign
            assert all(torch.equal(v, feat0[k]) for k, v in algo.model.featurizer.state_dict().items())
            moved = (algo.model.head.weight.detach() - head0).abs()
            assert torch.allclose(moved, torch.full_like(moved, 0.05), rtol=1e-3)
    assert not torch.equal(algo.model.featurizer[0].weight, feat0["0.weight"])  # full training from step 2
    # averaging from step sma_start - 1 = 2: the weights after steps 1 (the copy it starts from), 2, 3 and 4
    for k, v in algo.average.state_dict().items():
        assert torch.allclose(v, torch.stack([it[k] for it in iterates[1:]]).mean(0), atol=1e-6), k
    assert int(algo.sma_count) == 3
    x = envs[0]["x"]
    assert torch.allclose(algo.scores(envs[0]), algo.average(x)) and not torch.allclose(algo.average(x), algo.model(x))


# ---------------------------------------------------------------- Transfer


def test_transfer_projection_onto_the_ball():
    centre, adv = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        centre.weight.copy_(torch.tensor([[1.0, 1.0]])), centre.bias.fill_(0.0)
        adv.weight.copy_(torch.tensor([[4.0, 1.0]])), adv.bias.fill_(4.0)  # distance sqrt(9 + 16) = 5
    project_to_ball(adv, centre, 2.0)  # 2/5 of the way: weight [1 + 1.2, 1], bias 1.6
    assert torch.allclose(adv.weight, torch.tensor([[2.2, 1.0]])) and adv.bias.item() == pytest.approx(1.6)
    project_to_ball(adv, centre, 10.0)  # inside: unchanged
    assert adv.bias.item() == pytest.approx(1.6)


def test_transfer_gap_and_the_adversarial_head():
    envs = env_batches(seed=12, n_envs=3, d=2, k=2)
    algo = make(Transfer, lr=0.01, transfer_d_steps_per_g=1, transfer_lr_d=10.0, transfer_delta=0.3)
    risks = [nn.functional.cross_entropy(b["x"], b["y"]).item() for b in envs]  # W = I, identity features
    gap = algo.gap([b["x"] for b in envs], envs, algo.model.head)
    assert gap.item() == pytest.approx(max(risks) - min(risks), abs=1e-6)
    algo.update(envs, 0)
    # one ascent step of lr 10 leaves the ball of radius 0.3, so h' = h + 0.3 * grad(gap at h) / |grad|
    head = copy.deepcopy(algo.model.head)
    g = torch.autograd.grad(algo.gap([b["x"] for b in envs], envs, head), list(head.parameters()))
    g = torch.cat([t.reshape(-1) for t in g])
    moved = torch.cat([(a - c).reshape(-1) for a, c in zip(algo.adv_head.parameters(), head.parameters())])
    assert moved.norm().item() == pytest.approx(0.3, rel=1e-5)
    assert torch.allclose(moved, 0.3 * g / g.norm(), atol=1e-5)


# ---------------------------------------------------------------- URM


def test_urm_generator_and_discriminator_losses():
    envs = env_batches(seed=13)
    algo = URM(small_model(), Classification(), 2, defaults(URM, urm_adv_lambda=0.2, urm_discriminator_lr=0.01))
    disc = copy.deepcopy(algo.discriminator)
    model = copy.deepcopy(algo.model)
    x, y = torch.cat([b["x"] for b in envs]), torch.cat([b["y"] for b in envs])
    z = torch.tanh(model.featurizer(x))
    bce = nn.functional.binary_cross_entropy_with_logits
    fool = bce(disc(z)[:, 0], torch.ones(12))  # the encoder wants its features called noise (label 1)
    torch.manual_seed(3)
    stats = algo.update(envs, 0)
    assert stats["nll"].item() == pytest.approx(nn.functional.cross_entropy(model.head(z), y).item(), rel=1e-6)
    assert stats["loss"].item() == pytest.approx(stats["nll"].item() + 0.2 * fool.item(), rel=1e-6)
    # the discriminator step: U[-1, 1) noise labelled 1, this step's (tanh) features, detached, labelled 0
    torch.manual_seed(3)
    noise = -1 + 2 * torch.rand_like(z)
    d_loss = bce(disc(noise)[:, 0], torch.ones(12)) + 0.2 * bce(disc(z.detach())[:, 0], torch.zeros(12))
    assert stats["disc_loss"].item() == pytest.approx(d_loss.item(), rel=1e-6)
    grads = torch.autograd.grad(d_loss, list(disc.parameters()))
    for p_new, p_old, g in zip(algo.discriminator.parameters(), disc.parameters(), grads):
        step = 0.01 * g / (g.abs() + 1e-8)  # Adam's first step: lr * m_hat / (sqrt(v_hat) + eps), m_hat = g
        assert torch.allclose(p_old - p_new, step, atol=1e-6)
    assert torch.allclose(algo.scores(envs[0]), algo.model.head(torch.tanh(algo.model.featurizer(envs[0]["x"]))))


# ---------------------------------------------------------------- TRM


def test_trm_neumann_series_against_the_explicit_hessian():
    g = torch.Generator().manual_seed(14)
    x, y = 0.5 * torch.randn(6, 3, generator=g), torch.tensor([0, 1, 1, 0, 1, 0])
    head = nn.Linear(3, 2)
    v = 0.1 * torch.randn(6, generator=g)

    def loss_of(w_flat):
        return nn.functional.cross_entropy(x @ w_flat.reshape(2, 3).T + head.bias, y)

    hess = torch.autograd.functional.hessian(loss_of, head.weight.detach().reshape(-1)).numpy().astype(np.float64)
    partial, term = [v.numpy().astype(np.float64)], v.numpy().astype(np.float64)
    for _ in range(10):  # partial sums of sum_{k=0}^{10} (I - H)^k v
        term = term - hess @ term
        partial.append(partial[-1] + term)
    series = partial[-1]
    assert np.abs(series).max() < 10
    got = neumann_inverse_hvp(lambda: nn.functional.cross_entropy(head(x), y), head.weight, v)
    assert np.allclose(got.numpy(), series, atol=1e-5)
    # a sum growing past the bound stops at the first partial sum beyond it (here v scaled up 100 times)
    big = [100 * p for p in partial]
    first = next(k for k in range(1, 11) if np.abs(big[k]).max() > 10)
    got = neumann_inverse_hvp(lambda: nn.functional.cross_entropy(head(x), y), head.weight, 100 * v)
    assert first < 10 and np.allclose(got.numpy(), big[first], rtol=1e-4)
    # the eigenvalues here are small, so 10 terms are far from H^-1 v: the series is what TRM uses, not the inverse
    assert not np.allclose(series, np.linalg.pinv(hess) @ v.numpy(), atol=1e-2)


def test_trm_weights_follow_the_transfer_risks():
    envs = env_batches(seed=15, n_envs=3)
    model = small_model()
    before = copy.deepcopy(model)
    algo = TRM(model, Classification(), 3, defaults(TRM, trm_iters=0, trm_cos_lambda=0.0, trm_groupdro_eta=0.5))
    stats = algo.update(envs, 0)
    # independent: the risk of domain Q's fitted head on domain i, on the features before the model's step
    feats = [before.featurizer(b["x"]).detach() for b in envs]
    risk = [[nn.functional.cross_entropy(algo.env_heads[q](feats[i]), envs[i]["y"]).item() for i in range(3)]
            for q in range(3)]  # fmt: skip
    # alpha started at 1 - I, normalised per row: 1/2 off the diagonal; then alpha_Qi *= exp(eta * alpha_Qi R_i)
    for q in range(3):
        for i in range(3):
            want = 0.0 if i == q else 0.5 * math.exp(0.5 * 0.5 * risk[q][i])
            assert algo.alpha[q, i].item() == pytest.approx(want, rel=1e-5), (q, i)
    # with cos_lambda 0 the TRM term is the mean over Q of sum_{i != Q} alpha_Qi R_i(h_Q)
    transfer = np.mean([sum(0.5 * risk[q][i] for i in range(3) if i != q) for q in range(3)])
    assert stats["trm"].item() == pytest.approx(transfer, rel=1e-5)
    # each domain's head was fitted to its own domain: it beats the other domains' heads there
    for q in range(3):
        assert risk[q][q] < min(risk[j][q] for j in range(3) if j != q)


# ---------------------------------------------------------------- ADRMX


def np_ce(logits: np.ndarray, y: np.ndarray) -> float:
    logits = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]))


def np_supcon(z: np.ndarray, y: np.ndarray, d: np.ndarray, lam: float, tau: float) -> float:
    """The domain-weighted supervised contrastive loss, anchor by anchor."""
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    total, kept = 0.0, 0
    for i in range(len(z)):
        weight = lambda j: lam if d[j] == d[i] else 1 - lam  # noqa: E731
        others = [j for j in range(len(z)) if j != i]
        denom = sum(weight(j) * math.exp(zn[i] @ zn[j] / tau) for j in others) + 1e-5
        pos = [j for j in others if y[j] == y[i]]
        if pos:
            total += sum(math.log(weight(p) * math.exp(zn[i] @ zn[p] / tau) / denom + 1e-5) for p in pos) / len(pos)
            kept += 1
    return -total / (kept + 1)


def test_adrmx_contrastive_loss_by_hand():
    # z0 = (1, 0), z1 = (0, 1), z2 = (1, 1); classes 0, 0, 1; domains 0, 1, 0; λ = 0.8, temperature 1.
    # cos(z0, z1) = 0, cos(z0, z2) = cos(z1, z2) = 1/√2. Anchor 0: positive z1 (other domain, weight 0.2), denominator
    # 0.2·e^0 + 0.8·e^{1/√2} (z2 shares its domain). Anchor 1: positive z0 (weight 0.2), denominator 0.2 + 0.2·e^{1/√2}
    # (z2 is in the other domain). Anchor 2 has no positive and is skipped; 2 anchors kept, divided by 3.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    y, d = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    c = math.exp(1 / math.sqrt(2))
    l0 = math.log(0.2 / (0.2 + 0.8 * c + 1e-5) + 1e-5)
    l1 = math.log(0.2 / (0.2 + 0.2 * c + 1e-5) + 1e-5)
    assert supcon_lambda(z, y, d, lam=0.8, temperature=1.0).item() == pytest.approx(-(l0 + l1) / 3, rel=1e-9)
    # against the anchor-by-anchor loop, DomainBed's λ and temperature, on a random batch
    g = torch.Generator().manual_seed(21)
    z, y, d = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g), \
        torch.randint(0, 2, (9,), generator=g)
    want = np_supcon(z.numpy(), y.numpy(), d.numpy(), 0.5, 0.07)
    assert supcon_lambda(z, y, d).item() == pytest.approx(want, rel=1e-9)
    # the loss only sees directions: scaling the features changes nothing
    assert supcon_lambda(3 * z, y, d).item() == pytest.approx(want, rel=1e-9)


def test_adrmx_remix_pairs_share_the_class_and_cross_domains():
    torch.manual_seed(0)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    d = torch.tensor([0, 0, 1, 1, 1, 0])
    for _ in range(20):
        pairs = remix_pairs(y, d, n_classes=4)
        by_class = {int(y[a]): (int(a), int(b)) for a, b in pairs}
        assert sorted(by_class) == [0, 1]  # class 2 has one example, class 3 none
        a, b = by_class[0]
        assert y[b] == 0 and d[a] != d[b]  # class 0 spans both domains: the partner is from the other one
        assert set(by_class[1]) == {3, 4}  # class 1 lives in one domain: the other example of it


def adrmx_case():
    """ADRMX on a model whose featurizer is the identity (a 2 × 2 linear layer), its domain featurizer set to half
    the identity: f(x) = x, f_d(x) = x/2, z = x/2, and every remix ``z_a + f_d(x_b) = (x_a + x_b)/2`` is the same
    whichever of the pair comes first."""
    torch.manual_seed(3)
    feat = nn.Linear(2, 2, bias=False)
    feat.n_outputs = 2
    with torch.no_grad():
        feat.weight.copy_(torch.eye(2))
    model = Linear(torch.tensor([[1.0, -1.0], [0.5, 2.0]]), featurizer=feat)
    algo = make(ADRMX, model=model, adrmx_mlp_depth=3, adrmx_mlp_width=8)
    assert not torch.allclose(algo.domain_featurizer.weight, torch.eye(2))  # a fresh copy, not the featurizer
    with torch.no_grad():
        algo.domain_featurizer.weight.copy_(0.5 * torch.eye(2))
    # one example of each class in each environment: each class's remix pair is its two examples
    envs = [{"x": torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), "y": torch.tensor([0, 1]), "idx": torch.arange(2)},
            {"x": torch.tensor([[0.0, 1.0], [2.0, -1.0]]), "y": torch.tensor([0, 1]), "idx": torch.arange(2)}]
    return algo, envs


def test_adrmx_generator_objective_by_hand():
    algo, envs = adrmx_case()
    x = torch.cat([b["x"] for b in envs])
    y, e = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    xn, yn, en = x.numpy(), y.numpy(), e.numpy()
    w = algo.model.head.weight.detach().numpy()
    with torch.no_grad():
        c2 = algo.invariant_classifier(x / 2).numpy()
        cd = algo.domain_classifier(x / 2).numpy()
        disc = algo.discriminator(x / 2).numpy()
        terms = algo.generator_losses(x, y, e, algo.model.featurizer(x), algo.domain_featurizer(x))
    mid = np.stack([(xn[0] + xn[2]) / 2, (xn[1] + xn[3]) / 2])  # class 0's and class 1's remix
    want = {
        "ce_label": np_ce(xn @ w.T, yn), "ce_invariant": np_ce(c2, yn), "ce_domain": np_ce(cd, en),
        "cnt": 2 * np_supcon(xn, yn, en, 0.5, 0.07),  # f(x) and z = x/2 point the same ways
        "disc": np_ce(disc, en), "remix": 2 * np_ce(mid @ w.T, np.array([0, 1])) / 2,  # summed, / 2 classes
    }
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5), k
    total = (want["ce_label"] + want["ce_invariant"] + want["ce_domain"] + want["remix"] + want["cnt"]
             - 0.75 * want["disc"])  # fmt: skip
    assert terms["gen_loss"].item() == pytest.approx(total, rel=1e-5)


def test_adrmx_alternates_discriminator_and_generator_steps():
    algo, envs = adrmx_case()
    parts = {"disc": algo.discriminator, "featurizer": algo.model.featurizer, "head": algo.model.head,
             "domain": algo.domain_featurizer, "c2": algo.invariant_classifier, "cd": algo.domain_classifier}

    def snapshot():
        return {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}

    def moved(before, after):
        return {k for k in parts if any(not torch.equal(a, b) for a, b in zip(before[k], after[k]))}

    # d_steps_per_g_step = 2: steps 0 and 2 are the discriminator's ((k + 1) mod 3 < 2), step 1 the generator's
    assert [algo.is_discriminator_step(k) for k in range(6)] == [True, False, True, True, False, True]
    s0 = snapshot()
    algo.update(envs, 0)
    s1 = snapshot()
    assert moved(s0, s1) == {"disc"}
    algo.update(envs, 1)
    assert moved(s1, snapshot()) == set(parts) - {"disc"}
    x = torch.randn(3, 2)
    assert torch.allclose(algo.scores({"x": x}), algo.model(x))  # prediction is the model: featurizer and head


def test_adrmx_domain_featurizer_keeps_loaded_weights():
    feat = nn.Linear(3, 3)
    assert not torch.equal(fresh_copy(feat).weight, feat.weight)
    feat.loaded_from = "/weights.pt"  # as a ResNet loaded from ImageNet says
    assert torch.equal(fresh_copy(feat).weight, feat.weight)
