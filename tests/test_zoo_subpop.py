"""The subpopulation-shift methods' defining effects on tiny cases worked out by hand, and the subpop_digits dataset.

Most cases use a bias-free linear model on 2-d inputs (featurizer = identity), whose logits are set by hand, and a
hand-built ``MethodContext`` whose splits are small ``TensorSplit``s: environment 0 is held out, environment 1 trains.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shiftbench.algorithm import MethodContext
from shiftbench.config import TrialSpec
from shiftbench.data import TensorSplit
from shiftbench.errors import UserError
from shiftbench.methods.bsoftmax import BSoftmax
from shiftbench.methods.cbloss import CBLoss, effective_number_weights
from shiftbench.methods.crt import CRT
from shiftbench.methods.cvardro import CVaRDRO, cvar
from shiftbench.methods.dfr import DFR
from shiftbench.methods.focal import Focal, focal_loss
from shiftbench.methods.jtt import JTT
from shiftbench.methods.ldam import LDAM, ldam_loss, ldam_margins
from shiftbench.methods.lff import LfF, generalized_ce, relative_difficulty
from shiftbench.methods.lisa import lisa_partners, mix
from shiftbench.methods.resample import ReSample
from shiftbench.methods.reweight import ReWeight
from shiftbench.methods.sqrtreweight import SqrtReWeight
from shiftbench.registry import DATASETS, METHODS
from shiftbench.tasks import Classification

from methodkit import Linear


def split(x, y, group, start=0) -> TensorSplit:
    x = torch.as_tensor(x, dtype=torch.float32)
    n = len(x)
    return TensorSplit({"x": x, "y": torch.as_tensor(y), "group": torch.as_tensor(group),
                        "idx": torch.arange(start, start + n)})


def make(cls, weight=None, context=None, **hp):
    space = cls.hparam_space()
    alg = cls(Linear(torch.eye(2) if weight is None else weight), Classification(), 1,
              {**{k: v.default for k, v in space.items()}, **hp})
    if context is not None:
        alg.setup(context)
    return alg


def context(splits: dict, reference: nn.Module | None = None, tmp=None) -> MethodContext:
    return MethodContext(train_env_names=["train"], splits=splits, stream=None, device=torch.device("cpu"),
                         workdir=tmp, seed=0, train_envs=(1,),
                         train_reference=lambda method="erm", steps=0, **kw: reference)


def imbalanced() -> dict:
    """Training ``in``: groups 0, 1, 2, 3 (y = g // 2) with 6, 2, 1, 3 examples; out and test splits differ."""
    g = [0] * 6 + [1] * 2 + [2] * 1 + [3] * 3
    y = [k // 2 for k in g]
    x = [[1.0 - k // 2, float(k // 2)] for k in g]
    return {
        "env1_in": split(x, y, g),
        "env1_out": split([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 4, [0] * 5 + [1] * 4, [0] * 3 + [1] * 2 + [2] * 2 + [3] * 2,
                          start=100),
        "env0_in": split([[0.0, 1.0]] * 8, [1] * 8, [3] * 8),
        "env0_out": split([[0.0, 1.0]] * 8, [1] * 8, [2] * 8, start=8),
    }


# ----------------------------------------------------------------------------------------------- loss formulas


def test_focal_loss_is_the_formula():
    # logits (2, 0), label 0: p = 1 / (1 + e^-2); with γ = 2 the loss is −(1 − p)² log p
    p = 1 / (1 + math.exp(-2))
    alg = make(Focal, focal_gamma=2.0)
    batch = {"x": torch.tensor([[2.0, 0.0]]), "y": torch.tensor([0]), "idx": torch.tensor([0])}
    out = alg.update([batch], 0)
    assert float(out["loss"]) == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)
    assert float(focal_loss(torch.tensor([-math.log(p)]), 0.0)) == pytest.approx(-math.log(p), rel=1e-6)


def test_ldam_margins_scale_as_inverse_fourth_root_of_class_counts(tmp_path):
    # 16 and 1 training examples: n^(-1/4) = 1/2 and 1, scaled so the largest is max_m = 0.5 -> (0.25, 0.5)
    m = ldam_margins(torch.tensor([16.0, 1.0]), 0.5)
    assert m.tolist() == pytest.approx([0.25, 0.5])
    # logits (1, 1), label 1, scale 1: the true logit drops by 0.5 -> CE = log(e + e^0.5) − 0.5
    loss = ldam_loss(torch.tensor([[1.0, 1.0]]), torch.tensor([1]), m, 1.0)
    assert float(loss) == pytest.approx(math.log(math.e + math.exp(0.5)) - 0.5, rel=1e-6)
    # counts come from the training in split only (6 + 2 of class 0, 1 + 3 of class 1), not out or test
    alg = make(LDAM, context=context(imbalanced(), tmp=tmp_path), ldam_max_margin=1.0)
    assert alg.margins.tolist() == pytest.approx([(8 ** -0.25) / (4 ** -0.25), 1.0], rel=1e-6)


def test_cbloss_weights_are_one_minus_beta_over_one_minus_beta_to_the_n(tmp_path):
    w = effective_number_weights(torch.tensor([100.0, 1.0], dtype=torch.float64), 0.9)
    assert w.tolist() == pytest.approx([0.1 / (1 - 0.9 ** 100), 1.0])
    alg = make(CBLoss, context=context(imbalanced(), tmp=tmp_path), cb_beta=0.5)
    raw = [0.5 / (1 - 0.5 ** n) for n in (6, 2, 1, 3)]
    assert alg.weights.tolist() == pytest.approx([4 * r / sum(raw) for r in raw], rel=1e-6)


def test_reweight_and_sqrt_reweight_weights(tmp_path):
    ctx = context(imbalanced(), tmp=tmp_path)
    inv = [1 / n for n in (6, 2, 1, 3)]
    assert make(ReWeight, context=ctx).weights.tolist() == pytest.approx([4 * v / sum(inv) for v in inv], rel=1e-6)
    sq = [n ** -0.5 for n in (6, 2, 1, 3)]
    assert make(SqrtReWeight, context=ctx).weights.tolist() == pytest.approx([4 * v / sum(sq) for v in sq], rel=1e-6)
    # the loss: per-example weight of its group times its cross-entropy, averaged
    alg = make(ReWeight, context=ctx)
    batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "y": torch.tensor([0, 0]), "group": torch.tensor([0, 2])}
    w = [4 * v / sum(inv) for v in inv]
    expected = (w[0] * math.log(1 + math.exp(-1)) + w[2] * math.log(1 + math.e)) / 2
    assert float(alg.update([batch], 0)["loss"]) == pytest.approx(expected, rel=1e-5)


def test_bsoftmax_adds_the_log_prior(tmp_path):
    # training classes 8 and 4 -> prior (2/3, 1/3); logits (0, 1), label 1: CE((log 2/3, 1 + log 1/3), 1)
    alg = make(BSoftmax, context=context(imbalanced(), tmp=tmp_path))
    z = [math.log(2 / 3), 1 + math.log(1 / 3)]
    expected = -(z[1] - math.log(math.exp(z[0]) + math.exp(z[1])))
    batch = {"x": torch.tensor([[0.0, 1.0]]), "y": torch.tensor([1])}
    assert float(alg.update([batch], 0)["loss"]) == pytest.approx(expected, rel=1e-5)
    assert alg.scores(batch)[0].tolist() == pytest.approx([0.0, 1.0], abs=0.02)  # prediction keeps the plain logits


def test_cvar_is_the_mean_of_the_worst_alpha_fraction():
    losses = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0])
    assert float(cvar(losses, 0.4)) == pytest.approx((5 + 4) / 2)
    assert float(cvar(losses, 0.5)) == pytest.approx((5 + 4 + 0.5 * 3) / 2.5)  # a fractional α·n
    assert float(cvar(losses, 1.0)) == pytest.approx(3.0)
    assert float(cvar(losses, 0.1)) == pytest.approx(5.0)
    # through the method: α = 0.5 of two examples is the larger loss, log(1 + e)
    alg = make(CVaRDRO, cvar_alpha=0.5)
    batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "y": torch.tensor([0, 0])}
    assert float(alg.update([batch], 0)["loss"]) == pytest.approx(math.log(1 + math.e), rel=1e-5)


def test_lff_relative_difficulty_and_generalized_ce():
    w = relative_difficulty(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert w.tolist() == pytest.approx([0.5, 0.75, 0.0], abs=1e-6)
    assert float(generalized_ce(torch.tensor([math.log(2)]), 0.5)) == pytest.approx((1 - 0.5 ** 0.5) / 0.5)
    # the update: debiased loss is mean(W · CE_d) with W from the biased copy's losses at the same step
    torch.manual_seed(0)
    alg = make(LfF)
    batch = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "y": torch.tensor([0, 1])}
    with torch.no_grad():
        ce_d = nn.functional.cross_entropy(alg.model(batch["x"]), batch["y"], reduction="none")
        ce_b = nn.functional.cross_entropy(alg.biased(batch["x"]), batch["y"], reduction="none")
    out = alg.update([batch], 0)
    assert float(out["loss"]) == pytest.approx(float((ce_b / (ce_b + ce_d) * ce_d).mean()), rel=1e-5)
    assert set(alg.optimizers()) == {"optimizer", "biased_optimizer"}
    assert not torch.equal(alg.biased.head.weight, alg.model.head.weight)  # its own initialisation


# ----------------------------------------------------------------------------------------------- selective mixup


def test_lisa_partners_and_mixing():
    y = torch.tensor([0, 0, 1, 1, 0])
    d = torch.tensor([0, 1, 0, 1, 0])
    torch.manual_seed(1)
    j = lisa_partners(y, d, same_label=True)
    for i, k in enumerate(j.tolist()):  # same label, other domain (every example has one here)
        assert y[k] == y[i] and d[k] != d[i]
    j = lisa_partners(y, d, same_label=False)
    for i, k in enumerate(j.tolist()):  # same domain, other label
        assert d[k] == d[i] and y[k] != y[i]
    lone = lisa_partners(torch.tensor([0, 1]), torch.tensor([0, 1]), same_label=True)
    assert lone.tolist() == [0, 1]  # no allowed partner: itself
    x = torch.tensor([[0.0], [1.0]])
    xm, soft = mix(x, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.25, 0.5]), 2)
    assert xm.tolist() == [[0.75], [0.5]]
    assert soft.tolist() == [[0.25, 0.75], [0.5, 0.5]]


# ------------------------------------------------------------------------------------------- group-balanced data


def test_resample_draws_groups_uniformly(tmp_path):
    alg = make(ReSample, context=context(imbalanced(), tmp=tmp_path), batch_size=8)
    for k in range(5):
        b = alg.stream(k)
        assert torch.bincount(b["group"], minlength=4).tolist() == [2, 2, 2, 2]
        assert (b["y"] == b["group"] // 2).all()  # each drawn from its own group
        assert (b["idx"] < 100).all()  # training in split only


def test_jtt_upweights_exactly_the_identification_models_errors(tmp_path):
    # the identification model predicts class 0 everywhere (weights favour logit 0 for every input here)
    ref = Linear(torch.tensor([[2.0, 2.0], [0.0, 0.0]]))
    splits = imbalanced()
    alg = make(JTT, context=context(splits, reference=ref, tmp=tmp_path), jtt_lambda=7.0)
    train = splits["env1_in"].tensors
    wrong = train["y"] == 1  # exactly the class-1 examples are its errors
    assert alg.errors[0][train["idx"]].tolist() == wrong.tolist()
    batch = {k: v[[0, 7, 8, 11]] for k, v in train.items()}  # rows of groups 0, 1, 2, 3
    assert alg.example_weights([batch]).tolist() == [1.0, 1.0, 7.0, 7.0]


def test_dfr_head_trains_only_on_group_balanced_held_out_training_data(tmp_path):
    splits = imbalanced()
    ref = Linear(torch.eye(2))
    alg = make(DFR, context=context(splits, reference=ref, tmp=tmp_path))
    # env1_out holds groups with 3, 2, 2, 2 examples: 2 of each are kept, from env1_out only
    assert {name for name, _ in alg.held_out} == {"env1_out"}
    out = splits["env1_out"].tensors
    kept = torch.tensor([i for _, i in alg.held_out])
    groups = out["group"][kept - 100]
    assert torch.bincount(groups, minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.equal(alg.features, out["x"][kept - 100])  # identity featurizer: features are the inputs
    z, y, _ = alg.head_batch(None, 0)
    assert all(any(torch.equal(r, f) for f in alg.features) for r in z)
    # the featurizer is frozen, only the head moves; the ℓ1 penalty is part of the loss
    before = alg.model.head.weight.detach().clone()
    loss = float(alg.update(None, 0)["loss"])
    w1 = float(before.abs().sum())
    assert loss > alg.hparams["dfr_reg"] * w1
    assert not torch.equal(before, alg.model.head.weight)
    assert all(not p.requires_grad for p in alg.model.featurizer.parameters())


def test_crt_retrains_a_fresh_head_on_balanced_training_batches(tmp_path):
    ref = Linear(torch.tensor([[3.0, -1.0], [0.5, 2.0]]))
    alg = make(CRT, context=context(imbalanced(), reference=ref, tmp=tmp_path), batch_size=4)
    assert not torch.equal(alg.model.head.weight, ref.head.weight)  # re-initialised, seeded
    again = make(CRT, context=context(imbalanced(), reference=ref, tmp=tmp_path), batch_size=4)
    assert torch.equal(alg.model.head.weight, again.model.head.weight)
    _, y, batch = alg.head_batch(None, 0)
    assert torch.bincount(batch["group"], minlength=4).tolist() == [1, 1, 1, 1]
    alg.train()
    assert not alg.model.featurizer.training


# --------------------------------------------------------------------------------------------- refusal and data


@pytest.mark.parametrize("method", ["resample", "reweight", "sqrtreweight", "cbloss", "crt", "reweightcrt", "dfr"])
def test_group_methods_are_refused_without_groups(method):
    with pytest.raises(UserError) as e:
        TrialSpec.resolve("colored_digits", method, dataset_options={"env_size": 300, "resolution": 8})
    assert "\n" not in str(e.value) and "groups" in str(e.value)
    assert TrialSpec.resolve("subpop_digits", method).method == method


@pytest.mark.parametrize("method", ["jtt", "lff", "focal", "cvardro", "ldam", "bsoftmax", "lisa"])
def test_methods_without_groups_resolve_anywhere(method):
    assert TrialSpec.resolve("colored_digits", method).method == method


SMALL = {"env_size": 600, "resolution": 8}


def test_subpop_digits_groups_imbalanced_in_training_balanced_at_test():
    d = DATASETS.get("subpop_digits")(options={**SMALL, "spurious_corr": 0.9})
    test, train = d.environments
    for part, s in train.splits.items():
        t = s.tensors
        assert torch.equal(t["group"], 2 * t["y"] + t["attribute"])
        assert torch.equal(t["y"], (t["digit"] < 5).long())
        for c in (0, 1):
            n = int((t["y"] == c).sum())
            assert int(((t["y"] == c) & (t["attribute"] == c)).sum()) == round(0.9 * n)
    for s in test.splits.values():
        t = s.tensors
        for c in (0, 1):
            n = int((t["y"] == c).sum())
            assert int(((t["y"] == c) & (t["attribute"] == c)).sum()) == round(0.5 * n)
    # the colour is the channel holding the digit
    t = train.splits["in"].tensors
    ink = t["x"].sum((2, 3))
    assert torch.equal(ink.argmax(1), t["attribute"])
    # base digits never shared between the four splits
    bases = [set(s.tensors["base"].tolist()) for e in d.environments for s in e.splits.values()]
    assert all(not (a & b) for i, a in enumerate(bases) for b in bases[i + 1:])


def test_subpop_digits_worst_group_evaluation_and_group_envs():
    d = DATASETS.get("subpop_digits")(options=SMALL)
    t = d.environments[0].splits["in"].tensors
    g = t["group"].numpy()
    correct = (g != 1).astype(np.float32)  # every group right except y0_a1
    correct[np.flatnonzero(g == 3)[:1]] = 0.0
    m = d.evaluate("env0_in", {"correct": correct, "loss": np.zeros(len(g)), "idx": t["idx"].numpy()})
    assert m["worst_group_acc"] == 0.0 and m["acc_y0_a1"] == 0.0 and m["acc_y0_a0"] == 1.0
    assert m["acc_y1_a1"] == pytest.approx(1 - 1 / (g == 3).sum())
    grouped = DATASETS.get("subpop_digits")(options={**SMALL, "group_envs": True})
    assert grouped.env_names == ["test", "train:y0_a0", "train:y0_a1", "train:y1_a0", "train:y1_a1"]
    for k, env in enumerate(grouped.environments[1:]):
        assert (env.splits["in"].tensors["group"] == k).all()
    assert sum(len(e.splits["in"]) for e in grouped.environments[1:]) == len(d.environments[1].splits["in"])


def test_bad_spurious_corr_is_a_user_error():
    with pytest.raises(UserError, match="spurious_corr"):
        TrialSpec.resolve("subpop_digits", "erm", dataset_options={"spurious_corr": 0.2})


def test_subpop_methods_are_registered_with_subpopbench_defaults():
    expected = {"cbloss": {"cb_beta": 0.9999}, "focal": {"focal_gamma": 1.0},
                "ldam": {"ldam_max_margin": 0.5, "ldam_scale": 30.0}, "cvardro": {"cvar_alpha": 0.1},
                "jtt": {"jtt_lambda": 10.0}, "lff": {"lff_q": 0.7}, "lisa": {"lisa_alpha": 2.0, "lisa_p_sel": 0.5},
                "dfr": {"dfr_reg": 0.1}}
    for name, hp in expected.items():
        space = METHODS.get(name).hparam_space()
        assert {k: space[k].default for k in hp} == hp
    for name in ("resample", "reweight", "sqrtreweight", "bsoftmax", "crt", "reweightcrt"):
        METHODS.get(name)
