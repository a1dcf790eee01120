"""Extra leaderboard tables: a record metric (robust accuracy, ...) at the checkpoint a rule selects by accuracy.

Synthetic sweep: dataset "toy", environments env0..env2, every single test environment, one draw, seeds 0 and 1.
Records at steps 50 and 100: the training environments' out accuracy is .60 then .75, so training-domain validation
picks step 100, as does the oracle (last step). The test environment's robust accuracy is .90 at step 50 (it would
win any selection by robust accuracy) and B + .01·env at step 100, with B per (method, seed):

    erm          B = .10, .20 -> env0: 10, 20 -> 15.0 ± 5.0; env1 16.0 ± 5.0; env2 17.0 ± 5.0; Avg 16.0 ± 5.0
    adversarial  B = .40, .50 -> env0: 45.0 ± 5.0 ... Avg 46.0 ± 5.0
    irm          B = .30 (seed 0 only: seed 1 records no robust accuracy) -> env0 30.0 (no SE), n_seeds 1

(SE = s / √2 = |a − b| / 2 = 5.0 for two seeds 10 points apart, ddof=1.)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest

from shiftbench.report import all_tables, compute_tables, extra_metrics, load_trials, write_report

B = {"erm": (0.10, 0.20), "adversarial": (0.40, 0.50), "irm": (0.30, None)}


def _record(step: int, test_env: int, robust: float | None) -> dict:
    r = {"step": step, "loss": 0.3}
    for i in range(3):
        r[f"env{i}_in_acc"] = 0.5 + step / 1000 if i == test_env else 0.9
        r[f"env{i}_out_acc"] = 0.5 if i == test_env else (0.60 if step == 50 else 0.75)
        if robust is not None:
            r[f"env{i}_in_robust_acc"] = robust if i == test_env else 0.05
            r[f"env{i}_out_robust_acc"] = 0.01  # out splits never feed the extra tables
    if robust is not None:
        r["robust_eps"] = 0.1
    return r


def _write(root: Path, method: str, seed: int, env: int, records: list[dict]) -> None:
    spec = {"dataset": "toy", "method": method, "test_envs": [env], "seed": seed, "hparams_seed": 0, "hparams": {},
            "steps": 100, "eval_every": 50, "model": "mlp", "dataset_options": {}, "callbacks": ["robust_eval"]}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    d = root / "trials" / h[:16]
    d.mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps({"hash": h, "spec": spec, "env_names": ["env0", "env1", "env2"]}))
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "final.json").write_text(json.dumps({"status": "done", "hash": h, "record": records[-1]}))


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for method, bases in B.items():
        for seed, b in enumerate(bases):
            for env in range(3):
                late = None if b is None else b + 0.01 * env
                _write(root, method, seed, env, [_record(50, env, None if b is None else 0.9), _record(100, env, late)])
    return load_trials(root)


def test_extra_metrics_are_found_in_the_records(trials):
    assert extra_metrics(trials) == ["robust_acc"]  # not acc itself, not out-only keys, not settings
    assert extra_metrics([{"records": [{"env0_in_worst_group_acc": 0.5, "env0_in_acc": 0.6}]}]) == ["worst_group_acc"]


def test_robust_table_reports_the_checkpoint_selected_by_accuracy(trials):
    (table,) = compute_tables(trials, rules=["training_domain"], metric="robust_acc")
    cell = lambda m, k: table.cells[(m, k)]  # noqa: E731
    assert cell("erm", 0).mean == pytest.approx(15.0) and cell("erm", 0).se == pytest.approx(5.0)
    assert cell("erm", 2).mean == pytest.approx(17.0) and cell("erm", "avg").mean == pytest.approx(16.0)
    assert cell("adversarial", 1).mean == pytest.approx(46.0) and cell("adversarial", "avg").n_seeds == 2
    assert (cell("irm", 0).mean, cell("irm", 0).se, cell("irm", 0).n_seeds) == (pytest.approx(30.0), None, 1)
    (ddof0,) = compute_tables(trials, rules=["training_domain"], metric="robust_acc", se_ddof=0)
    assert ddof0.cells[("erm", 0)].se == pytest.approx(5 / math.sqrt(2))  # DomainBed's printing: |a − b| / 2 / √2
    assert {s.step for s in table.selections.values()} == {100}
    assert table.title == "training-domain validation: robust_acc"
    (acc,) = compute_tables(trials, rules=["training_domain"])  # the accuracy table is untouched: 0.6 at step 100
    assert acc.cells[("erm", 0)].mean == pytest.approx(60.0) and acc.metric == "acc"


def test_report_files_carry_the_extra_tables(trials, tmp_path):
    metrics = write_report(trials, tmp_path, plots=False)
    md = (tmp_path / "leaderboard.md").read_text(encoding="utf-8")
    section = md.split("## toy — training-domain validation: robust_acc", 1)[1].split("\n## ", 1)[0]
    erm = next(line for line in section.splitlines() if line.startswith("| erm"))
    assert [c.strip() for c in erm.strip("|").split("|")] == [
        "erm", "15.0 ± 5.0 (n=2)", "16.0 ± 5.0 (n=2)", "17.0 ± 5.0 (n=2)", "16.0 ± 5.0 (n=6)"]
    assert "## toy — test-domain validation (oracle): robust_acc" in md  # the oracle's last step is step 100 too
    assert "leave-one-domain-out: robust_acc" not in md  # a rule with nothing selected adds no extra table
    toy = metrics["datasets"]["toy"]
    assert set(toy["rules"]) >= {"training_domain", "oracle"} and "robust_acc" not in toy["rules"]
    td = toy["extra_metrics"]["robust_acc"]["training_domain"]["methods"]
    assert td["adversarial"]["env0"]["mean"] == pytest.approx(45.0) and td["irm"]["avg"]["n_seeds"] == 1
    with open(tmp_path / "leaderboard_extra.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if (r["metric"], r["rule"], r["method"], r["env"]) ==
               ("robust_acc", "training_domain", "erm", "env1"))
    assert float(row["mean"]) == pytest.approx(16.0) and row["n_seeds"] == "2"
    with open(tmp_path / "leaderboard.csv", newline="") as f:
        assert {r["rule"] for r in csv.DictReader(f)} <= set(toy["rules"])  # accuracy only, as before
    assert "training-domain validation: robust_acc</h2>" in (tmp_path / "leaderboard.html").read_text()


def test_no_extra_metric_no_extra_table(trials):
    plain = [{**t, "records": [{k: v for k, v in r.items() if "robust" not in k} for r in t["records"]]}
             for t in trials]
    assert [t.metric for t in all_tables(plain)] == ["acc"] * len(compute_tables(plain))
