"""Preference workloads: the Bradley–Terry task, the spurious_prefs generator, preference files, best-of-n, report."""

from __future__ import annotations

import gzip
import itertools
import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from shiftbench.bestofn import RULES_SHOWN, best_of_n_curve, best_of_n_data, curve_key, preference_rows
from shiftbench.config import TrialSpec
from shiftbench.datasets.prefs import (
    DOMAINS, MALFORMED, REWARDBENCH_COUNTS, PreferenceFiles, SpuriousPrefs, generate_domain, load_pairs, parse_pair,
)  # fmt: skip
from shiftbench.errors import UserError
from shiftbench.tasks import Preference
from shiftbench.trainer import run_trial

SMALL = {"n_pairs": 300, "bon_prompts": 4}


@pytest.fixture(scope="module")
def small_prefs() -> SpuriousPrefs:
    return SpuriousPrefs(options=SMALL)


class LinearReward(torch.nn.Module):
    def __init__(self, w, b=0.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return (x @ self.w + self.b)[:, None]


# ---------------------------------------------------------------------------------------------- the Bradley–Terry task


def test_bradley_terry_loss_and_gradient_by_hand():
    # r(x) = w·x with w = (1, 0): r_c = 2, r_r = 1, d = 1. loss = log(1 + e^-1) = 0.3132617;
    # dL/dd = σ(d) − 1 = −0.2689414, so dL/dw = (σ(d) − 1)(x_c − x_r) = −0.2689414 · (1, −1).
    model, task = LinearReward([1.0, 0.0]), Preference()
    batch = {"chosen": torch.tensor([[2.0, 1.0]]), "rejected": torch.tensor([[1.0, 2.0]])}
    loss = task.loss(task.scores(model, batch), batch)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-6)
    loss.backward()
    assert model.w.grad.tolist() == pytest.approx([-0.2689414, 0.2689414], abs=1e-6)
    # with a margin of 0.5: −log σ(0.5) = 0.4740770, gradient factor σ(0.5) − 1 = −0.3775407
    model.w.grad = None
    batch["margin"] = torch.tensor([0.5])
    loss = task.loss(task.scores(model, batch), batch)
    loss.backward()
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    assert model.w.grad.tolist() == pytest.approx([-0.3775407, 0.3775407], abs=1e-6)


def test_centre_rewards_term_by_hand_and_it_moves_only_the_offset():
    # r_c = 2 + b, r_r = 1 + b with b = 3: d = 1, sum = 9; loss = 0.3132617 + 0.01 · 81 = 1.1232617.
    # Bradley–Terry ignores the offset b; the centring term's dL/db = 2 · 0.01 · 9 · 2 = 0.36.
    model, task = LinearReward([1.0, 0.0], 3.0), Preference()
    batch = {"chosen": torch.tensor([[2.0, 1.0]]), "rejected": torch.tensor([[1.0, 2.0]]),
             "center_rewards_coefficient": torch.tensor([0.01])}  # fmt: skip
    loss = task.loss(task.scores(model, batch), batch)
    loss.backward()
    assert loss.item() == pytest.approx(0.3132617 + 0.81, abs=1e-6)
    assert model.b.grad.item() == pytest.approx(0.36, abs=1e-6)
    # dL/dw = (σ(1) − 1)(x_c − x_r) + 2 · 0.01 · 9 · (x_c + x_r) = (−0.2689 + 0.54, 0.2689 + 0.54)
    assert model.w.grad.tolist() == pytest.approx([-0.2689414 + 0.54, 0.2689414 + 0.54], abs=1e-6)
    del batch["center_rewards_coefficient"]
    model.b.grad = None
    task.loss(task.scores(model, batch), batch).backward()
    assert model.b.grad.item() == 0.0
    with pytest.raises(ValueError, match="two-column"):
        task.loss(torch.tensor([1.0]), {"center_rewards_coefficient": torch.tensor([0.1])})


def test_scale_multiplies_both_rewards_and_outputs_recover_them():
    task = Preference()
    scores = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])  # (r_c − r_r, r_c + r_r): rewards (2, 1) and (−1, 1)
    batch = {"center_rewards_coefficient": torch.tensor([0.1, 0.1])}
    per = task.loss(scores, batch, scale=2.0, reduction="none")
    expected = -torch.nn.functional.logsigmoid(2 * scores[:, 0]) + 0.1 * (2 * scores[:, 1]) ** 2
    assert torch.allclose(per, expected)
    out = task.outputs(scores, {})
    assert out["reward_chosen"].tolist() == [2.0, -1.0] and out["reward_rejected"].tolist() == [1.0, 1.0]
    assert out["score"].tolist() == [1.0, -2.0] and out["correct"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------------ spurious_prefs


def _evaluate_with(ds, reward_of):
    """Every split's metrics when the reward of a response is ``reward_of(split tensors, side)``."""
    task, out = Preference(), {}
    for name, split in ds.eval_splits().items():
        t = split.tensors
        r_c, r_r = reward_of(t, "chosen").float(), reward_of(t, "rejected").float()
        outputs = {k: v.numpy() for k, v in task.outputs(torch.stack([r_c - r_r, r_c + r_r], 1), t).items()}
        outputs["idx"] = t["idx"].numpy()
        out[name] = ds.evaluate(name, outputs)
    return out


def test_gold_reward_scores_pairwise_accuracy_one(small_prefs):
    metrics = _evaluate_with(small_prefs, lambda t, side: t[f"{side}_gold"])
    assert {m["acc"] for m in metrics.values()} == {1.0}
    assert all(m["gold_corr"] == pytest.approx(1.0) for m in metrics.values())


def test_length_only_reward_scores_the_agreement_rate_of_each_domain():
    rates = [0.95, 0.75, 0.35, 0.1]
    ds = SpuriousPrefs(options={"n_pairs": 1000, "bon_prompts": 1})
    metrics = _evaluate_with(ds, lambda t, side: t[f"{side}_len"])
    for i, (domain, rate) in enumerate(zip(DOMAINS, rates)):
        n_in, n_out = len(ds.environments[i].splits["in"]), len(ds.environments[i].splits["out"])
        acc = (metrics[f"env{i}_in"]["acc"] * n_in + metrics[f"env{i}_out"]["acc"] * n_out) / (n_in + n_out)
        assert acc == pytest.approx(ds.describe()["agreement"][domain])  # the realised rate, exactly
        assert abs(acc - rate) < 0.04, (domain, acc)  # the configured rate, within sampling error (SE ≤ 0.016)
        assert metrics[f"env{i}_in"]["length_corr"] == pytest.approx(1.0)


def test_visible_content_is_the_invariant_feature(small_prefs):
    # With hidden_quality = 1 the visible content orders a pair as the gold reward does in ~75% of pairs in every
    # domain (1/2 + arcsin(1/√2)/π for Gaussian parts), whatever the cue does there.
    ds = SpuriousPrefs(options={"n_pairs": 1000, "bon_prompts": 1})
    metrics = _evaluate_with(ds, lambda t, side: t[f"{side}_content"])
    accs = [(metrics[f"env{i}_in"]["acc"] + metrics[f"env{i}_out"]["acc"]) / 2 for i in range(4)]
    assert all(abs(a - 0.75) < 0.04 for a in accs), accs


def test_generator_is_deterministic_and_documented_text():
    a, b = generate_domain("code", 0.85, 20, 1, seed=3), generate_domain("code", 0.85, 20, 1, seed=3)
    assert a["pairs"]["chosen"] == b["pairs"]["chosen"]
    own = generate_domain("code", 0.85, 20, 1, seed=3, domain_text=True)["pairs"]["prompt"]
    assert all(p.startswith("How do I go about") for p in own)
    assert len({p.split()[0] for p in generate_domain("code", 0.85, 200, 1, seed=3)["pairs"]["prompt"]}) == 4
    assert generate_domain("code", 0.85, 20, 1, seed=4)["pairs"]["chosen"] != a["pairs"]["chosen"]
    assert np.all(a["pairs"]["chosen_gold"] > a["pairs"]["rejected_gold"])
    assert all(t.lower().count("it gives a") == 3 for t in a["pairs"]["chosen"])
    assert SpuriousPrefs(options=SMALL).version() == SpuriousPrefs(options=SMALL).version()
    assert SpuriousPrefs(options={**SMALL, "seed": 1}).version() != SpuriousPrefs(options=SMALL).version()


def test_the_encoded_pair_does_not_tell_the_domains_apart():
    # A logistic regression (scikit-learn, not the harness) that reads a response's encoding and guesses its domain
    # (chat or safety): at chance with the default text, near perfect where prompts and topics are the domain's own.
    # The response is either side of a pair at random, as a reward model meets it (a chosen one alone would tell
    # chat from safety by its length: the longer side is the chosen one in 95% against 10% of pairs).
    from sklearn.linear_model import LogisticRegression

    def held_out_accuracy(options):
        ds = SpuriousPrefs(options={"n_pairs": 400, "bon_prompts": 1, **options})
        pick = np.random.RandomState(1).rand(320) < 0.5
        xs = [np.where(pick[:, None], t["chosen"].numpy(), t["rejected"].numpy())
              for t in (ds.environments[i].splits["in"].tensors for i in (0, 3))]
        x, y = np.concatenate(xs), np.repeat([0, 1], [len(v) for v in xs])
        order = np.random.RandomState(0).permutation(len(y))
        fit, test = order[: len(y) // 2], order[len(y) // 2 :]
        return LogisticRegression(max_iter=2000).fit(x[fit], y[fit]).score(x[test], y[test])

    assert held_out_accuracy({}) < 0.6
    assert held_out_accuracy({"domain_text": True, "encoder": "hashing:512,16,64"}) > 0.95


def test_the_generator_own_features_separate_erm_from_the_invariant_reward():
    # On the generator's own features (Δ visible content, Δ length), a logistic regression pooled over the training
    # domains (ERM's optimum) against one on the content alone (the invariant reward). Measured (seed 0, 2000 pairs a
    # domain): ERM 0.82 / 0.78 / 0.71 on chat / code / math and 0.65 on safety; content alone 0.74-0.76 everywhere.
    from sklearn.linear_model import LogisticRegression

    rng, xs, ys = np.random.RandomState(0), [], []
    for domain, rate in zip(DOMAINS, (0.95, 0.75, 0.35, 0.1)):
        p = generate_domain(domain, rate, 2000, 1, seed=0)["pairs"]
        d = np.stack([p["chosen_content"] - p["rejected_content"], (p["chosen_len"] - p["rejected_len"]) / 8.0], 1)
        sign = np.where(rng.rand(len(d)) < 0.5, -1.0, 1.0)
        xs.append(d * sign[:, None])
        ys.append((sign > 0).astype(int))
    train_x, train_y = np.concatenate(xs[:3]), np.concatenate(ys[:3])
    erm = LogisticRegression(fit_intercept=False).fit(train_x, train_y)
    content = LogisticRegression(fit_intercept=False).fit(train_x[:, :1], train_y)
    erm_acc = [erm.score(x, y) for x, y in zip(xs, ys)]
    inv_acc = [content.score(x[:, :1], y) for x, y in zip(xs, ys)]
    assert erm.coef_[0, 1] > 0.3  # ERM leans on length: it agrees with preference in 68% of training pairs
    assert max(inv_acc) - min(inv_acc) < 0.04 and abs(np.mean(inv_acc) - 0.75) < 0.02
    assert erm_acc[3] < inv_acc[3] - 0.08  # the held-out domain punishes the cue ...
    assert erm_acc[2] < erm_acc[0] - 0.08  # ... and so does the 35% training domain, which worst-domain selection reads


def test_options_round_trip_through_option_strings():
    raw = {"agreement": "0.7,0.75,0.8,0.3", "n_pairs": "40", "hidden_quality": "0.5",
           "center_rewards_coefficient": "0.01", "encoder": "hashing:64,32,16"}  # fmt: skip
    spec = TrialSpec.resolve("spurious_prefs", "erm", dataset_options=raw)
    typed = {"agreement": "0.7,0.75,0.8,0.3", "n_pairs": 40, "hidden_quality": 0.5, "center_rewards_coefficient": 0.01,
             "encoder": "hashing:64,32,16"}  # fmt: skip
    assert spec.hash == TrialSpec.resolve("spurious_prefs", "erm", dataset_options=typed).hash
    assert TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).hash == spec.hash
    ds = SpuriousPrefs(options=spec.dataset_options | {"bon_prompts": 1})
    assert ds.input_shape == (112,)
    assert torch.all(ds.environments[0].splits["in"].tensors["center_rewards_coefficient"] == 0.01)
    with pytest.raises(UserError, match="agreement"):
        SpuriousPrefs(options={"agreement": "0.9,0.1"})


@pytest.mark.slow
def test_cli_train_takes_the_options(exe, cli_env, tmp_path):
    out = tmp_path / "t"
    cmd = [exe, "train", "--dataset", "spurious_prefs", "--method", "erm", "--steps", "3", "--eval-every", "3",
           "--out", str(out), "--no-mlflow", "--option", "n_pairs=20", "bon_prompts=1", "agreement=0.6,0.7,0.8,0.2",
           "encoder=hashing:32,16,8"]  # fmt: skip
    subprocess.run(cmd, check=True, env=cli_env, capture_output=True, timeout=120)
    spec = json.loads((out / "spec.json").read_text())
    assert spec["spec"]["dataset_options"]["agreement"] == "0.6,0.7,0.8,0.2"
    assert spec["dataset"]["input_shape"] == [56]


def test_erm_picks_up_the_length_cue_and_best_of_n_is_recorded(tmp_path):
    spec = TrialSpec.resolve("spurious_prefs", "erm", steps=40, eval_every=20, dataset_options=SMALL,
                             callbacks=("best_of_n",))  # fmt: skip
    final = run_trial(spec, tmp_path / "t")
    rec = final["record"]
    # measured: chat 0.82, safety 0.43, corr(r, len) 0.25 on safety (where longer is worse), 0.69 on chat
    assert rec["env0_out_acc"] > 0.8  # 40 steps in, ERM reads the easy cue: chat rewards verbosity ...
    assert rec["env3_in_acc"] < 0.5  # ... and the held-out domain punishes it
    assert rec["env3_in_length_corr"] > 0.1 and rec["env0_out_length_corr"] > 0.45  # ODIN's plain-RM level on chat
    bon = json.loads((tmp_path / "t" / "best_of_n.json").read_text())
    safety = bon["domains"]["safety"]
    assert bon["n"] == [1, 2, 4, 8, 16, 32]
    assert safety["gold"][-1] < safety["gold"][0] < safety["oracle"][-1]  # over-optimisation where the cue reverses
    assert safety["length"][-1] > safety["length"][0]  # ... because the picks get longer


def _preference_methods() -> list[str]:
    from shiftbench import config
    from shiftbench.registry import METHODS

    supports = getattr(config, "supports_task", lambda cls, task: True)
    from shiftbench.methods.groups import NeedsGroups

    # spurious_prefs has no per-example groups: the group methods refuse it (tests/test_zoo_subpop.py)
    return [m for m in METHODS.names() if supports(METHODS.get(m), "preference")
            and not issubclass(METHODS.get(m), NeedsGroups)]  # fmt: skip


@pytest.mark.slow  # some methods (adversarial training) take ~20 s even for 4 steps on this box
@pytest.mark.parametrize("method", _preference_methods())
def test_every_preference_method_records_what_its_predictions_say(method, tmp_path):
    # Recomputed from the trial's own predictions.npz, independently of the evaluator: a pair is right when its
    # reward difference is positive (chosen = the higher gold reward), the margin is the mean difference.
    tiny = {"n_pairs": 60, "bon_prompts": 1, "encoder": "hashing:64,32,16"}
    spec = TrialSpec.resolve("spurious_prefs", method, steps=4, eval_every=2, dataset_options=tiny)
    final = run_trial(spec, tmp_path / "t")
    rec, z = final["record"], np.load(tmp_path / "t" / "predictions.npz")
    splits = sorted(set(z["split"].tolist()))
    assert splits == sorted(f"env{i}_{p}" for i in range(4) for p in ("in", "out"))
    for name in splits:
        score = z["score"][z["split"] == name]
        assert len(score) == (48 if name.endswith("_in") else 12)
        assert rec[f"{name}_acc"] == pytest.approx(float(np.mean(score > 0))), name
        assert rec[f"{name}_margin"] == pytest.approx(float(np.mean(score)), rel=1e-5, abs=1e-6), name


def test_best_of_n_callback_refuses_a_dataset_without_pools_before_a_trial_starts(small):
    # refused while the spec is resolved: no trial folder is ever made for it
    with pytest.raises(UserError, match="best_of_n needs a dataset with gold-reward candidate pools .*colored_digits"):
        TrialSpec.resolve("colored_digits", "erm", steps=2, eval_every=2, dataset_options=small["colored_digits"],
                          callbacks=("best_of_n",))  # fmt: skip


# --------------------------------------------------------------------------------------------------------- best-of-n


def test_best_of_n_curve_equals_the_mean_over_all_subsets():
    rng = np.random.RandomState(0)
    proxy, gold = rng.randn(3, 7), rng.randn(3, 7)
    for n in (1, 2, 3, 7):
        brute = np.mean([[gold[p, list(s)][np.argmax(proxy[p, list(s)])] for s in itertools.combinations(range(7), n)]
                         for p in range(3)])  # fmt: skip
        assert best_of_n_curve(proxy, gold, [n])[0] == pytest.approx(brute)
    assert best_of_n_curve(proxy, gold, [1])[0] == pytest.approx(gold.mean())
    with pytest.raises(ValueError):
        best_of_n_curve(proxy, gold, [8])


def test_pools_over_optimise_a_length_reward_only_where_the_cue_is_below_one_half(small_prefs):
    pools = small_prefs.best_of_n_pools()
    for domain in DOMAINS:
        gold, length = pools[domain]["gold"], pools[domain]["length"]
        oracle = best_of_n_curve(gold, gold)
        assert all(b > a for a, b in zip(oracle, oracle[1:]))
        by_length = best_of_n_curve(length, gold)
        assert (by_length[-1] < by_length[0]) == (domain in ("math", "safety")), domain  # agreement < 1/2 there


# -------------------------------------------------------------------------------------------------------- the report


def _fake_trial(method, seed, accs, corr, env_names=("a", "b", "c"), test_env=2, bon=None):
    rec = {"step": 10}
    for i in range(len(env_names)):
        for part in ("in", "out"):
            rec[f"env{i}_{part}_acc"] = accs[(i, part)]
            rec[f"env{i}_{part}_length_corr"] = corr[(i, part)]
            rec[f"env{i}_{part}_margin"] = 0.5
    return {"hash": f"{method}{seed}", "task": "preference", "env_names": list(env_names), "records": [rec],
            "spec": {"dataset": "toy", "method": method, "seed": seed, "test_envs": [test_env], "hparams_seed": 0},
            "final": {"best_of_n": bon} if bon else {}}  # fmt: skip


def test_report_worst_domain_uses_test_in_and_training_out_splits():
    accs = {(0, "in"): 0.99, (0, "out"): 0.9, (1, "in"): 0.99, (1, "out"): 0.7, (2, "in"): 0.8, (2, "out"): 0.1}
    corr = {(0, "in"): 0.0, (0, "out"): 0.2, (1, "in"): 0.0, (1, "out"): 0.4, (2, "in"): 0.6, (2, "out"): -1.0}
    bon = {"n": [1, 2], "env_names": ["a", "b", "c"],
           "domains": {d: {"gold": [0.0, v], "oracle": [0.0, 1.0], "length": [1, 2]} for d, v in zip("abc", (1, 2, 3))}}
    trials = [_fake_trial("erm", s, accs, corr, bon=bon) for s in (0, 1)]
    cell = preference_rows(trials)["toy"]["cells"][("erm", 2)]
    # test env 2 scores on its "in" split (0.8); training envs on their "out" splits (0.9, 0.7): worst = 0.7
    assert [cell[f"acc_{i}"][0] for i in range(3)] == pytest.approx([0.9, 0.7, 0.8])
    assert cell["worst"][:3] == pytest.approx((0.7, 0.0, 2))
    assert cell["corr_test"][0] == pytest.approx(0.6) and cell["corr_train"][0] == pytest.approx(0.3)
    curves = best_of_n_data(trials)["toy"]["test_envs"][2]
    assert curves["methods"]["erm"]["c"]["mean"] == [0.0, 3.0] and curves["oracle"]["c"] == [0.0, 1.0]


def _stepped_trial(rows, env_names=("a", "b", "c")):
    """A fake trial holding out env 2 whose records are ``(step, env0 out, env1 out, env2 in, safety-like gold
    curve)``; env2's out split copies its in split (what the oracle reads)."""
    records = []
    for step, a0, a1, test, gold in rows:
        r = {"step": step, "env0_out_acc": a0, "env1_out_acc": a1, "env2_in_acc": test, "env2_out_acc": test,
             "env0_in_acc": 1.0, "env1_in_acc": 1.0, "env2_in_length_corr": test - 1}
        if gold is not None:
            r.update({curve_key(d, "gold", n): v for d in env_names for n, v in zip((1, 2), gold)})
        records.append(r)
    bon = {"n": [1, 2], "env_names": list(env_names),
           "domains": {d: {"gold": [0.0, 9.0], "oracle": [0.0, 4.0], "length": [1, 1]} for d in env_names}}
    return {"hash": "t0", "task": "preference", "env_names": list(env_names), "records": records,
            "spec": {"dataset": "toy", "method": "erm", "seed": 0, "test_envs": [2], "hparams_seed": 0},
            "final": {"best_of_n": bon}}  # fmt: skip


STEPPED = [(0, 0.60, 0.60, 0.30, (0.0, 1.0)),  # nothing picks this one
        (5, 0.95, 0.55, 0.40, (0.0, 2.0)),  # training-domain validation: mean 0.75 is the best
        (10, 0.70, 0.70, 0.50, (0.0, 3.0)),  # worst-domain validation: min 0.70 is the best
        (15, 0.65, 0.50, 0.60, (0.0, 9.0))]  # the last step: the oracle's
"""Checkpoints where each rule picks a different one (values chosen by hand)."""


def test_preference_rows_show_each_rule_at_its_own_checkpoint():
    trial = _stepped_trial(STEPPED)
    picked = {r: preference_rows([trial], r)["toy"]["cells"][("erm", 2)] for r in RULES_SHOWN}
    assert {r: c["acc_2"][0] for r, c in picked.items()} == pytest.approx(
        {"training_domain": 0.40, "worst_group": 0.50, "oracle": 0.60})
    assert picked["worst_group"]["corr_test"][0] == pytest.approx(-0.50)
    assert picked["training_domain"]["worst"][0] == pytest.approx(0.40)  # min(0.95, 0.55, 0.40)


def test_best_of_n_curves_come_from_the_checkpoint_the_rule_selects():
    trial = _stepped_trial(STEPPED)
    at = {r: best_of_n_data([trial], r)["toy"]["test_envs"][2]["methods"]["erm"]["c"]["mean"] for r in RULES_SHOWN}
    assert at == {"training_domain": [0.0, 2.0], "worst_group": [0.0, 3.0], "oracle": [0.0, 9.0]}  # not final.json's
    # a trial from before curves were recorded: its final curves stand only for a selection of its last step
    old = _stepped_trial([row[:4] + (None,) for row in STEPPED])
    assert best_of_n_data([old], "training_domain")["toy"] == {"n": [1, 2], "env_names": ["a", "b", "c"],
                                                               "test_envs": {}, "skipped": 1}  # fmt: skip
    assert best_of_n_data([old], "oracle")["toy"]["test_envs"][2]["methods"]["erm"]["c"]["mean"] == [0.0, 9.0]


def test_report_writes_the_preference_sections_and_the_best_of_n_plot(tmp_path):
    from shiftbench import report

    spec = TrialSpec.resolve("spurious_prefs", "erm", steps=3, eval_every=3, dataset_options=SMALL,
                             callbacks=("best_of_n",))  # fmt: skip
    run_trial(spec, tmp_path / "runs" / "trials" / spec.short_hash)
    metrics = report.write_report(report.scan_runs(tmp_path / "runs").done, tmp_path / "rep", plots=False)
    pref = metrics["sections"]["preference"]["spurious_prefs"]
    assert set(pref) == set(RULES_SHOWN)
    cell = pref["training_domain"]["erm/env3"]
    record = run_trial(spec, tmp_path / "runs" / "trials" / spec.short_hash)["record"]  # done: read back
    assert cell["acc_3"]["mean"] == pytest.approx(record["env3_in_acc"]) and cell["worst"]["n"] == 1
    assert set(metrics["sections"]["best_of_n"]["spurious_prefs"]["env3"]["methods"]["erm"]) == set(DOMAINS)
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "corr(r,len) test" in md and "held-out domain **safety**" in md
    assert "| acc (training-domain) | acc (worst-domain) | acc (oracle) |" in md
    assert (tmp_path / "rep" / "plots" / "best_of_n_spurious_prefs.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rep" / "best_of_n_spurious_prefs.csv").read_text().startswith("dataset,test_env,method")


# ------------------------------------------------------------------------------------------------- preference files

Q, A1, A2 = "What is 2+2?", "It is 4.", "It is 5."
HH_C = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
HH_R = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: It is 5."
HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant:"


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


ROWS = {
    "explicit": ({"prompt": Q, "chosen": A1, "rejected": A2}, (Q, A1, A2)),
    "implicit": ({"chosen": HH_C, "rejected": HH_R}, (HH_PROMPT, A1, A2)),
    "conversational": ({"prompt": Q, "chosen": _msgs(("user", Q), ("assistant", A1)),
                        "rejected": _msgs(("user", Q), ("assistant", A2))}, (Q, A1, A2)),
    "conversational_prefix": ({"chosen": _msgs(("user", Q), ("assistant", A1)),
                               "rejected": _msgs(("user", Q), ("assistant", A2))}, (f"user: {Q}", A1, A2)),
    "conversational_prompt_list": ({"prompt": _msgs(("user", Q)), "chosen": _msgs(("assistant", A1)),
                                    "rejected": _msgs(("assistant", A2))}, (f"user: {Q}", A1, A2)),
}  # fmt: skip


def _write(path, rows):
    name = path.name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    elif name.endswith(".csv"):
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]) \
            .to_csv(path, index=False)
    return path


FILE_OPTIONS = {"format": "auto", "domain_column": "", "margin_column": "", "sections": "", "skip_malformed": False,
                "max_rows": 0}  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv"])
@pytest.mark.parametrize("kind", list(ROWS))
def test_every_format_round_trips(kind, suffix, tmp_path):
    row, expected = ROWS[kind]
    path = _write(tmp_path / f"prefs{suffix}", [row, row])
    rows, skipped = load_pairs([path], FILE_OPTIONS)
    assert skipped == {} and [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [expected] * 2
    assert rows[1]["where"] == f"prefs{suffix} {'line' if suffix.startswith('.jsonl') else 'row'} 2"


def test_hh_prompt_stops_at_the_last_shared_assistant_turn_even_when_responses_share_words():
    chosen, rejected = HH_PROMPT + " Sure, it is 4.", HH_PROMPT + " Sure, it is 5."
    assert parse_pair({"chosen": chosen, "rejected": rejected}) == (HH_PROMPT, "Sure, it is 4.", "Sure, it is 5.")


BAD = {
    "missing_field": {"prompt": Q, "chosen": A1},
    "empty_text": {"prompt": Q, "chosen": "  ", "rejected": A2},
    "identical": {"prompt": Q, "chosen": A1, "rejected": A1},
    "bad_type": {"prompt": Q, "chosen": 5, "rejected": A2},
}


@pytest.mark.parametrize("kind", [*BAD, "bad_json", "unknown_subset", "missing_domain"])
def test_every_malformed_row_is_refused_with_file_and_row_or_counted(kind, tmp_path):
    good = {"prompt": Q, "chosen": A1, "rejected": A2, "subset": "hep-go"}
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(good)] * 2
    options = dict(FILE_OPTIONS, domain_column="subset")
    if kind == "bad_json":
        lines.insert(1, '{"prompt": "unterminated')
    elif kind == "unknown_subset":
        lines.insert(1, json.dumps(dict(good, subset="no-such-subset")))
        options["sections"] = "rewardbench"
    elif kind == "missing_domain":
        lines.insert(1, json.dumps({"prompt": Q, "chosen": A1, "rejected": A2}))
    else:
        lines.insert(1, json.dumps(dict(BAD[kind], subset="hep-go")))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: line 2 .*skip_malformed=true"):
        load_pairs([path], options)
    rows, skipped = load_pairs([path], dict(options, skip_malformed=True))
    assert len(rows) == 2 and skipped == {"missing_field" if kind == "missing_domain" else kind: 1}
    assert set(skipped) <= set(MALFORMED)


def test_csv_empty_cell_is_a_missing_field_with_its_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(f"prompt,chosen,rejected\n{Q},{A1},{A2}\n{Q},{A1},\n")
    with pytest.raises(UserError, match=r"p.csv: row 2 lacks the field 'rejected'"):
        load_pairs([path], FILE_OPTIONS)


def _files_dataset(tmp_path, **options):
    subsets = ["math-prm"] * 6 + ["hep-cpp"] * 4 + ["donotanswer"] * 5
    rows = [{"prompt": f"{Q} {i}", "chosen": f"{A1} {'really ' * (i % 3)}", "rejected": f"{A2} {i}", "subset": s,
             "margin": 1.0} for i, s in enumerate(subsets)]
    path = _write(tmp_path / "rb.parquet", rows)
    return PreferenceFiles(options={"files": str(path), "domain_column": "subset", "encoder": "hashing:64,32,16",
                                    "holdout_fraction": 0.4, **options})  # fmt: skip


def test_files_environments_margins_and_rewardbench_section_weighting(tmp_path):
    ds = _files_dataset(tmp_path, sections="rewardbench", margin_column="margin")
    assert ds.env_names == ["Safety", "Reasoning"] and ds.input_shape == (112,)  # present sections, RewardBench order
    ds = _files_dataset(tmp_path, sections="rewardbench", margin_column="margin", domains="Reasoning,Safety")
    assert ds.env_names == ["Reasoning", "Safety"]
    split = ds.environments[0].splits["in"]
    assert torch.all(split.tensors["margin"] == 1.0)
    subsets = [ds.subsets[int(s)] for s in split.tensors["subset"]]
    correct = np.array([1.0 if s == "math-prm" else 0.0 for s in subsets])  # right on maths, wrong on code
    outputs = {"idx": split.tensors["idx"].numpy(), "correct": correct, "loss": correct, "score": correct}
    metrics = ds.evaluate("env0_in", outputs)
    w_math, w_cpp = REWARDBENCH_COUNTS["math-prm"], REWARDBENCH_COUNTS["hep-cpp"]
    assert metrics["weighted_acc"] == pytest.approx(w_math / (w_math + w_cpp))  # RewardBench's 984 vs 164
    assert metrics["acc"] == pytest.approx(correct.mean())


def test_files_domains_come_from_the_column_and_an_erm_trial_runs(tmp_path):
    path = tmp_path / "rb.parquet"
    _files_dataset(tmp_path)
    options = {"files": str(path), "domain_column": "subset", "encoder": "hashing:64,32,16"}
    assert PreferenceFiles.environment_names(options) == ["donotanswer", "hep-cpp", "math-prm"]
    spec = TrialSpec.resolve("preference_files", "erm", test_envs=(0,), steps=4, eval_every=2, dataset_options=options)
    final = run_trial(spec, tmp_path / "t")
    assert {"env0_in_length_corr", "env2_out_margin"} <= set(final["record"])
    with pytest.raises(UserError, match="needs --option files="):
        TrialSpec.resolve("preference_files", "erm", dataset_options={"domain_column": "subset"})
    with pytest.raises(UserError, match="does not exist"):
        PreferenceFiles(options={"files": str(tmp_path / "nope.jsonl")})


def test_hf_reward_model_explains_what_it_needs():
    from shiftbench.models import build_model

    with pytest.raises(UserError, match="hf_reward_path"):
        build_model("hf_reward", (2, 16), 1, {})
    with pytest.raises(UserError, match="encoder=hf:PATH"):
        build_model("hf_reward", (64,), 1, {"hf_reward_path": "x"})
