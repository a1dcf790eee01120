"""Attacks against known optima and invariants, and the robust-evaluation callback in a real trial."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from shiftbench.attacks import Threat, _transform, parse_bounds, perturb
from shiftbench.config import TrialSpec
from shiftbench.errors import UserError
from shiftbench.hooks.robust import parse_settings
from shiftbench.tasks import Classification, Preference
from shiftbench.trainer import load_dataset, run_trial

CLS = Classification()



def linear_model(d: int = 12, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, 2)


def test_linf_pgd_reaches_the_analytic_optimum_of_a_linear_model():
    # CE of label y under logits W x + b grows along w_other - w_y, so the L∞ optimum is ε·sign(w_other - w_y).
    model = linear_model()
    x = torch.rand(32, 12)
    y = torch.randint(2, (32,))
    threat = Threat("linf", eps=0.05, steps=10, bounds=None)
    adv = perturb(lambda b: CLS.scores(model, b), CLS, {"x": x, "y": y}, threat)
    w = model.weight.detach()
    direction = torch.where(y[:, None] == 0, w[1] - w[0], w[0] - w[1])
    assert torch.allclose(adv["x"] - x, 0.05 * direction.sign(), atol=1e-7)


def test_l2_pgd_reaches_the_analytic_optimum_of_a_linear_model():
    model = linear_model()
    x, y = torch.rand(16, 12), torch.zeros(16, dtype=torch.long)
    threat = Threat("l2", eps=0.3, steps=30, step_size=0.3, bounds=None)
    adv = perturb(lambda b: CLS.scores(model, b), CLS, {"x": x, "y": y}, threat)
    u = model.weight.detach()[1] - model.weight.detach()[0]
    assert torch.allclose(adv["x"] - x, (0.3 * u / u.norm()).expand(16, -1), atol=1e-5)


def test_preference_attack_moves_both_responses_the_harmful_way():
    # Bradley–Terry loss -log σ(r(chosen) - r(rejected)), r = w·z: chosen moves by -ε·sign(w), rejected by +ε·sign(w).
    task = Preference()
    model = nn.Linear(6, 1)
    batch = {"chosen": torch.rand(8, 6), "rejected": torch.rand(8, 6)}
    adv = perturb(lambda b: task.scores(model, b), task, batch, Threat("linf", eps=0.1, steps=5, bounds=None))
    s = model.weight.detach()[0].sign()
    assert torch.allclose(adv["chosen"] - batch["chosen"], -0.1 * s.expand(8, -1), atol=1e-7)
    assert torch.allclose(adv["rejected"] - batch["rejected"], 0.1 * s.expand(8, -1), atol=1e-7)


@pytest.fixture(scope="module")
def digits_model(small):
    """An MLP fitted for 150 steps on the small rotated digits, and a batch of its training environment 1."""
    ds = load_dataset("rotated_digits", small["rotated_digits"])
    t = ds.eval_splits()["env1_in"].tensors
    x, y = t["x"][:128], t["y"][:128]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, {"x": x, "y": y}


@pytest.mark.parametrize("kind, eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_raises_the_loss_more_than_random_noise_of_the_same_norm(digits_model, kind, eps):
    model, batch = digits_model
    g = torch.Generator().manual_seed(1)
    adv = perturb(model_scores(model), CLS, batch, Threat(kind, eps=eps, steps=10, bounds=None), g)
    delta = adv["x"] - batch["x"]
    if kind == "linf":
        noise = eps * torch.randint(0, 2, delta.shape, generator=g).float().mul(2).sub(1)  # ±ε: the same L∞ norm
    else:
        noise = torch.randn(delta.shape, generator=g)
        noise *= delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    with torch.no_grad():
        clean = nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        attacked = nn.functional.cross_entropy(model(adv["x"]), batch["y"])
        noisy = nn.functional.cross_entropy(model(batch["x"] + noise), batch["y"])
    assert attacked > noisy + 1.0 and attacked > 3 * clean  # measured: noise moves the loss by < 0.05
    assert abs(noisy - clean) < 0.5


def model_scores(model):
    return lambda b: CLS.scores(model, b)


@pytest.mark.parametrize("threat", [
    Threat("linf", eps=0.3, steps=5), Threat("l2", eps=1.5, steps=5), Threat("linf", eps=0.3, steps=5, restarts=3),
    Threat("spatial", k=4, restarts=2), Threat("linf", eps=0.2, steps=3, bounds=(0.2, 0.8)),
])  # fmt: skip
def test_perturbations_stay_in_the_ball_and_the_valid_range(digits_model, threat):
    model, batch = digits_model
    lo, hi = threat.bounds
    x = batch["x"].clamp(lo, hi)
    adv = perturb(model_scores(model), CLS, {"x": x, "y": batch["y"]}, threat, torch.Generator().manual_seed(0))["x"]
    assert adv.shape == x.shape and adv.min() >= lo and adv.max() <= hi
    assert not torch.equal(adv, x)  # it did move
    if threat.kind == "linf":
        assert (adv - x).abs().max() <= threat.eps + 1e-6
    elif threat.kind == "l2":
        assert (adv - x).flatten(1).norm(dim=1).max() <= threat.eps + 1e-5


def test_restarts_never_make_the_attack_weaker(digits_model):
    model, batch = digits_model
    accs = []
    for restarts in (1, 4):
        threat = Threat("linf", eps=0.03, steps=3, restarts=restarts)
        adv = perturb(model_scores(model), CLS, batch, threat, torch.Generator().manual_seed(5))
        with torch.no_grad():
            accs.append(float((model(adv["x"]).argmax(1) == batch["y"]).float().mean()))
    # The same generator makes restart 1 the single attempt; later ones can only turn examples wrong.
    assert accs[1] <= accs[0] and accs[1] < 1.0


def test_spatial_transform_moves_and_rotates_as_documented():
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 2, 3] = 1.0
    shifted = _transform(img, torch.zeros(1), torch.tensor([[1 / 8, 0.0]]))  # +1 pixel along x (columns)
    assert torch.allclose(shifted[0, 0, 2, 4], torch.tensor(1.0)) and shifted.sum() == pytest.approx(1.0)
    same = _transform(img, torch.zeros(1), torch.zeros(1, 2))
    assert torch.allclose(same, img, atol=1e-6)
    quarter = _transform(img, torch.full((1,), 90.0), torch.zeros(1, 2))  # counter-clockwise on screen
    assert quarter[0, 0].argmax() == 4 * 8 + 2  # pixel (row 2, col 3) goes to (row 4, col 2)


def test_bad_threats_are_one_clear_error():
    with pytest.raises(UserError, match="unknown threat 'linf2': use one of linf, l2, spatial"):
        Threat("linf2")
    with pytest.raises(UserError, match="needs image inputs"):
        perturb(lambda b: b["x"] @ torch.ones(5, 2), CLS, {"x": torch.rand(4, 5), "y": torch.zeros(4).long()},
                Threat("spatial"))
    with pytest.raises(UserError, match="must be 'lo:hi'"):
        parse_bounds("0,1")
    assert parse_bounds("none") is None and parse_bounds("-1:1") == (-1.0, 1.0)


def test_robust_eval_settings_in_the_name():
    s = parse_settings("robust_eval:threat=l2,eps=0.5,steps=40,key=robust_l2")
    assert (s["threat"], s["eps"], s["steps"], s["key"], s["restarts"]) == ("l2", 0.5, 40, "robust_l2", 2)
    assert parse_settings("robust_eval") == parse_settings("robust_eval:")
    with pytest.raises(UserError, match="bad setting 'epss=0.5' \\(did you mean 'eps'\\?\\)"):
        parse_settings("robust_eval:epss=0.5")
    with pytest.raises(UserError, match="steps='many' is not an integer"):
        parse_settings("robust_eval:steps=many")


def test_robust_eval_records_every_split_and_leaves_training_alone(small, tmp_path):
    opts = small["rotated_digits"]
    names = ("robust_eval:eps=0.1,steps=5,examples=60", "robust_eval:threat=spatial,k=3,key=spatial",
             "robust_eval:threat=spatial,k=2,max_rotation=0,max_shift=0,key=still")
    spec = TrialSpec.resolve("rotated_digits", "erm", steps=30, eval_every=15, dataset_options=opts, callbacks=names)
    plain = TrialSpec.resolve("rotated_digits", "erm", steps=30, eval_every=15, dataset_options=opts)
    final = run_trial(spec, tmp_path / "r")
    rec = final["record"]
    records = [json.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 15, 29]
    for i in range(6):
        for part in ("in", "out"):
            assert 0.0 <= rec[f"env{i}_{part}_robust_acc"] < rec[f"env{i}_{part}_acc"] / 2  # ERM breaks under PGD
            # no rotation, no shift: every attempt is the clean image, so the "attacked" accuracy is the clean one
            assert rec[f"env{i}_{part}_still_acc"] == rec[f"env{i}_{part}_acc"]
    # The spatial numbers replayed by hand from the final model: the callback's generator draws, per restart and
    # attempt, one (rotation, shift) per example; an example counts as robust only if all 2 x 3 attempts leave it
    # right.
    from shiftbench.hparams import seed_hash
    from shiftbench.trainer import Trainer

    model = Trainer(spec, tmp_path / "replay")._build().model
    model.load_state_dict(torch.load(tmp_path / "r" / "model.pt", weights_only=True))
    model.eval()
    data = load_dataset("rotated_digits", spec.dataset_options, None, False)
    gaps = []
    for name, split in data.eval_splits().items():
        t = split.tensors
        g = torch.Generator().manual_seed(seed_hash(spec.seed, "robust_eval", "spatial", 29, name))
        robust = torch.ones(len(t["y"]), dtype=torch.bool)
        with torch.no_grad():
            for _ in range(2 * 3):  # restarts (default 2) x k
                u = torch.rand(len(t["y"]), 3, generator=g)
                moved = _transform(t["x"], (2 * u[:, 0] - 1) * 30.0, (2 * u[:, 1:] - 1) * 0.1).clamp(0, 1)
                robust &= model(moved).argmax(1) == t["y"]
        assert rec[f"{name}_spatial_acc"] == pytest.approx(robust.float().mean().item(), abs=1e-6), name
        gaps.append(rec[f"{name}_acc"] - rec[f"{name}_spatial_acc"])
    assert max(gaps) > 0.05  # the attack does bite, so the replay is not the clean accuracy again
    settings = (rec["robust_threat"], rec["robust_eps"], rec["robust_steps"], rec["robust_examples"])
    assert settings == ("linf", 0.1, 5, 60)
    assert rec["robust_bounds"] == "0:1"  # rotated_digits declares no range: the data's own
    assert [e["key"] for e in final["robust_eval"]] == ["robust", "spatial", "still"]
    # The attack draws from its own generator: the clean numbers equal those of the same trial without it.
    bare = run_trial(plain, tmp_path / "p")["record"]
    assert bare["env0_in_loss"] == rec["env0_in_loss"] and bare["env3_out_acc"] == rec["env3_out_acc"]
