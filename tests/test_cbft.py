"""The cue dataset's counterfactuals, and CBFT's defining effects against naive fine-tuning from the same θ_C."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftbench.config import TrialSpec
from shiftbench.datasets.cue_digits import VARIANTS, add_cue, cue_boxes
from shiftbench.errors import UserError
from shiftbench.methods.cbft import Interpolated, class_mean_gap, interpolate
from shiftbench.methods.finetune import nc_splits
from shiftbench.models import build_model
from shiftbench.trainer import Interrupted, RunOptions, Trainer, load_dataset, run_trial

SMALL = {"env_size": 1000, "nc_size": 200, "test_size": 200}



@pytest.fixture(scope="module")
def cue():
    return load_dataset("cue_digits", {**SMALL, "cue_fraction": 0.6})


def box_is_lit(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """Per image, whether every pixel of class cls's box is 1."""
    s, boxes = cue_boxes(x.shape[-1])
    return torch.stack([x[i, :, r : r + s, c : c + s].eq(1).all() for i, (r, c) in enumerate(boxes[k] for k in cls)])


def test_cue_sits_in_exactly_p_of_each_class_at_the_label_position(cue):
    t = cue.eval_splits()["env0_in"].tensors
    for c in range(10):
        n_c = int((t["y"] == c).sum())
        assert int(((t["y"] == c) & (t["cue"] == c)).sum()) == round(0.6 * n_c)
    cued = t["cue"] >= 0
    assert bool((t["cue"][~cued] == -1).all()) and torch.equal(t["cue"][cued], t["y"][cued])
    assert bool(box_is_lit(t["x"][cued], t["cue"][cued]).all())
    nc = cue.eval_splits()["env0_nc"].tensors
    assert bool((nc["cue"] == -1).all()) and len(nc["y"]) == 200


def test_counterfactual_variants(cue):
    t = cue.eval_splits()["env1_in"].tensors
    n = len(t["y"]) // 4
    x, y, v = t["x"].view(4, n, *t["x"].shape[1:]), t["y"].view(4, n), t["variant"].view(4, n)
    cues, base = t["cue"].view(4, n), t["base"].view(4, n)
    assert [VARIANTS[int(v[k, 0])] for k in range(4)] == ["NC", "C", "RC", "RI"] and bool((y == y[0]).all())
    assert bool((cues[0] == -1).all()) and bool((cues[1] == y[0]).all()) and bool((cues[3] == y[0]).all())
    assert torch.equal(x[1], add_cue(x[0], y[0]))  # C = NC with the label's box, nothing else changed
    assert torch.equal(x[2], add_cue(x[0], cues[2]))  # RC = NC with a random class's box
    assert 0.8 < float((cues[2] != y[0]).float().mean()) < 1.0  # uniform over the ten classes
    assert bool(box_is_lit(x[3], y[0]).all())
    assert float((base[3] != base[0]).float().mean()) > 0.8  # RI swaps the image (its base follows the image)


def test_no_digit_crosses_environments_or_in_out(cue):
    s = {k: set(v.tensors["base"].tolist()) for k, v in cue.eval_splits().items()}
    train = s["env0_in"] | s["env0_out"] | s["env0_nc"]
    assert not train & (s["env1_in"] | s["env1_out"])
    assert not s["env0_in"] & s["env0_out"] and not s["env1_in"] & s["env1_out"]
    assert s["env0_nc"] <= s["env0_in"]  # D_NC: cue-free copies of training digits


def test_dataset_scores_each_variant(cue):
    t = cue.eval_splits()["env1_out"].tensors
    correct = (t["variant"] % 2 == 0).float().numpy()  # right on NC and RC, wrong on C and RI
    idx = t["idx"].numpy()[::-1].copy()  # order must not matter
    out = {"correct": correct[::-1].copy(), "loss": np.zeros(len(idx)), "idx": idx}
    m = cue.evaluate("env1_out", out)
    assert (m["nc_acc"], m["c_acc"], m["rc_acc"], m["ri_acc"], m["acc"]) == (1.0, 0.0, 1.0, 0.0, 0.5)
    assert "nc_acc" not in cue.evaluate("env0_out", {"correct": np.ones(3), "loss": np.zeros(3), "idx": np.arange(3)})


def test_bad_cue_input_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="cue_fraction=1.5 must be between 0 and 1"):
        load_dataset("cue_digits", {**SMALL, "cue_fraction": 1.5})
    with pytest.raises(UserError, match="test_size=2 must be large enough for one 'in' and one 'out' copy"):
        load_dataset("cue_digits", {**SMALL, "test_size": 2})
    spec = TrialSpec.resolve("cue_digits", "erm", test_envs=(0,), steps=2, eval_every=2, dataset_options=SMALL)
    with pytest.raises(UserError, match="hold out exactly environment 1"):
        run_trial(spec, tmp_path / "t")


def test_class_mean_gap_by_hand():
    z_a = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # class 0 mean (2, 0) -> (1, 0); class 1 (0, 2) -> (0, 1)
    z_b = torch.tensor([[0.0, 5.0], [1.0, 1.0]])  # class 0 mean (0, 5) -> (0, 1); class 2 only here
    gap = class_mean_gap(z_a, torch.tensor([0, 0, 1]), z_b, torch.tensor([0, 2]), k=3)
    assert float(gap) == pytest.approx(2.0)  # |(1,0) - (0,1)|^2 = 2 for class 0; classes 1, 2 are skipped


def test_path_ends_are_the_two_models():
    torch.manual_seed(0)
    a, b = build_model("mlp", (1, 4, 4), 3, {}), build_model("mlp", (1, 4, 4), 3, {})
    x = torch.rand(5, 1, 4, 4)
    theta_a, theta_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert torch.allclose(Interpolated(b, interpolate(theta_a, theta_b, 1.0))(x), a(x))
    assert torch.allclose(Interpolated(b, interpolate(theta_a, theta_b, 0.0))(x), b(x))


def test_fine_tuning_starts_at_the_reference_and_reads_the_cue_free_split(tmp_path):
    spec = TrialSpec.resolve("cue_digits", "finetune", steps=3, eval_every=3, dataset_options=SMALL,
                             hparams={"lr": 1e-12, "weight_decay": 0.0, "ft_reference_steps": 5})
    run = Trainer(spec, tmp_path / "b")._build()
    assert run.algorithm.nc_split == "env0_nc"
    run_trial(spec, tmp_path / "t")  # lr 1e-12 (lr must be > 0): the model does not leave θ_C
    ref = torch.load(tmp_path / "t" / "reference_erm_5.pt", weights_only=True)
    final = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert all(torch.allclose(ref[k], final[k], rtol=0, atol=1e-9) for k in ref)


@pytest.fixture(scope="module")
def finetune_vs_cbft(tmp_path_factory):
    """Naive fine-tuning and CBFT (paper defaults) from the same θ_C (300 ERM steps) on the small cue digits, p=90%."""
    out = {}
    for method in ("finetune", "cbft"):
        spec = TrialSpec.resolve("cue_digits", method, steps=300, eval_every=299, seed=0, dataset_options=SMALL,
                                 hparams={"ft_reference_steps": 300})
        d = tmp_path_factory.mktemp(method) / "t"
        record = run_trial(spec, d)["record"]
        out[method] = (spec, d, record)
    return out


def midpoint_loss(spec, trial_dir) -> float:
    """Cross-entropy on the cue environment's held-out split, cued as in training, at θ_0.5 = (θ_C + θ) / 2."""
    ds = load_dataset("cue_digits", {**spec.dataset_options, "validation": "cued"})
    model = build_model(spec.model, ds.input_shape, 10, spec.hparams)
    model.load_state_dict(torch.load(trial_dir / "model.pt", weights_only=True))
    theta_c = torch.load(trial_dir / f"reference_erm_{spec.hparams['ft_reference_steps']}.pt", weights_only=True)
    b = ds.eval_splits()["env0_out"].tensors
    with torch.no_grad():
        scores = Interpolated(model, interpolate(theta_c, dict(model.named_parameters()), 0.5))(b["x"])
        return float(torch.nn.functional.cross_entropy(scores, b["y"]))


@pytest.mark.slow
def test_cbft_raises_the_cue_loss_at_the_path_midpoint(finetune_vs_cbft):
    ft, cb = (midpoint_loss(*finetune_vs_cbft[m][:2]) for m in ("finetune", "cbft"))
    # Measured (seed 0): fine-tuning 0.20, CBFT 1.09 (the barrier's target B = 1); seeds 1, 2: 0.15 / 0.49, 0.19 / 1.15.
    assert cb > ft + 0.3


@pytest.mark.slow
def test_cbft_depends_less_on_the_cue_than_fine_tuning(finetune_vs_cbft):
    ft, cb = finetune_vs_cbft["finetune"][2], finetune_vs_cbft["cbft"][2]
    # Measured (seed 0): randomised-cue accuracy 0.356 vs 0.431, randomised-image 0.494 vs 0.406.
    assert cb["env1_in_rc_acc"] > ft["env1_in_rc_acc"] + 0.03
    assert cb["env1_in_ri_acc"] < ft["env1_in_ri_acc"]


def test_cbft_resumes_exactly_after_a_kill(tmp_path):
    # θ_C comes back from its cache, D_NC batches are pure in the step, and t is drawn from the checkpointed RNG.
    spec = TrialSpec.resolve("cue_digits", "cbft", steps=21, eval_every=5, dataset_options=SMALL,
                             hparams={"ft_reference_steps": 20})
    whole = run_trial(spec, tmp_path / "whole")["record"]
    with pytest.raises(Interrupted):
        run_trial(spec, tmp_path / "cut", RunOptions(stop_after=10))
    resumed = run_trial(spec, tmp_path / "cut")["record"]
    assert resumed["env1_in_loss"] == whole["env1_in_loss"] and resumed["barrier"] == whole["barrier"]


# ------------------------------------------------------------------------------------------ what selection scores on


def test_validation_split_is_cue_free_by_default_and_cued_on_request():
    default = load_dataset("cue_digits", {**SMALL, "cue_fraction": 0.9}).eval_splits()
    assert bool((default["env0_out"].tensors["cue"] == -1).all())  # held-out cue-free data: what selection scores
    cued = load_dataset("cue_digits", {**SMALL, "cue_fraction": 0.9, "validation": "cued"}).eval_splits()
    t = cued["env0_out"].tensors
    for c in range(10):
        n_c = int((t["y"] == c).sum())
        assert int((t["cue"] == c).sum()) == round(0.9 * n_c)
    # the same digits and copies either way, the cue apart; training data untouched
    assert torch.equal(default["env0_out"].tensors["base"], t["base"])
    assert torch.equal(default["env0_in"].tensors["x"], cued["env0_in"].tensors["x"])
    assert not set(t["base"].tolist()) & set(default["env0_nc"].tensors["base"].tolist())  # D_NC: in digits only
    with pytest.raises(UserError, match="validation='last'"):
        load_dataset("cue_digits", {**SMALL, "validation": "last"})


def test_cue_only_classifier_scores_chance_on_the_default_validation_split():
    # A model that reads only the box scores p + (1 - p)/10 on a cued split and 1/10 on a cue-free one, so a cued
    # validation split rewards cue reliance and the default one does not.
    def cue_reader(t):
        s, boxes = cue_boxes(t["x"].shape[-1])
        lit = torch.stack([t["x"][:, 0, r : r + s, c : c + s].eq(1).flatten(1).all(1) for r, c in boxes], 1)
        return torch.where(lit.any(1), lit.float().argmax(1), torch.zeros(len(lit), dtype=torch.long))

    for validation, expected in (("nc", 0.1), ("cued", 0.9 + 0.1 * 0.1)):
        t = load_dataset("cue_digits", {**SMALL, "cue_fraction": 0.9, "validation": validation}) \
            .eval_splits()["env0_out"].tensors
        acc = float((cue_reader(t) == t["y"]).float().mean())
        assert abs(acc - expected) < 0.04, (validation, acc)


def test_fine_tuning_reads_only_a_training_environment_cue_free_split():
    splits = {"env0_in": 0, "env0_nc": 0, "env1_nc": 0, "env2_nc": 0, "env2_out": 0}
    assert nc_splits(splits, train_envs=(2, 0)) == ["env0_nc", "env2_nc"]
    assert nc_splits(splits, train_envs=(1,)) == ["env1_nc"]
    assert nc_splits(splits, train_envs=(3,)) == []  # a held-out env's env1_nc is test data, never read
