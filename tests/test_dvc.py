"""The DVC pipeline (dvc.yaml: prepare -> sweep -> report) in a temporary git repository: it runs end to end, a
second ``dvc repro`` does nothing, one changed parameter reruns only what depends on it, ``dvc metrics show`` and
``dvc plots show`` work, and every trial records the version of the data it read (DVC's md5 and the sha256)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = {
    "name": "tiny",
    "datasets": ["colored_digits", "wilds:waterbirds"],
    "methods": ["erm"],
    "test_envs": "default",
    "n_hparams": 1,
    "n_seeds": 1,
    "steps": 3,
    "eval_every": 3,
    "model": "mlp",
    "hparams": {"batch_size": 4},
    "dataset_options": {"colored_digits": {"env_size": 60, "resolution": 8}, "wilds:waterbirds": {"resolution": 8}},
}


def _fakes():
    """The WILDS fakes of test_wilds.py (one builder per format lives there)."""
    spec = importlib.util.spec_from_file_location("_wilds_fakes", Path(__file__).with_name("test_wilds.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[str, float]:
    t0 = time.time()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr, time.time() - t0


def ran(log: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", log)


@pytest.fixture
def project(tmp_path):
    """A git repository holding the pipeline files and the code they depend on, and a WILDS fake as raw data."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    for folder in ("bench", "methods", "datasets"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    _fakes().make_waterbirds(tmp_path / "raw")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONSAFEPATH="1",
               MPLBACKEND="Agg", SHIFTBENCH_DATA=str(tmp_path / "raw"), DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"]):
        run(cmd, repo, env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_end_to_end_noop_and_one_param(project):
    repo, env = project
    dvc = str(BIN / "dvc")

    log, first = run([dvc, "repro"], repo, env)
    assert ran(log) == ["prepare", "sweep", "report"], log
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    data_md5 = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data")
    manifest = json.loads((repo / "data" / "manifest.json").read_text())
    assert "waterbirds_v1.0/metadata.csv" in manifest["files"]
    versions = {}
    for trial in (repo / "runs" / "dvc" / "trials").iterdir():
        meta = json.loads((trial / "spec.json").read_text())
        assert (trial / "final.json").exists()
        versions[meta["spec"]["dataset"]] = meta["data_version"]
    # the WILDS trial read the prepared copy: its version is the manifest's digests plus DVC's md5 of data/
    sha, _, md5 = versions["wilds:waterbirds"].partition("+dvc:")
    assert md5 == data_md5 and len(sha) == 64
    # the generated dataset's trial trained on exactly what prepare materialised
    assert versions["colored_digits"] == manifest["datasets"]["colored_digits"]["version"]

    log, noop = run([dvc, "repro"], repo, env)
    assert ran(log) == [] and "up to date" in log

    params = dict(PARAMS, steps=4)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log, one = run([dvc, "repro"], repo, env)
    assert ran(log) == ["sweep", "report"], log
    steps = {json.loads((t / "spec.json").read_text())["spec"]["steps"] for t in (repo / "runs/dvc/trials").iterdir()}
    assert steps == {4}

    out, _ = run([dvc, "metrics", "show", "--json"], repo, env)
    shown = json.loads(out[out.index("{"):])
    flat = json.dumps(shown)
    assert '"counts.done": 2' in flat or '"done": 2' in flat
    run([dvc, "plots", "show", "--out", "plots_html"], repo, env)
    assert (repo / "plots_html" / "index.html").is_file()
    print(f"dvc repro: first {first:.1f} s, no-op {noop:.1f} s, one param (steps) {one:.1f} s")


def test_params_yaml_is_the_quickstart_suite_and_stages_use_the_console_script():
    from shiftbench.config import load_suite

    shipped, quickstart = load_suite(str(REPO / "params.yaml")).to_dict(), load_suite("quickstart").to_dict()
    assert shipped == quickstart
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "sweep", "report"]
    for stage in stages.values():
        assert "PYTHONSAFEPATH=1 shiftbench " in " ".join(stage["cmd"].split()).replace("MPLBACKEND=Agg ", "")
        assert "python -m" not in stage["cmd"]
    assert "data" in stages["sweep"]["deps"] and stages["prepare"]["outs"] == ["data"]


def test_report_stage_files_and_ignores():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["report"]
    assert "reports/report.json" in stage["outs"] and list(stage["metrics"][0]) == ["reports/metrics.json"]
    plots = {next(iter(p)): next(iter(p.values())) for p in stage["plots"]}
    assert plots["reports/plot_methods.csv"]["x"] == "accuracy" and plots["reports/plot_methods.csv"]["y"] == "method"
    assert "reports/leaderboard.csv" not in plots  # 8 rows per method there: no longer a bar chart's data
    assert "dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["prepare", "sweep", "report"]
    assert {o["path"] for o in lock["stages"]["report"]["outs"]} >= {"reports/metrics.json", "reports/report.json",
                                                                     "reports/plot_methods.csv"}


def _toy_trial(root: Path, method: str, seed: int, acc: float) -> None:
    import hashlib

    spec = {"dataset": "toy", "method": method, "test_envs": [1], "seed": seed, "hparams_seed": 0, "hparams": {},
            "steps": 10, "eval_every": 10, "model": "mlp", "dataset_options": {}, "callbacks": []}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    d = root / "trials" / h[:16]
    d.mkdir(parents=True)
    rec = {"step": 10, "env0_in_acc": 0.9, "env0_out_acc": 0.8, "env1_in_acc": acc, "env1_out_acc": acc}
    (d / "spec.json").write_text(json.dumps({"hash": h, "spec": spec, "env_names": ["a", "b"]}))
    (d / "results.jsonl").write_text(json.dumps(rec) + "\n")
    (d / "final.json").write_text(json.dumps({"status": "done", "hash": h, "record": rec}))


@pytest.mark.slow
def test_dvc_metrics_show_has_numbers_only_and_plots_one_bar_per_method(tmp_path):
    """``dvc metrics show`` and ``dvc plots show`` on a report, without running the pipeline: a section whose
    content is keyed by an absolute path (as the attestation log's tree heads are) leaves no such key."""
    from shiftbench import report

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    for name in ("dvc.yaml", ".dvc/config", ".dvc/.gitignore"):
        shutil.copy(REPO / name, repo / name)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    run(["git", "init", "-q"], repo, env)
    for method, accs in {"erm": (0.40, 0.50), "irm": (0.60, 0.64)}.items():
        for seed, acc in enumerate(accs):
            _toy_trial(repo / "runs" / "dvc", method, seed, acc)

    @report.report_section("test_paths")
    def by_path(trials):
        return report.Section("test_paths", "By path", "x", "<p>x</p>",
                              {str(repo / "runs" / "dvc" / "log"): {"root_hash": "ab" * 32, "tree_size": 4}, "n": 4})

    try:
        report.build_report(repo / "runs" / "dvc", repo / "reports", plots=False)
    finally:
        report.SECTIONS.pop("test_paths")
    out, _ = run([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env)
    data = json.loads(out[out.index("{"):])[""]["data"]["reports/metrics.json"]["data"]

    def leaves(obj, path=()):
        return [x for k, v in obj.items() for x in leaves(v, (*path, k))] if isinstance(obj, dict) else [(path, obj)]

    flat = dict(leaves(data))
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat.values())
    assert not any("/" in k for path in flat for k in path)
    assert flat[("sections", "test_paths", "n")] == 4 and flat[("counts", "done")] == 4
    assert flat[("datasets", "toy", "rules", "training_domain", "methods", "irm", "env1", "mean")] == pytest.approx(62.0)
    # only the bar chart's file: plots=False wrote no reports/plots/ images, which dvc would report as an error
    out, _ = run([str(BIN / "dvc"), "plots", "show", "--json", "reports/plot_methods.csv"], repo, env)
    (plot,) = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]["data"]["reports/plot_methods.csv"]
    bars = [(v["method"], float(v["accuracy"])) for v in plot["content"]["data"]["values"]]
    assert bars == [("erm", pytest.approx(45.0)), ("irm", pytest.approx(62.0))]  # one bar per method
