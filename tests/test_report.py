"""The report on a synthetic sweep written in the docs/records.md layout.

Sweep: dataset "toy" with environments ("+90%", "+80%", "-90%"), methods erm and irm, seeds 0 and 1, hparams draws 0
and 1, every single test environment: 2 × 3 × 2 × 2 = 24 done trials, plus one failed and one incomplete trial.

Each trial has records at steps 50 and 100; A = ACC[method][env][seed] is a chosen test accuracy.

- draw 1: step 50: train-env out .60, test out .20, test in A - .10; step 100: train out .75, test out .30, test in A.
- draw 0: step 50: train-env out .55, test out .99, test in .11; step 100: train out .65, test out .50, test in A + .05.

Training-domain validation picks draw 1 at step 100 (val .75 beats .65), so cells are A. The oracle takes each
run's last step and picks draw 0 (test out .50 beats .30): A + .05; had it early-stopped, draw 0 at step 50 (.99)
would give .11. No leave-one-domain-out pairs: that table is all dashes.

By hand (percent, SE = std/√2 with ddof=0, i.e. |a - b| / 2 / √2):
    erm  env0: 80, 70 -> 75.0 ± 3.5   env1: 60, 64 -> 62.0 ± 1.4   env2: 30, 40 -> 35.0 ± 3.5
         Avg: seed 0 = 56.667, seed 1 = 58.0 -> 57.3 ± 0.5
    irm  env0: 78, 78 -> 78.0 ± 0.0   env1: 66, 70 -> 68.0 ± 1.4   env2: 50, 44 -> 47.0 ± 2.1
         Avg: seed 0 = 64.667, seed 1 = 64.0 -> 64.3 ± 0.2
    oracle adds 5: erm 80.0 ± 3.5, 67.0 ± 1.4, 40.0 ± 3.5, Avg 62.3 ± 0.5; irm 83.0 ± 0.0, 73.0 ± 1.4, 52.0 ± 2.1,
         Avg 69.3 ± 0.2.
A cell rests on 2 seeds × 2 draws = 4 trials; an Avg cell on 12.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest

from shiftbench.report import build_report, leaderboard_text, load_failed, load_trials, scan_runs, write_report
from shiftbench.selection import RULES

ENV_NAMES = ["+90%", "+80%", "-90%"]
ACC = {"erm": {0: (0.80, 0.70), 1: (0.60, 0.64), 2: (0.30, 0.40)},
       "irm": {0: (0.78, 0.78), 1: (0.66, 0.70), 2: (0.50, 0.44)}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(step: int, test_env: int, train_out: float, test_out: float, test_in: float) -> dict:
    r: dict = {"step": step, "loss": 0.4, "elapsed": step / 100, "step_time": 0.01}
    for i in range(3):
        r[f"env{i}_in_acc"] = test_in if i == test_env else 0.9
        r[f"env{i}_in_loss"] = 0.5
        r[f"env{i}_out_acc"] = test_out if i == test_env else train_out
        r[f"env{i}_out_loss"] = 0.5
    return r


def _spec(method: str, seed: int, hp: int, test_envs: list[int]) -> dict:
    return {"dataset": "toy", "method": method, "test_envs": test_envs, "seed": seed, "hparams_seed": hp,
            "hparams": {"lr": 0.001 * (hp + 1)}, "steps": 100, "eval_every": 50, "model": "mlp",
            "dataset_options": {}, "callbacks": []}


def _write_trial(trials_dir: Path, spec: dict, records: list[dict] | None, marker: str | None) -> str:
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    d = trials_dir / h[:16]
    d.mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps({"hash": h, "spec": spec, "data_version": "d" * 64,
                                             "code_version": "c" * 40, "task": "classification",
                                             "env_names": ENV_NAMES}))
    if records is not None:
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if marker == "done":
        (d / "final.json").write_text(json.dumps({"status": "done", "hash": h, "record": records[-1]}))
    elif marker == "failed":
        (d / "failed.json").write_text(json.dumps({"status": "failed", "reason": "non-finite loss", "step": 30}))
    return h


def make_sweep(root: Path) -> Path:
    """Writes the sweep of the module docstring under ``root/trials`` and returns ``root``."""
    trials_dir = root / "trials"
    for method, by_env in ACC.items():
        for env, by_seed in by_env.items():
            for seed, a in enumerate(by_seed):
                _write_trial(trials_dir, _spec(method, seed, 1, [env]),
                             [_record(50, env, 0.60, 0.20, a - 0.10), _record(100, env, 0.75, 0.30, a)], "done")
                _write_trial(trials_dir, _spec(method, seed, 0, [env]),
                             [_record(50, env, 0.55, 0.99, 0.11), _record(100, env, 0.65, 0.50, a + 0.05)], "done")
    # Would win training-domain validation for erm env0 seed 0 with test acc 1% if it were counted.
    _write_trial(trials_dir, _spec("erm", 0, 2, [0]), [_record(50, 0, 0.99, 0.99, 0.01)], None)
    _write_trial(trials_dir, _spec("erm", 0, 3, [0]), [_record(20, 0, 0.99, 0.99, 0.01)], "failed")
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def report(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reports")
    metrics = write_report(load_trials(sweep), out, failed=load_failed(sweep), incomplete=1)
    return out, metrics


def test_load_trials_layouts_and_markers(sweep: Path):
    scan = scan_runs(sweep)
    assert len(scan.done) == 24 and len(scan.failed) == 1 and len(scan.incomplete) == 1 and not scan.unreadable
    assert scan.failed[0]["reason"] == "non-finite loss" and scan.failed[0]["step"] == 30
    t = scan.done[0]
    assert set(t) >= {"hash", "spec", "env_names", "data_version", "code_version", "task", "records", "final"}
    assert t["env_names"] == ENV_NAMES and t["task"] == "classification" and len(t["records"]) == 2
    assert all(tr["spec"]["hparams_seed"] in (0, 1) for tr in scan.done)  # the incomplete draw 2 is not there
    assert len(load_trials(sweep / "trials")) == 24  # a folder of trial folders
    one = Path(scan.done[0]["dir"])
    assert [x["hash"] for x in load_trials(one)] == [scan.done[0]["hash"]]  # a single trial folder
    assert load_trials(sweep / "missing") == []


def test_leaderboard_markdown_numbers(report: tuple[Path, dict]):
    out, _ = report
    md = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert "## toy — training-domain validation" in md and "## toy — test-domain validation (oracle)" in md
    assert "## toy — leave-one-domain-out" in md
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n## ")}
    td = sections["toy — training-domain validation"]
    header = next(line for line in td.splitlines() if line.startswith("| Method"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["Method", *ENV_NAMES, "Avg"]
    erm = next(line for line in td.splitlines() if line.startswith("| erm"))
    assert [c.strip() for c in erm.strip("|").split("|")] == [
        "erm", "75.0 ± 3.5 (n=4)", "62.0 ± 1.4 (n=4)", "35.0 ± 3.5 (n=4)", "57.3 ± 0.5 (n=12)"]
    irm = next(line for line in td.splitlines() if line.startswith("| irm"))
    assert [c.strip() for c in irm.strip("|").split("|")] == [
        "irm", "78.0 ± 0.0 (n=4)", "68.0 ± 1.4 (n=4)", "47.0 ± 2.1 (n=4)", "64.3 ± 0.2 (n=12)"]
    orc = sections["toy — test-domain validation (oracle)"]
    assert "80.0 ± 3.5 (n=4)" in orc and "67.0 ± 1.4 (n=4)" in orc and "40.0 ± 3.5 (n=4)" in orc
    assert "62.3 ± 0.5 (n=12)" in orc and "83.0 ± 0.0" in orc and "52.0 ± 2.1" in orc and "69.3 ± 0.2" in orc
    loo = sections["toy — leave-one-domain-out"]
    assert "No selections (it needs trials holding out pairs of environments" in loo
    assert "| erm" not in loo
    assert "mean ± standard error over trial seeds" in md
    summary = sections["Run summary"]
    assert "done trials: 24" in summary and "failed trials: 1" in summary and "non-finite loss: 1" in summary
    assert "incomplete trials (no final.json, ignored): 1" in summary


def test_leaderboard_text_matches_file(report: tuple[Path, dict], sweep: Path):
    out, _ = report
    scan = scan_runs(sweep)
    text = leaderboard_text(scan.done, failed=scan.failed, incomplete=len(scan.incomplete))
    assert text == (out / "leaderboard.md").read_text(encoding="utf-8")


def test_metrics_json(report: tuple[Path, dict]):
    out, returned = report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == returned
    assert metrics["unit"] == "percent"
    assert {k: metrics["counts"][k] for k in ("done", "failed", "incomplete")} == {"done": 24, "failed": 1,
                                                                                     "incomplete": 1}
    toy = metrics["datasets"]["toy"]
    assert toy["envs"] == {"env0": "+90%", "env1": "+80%", "env2": "-90%"}
    assert list(toy["rules"]) == list(RULES)
    erm = toy["rules"]["training_domain"]["methods"]["erm"]
    assert list(erm) == ["env0", "env1", "env2", "avg"]
    assert erm["env0"]["mean"] == pytest.approx(75.0) and erm["env0"]["se"] == pytest.approx(5 / math.sqrt(2))
    assert erm["env0"]["n_seeds"] == 2 and erm["env0"]["n_trials"] == 4 and erm["env0"]["name"] == "+90%"
    assert erm["avg"]["mean"] == pytest.approx(57.0 + 1 / 3) and erm["avg"]["se"] == pytest.approx(
        (2 / 3) / math.sqrt(2))
    assert erm["avg"]["n_seeds"] == 2 and erm["avg"]["n_trials"] == 12
    irm_orc = toy["rules"]["oracle"]["methods"]["irm"]
    assert irm_orc["env2"]["mean"] == pytest.approx(52.0) and irm_orc["env2"]["se"] == pytest.approx(3 / math.sqrt(2))
    loo = toy["rules"]["leave_one_domain_out"]["methods"]["irm"]["env1"]
    assert loo == {"name": "+80%", "mean": None, "se": None, "n_seeds": 0, "n_trials": 0}


def test_html_and_tex(report: tuple[Path, dict]):
    out, _ = report
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert "75.0 ± 3.5" in page and "57.3 ± 0.5" in page and "n=12" in page
    assert "test-domain validation (oracle)" in page
    tex = (out / "leaderboard.tex").read_text(encoding="utf-8")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\begin{tabular}" in tex
    assert "$75.0 \\pm 3.5$" in tex and "$64.3 \\pm 0.2$" in tex and "+90\\%" in tex
    assert "leave-one-domain-out" in tex


def test_csv_files(report: tuple[Path, dict]):
    out, _ = report
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["dataset", "rule", "method", "env", "mean", "se", "n_seeds", "n_trials"]
    assert len(rows) == len(RULES) * 2 * 4
    row = next(r for r in rows if (r["rule"], r["method"], r["env"]) == ("training_domain", "irm", "-90%"))
    assert float(row["mean"]) == pytest.approx(47.0) and row["n_seeds"] == "2" and row["n_trials"] == "4"
    with open(out / "selections.csv", newline="") as f:
        sels = list(csv.DictReader(f))
    td = [s for s in sels if s["rule"] == "training_domain"]
    orc = [s for s in sels if s["rule"] == "oracle"]
    assert len(td) == len(orc) == 12
    assert {(s["hparams_seed"], s["step"]) for s in td} == {("1", "100")}
    assert {(s["hparams_seed"], s["step"]) for s in orc} == {("0", "100")}


def test_plots_are_png(report: tuple[Path, dict]):
    out, _ = report
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["accuracy_by_env_toy.png", "accuracy_over_steps.png"]
    for name in pngs:
        data = (out / "plots" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "plots" / "accuracy_by_env_toy.png")
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # something is drawn


def test_build_report_and_empty_runs(sweep: Path, tmp_path: Path):
    metrics, text = build_report(sweep, tmp_path / "r", plots=False)
    assert metrics["counts"]["done"] == 24 and metrics["counts"]["incomplete"] == 1 and "57.3 ± 0.5" in text
    assert not (tmp_path / "r" / "plots").exists()
    empty = write_report([], tmp_path / "empty")
    assert empty["counts"]["done"] == 0 and empty["datasets"] == {}
    assert "No done trials." in (tmp_path / "empty" / "leaderboard.md").read_text(encoding="utf-8")
    assert (tmp_path / "empty" / "plots" / "accuracy_over_steps.png").read_bytes()[:8] == PNG_MAGIC


def test_unreadable_results_are_reported_not_fatal(tmp_path: Path):
    root = make_sweep(tmp_path / "s")
    victim = Path(scan_runs(root).done[0]["dir"])
    (victim / "results.jsonl").write_text('{"step": 1\n')
    scan = scan_runs(root)
    assert len(scan.done) == 23 and len(scan.unreadable) == 1
    metrics, text = build_report(root, tmp_path / "r", plots=False)
    assert metrics["counts"]["failed"] == 2 and "unreadable" in text


def test_leave_one_domain_out_in_report(tmp_path: Path):
    # One method, one seed, one draw, test env 0 with both pairs: val = mean(pair (0,1) env1 in, pair (0,2) env2 in).
    trials_dir = tmp_path / "trials"
    _write_trial(trials_dir, _spec("erm", 0, 0, [0]),
                 [_record(50, 0, 0.5, 0.5, 0.61), _record(100, 0, 0.5, 0.5, 0.72)], "done")
    for j, accs in ((1, (0.9, 0.1)), (2, (0.8, 0.2))):  # step 50 has the better pair accuracies -> 61.0
        recs = []
        for step, a in zip((50, 100), accs):
            r = _record(step, 0, 0.5, 0.5, 0.5)
            r[f"env{j}_in_acc"] = a
            recs.append(r)
        _write_trial(trials_dir, _spec("erm", 0, 0, [0, j]), recs, "done")
    metrics = write_report(load_trials(tmp_path), tmp_path / "r", plots=False)
    cell = metrics["datasets"]["toy"]["rules"]["leave_one_domain_out"]["methods"]["erm"]["env0"]
    assert cell["mean"] == pytest.approx(61.0) and cell["n_seeds"] == 1 and cell["n_trials"] == 3
    td = metrics["datasets"]["toy"]["rules"]["training_domain"]["methods"]["erm"]
    assert td["env0"]["mean"] == pytest.approx(61.0) and td["env0"]["n_trials"] == 1  # tie -> earliest step
    assert td["env1"]["mean"] is None and td["avg"]["mean"] is None  # env1/env2 are only held out in pairs
