"""The report on a synthetic sweep written in the docs/records.md layout.

Sweep: dataset "toy" with environments ("+90%", "+80%", "-90%"), methods erm and irm, seeds 0 and 1, hparams draws 0
and 1, every single test environment: 2 × 3 × 2 × 2 = 24 done trials, plus one failed and one incomplete trial.

Each trial has records at steps 50 and 100; A = ACC[method][env][seed] is a chosen test accuracy.

- draw 1: step 50: train-env out .60, test out .20, test in A - .10; step 100: train out .75, test out .30, test in A.
- draw 0: step 50: train-env out .55, test out .99, test in .11; step 100: train out .65, test out .50, test in A + .05.

Training-domain validation picks draw 1 at step 100 (val .75 beats .65), so cells are A. The oracle takes each
run's last step and picks draw 0 (test out .50 beats .30): A + .05; had it early-stopped, draw 0 at step 50 (.99)
would give .11. No leave-one-domain-out pairs: that table is all dashes.

By hand (percent; two seeds a, b: SE = s/√2 with ddof=1 is |a - b| / 2, with ddof=0 |a - b| / 2 / √2):
    erm  env0: 80, 70 -> 75.0 ± 5.0   env1: 60, 64 -> 62.0 ± 2.0   env2: 30, 40 -> 35.0 ± 5.0
         Avg: mean of the column means (75 + 62 + 35) / 3 = 57.33; per seed 56.667 and 58.0 -> ± 0.67
    irm  env0: 78, 78 -> 78.0 ± 0.0   env1: 66, 70 -> 68.0 ± 2.0   env2: 50, 44 -> 47.0 ± 3.0
         Avg: 64.33; per seed 64.667 and 64.0 -> ± 0.33
    oracle adds 5: erm 80.0 ± 5.0, 67.0 ± 2.0, 40.0 ± 5.0, Avg 62.3 ± 0.7; irm 83.0 ± 0.0, 73.0 ± 2.0,
         52.0 ± 3.0, Avg 69.3 ± 0.3.
Rows: irm (Avg 64.3) above erm (57.3); irm is best in every column and erm is never within irm's SE of it (env1:
62 < 68 - 2), so irm's cells are bold. The 95% interval of erm's env2 cell: 35 ± t(0.975, 1) · 5 = 35 ± 12.706 · 5.
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
        "erm", "75.0 ± 5.0 (n=4)", "62.0 ± 2.0 (n=4)", "35.0 ± 5.0 (n=4)", "57.3 ± 0.7 (n=12)"]
    irm = next(line for line in td.splitlines() if line.startswith("| irm"))
    assert [c.strip() for c in irm.strip("|").split("|")] == [
        "irm", "**78.0 ± 0.0 (n=4)**", "**68.0 ± 2.0 (n=4)**", "**47.0 ± 3.0 (n=4)**", "**64.3 ± 0.3 (n=12)**"]
    assert td.index("| irm") < td.index("| erm")  # sorted by Avg, descending
    assert "Mean ± SE at ddof=1 over seeds. Rows sorted by Avg, descending; bold: the best cell" in td
    orc = sections["toy — test-domain validation (oracle)"]
    assert "80.0 ± 5.0 (n=4)" in orc and "67.0 ± 2.0 (n=4)" in orc and "40.0 ± 5.0 (n=4)" in orc
    assert "62.3 ± 0.7 (n=12)" in orc and "83.0 ± 0.0" in orc and "52.0 ± 3.0" in orc and "69.3 ± 0.3" in orc
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


def _leaves(obj, path=()):
    """(key path, leaf) of every leaf of nested dicts and lists."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _leaves(v, (*path, k))]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _leaves(v, (*path, i))]
    return [(path, obj)]


def test_report_json(report: tuple[Path, dict]):
    out, returned = report
    full = json.loads((out / "report.json").read_text())
    assert full == returned
    assert full["unit"] == "percent"
    assert {k: full["counts"][k] for k in ("done", "failed", "incomplete")} == {"done": 24, "failed": 1,
                                                                                  "incomplete": 1}
    assert full["failures"][0]["reason"] == "non-finite loss"
    toy = full["datasets"]["toy"]
    assert toy["envs"] == {"env0": "+90%", "env1": "+80%", "env2": "-90%"}
    assert list(toy["rules"]) == list(RULES)
    erm = toy["rules"]["training_domain"]["methods"]["erm"]
    assert list(erm) == ["env0", "env1", "env2", "avg"]
    assert erm["env0"]["mean"] == pytest.approx(75.0) and erm["env0"]["se"] == pytest.approx(5.0)
    assert erm["env0"]["n_seeds"] == 2 and erm["env0"]["n_trials"] == 4 and erm["env0"]["name"] == "+90%"
    assert erm["avg"]["mean"] == pytest.approx(57.0 + 1 / 3) and erm["avg"]["se"] == pytest.approx(2 / 3)
    assert erm["avg"]["complete"] == 1 and erm["avg"]["mark"] == "" and toy["rules"]["training_domain"]["methods"][
        "irm"]["avg"]["mark"] == "best"
    assert list(toy["rules"]["training_domain"]["methods"]) == ["irm", "erm"]  # the table's order
    assert full["statistics"] == {"se_ddof": 1, "ci_level": 0.95}
    assert erm["avg"]["n_seeds"] == 2 and erm["avg"]["n_trials"] == 12
    irm_orc = toy["rules"]["oracle"]["methods"]["irm"]
    assert irm_orc["env2"]["mean"] == pytest.approx(52.0) and irm_orc["env2"]["se"] == pytest.approx(3.0)
    loo = toy["rules"]["leave_one_domain_out"]["methods"]["irm"]["env1"]
    assert loo == {"name": "+80%", "mean": None, "se": None, "ci95_low": None, "ci95_high": None, "n_seeds": 0,
                   "n_trials": 0, "mark": ""}


def test_metrics_json_is_numbers_at_report_json_paths(report: tuple[Path, dict]):
    out, full = report
    metrics = json.loads((out / "metrics.json").read_text())
    leaves = _leaves(metrics)
    assert leaves and all(type(v) in (int, float) for _, v in leaves)  # no str, None, bool or list leaf
    assert not any("/" in str(k) for path, _ in leaves for k in path)
    for path, v in leaves:  # every number sits where report.json has it
        node = full
        for k in path:
            node = node[k]
        assert node == v, path
    erm = metrics["datasets"]["toy"]["rules"]["training_domain"]["methods"]["erm"]
    t1 = 12.7062047  # t(0.975, 1), from a table
    assert erm["env2"] == {"mean": pytest.approx(35.0), "se": pytest.approx(5.0), "ci95_low": pytest.approx(
        35 - t1 * 5), "ci95_high": pytest.approx(35 + t1 * 5), "n_seeds": 2, "n_trials": 4}
    assert erm["avg"]["complete"] == 1 and metrics["statistics"] == {"se_ddof": 1, "ci_level": 0.95}
    assert metrics["datasets"]["toy"]["rules"]["leave_one_domain_out"]["methods"]["irm"]["env1"] == {
        "n_seeds": 0, "n_trials": 0}
    assert metrics["counts"]["failed"] == 1 and "failures" not in metrics and "schema" not in metrics


def test_numbers_only_drops_strings_lists_and_path_keys(tmp_path: Path):
    from shiftbench.report import numbers_only

    raw = {"tree_heads": {str(tmp_path / "runs" / "attestation_log"): {"root_hash": "ab" * 32, "tree_size": 3}},
           "rows": [{"n": 1}], "ok": True, "nan": float("nan"), "n": 2, "p": 0.5, "erm/env3": {"acc": 0.7},
           "empty": {"s": "x"}}
    assert numbers_only(raw) == {"n": 2, "p": 0.5, "erm/env3": {"acc": 0.7}}


def test_html_and_tex(report: tuple[Path, dict]):
    out, _ = report
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert "75.0 ± 5.0" in page and "57.3 ± 0.7" in page and "n=12" in page and "<b>64.3 ± 0.3</b>" in page
    assert "<caption>Mean ± SE at ddof=1 over seeds. Rows sorted by Avg" in page
    assert "test-domain validation (oracle)" in page
    tex = (out / "leaderboard.tex").read_text(encoding="utf-8")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\begin{tabular}" in tex
    assert "$75.0 \\pm 5.0$" in tex and "$\\mathbf{64.3 \\pm 0.3}$" in tex and "+90\\%" in tex
    assert "Mean $\\pm$ SE at ddof=1 over seeds." in tex
    assert "leave-one-domain-out" in tex


def test_csv_files(report: tuple[Path, dict]):
    out, _ = report
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["dataset", "rule", "method", "env", "mean", "se", "ci95_low", "ci95_high", "n_seeds",
                             "n_trials", "mark"]
    assert len(rows) == len(RULES) * 2 * 4
    row = next(r for r in rows if (r["rule"], r["method"], r["env"]) == ("training_domain", "irm", "-90%"))
    assert float(row["mean"]) == pytest.approx(47.0) and row["n_seeds"] == "2" and row["n_trials"] == "4"
    assert row["mark"] == "best" and float(row["se"]) == pytest.approx(3.0)
    assert float(row["ci95_high"]) == pytest.approx(47.0 + 12.7062047 * 3.0, abs=1e-3)
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
    assert metrics["counts"]["done"] == 24 and metrics["counts"]["incomplete"] == 1 and "57.3 ± 0.7" in text
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


# ------------------------------------------------------------------------------------ what a newcomer reads (issue 12)


def _one(root: Path, method: str = "erm", acc: float = 0.412, dataset: str = "toy", seed: int = 0, hp: int = 0,
         envs: tuple[int, ...] = (2,), steps: int = 100) -> str:
    """A done trial with one record at step 100: training envs' out .7, the test envs' in accuracy ``acc``."""
    spec = {**_spec(method, seed, hp, list(envs)), "dataset": dataset, "steps": steps}
    rec = {"step": 100}
    for i in range(3):
        rec[f"env{i}_in_acc"] = acc if i in envs else 0.9
        rec[f"env{i}_out_acc"] = 0.5 if i in envs else 0.7
    return _write_trial(root / "trials", spec, [rec], "done")


def _row(md: str, heading: str, method: str) -> list[str]:
    body = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in next(x for x in body.splitlines() if x.startswith(f"| {method} ")).strip("|").split("|")]


def _header(md: str, heading: str) -> list[str]:
    return _row(md, heading, "Method")


def test_one_seed_cell_has_no_se_and_one_env_has_no_avg(tmp_path: Path):
    from shiftbench.report import Cell

    _one(tmp_path / "s")
    full = write_report(load_trials(tmp_path / "s"), tmp_path / "r", plots=False)
    md = (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
    assert _header(md, "toy — training-domain validation") == ["Method", "-90%"]  # no Avg of a single column
    assert _row(md, "toy — training-domain validation", "erm") == ["erm", "41.2 (n=1)"]
    assert "± 0.0" not in md
    assert Cell(41.2, 0.0, 1, 1).text() == "41.2" and Cell(41.2, 0.0, 2, 2).text() == "41.2 ± 0.0"
    page = (tmp_path / "r" / "leaderboard.html").read_text(encoding="utf-8")
    assert "<td>41.2<sup" in page and ">Avg<" not in page
    tex = (tmp_path / "r" / "leaderboard.tex").read_text(encoding="utf-8")
    assert "$41.2$\\textsuperscript{\\tiny 1}" in tex and "Avg" not in tex
    assert list(full["datasets"]["toy"]["rules"]["training_domain"]["methods"]["erm"]) == ["env2"]
    with open(tmp_path / "r" / "leaderboard.csv", newline="") as f:
        assert {r["env"] for r in csv.DictReader(f)} == {"-90%"}


def _note_count(text: str) -> int:
    return text.count("training-domain validation picks colour-reliant models")


@pytest.mark.parametrize("dataset,acc,expected", [("colored_digits", 0.10, 1), ("colored_mnist", 0.49, 1),
                                                  ("colored_digits", 0.50, 0), ("rotated_digits", 0.10, 0),
                                                  ("toy", 0.10, 0)])
def test_colour_note_exactly_where_training_domain_validation_follows_the_colour(tmp_path, dataset, acc, expected):
    for seed in (0, 1):
        _one(tmp_path / "s", "erm", acc, dataset=dataset, seed=seed)
        _one(tmp_path / "s", "irm", 0.72, dataset=dataset, seed=seed)
    write_report(load_trials(tmp_path / "s"), tmp_path / "r", plots=False)
    md = (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
    assert _note_count(md) == expected  # once: under the training-domain table, not the oracle's or the others'
    if expected:
        td = md.split(f"## {dataset} — training-domain validation\n", 1)[1].split("\n## ", 1)[0]
        (line,) = [x for x in td.splitlines() if x.startswith("Note: ")]
        assert line.startswith("Note: -90%: training-domain validation picks colour-reliant models.")
        assert "Gulrajani & Lopez-Paz" in line
    assert _note_count((tmp_path / "r" / "leaderboard.html").read_text(encoding="utf-8")) == expected
    assert _note_count((tmp_path / "r" / "leaderboard.tex").read_text(encoding="utf-8")) == expected


def test_colour_note_absent_from_the_main_fixture(report: tuple[Path, dict]):
    out, _ = report  # "toy" has a -90% column at 35% and 47%, but is no colored dataset
    assert _note_count((out / "leaderboard.md").read_text(encoding="utf-8")) == 0


def _sweep_json(root: Path, name: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({"hash": "h" * 64, "spec": {"name": name}}))


def test_report_over_two_sweeps_labels_repeated_methods_and_counts_shared_trials_once(tmp_path: Path):
    qs, cd = tmp_path / "runs" / "qs_folder", tmp_path / "runs" / "cd_folder"
    _sweep_json(qs, "qs")
    _sweep_json(cd, "cd")
    for seed, (a, b) in enumerate(((0.60, 0.20), (0.70, 0.30))):
        _one(qs, "erm", a, seed=seed)
        _one(qs, "irm", 0.55, seed=seed)
        _one(cd, "erm", b, seed=seed, steps=200)  # a different trial: another step count
    _one(cd, "irm", 0.55, seed=0)  # the very trial qs holds (same spec, same hash): counted once, from qs
    full, text = build_report([qs, cd], tmp_path / "r", plots=False)
    assert full["counts"]["done"] == 6 and full["counts"]["duplicates"] == 1 and full["counts"]["sweeps"] == 2
    assert full["sweeps"] == [{"label": "qs", "dir": str(qs), "done": 4}, {"label": "cd", "dir": str(cd), "done": 2}]
    rows = full["datasets"]["toy"]["rules"]["training_domain"]["methods"]
    assert list(rows) == ["erm (qs)", "irm", "erm (cd)"]  # by the headline; irm ran in qs only (cd's copy is qs's)
    assert rows["erm (qs)"]["env2"]["mean"] == pytest.approx(65.0) and rows["erm (qs)"]["env2"]["n_trials"] == 2
    assert rows["erm (cd)"]["env2"]["mean"] == pytest.approx(25.0) and rows["irm"]["env2"]["n_trials"] == 2
    # SE = |20 - 30| / 2 = 5.0 (ddof=1)
    assert _row(text, "toy — training-domain validation", "erm (cd)") == ["erm (cd)", "25.0 ± 5.0 (n=2)"]
    assert f"- sweeps: qs ({qs}: 4 done), cd ({cd}: 2 done); 1 trial(s) found in more than one folder counted once" \
        in text
    with open(tmp_path / "r" / "plot_methods.csv", newline="") as f:
        assert [(r["method"], r["accuracy"]) for r in csv.DictReader(f)] == [
            ("erm (cd)", "25.0000"), ("erm (qs)", "65.0000"), ("irm", "55.0000")]


def test_two_sweeps_with_one_name_are_labelled_by_folder(tmp_path: Path):
    from shiftbench.report import scan_sweeps, sweep_labels

    a, b = tmp_path / "a" / "demo1", tmp_path / "b" / "demo2"
    for d in (a, b):
        _sweep_json(d, "quickstart")
    _one(a, "erm", 0.5)
    _one(b, "erm", 0.6, seed=1)
    assert sweep_labels([a, b]) == ["demo1", "demo2"]
    c = tmp_path / "c" / "demo1"
    _sweep_json(c, "quickstart")
    assert sweep_labels([a, c]) == [str(a), str(c)]  # sweep and folder names clash: the paths as given
    assert sorted(t["row"] for t in scan_sweeps([a, b]).done) == ["erm (demo1)", "erm (demo2)"]


def test_html_cells_link_the_selected_trial_folders(report: tuple[Path, dict], sweep: Path):
    import re

    out, _ = report
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    with open(out / "selections.csv", newline="") as f:
        picked = {r["hash"][:16] for r in csv.DictReader(f) if r["rule"] == "training_domain"}
    links = re.findall(r'<a href="([^"]+)" title="([0-9a-f]{16})">s(\d)</a>', page)
    assert {title for _, title, _ in links} >= picked and len(picked) == 12
    for href, title, _ in links:  # relative, offline, and each lands on its trial's folder
        assert not href.startswith(("/", "http")) and href.endswith(f"trials/{title}/")
        assert ((out / href) / "spec.json").is_file()
    erm_row = next(r for r in page.split("<tr>") if r.startswith("<td>erm</td>"))  # first table: training-domain
    cells = erm_row.split("<td")[2:]
    assert [len(re.findall(r"<a href", c)) for c in cells] == [2, 2, 2, 0]  # one link per seed; none in Avg


def test_plot_methods_csv_has_one_row_per_method(report: tuple[Path, dict]):
    out, _ = report
    with open(out / "plot_methods.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"method": "erm", "accuracy": "57.3333", "toy": "57.3333"},
                    {"method": "irm", "accuracy": "64.3333", "toy": "64.3333"}]  # the training-domain Avg cells


def test_terminal_form_prints_a_long_section_as_one_line(sweep: Path, tmp_path: Path):
    from shiftbench import report

    @report.report_section("test_long")
    def long_table(trials):
        md = "\n".join(f"| row {i} |" for i in range(32))
        return report.Section("test_long", "Long table", md, "<p>long</p>", {"n": 32},
                              terminal=f"long: {len(trials)} trials listed")

    try:
        _, short = build_report(sweep, tmp_path / "r", plots=False, terminal=True)
        _, full = build_report(sweep, tmp_path / "r", plots=False)
    finally:
        report.SECTIONS.pop("test_long")
    assert f"- long: 24 trials listed; details in {tmp_path / 'r' / 'leaderboard.md'}" in short
    assert "| row 31 |" not in short and "## Long table" not in short
    assert "## Long table" in full and "| row 31 |" in full and "long: 24 trials listed" not in full
    assert full == (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
    assert short.index("## toy — training-domain validation") < short.index("- long: 24")


def test_attestation_terminal_line():
    from shiftbench.attest.report import _numbers, _terminal_line

    rows = [{"status": "self-attested", "log_index": i} for i in range(31)] + [
        {"status": "host-verified", "log_index": None}]
    heads = {"/somewhere/runs/demo/attestation_log": {"root_hash": "0123456789abcdef" * 4, "tree_size": 32}}
    assert _terminal_line(rows, heads, []) == (
        "attestation: 32 trial(s) signed (1 host-verified, 0 failed by a host), log root 0123456789abcdef… (size 32)")
    assert _terminal_line(rows[:2], {"a": None}, ["x is not in its log"]) == (
        "attestation: 2 trial(s) signed, no checkpoint; 1 warning(s), first: x is not in its log")
    assert _numbers(rows, heads, []) == {"signed": 32, "host_verified": 1, "host_failed": 0, "not_in_log": 1,
                                         "logs": 1, "tree_size": 32, "warnings": 0}


# ------------------------------------------------------------------ error bars, Avg and the leaderboard (issues 15, 17)


def test_standard_error_and_t_interval_by_hand():
    from shiftbench.report import standard_error, t_interval

    values = [0.70, 0.80, 0.90]  # mean 0.80; s = 0.1 (ddof=1), std = 0.0816 (ddof=0)
    assert standard_error(values) == pytest.approx(0.1 / math.sqrt(3)) == pytest.approx(0.0577, abs=5e-5)
    assert standard_error(values, ddof=0) == pytest.approx(0.0471, abs=5e-5)
    lo, hi = t_interval(values)  # t(0.975, 2) = 4.303 -> ± 4.303 · 0.0577 = ± 0.248
    assert (lo, hi) == (pytest.approx(0.80 - 0.2484, abs=1e-4), pytest.approx(0.80 + 0.2484, abs=1e-4))
    assert standard_error([0.5]) is None and t_interval([0.5]) is None  # one seed: no estimate


# Leaderboard fixture: one test environment (the headline column), three seeds per method, accuracies in percent:
#   a  70, 80, 90        mean 80.0  SE 5.774 (ddof=1) / 4.714 (ddof=0)  95% t-interval 80 ± 24.84 = [55.2, 104.8]
#   b  76, 78, 80        mean 78.0  SE 1.155
#   e  74.5 x 3          mean 74.5  SE 0
#   d  74 x 3            mean 74.0  SE 0
#   c  60, 61, 62        mean 61.0  SE 0.577
#   f  61 x 3            mean 61.0  SE 0        (ties c: name order keeps c first)
# Order: a, b, e, d, c, f. Best: a. Within a's SE (ddof=1: >= 80 - 5.774 = 74.23): b and e, not d (74.0).
# With ddof=0 (>= 80 - 4.714 = 75.29): b only.
BOARD = {"a": (0.70, 0.80, 0.90), "b": (0.76, 0.78, 0.80), "e": (0.745,) * 3, "d": (0.74,) * 3,
         "c": (0.60, 0.61, 0.62), "f": (0.61,) * 3}


@pytest.fixture(scope="module")
def board(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("board")
    for method, accs in BOARD.items():
        for seed, acc in enumerate(accs):
            _one(root, method, acc, seed=seed)
    return root


def test_leaderboard_is_sorted_by_the_headline_and_marks_the_best_and_those_within_one_se(board, tmp_path):
    from shiftbench.report import compute_tables

    (t,) = compute_tables(load_trials(board), rules=["training_domain"])
    assert t.methods == ["a", "b", "e", "d", "c", "f"]
    assert {m: t.cells[(m, 2)].mark for m in t.methods} == {"a": "best", "b": "within_1se", "e": "within_1se",
                                                             "d": "", "c": "", "f": ""}
    a = t.cells[("a", 2)]
    assert a.mean == pytest.approx(80.0) and a.se == pytest.approx(10 / math.sqrt(3)) and a.n_seeds == 3
    assert (a.ci_low, a.ci_high) == (pytest.approx(55.159, abs=1e-3), pytest.approx(104.841, abs=1e-3))
    (t0,) = compute_tables(load_trials(board), rules=["training_domain"], se_ddof=0)
    assert t0.cells[("a", 2)].se == pytest.approx(4.714, abs=1e-3)
    assert [m for m in t0.methods if t0.cells[(m, 2)].mark] == ["a", "b"]
    assert (t0.cells[("a", 2)].ci_low, t0.cells[("a", 2)].ci_high) == (a.ci_low, a.ci_high)  # always ddof=1

    write_report(load_trials(board), tmp_path / "r", plots=False, ci=True)
    md = (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
    head = "toy — training-domain validation"
    assert _row(md, head, "a") == ["a", "**80.0 ± 5.8 [55.2, 104.8] (n=3)**"]
    assert _row(md, head, "e") == ["e", "**74.5 ± 0.0 [74.5, 74.5] (n=3)**"]
    assert _row(md, head, "d") == ["d", "74.0 ± 0.0 [74.0, 74.0] (n=3)"]
    body = md.split(f"## {head}\n", 1)[1].split("\n## ", 1)[0]
    assert [line.split("|")[1].strip() for line in body.splitlines() if line.startswith("| ")][2:] == list("abedcf")
    assert "[a, b] = 95% t-interval, mean ± t(0.975, n−1)·s/√n (s at ddof=1)" in body
    with open(tmp_path / "r" / "leaderboard.csv", newline="") as f:
        marks = [(r["method"], r["mark"]) for r in csv.DictReader(f) if r["rule"] == "training_domain"]
    assert marks == [("a", "best"), ("b", "within_1se"), ("e", "within_1se"), ("d", ""), ("c", ""), ("f", "")]
    tex = (tmp_path / "r" / "leaderboard.tex").read_text(encoding="utf-8")
    assert "$\\mathbf{80.0 \\pm 5.8\\;[55.2, 104.8]}$" in tex and "$74.0 \\pm 0.0\\;[74.0, 74.0]$" in tex
    page = (tmp_path / "r" / "leaderboard.html").read_text(encoding="utf-8")
    assert "<b>78.0 ± 1.2 [73.0, 83.0]</b>" in page and "<td>61.0 ± 0.6 [58.5, 63.5]<sup" in page


def test_metrics_json_carries_mean_se_interval_and_n_per_cell(board, tmp_path):
    build_report(board, tmp_path / "r", plots=False, se_ddof=0)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    cell = metrics["datasets"]["toy"]["rules"]["training_domain"]["methods"]["a"]["env2"]
    assert cell == {"mean": pytest.approx(80.0), "se": pytest.approx(4.714, abs=1e-3),
                    "ci95_low": pytest.approx(55.159, abs=1e-3), "ci95_high": pytest.approx(104.841, abs=1e-3),
                    "n_seeds": 3, "n_trials": 3}
    assert metrics["statistics"] == {"se_ddof": 0, "ci_level": 0.95}


def test_avg_is_the_mean_of_column_means_and_marked_when_incomplete(tmp_path):
    # x: env0 50, 70; env1 80, 80; env2 30, 50 -> columns 60, 80, 40 -> Avg 60.0; per seed 53.33, 66.67 -> SE 6.67
    # y: env0 60, 60; env1 90 (seed 0 only); env2 20, 40 -> columns 60, 90, 30 -> Avg 60.0, incomplete (no ±)
    # z: env0 and env1 only -> no Avg number, incomplete
    cases = {"x": {0: (0.5, 0.7), 1: (0.8, 0.8), 2: (0.3, 0.5)}, "y": {0: (0.6, 0.6), 1: (0.9,), 2: (0.2, 0.4)},
             "z": {0: (0.5, 0.5), 1: (0.5, 0.5)}}
    for method, by_env in cases.items():
        for env, accs in by_env.items():
            for seed, acc in enumerate(accs):
                _one(tmp_path / "s", method, acc, seed=seed, envs=(env,))
    full = write_report(load_trials(tmp_path / "s"), tmp_path / "r", plots=False)
    rows = full["datasets"]["toy"]["rules"]["training_domain"]["methods"]
    assert rows["x"]["avg"]["mean"] == pytest.approx(60.0) and rows["x"]["avg"]["se"] == pytest.approx(20 / 3)
    assert rows["x"]["avg"]["complete"] == 1 and rows["x"]["avg"]["n_seeds"] == 2
    assert rows["y"]["avg"]["mean"] == pytest.approx(60.0) and rows["y"]["avg"]["se"] is None
    assert rows["y"]["avg"]["complete"] == 0 and rows["y"]["avg"]["ci95_low"] is None
    assert rows["z"]["avg"]["mean"] is None and rows["z"]["avg"]["complete"] == 0
    assert list(rows) == ["x", "y", "z"]  # x and y tie at 60.0 (name order); z has no headline
    md = (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
    head = "toy — training-domain validation"
    assert _row(md, head, "x")[-1] == "60.0 ± 6.7 (n=6)" and _row(md, head, "y")[-1] == "60.0† (n=5)"
    assert _row(md, head, "z")[-1] == "–†"
    with open(tmp_path / "r" / "leaderboard.csv", newline="") as f:
        avg = {r["method"]: r["mark"] for r in csv.DictReader(f)
               if r["rule"] == "training_domain" and r["env"] == "Avg"}
    assert avg == {"x": "", "y": "incomplete", "z": "incomplete"}  # an incomplete Avg is never marked best
    with open(tmp_path / "r" / "plot_methods.csv", newline="") as f:
        assert {r["method"]: r["accuracy"] for r in csv.DictReader(f)} == {"x": "60.0000", "y": "", "z": ""}


def test_trials_of_an_older_protocol_get_their_own_row(tmp_path):
    # Same method and seeds; protocol-1 trials (no key, data seed fixed) at 90%, protocol-2 trials at 50% and 60%.
    for seed, acc in enumerate((0.5, 0.6)):
        spec = {**_spec("erm", seed, 0, [2]), "protocol": 2}
        rec = {"step": 100, **{f"env{i}_in_acc": acc if i == 2 else 0.9 for i in range(3)},
               **{f"env{i}_out_acc": 0.7 for i in range(3)}}
        _write_trial(tmp_path / "s" / "trials", spec, [rec], "done")
        _one(tmp_path / "s", "erm", 0.9, seed=seed)
    full = write_report(load_trials(tmp_path / "s"), tmp_path / "r", plots=False)
    rows = full["datasets"]["toy"]["rules"]["training_domain"]["methods"]
    assert rows["erm"]["env2"]["mean"] == pytest.approx(55.0) and rows["erm"]["env2"]["n_trials"] == 2
    assert rows["erm (protocol 1)"]["env2"]["mean"] == pytest.approx(90.0)


def test_bad_se_ddof_is_one_clear_error(board, tmp_path):
    from shiftbench.errors import UserError

    with pytest.raises(UserError, match="se_ddof must be 0 .* or 1"):
        build_report(board, tmp_path / "r", plots=False, se_ddof=2)
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------- report sections through the registry (issue 13)

BUILT_IN_SECTIONS = ["drift", "preference", "best_of_n", "coordination", "attestation"]


def _python(code: str, cwd: Path, pythonpath: str | None = None) -> str:
    """Runs ``code`` in a fresh interpreter (outside the repository, so no local folder shadows a package)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONSAFEPATH="1", MPLBACKEND="Agg")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_build_report_imports_no_trainer_and_takes_its_sections_from_the_registry(sweep: Path, tmp_path: Path):
    code = f"""
import json, sys
from shiftbench.report import build_report
from shiftbench.registry import SECTIONS
build_report({str(sweep)!r}, {str(tmp_path / 'r')!r}, plots=False)
print(json.dumps({{"trainer": "shiftbench.trainer" in sys.modules, "sweep": "shiftbench.sweep" in sys.modules,
                  "sections": {{n: c.__module__ for n, c in SECTIONS.items()}}}}))
"""
    seen = json.loads(_python(code, tmp_path).splitlines()[-1])
    assert seen["trainer"] is False and seen["sweep"] is False
    assert seen["sections"] == {"drift": "shiftbench.hooks.drift", "preference": "shiftbench.hooks.best_of_n",
                                "best_of_n": "shiftbench.hooks.best_of_n",
                                "coordination": "shiftbench.coordination.report",
                                "attestation": "shiftbench.attest.report"}  # fmt: skip


def test_the_report_package_loads_no_module_by_name():
    import shiftbench.report

    for path in Path(shiftbench.report.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "importlib" not in text and "import_module" not in text and "__import__" not in text, path.name


def test_built_in_sections_keep_the_report_order():
    from shiftbench.registry import SECTIONS
    from shiftbench.report import ReportSection

    order = [n for n, c in sorted(SECTIONS.items(), key=lambda kv: (kv[1].ORDER, kv[0])) if n in BUILT_IN_SECTIONS]
    assert order == BUILT_IN_SECTIONS
    assert all(issubclass(c, ReportSection) for _, c in SECTIONS.items())
    assert "SECTION_MODULES" not in vars(__import__("shiftbench.report").report)


def test_a_registered_section_appears_in_the_report_and_an_unregistered_one_does_not(sweep: Path, tmp_path: Path):
    from shiftbench import report

    def counted(trials):
        return report.Section("test_counted", "Counted", f"{len(trials)} trials", "<p>counted</p>", {"n": len(trials)})

    @report.report_section("test_late", order=200)
    class Late(report.ReportSection):
        def build(self, trials):
            return report.Section("test_late", "Late", "late body", "<p>late</p>", {"n": 1})

    def unregistered(trials):
        return report.Section("test_never", "Never", "never body", "<p>never</p>", {"n": 2})

    assert report.report_section("test_counted", order=5)(counted) is counted  # the function stays as it is
    try:
        full = write_report(load_trials(sweep), tmp_path / "r", plots=False)
        md = (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
        html = (tmp_path / "r" / "leaderboard.html").read_text(encoding="utf-8")
    finally:
        report.SECTIONS.pop("test_counted")
        report.SECTIONS.pop("test_late")
    assert full["sections"] == {"test_counted": {"n": 24}, "test_late": {"n": 1}}  # ORDER 5 before 200
    assert "## Counted\n\n24 trials\n" in md and "## Late\n\nlate body\n" in md
    assert md.index("## Counted") < md.index("## Late") < md.index("## Run summary")
    assert "<p>late</p>" in html and "Never" not in md and "never" not in html
    assert unregistered([]).title == "Never" and "test_never" not in full["sections"]  # defined, never registered
    # popped: the next report has neither
    again = write_report(load_trials(sweep), tmp_path / "r2", plots=False)
    assert "sections" not in again and "## Counted" not in (tmp_path / "r2" / "leaderboard.md").read_text()


def test_a_section_registers_twice_only_as_itself():
    from shiftbench import report

    @report.report_section("test_twice")
    def first(trials):
        return None

    try:
        with pytest.raises(ValueError, match="section 'test_twice' is already registered"):
            report.report_section("test_twice")(lambda trials: None)
        with pytest.raises(TypeError, match="must subclass ReportSection"):
            report.SECTIONS.register("test_not_a_section")(dict)
    finally:
        report.SECTIONS.pop("test_twice")


def test_an_external_section_comes_through_the_entry_point_group(sweep: Path, tmp_path: Path):
    site = tmp_path / "site"
    (site / "ext_sections-0.1.dist-info").mkdir(parents=True)
    (site / "ext_sections-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-sections\n"
                                                                  "Version: 0.1\n")
    (site / "ext_sections-0.1.dist-info" / "entry_points.txt").write_text(
        "[shiftbench.sections]\next_count = ext_sections\n")
    (site / "ext_sections.py").write_text(
        "from shiftbench.report import Section, report_section\n\n\n"
        "@report_section('ext_count')\n"
        "def ext_count(trials):\n"
        "    return Section('ext_count', 'External', f'{len(trials)} trials seen', '<p>ext</p>', {'n': len(trials)})\n")
    code = f"""
import json
from shiftbench.report import build_report
full, md = build_report({str(sweep)!r}, {str(tmp_path / 'r')!r}, plots=False)
print(json.dumps(full["sections"]))
"""
    assert json.loads(_python(code, tmp_path, pythonpath=str(site)).splitlines()[-1]) == {"ext_count": {"n": 24}}
    assert "## External\n\n24 trials seen\n" in (tmp_path / "r" / "leaderboard.md").read_text(encoding="utf-8")
