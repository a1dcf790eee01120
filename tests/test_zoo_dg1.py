"""Defining effects of the DomainBed algorithms of issue 17 (first half), each on a tiny case worked out by hand or
by an independent (numpy / finite-difference / plain-autograd) computation.

Shared fixture: the "identity" linear model of tests/test_methods.py (featurizer = identity, bias-free head with
weights set by hand), so features are the inputs and logits are ``x @ W.T``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from shiftbench.config import load_suite
from shiftbench.featurewise import env_features, input_features, scores_from_features
from shiftbench.methods.andmask import ANDMask, and_mask
from shiftbench.methods.arm import ARM, support_sets
from shiftbench.methods.cdann import CDANN
from shiftbench.methods.coral import CORAL, coral_discrepancy
from shiftbench.methods.dann import DANN
from shiftbench.methods.erm import ERM
from shiftbench.methods.iga import IGA, gradient_spread
from shiftbench.methods.mixup import Mixup, mix_inputs
from shiftbench.methods.mldg import MLDG, meta_splits
from shiftbench.methods.mmd import GAMMAS, MMD, gaussian_mmd
from shiftbench.methods.mtl import MTL
from shiftbench.methods.rsc import RSC
from shiftbench.methods.sagnet import SagNet, randomize
from shiftbench.methods.sandmask import SANDMask, sand_mask
from shiftbench.methods.selfreg import FEATURE_WEIGHT, SelfReg, same_class_partners, selfreg_regulariser
from shiftbench.methods.sd import SD
from shiftbench.models import Model, build_model, feature_width
from shiftbench.registry import METHODS
from shiftbench.tasks import Classification, Preference

from methodkit import Linear, env_batches, make, pref_batches


DOMAINBED = {
    "mmd": {"mmd_gamma": (1.0, 0.1, 10)}, "coral": {"mmd_gamma": (1.0, 0.1, 10)}, "sd": {"sd_reg": (0.1, 1e-5, 0.1)},
    "mixup": {"mixup_alpha": (0.2, 0.1, 10)}, "iga": {"iga_penalty": (1000, 10, 1e5)},
    "andmask": {"andmask_tau": (1.0, 0.5, 1.0)},
    "sandmask": {"sandmask_tau": (0.5, 0.0, 1.0), "sandmask_k": (10, 1e-3, 1e5)},
    "mldg": {"mldg_beta": (1.0, 0.1, 10), "mldg_n_meta_test": (2, 1, 2)},
    "dann": {"dann_lambda": (1.0, 1e-2, 1e2), "dann_lr_d": (1e-3, 10**-4.5, 10**-2.5),
             "dann_d_steps_per_g_step": (1, 1, 8), "dann_mlp_depth": (3, 3, 5), "dann_mlp_width": (256, 64, 1024),
             "dann_beta1": (0.5, 0.0, 0.5)},
    "rsc": {"rsc_f_drop_factor": (1 / 3, 0, 0.5), "rsc_b_drop_factor": (1 / 3, 0, 0.5)},
    "mtl": {"mtl_ema": (0.99, 0.5, 1.0)}, "sagnet": {"sag_w_adv": (0.1, 1e-2, 10)},
    "trm": {"trm_cos_lambda": (1e-4, 1e-5, 1.0), "trm_iters": (200, 1, 1e4), "trm_groupdro_eta": (1e-2, 1e-3, 0.1)},
    "adrmx": {"lr": (3e-3, 5e-4, 3e-3), "adrmx_mlp_depth": (9, 8, 10)},
}  # fmt: skip
"""Per method: hyperparameter -> (DomainBed's default, search range low, high); SAND-mask's τ default departs
(see its docstring)."""


@pytest.mark.parametrize("name", sorted(DOMAINBED))
def test_defaults_and_ranges_are_domainbeds(name):
    space = METHODS.get(name).hparam_space()
    for key, (default, lo, hi) in DOMAINBED[name].items():
        assert space[key].default == default, key
        draws = [space[key].sample(np.random.RandomState(s)) for s in range(200)]
        assert lo <= min(draws) and max(draws) <= hi, key
        assert len(set(draws)) > 1, key  # searched, not fixed
    assert METHODS.get("cdann").hparam_space().keys() == METHODS.get("dann").hparam_space().keys()
    assert {"arm", "selfreg"} <= set(METHODS.names())



NOT_DG = {
    "adversarial", "cbft", "finetune",  # adversarial robustness and mechanistic fine-tuning
    "cooperative", "otherplay", "selfplay",  # coordination
    "bsoftmax", "cbloss", "crt", "cvardro", "dfr", "focal", "jtt", "ldam", "lff", "lisa", "resample", "reweight",
    "reweightcrt", "sqrtreweight",  # subpopulation shift (the subpop suite)
}  # fmt: skip
"""Registered methods that are not domain-generalisation algorithms. A new method must join the domainbed_all suite
or this set, so none is left out of the zoo's leaderboard by accident."""


def test_domainbed_all_suite_runs_every_dg_method_on_both_digits_datasets():
    suite = load_suite("domainbed_all")
    dg = set(METHODS.names()) - NOT_DG
    assert NOT_DG <= set(METHODS.names())  # no stale name
    assert set(suite.methods) == dg, (sorted(dg - set(suite.methods)), sorted(set(suite.methods) - dg))
    assert len(suite.methods) == len(dg) == 34  # DomainBed's 30 of issue 17 plus ERM, IRM, GroupDRO, V-REx
    assert suite.datasets == ("colored_digits", "rotated_digits") and suite.test_envs == "each"
    assert suite.n_hparams >= 2 and suite.n_seeds >= 2  # a random search, replicated over trial seeds
    trials = suite.trials()
    assert len(trials) == 34 * (3 + 6) * suite.n_hparams * suite.n_seeds  # every single test environment
    assert {t.test_envs for t in trials if t.dataset == "rotated_digits"} == {(i,) for i in range(6)}

# ---------------------------------------------------------------- feature-level scoring (shared by the zoo)


@pytest.mark.parametrize("task", [Classification(), Preference()])
def test_features_then_head_give_the_tasks_scores(task):
    torch.manual_seed(0)
    n_out = 1 if isinstance(task, Preference) else 3
    model = build_model("mlp", (4,), n_out, {"mlp_width": 8})
    assert feature_width(model) == model.n_features == 8
    envs = pref_batches(d=4) if isinstance(task, Preference) else env_batches(d=4)
    for b in envs:
        f = input_features(model, task, b)
        assert len(f) == (10 if isinstance(task, Preference) else 6)  # preference: chosen and rejected rows
        assert torch.allclose(scores_from_features(model.head, task, b, f), task.scores(model, b), atol=1e-6)
    # one pass over all environments: each environment's block is its own featurisation
    for f, b in zip(env_features(model, task, envs), envs):
        assert torch.allclose(f, input_features(model, task, b), atol=1e-6)


# ---------------------------------------------------------------- MMD and CORAL


def numpy_coral(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((x.mean(0) - y.mean(0)) ** 2) + np.mean((np.cov(x, rowvar=False) - np.cov(y, rowvar=False))
                                                                  ** 2))


def numpy_mmd(x: np.ndarray, y: np.ndarray) -> float:
    def k(a, b):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-g * d) for g in GAMMAS)

    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_coral_discrepancy_by_hand_and_against_numpy():
    # x = [[0, 0], [2, 0]], y = [[0, 0], [0, 2]]: means [1, 0] and [0, 1] -> mean diff² = (1 + 1) / 2 = 1;
    # covariances (n - 1 = 1) diag(2, 0) and diag(0, 2) -> cov diff² = (4 + 4) / 4 = 2; total 3.
    x, y = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert coral_discrepancy(x, y).item() == pytest.approx(3.0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=g, dtype=torch.float64), 2 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert coral_discrepancy(a, b).item() == pytest.approx(numpy_coral(a.numpy(), b.numpy()), rel=1e-10)


def test_gaussian_mmd_by_hand_and_against_numpy():
    # one point each at distance² 1: K(x,x) = K(y,y) = 7 kernels × e^0 = 7, K(x,y) = Σ_γ e^-γ;
    # mmd = 14 − 2 Σ_γ e^-γ
    x, y = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    assert gaussian_mmd(x, y).item() == pytest.approx(14 - 2 * sum(math.exp(-g) for g in GAMMAS), rel=1e-6)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert gaussian_mmd(a, b).item() == pytest.approx(numpy_mmd(a.numpy(), b.numpy()), rel=1e-8)
    assert gaussian_mmd(a, a).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("cls, reference", [(CORAL, numpy_coral), (MMD, numpy_mmd)])
def test_feature_matching_update_penalises_every_pair_of_environments(cls, reference):
    envs = env_batches(n_envs=3, d=2, k=2)
    algo = make(cls, n_envs=3, mmd_gamma=0.5)
    xs = [b["x"].double().numpy() for b in envs]  # identity featurizer: the features are the inputs
    pairs = [reference(xs[i], xs[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    nll = np.mean([nn.functional.cross_entropy(b["x"], b["y"]).item() for b in envs])  # W = I: logits = x
    stats = algo.update(envs, 0)
    assert stats["penalty"].item() == pytest.approx(np.mean(pairs), rel=1e-5)
    assert stats["nll"].item() == pytest.approx(nll, rel=1e-6)
    assert stats["loss"].item() == pytest.approx(nll + 0.5 * np.mean(pairs), rel=1e-5)


def test_feature_matching_without_weight_is_erm():
    envs = env_batches(k=2, d=2)
    erm, coral = make(ERM), make(CORAL, mmd_gamma=0.0)
    erm.update(envs, 0)
    coral.update(envs, 0)
    assert torch.allclose(erm.model.head.weight, coral.model.head.weight, atol=1e-7)


def test_coral_trains_a_reward_model_on_both_responses_features():
    torch.manual_seed(0)
    envs = pref_batches(n=6, d=2)
    algo = make(CORAL, model=Linear(torch.tensor([[1.0, -1.0]])), task=Preference())
    stats = algo.update(envs, 0)
    feats = [torch.cat([b["chosen"], b["rejected"]]).double().numpy() for b in envs]
    assert stats["penalty"].item() == pytest.approx(numpy_coral(*feats), rel=1e-5)


# ---------------------------------------------------------------- SD


def test_sd_penalty_is_the_mean_squared_logit_by_hand():
    # logits with W = I are the inputs: [1, 0] and [0, 1] -> mean(z²) = (1 + 0 + 0 + 1) / 4 = 0.5
    envs = [{"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])},
            {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])}]  # fmt: skip
    algo = make(SD, sd_reg=0.2)
    stats = algo.update(envs, 0)
    nll = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert stats["penalty"].item() == pytest.approx(0.5)
    assert stats["loss"].item() == pytest.approx(nll + 0.2 * 0.5, abs=1e-6)
    # the penalty's gradient on W is 2 λ mean(z x^T) over the 4 logits: 2 · 0.2 · I / 4 = 0.1 I, added to CE's
    s = 1 / (1 + math.exp(-1))
    ce_grad = 0.5 * torch.tensor([[s - 1, -s], [1 - s, s]])
    assert torch.allclose(algo.model.head.weight.grad, ce_grad + 0.1 * torch.eye(2), atol=1e-6)


def test_sd_on_preference_penalises_the_reward_difference():
    # w = [1, 0]: r = first feature; pairs (2 vs 0) and (0 vs 1) -> d = [2, -1], mean(d²) = 2.5
    envs = [{"chosen": torch.tensor([[2.0, 5.0]]), "rejected": torch.tensor([[0.0, 1.0]]), "idx": torch.tensor([0])},
            {"chosen": torch.tensor([[0.0, 3.0]]), "rejected": torch.tensor([[1.0, 0.0]]), "idx": torch.tensor([0])}]
    algo = make(SD, model=Linear(torch.tensor([[1.0, 0.0]])), task=Preference())
    assert algo.update(envs, 0)["penalty"].item() == pytest.approx(2.5)


# ---------------------------------------------------------------- Mixup


class Recorder(nn.Module):
    """Identity featurizer + linear head that records every input it is called on."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.inner = Linear(weight)
        self.featurizer, self.head, self.seen = self.inner.featurizer, self.inner.head, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_mixup_scores_convex_combinations_with_the_drawn_lambda():
    # env 0 is all ones with label 0, env 1 all zeros with label 1 (and one example more, which is cut): a mixed
    # input is λ·1 + (1 − λ)·0 = λ or (1 − λ)·1 when env 1 comes first, so λ can be read off the input itself.
    envs = [{"x": torch.ones(3, 2), "y": torch.zeros(3, dtype=torch.long), "idx": torch.arange(3)},
            {"x": torch.zeros(4, 2), "y": torch.ones(4, dtype=torch.long), "idx": torch.arange(4)}]  # fmt: skip
    w = torch.tensor([[1.0, 0.5], [-1.0, 2.0]])
    model = Recorder(w)
    algo = make(Mixup, model=model, mixup_alpha=0.5)
    torch.manual_seed(3)
    stats = algo.update(envs, 0)
    assert len(model.seen) == 2 and all(x.shape == (3, 2) for x in model.seen)  # one mixed batch per pair, cut to 3
    expected, lams = 0.0, []
    for x in model.seen:
        m = x[0, 0].item()
        assert torch.allclose(x, torch.full_like(x, m)) and 0 < m < 1  # one λ per pair, convex
        lams.append(m)
        logits = x @ w.T
        ce0 = nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).item()
        ce1 = nn.functional.cross_entropy(logits, torch.ones(3, dtype=torch.long)).item()
        # whichever env came first, the ones-env's weight is m and the zeros-env's is 1 − m
        expected += m * ce0 + (1 - m) * ce1
    assert lams[0] != lams[1]  # drawn afresh per pair
    assert stats["loss"].item() == pytest.approx(expected / 2, rel=1e-6)


def test_mixup_lambda_is_beta_distributed_and_mixes_both_responses():
    algo = make(Mixup, mixup_alpha=0.2)
    torch.manual_seed(0)
    draws = torch.stack([algo.draw_lambda() for _ in range(4000)])
    # Beta(0.2, 0.2): mean 1/2, variance αβ / ((α+β)²(α+β+1)) = 0.04 / (0.16 · 1.4) = 0.178571
    assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
    assert draws.var().item() == pytest.approx(0.17857, abs=0.01)
    a = {"chosen": torch.ones(2, 3), "rejected": 2 * torch.ones(2, 3), "margin": torch.zeros(2)}
    b = {"chosen": torch.zeros(2, 3), "rejected": torch.zeros(2, 3), "margin": torch.ones(2)}
    mixed = mix_inputs(Preference(), a, b, 0.25)
    assert torch.equal(mixed["chosen"], torch.full((2, 3), 0.25))
    assert torch.equal(mixed["rejected"], torch.full((2, 3), 0.5))
    assert torch.equal(mixed["margin"], a["margin"])


# ---------------------------------------------------------------- IGA, AND-mask, SAND-mask

S = 1 / (1 + math.exp(-1))  # sigmoid(1)


def test_iga_penalty_is_the_spread_of_environment_gradients_by_hand():
    # W = I, env 0: x = e0, env 1: x = e1, both label 0. dCE/dW = (p − onehot) x^T:
    #   g0 = [[s − 1, 0], [1 − s, 0]],  g1 = [[0, −s], [0, s]]  (s = sigmoid(1))
    # Σ_e ‖g_e − ḡ‖² = 2 · ‖(g0 − g1) / 2‖² = (2 (1 − s)² + 2 s²) / 2 = (1 − s)² + s²
    envs = [{"x": torch.tensor([[1.0, 0.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])},
            {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])}]  # fmt: skip
    stats = make(IGA, iga_penalty=10.0).update(envs, 0)
    spread = (1 - S) ** 2 + S**2
    nll = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert stats["penalty"].item() == pytest.approx(spread, rel=1e-6)
    assert stats["loss"].item() == pytest.approx(nll + 10 * spread, rel=1e-6)
    assert gradient_spread([(torch.tensor([1.0, 2.0]),), (torch.tensor([3.0, 2.0]),)]).item() == pytest.approx(2.0)


def mask_envs() -> list[dict]:
    """W = I; env 0: x = [1, 1], env 1: x = [1, −1], both label 0. With q_e the class-1 probability
    (q0 = 1/2, q1 = sigmoid(−2)), g_e = [[−q_e, −q_e·x2], [q_e, q_e·x2]]: column 0 has the same signs in both
    environments, column 1 opposite ones."""
    return [{"x": torch.tensor([[1.0, 1.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])},
            {"x": torch.tensor([[1.0, -1.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])}]


def test_andmask_zeroes_components_whose_signs_disagree_by_hand():
    algo = make(ANDMask)
    algo.update(mask_envs(), 0)
    q = 0.5 + 1 / (1 + math.exp(2))  # q0 + q1
    # kept: column 0, mean [−q/2, q/2], scaled by 1 / (kept share 1/2); column 1 zeroed
    expected = torch.tensor([[-q, 0.0], [q, 0.0]])
    assert torch.allclose(algo.model.head.weight.grad, expected, atol=1e-6)
    grads = torch.tensor([[1.0, -2.0, 3.0, 0.5], [2.0, 1.0, 3.0, -0.5], [1.0, 1.0, -1.0, 0.5]])
    # |mean sign| = [1, 1/3, 1/3, 1/3]: τ = 1 keeps the first only, τ = 0.3 keeps all
    assert torch.equal(and_mask(grads, 1.0), torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(and_mask(grads, 0.3), torch.ones(4))


def test_sandmask_is_a_smooth_mask_by_hand():
    grads = torch.tensor([[1.0, 1.0, -1.0], [3.0, 1.5, 1.0]])
    # agreement [1, 1, 0]; unbiased variances [2, 0.125, 2]; τ = 0.5, k = 1:
    # tanh(0.5 / 2) = 0.244919, tanh(0.5 / 0.125) = tanh(4) = 0.999329, tanh(−0.5 / 2) < 0 -> 0
    mask = sand_mask(grads, 0.5, 1.0)
    assert torch.allclose(mask, torch.tensor([math.tanh(0.25), math.tanh(4.0), 0.0]), atol=1e-6)
    algo = make(SANDMask, sandmask_tau=0.5, sandmask_k=1.0)
    algo.update(mask_envs(), 0)
    q0, q1 = 0.5, 1 / (1 + math.exp(2))
    g = torch.stack([torch.tensor([[-q0, -q0], [q0, q0]]), torch.tensor([[-q1, q1], [q1, -q1]])])
    m = torch.tanh(0.5 / g.var(0)) * torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(algo.model.head.weight.grad, m * g.mean(0) / m.mean(), atol=1e-6)
    assert "andmask_tau" not in SANDMask.hparam_space()


# ---------------------------------------------------------------- MLDG


def np_ce_grad(w: np.ndarray, x: np.ndarray, y: int) -> np.ndarray:
    """d CE(W x, y) / dW = (softmax(W x) − onehot(y)) x^T, for one example."""
    z = w @ x
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    p[y] -= 1
    return np.outer(p, x)


def test_mldg_meta_gradient_matches_a_hand_two_step_computation():
    lr, beta = 0.1, 0.5
    xs, y = [np.array([1.0, 0.0]), np.array([0.0, 1.0])], 0
    envs = [{"x": torch.tensor(x[None], dtype=torch.float32), "y": torch.tensor([y]), "idx": torch.tensor([0])}
            for x in xs]
    expected = {}
    for i, j in ((0, 1), (1, 0)):
        g_i = np_ce_grad(np.eye(2), xs[i], y)
        w_inner = np.eye(2) - lr * g_i / (np.abs(g_i) + 1e-8)  # a fresh Adam's first step
        expected[i, j] = (g_i + beta * np_ce_grad(w_inner, xs[j], y)) / 2  # first order: ∇L_j at θ'
    assert not np.allclose(expected[0, 1], expected[1, 0])
    algo = make(MLDG, lr=lr, mldg_beta=beta)  # n_meta_test 2 with 2 environments: one meta-train, one meta-test
    torch.manual_seed(0)
    (i, j), = meta_splits(2, 2)
    torch.manual_seed(0)
    algo.update(envs, 0)
    assert np.allclose(algo.model.head.weight.grad.numpy(), expected[i, j], atol=1e-6)


def test_mldg_meta_splits():
    for _ in range(5):
        (i, j), = meta_splits(2, 2)
        assert {i, j} == {0, 1}
        pairs = meta_splits(3, 1)
        assert len(pairs) == 2 and pairs[0][1] == pairs[1][1] and {pairs[0][0], pairs[1][0], pairs[0][1]} == {0, 1, 2}
    assert meta_splits(1, 2) == [(0, 0)]


# ---------------------------------------------------------------- DANN and CDANN


class Feat(nn.Linear):
    """A linear featurizer with the width attribute the model interface reads."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.n_outputs = d_out


def dann_model(n_out: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return Model(Feat(3, 4), n_out)


def test_dann_model_step_reverses_the_discriminators_gradient_on_the_featurizer():
    envs = env_batches(n=5, d=3, k=2)
    algo = make(DANN, model=dann_model(), dann_lambda=0.7, dann_mlp_width=8)
    assert not algo.is_discriminator_step(0) and algo.is_discriminator_step(1)  # d = 1: model, then discriminator
    twin = copy.deepcopy(algo)  # the same weights, for an independent autograd computation
    feats = [twin.model.featurizer(b["x"]) for b in envs]
    risk = torch.stack([nn.functional.cross_entropy(twin.model.head(f), b["y"]) for f, b in zip(feats, envs)]).mean()
    env_ids = torch.tensor([0] * 5 + [1] * 5)
    disc = nn.functional.cross_entropy(twin.discriminator(torch.cat(feats)), env_ids)
    w = twin.model.featurizer.weight
    g_risk, g_disc = torch.autograd.grad(risk, w, retain_graph=True)[0], torch.autograd.grad(disc, w)[0]
    disc_before = copy.deepcopy(algo.discriminator.state_dict())
    stats = algo.update(envs, 0)
    assert stats["disc_loss"].item() == pytest.approx(disc.item(), rel=1e-6)
    assert g_disc.abs().sum() > 0
    assert torch.allclose(algo.model.featurizer.weight.grad, g_risk - 0.7 * g_disc, atol=1e-6)
    assert all(torch.equal(v, disc_before[k]) for k, v in algo.discriminator.state_dict().items())
    # the discriminator step descends D itself and leaves the model alone
    model_before = copy.deepcopy(algo.model.state_dict())
    twin = copy.deepcopy(algo)
    feats = torch.cat([twin.model.featurizer(b["x"]) for b in envs]).detach()
    last = twin.discriminator[-1].weight
    g_last = torch.autograd.grad(nn.functional.cross_entropy(twin.discriminator(feats), env_ids), last)[0]
    algo.update(envs, 1)
    assert torch.allclose(algo.discriminator[-1].weight.grad, g_last, atol=1e-6)
    assert all(torch.equal(v, model_before[k]) for k, v in algo.model.state_dict().items())


def test_cdann_discriminator_loss_is_class_balanced_and_class_conditioned():
    algo = make(CDANN, model=dann_model(), dann_mlp_width=8)
    assert CDANN.TASKS == ("classification",) and "class_embeddings" in dict(algo.named_children())
    z, envs, y = torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    out = algo.discriminator(z + algo.class_embeddings.weight[y])
    ce = nn.functional.cross_entropy(out, envs, reduction="none")
    # class counts [2, 1], 2 classes: weights 1 / (2·2), 1 / (2·2), 1 / (1·2)
    want = 0.25 * ce[0] + 0.25 * ce[1] + 0.5 * ce[2]
    assert algo.discriminator_loss(z, envs, y).item() == pytest.approx(want.item(), rel=1e-6)
    assert set(algo.optimizers()) == {"optimizer", "disc_optimizer"}
    disc_params = {id(p) for g in algo.disc_optimizer.param_groups for p in g["params"]}
    assert id(algo.class_embeddings.weight) in disc_params


# ---------------------------------------------------------------- RSC


def test_rsc_mutes_the_features_with_the_largest_gradients_by_hand():
    # identity featurizer, W[0] = [3, 1, 2]: the gradient of the class-0 logit on the features is [3, 1, 2] for
    # every example; its 2/3 quantile is 2 + (1/3)(3 − 2) = 7/3, so feature 0 (gradient 3) is muted.
    w = torch.tensor([[3.0, 1.0, 2.0], [0.0, 1.0, 0.0]])
    x = torch.tensor([[1.0, 0.5, 0.2], [0.2, 1.0, 0.1], [0.5, -0.3, 1.0]])
    batch = [{"x": x, "y": torch.zeros(3, dtype=torch.long), "idx": torch.arange(3)}]
    mask_f = torch.tensor([0.0, 1.0, 1.0])
    ce = lambda inp: nn.functional.cross_entropy(inp @ w.T, batch[0]["y"]).item()  # noqa: E731
    # b_drop_factor 1: the 0-quantile of the drops is their minimum, so no example is spared
    algo = make(RSC, model=Linear(w), n_envs=1, rsc_f_drop_factor=1 / 3, rsc_b_drop_factor=1.0)
    assert algo.update(batch, 0)["loss"].item() == pytest.approx(ce(x * mask_f), rel=1e-6)
    # b_drop_factor 1/2: examples whose class-0 probability drops less than the median drop keep every feature
    p0 = lambda inp: (inp @ w.T).softmax(1)[:, 0]  # noqa: E731
    drop = (p0(x) - p0(x * mask_f)).numpy()
    keep = drop < np.median(drop)
    assert keep.sum() == 1
    masked = torch.where(torch.tensor(keep)[:, None], x, x * mask_f)
    algo = make(RSC, model=Linear(w), n_envs=1, rsc_f_drop_factor=1 / 3, rsc_b_drop_factor=0.5)
    assert algo.update(batch, 0)["loss"].item() == pytest.approx(ce(masked), rel=1e-6)


# ---------------------------------------------------------------- MTL


def test_mtl_embeddings_are_the_weighted_average_of_batch_means_and_scoring_uses_the_batch_mean():
    envs = env_batches(n=4, d=2, k=2)
    algo = make(MTL, mtl_ema=0.5)
    assert algo.mtl_head.in_features == 4  # [z, μ]
    algo.update(envs, 0)
    means = [b["x"].mean(0) for b in envs]  # identity featurizer
    assert torch.allclose(algo.embeddings, 0.5 * torch.stack(means), atol=1e-6)  # from zeros: 0.5·mean + 0.5·0
    shifted = [{**b, "x": b["x"] + 1} for b in envs]
    algo.update(shifted, 1)
    want = torch.stack([0.5 * (m + 1) + 0.25 * m for m in means])
    assert torch.allclose(algo.embeddings, want, atol=1e-6)
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    head = algo.mtl_head
    expected = x @ head.weight[:, :2].T + torch.tensor([2.0, 0.0]) @ head.weight[:, 2:].T + head.bias  # μ = [2, 0]
    assert torch.allclose(algo.scores({"x": x, "y": torch.zeros(2, dtype=torch.long)}), expected, atol=1e-6)


# ---------------------------------------------------------------- SagNet


def test_sagnet_randomize_swaps_style_or_content_by_hand():
    # row 0 = [1, 3, 2]: mean 2, unbiased variance 1, content [−1, 1, 0]; row 1 = [10, 20, 30]: mean 20,
    # variance 100, content [−1, 0, 1]; perm swaps the rows.
    z = torch.tensor([[1.0, 3.0, 2.0], [10.0, 20.0, 30.0]], dtype=torch.float64)
    perm, eps = torch.tensor([1, 0]), 1e-5
    alpha0 = torch.zeros(2, 1, dtype=torch.float64)
    style = randomize(z, "style", alpha0, perm, eps)  # α = 0: all of the partner's style
    c0 = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64) / math.sqrt(1 + eps)
    assert torch.allclose(style[0], c0 * math.sqrt(100 + eps) + 20)  # ≈ [10, 30, 20]
    content = randomize(z, "content", alpha0, perm, eps)
    c1 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / math.sqrt(100 + eps) * 10
    assert torch.allclose(content[0], c1 * math.sqrt(1 + eps) + 2)  # ≈ [1, 2, 3]: row 1's content, row 0's style
    half = randomize(z, "style", torch.full((2, 1), 0.5, dtype=torch.float64), perm, eps)
    assert torch.allclose(half[0], c0 * math.sqrt(50.5 + eps) + 11)  # mean (2 + 20) / 2, variance (1 + 100) / 2
    assert torch.allclose(randomize(z, "style", torch.ones(2, 1, dtype=torch.float64), perm, eps), z)


def test_sagnet_trains_each_part_with_its_own_optimizer():
    torch.manual_seed(0)
    model = Model(Feat(3, 4), 2)
    algo = make(SagNet, model=model, sag_w_adv=0.1)
    groups = {k: {id(p) for g in o.param_groups for p in g["params"]} for k, o in algo.optimizers().items()}
    assert groups["optimizer"] == {id(p) for p in model.featurizer.parameters()}
    assert groups["content_optimizer"] == {id(p) for p in model.head.parameters()}
    assert groups["style_optimizer"] == {id(p) for p in algo.style_head.parameters()}
    stats = algo.update(env_batches(n=5, d=3, k=2), 0)
    # the adversary is sag_w_adv × cross-entropy against the uniform label, which is at least w · log 2
    assert stats["loss_adv"].item() >= 0.1 * math.log(2) - 1e-6
    x = torch.randn(4, 3)
    assert torch.allclose(algo.scores({"x": x}), model(x))  # prediction: the content head on plain features


# ---------------------------------------------------------------- ARM


def test_arm_adaptation_uses_the_support_sets_context():
    torch.manual_seed(0)
    model = build_model("mlp", (3,), 2, {"mlp_width": 8})
    algo = make(ARM, model=model, batch_size=2)
    algo.eval()
    x0, others_a, others_b = torch.randn(1, 3), torch.randn(1, 3), 5 + torch.randn(1, 3)
    score_a = algo.scores({"x": torch.cat([x0, others_a])})[0]
    score_b = algo.scores({"x": torch.cat([x0, others_b])})[0]
    assert not torch.allclose(score_a, score_b)  # the same example, adapted to two different batches
    with torch.no_grad():
        ctx = algo.context_net(torch.cat([x0, others_a])).mean(0)
        assert torch.allclose(score_a, model(x0 + ctx)[0], atol=1e-6)
    # scoring cuts a batch into support sets of batch_size when it divides, else keeps it whole
    batch = {"x": torch.arange(8.0)[:, None], "y": torch.zeros(8, dtype=torch.long)}
    assert [len(s["x"]) for s in support_sets(batch, 2)] == [2, 2, 2, 2]
    assert [len(s["x"]) for s in support_sets(batch, 3)] == [8]
    with pytest.raises(TypeError, match="input_shape"):
        make(ARM)  # a model without input_shape
    assert {id(p) for p in algo.context_net.parameters()} <= {id(p) for g in algo.optimizer.param_groups
                                                             for p in g["params"]}  # fmt: skip


# ---------------------------------------------------------------- SelfReg


def test_selfreg_partners_share_the_class():
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 0])
    for _ in range(10):
        p = same_class_partners(y)
        assert torch.equal(y[p], y) and sorted(p.tolist()) == list(range(7))  # a permutation within classes


def test_selfreg_loss_by_hand():
    # regulariser on hand values: logits [[1], [3]], features = [[0], [2]], projections [[1], [1]], partners swap
    logits, feats, proj = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [1.0]])
    swap = torch.tensor([1, 0])
    # ind: MSE(logits, swapped) = 4, features vs swapped projections: MSE([0, 2], [1, 1]) = 1 -> 4 + 0.3 · 1
    # hdl with p1 = swap, p2 = identity, λ = 0.25: mixed logits [0.25·3 + 0.75·1, 0.25·1 + 0.75·3] = [1.5, 2.5],
    #   MSE = 0.25; mixed projections [1, 1] -> 0.3 · 1; total 0.25 · 4.3 + 0.75 · 0.55 = 1.4875
    reg = selfreg_regulariser(logits, feats, proj, torch.tensor(0.25), swap, torch.tensor([0, 1]))
    assert reg.item() == pytest.approx(0.25 * (4 + 0.3) + 0.75 * (0.25 + 0.3))
    # update with one example per class: every partner is the example itself, so only the feature terms remain:
    # loss = CE + min(CE, 1) · 0.3 · MSE(features, projection(features))
    torch.manual_seed(0)
    envs = [{"x": torch.tensor([[1.0, -1.0], [0.5, 2.0]]), "y": torch.tensor([0, 1]), "idx": torch.arange(2)}]
    algo = make(SelfReg, n_envs=1)
    with torch.no_grad():
        ce = nn.functional.cross_entropy(envs[0]["x"], envs[0]["y"]).item()
        algo.train()
        mse = nn.functional.mse_loss(envs[0]["x"], algo.projection(envs[0]["x"])).item()
    stats = algo.update(envs, 0)
    assert stats["nll"].item() == pytest.approx(ce, rel=1e-6)
    assert stats["loss"].item() == pytest.approx(ce + min(ce, 1) * FEATURE_WEIGHT * mse, rel=1e-5)
