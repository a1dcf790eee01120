"""``shiftbench status RUNS``: a sweep's trials as done / failed / partial / new, with counts.

The sweep: colored_digits × erm, default test environment (2), one draw, seeds 0..3 = 4 trials. Their folders are
written by hand in the trial-folder layout (docs/records.md): seed 0 done (final.json), seed 1 failed (failed.json
with a reason and step), seed 2 partial (a checkpoint and two evaluation records), seed 3 never started.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shiftbench.cli import main
from shiftbench.config import SweepSpec


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("sw")
    sweep = SweepSpec.from_mapping({"name": "four", "datasets": ["colored_digits"], "methods": ["erm"],
                                    "test_envs": "default", "n_seeds": 4, "steps": 30, "eval_every": 10})
    (out / "sweep.json").write_text(json.dumps({"hash": sweep.hash, "spec": sweep.to_dict()}))
    specs = sweep.trials()
    for seed, spec in enumerate(specs[:3]):
        d = out / "trials" / spec.short_hash
        d.mkdir(parents=True)
        (d / "spec.json").write_text(json.dumps({"hash": spec.hash, "spec": spec.to_dict()}))
        if seed == 0:
            (d / "final.json").write_text(json.dumps({"status": "done", "record": {"step": 30}}))
        elif seed == 1:
            (d / "failed.json").write_text(json.dumps({"status": "failed", "reason": "non-finite loss", "step": 20}))
        else:
            (d / "checkpoint.pt").write_bytes(b"x")
            (d / "results.jsonl").write_text('{"step": 10}\n{"step": 20}\n{"step": 3')  # a torn last line
    (out / "trials" / "0123456789abcdef").mkdir()  # a folder of another sweep
    return out, specs


def test_status_lists_each_trial_and_counts(sweep_dir, capsys):
    out, specs = sweep_dir
    assert main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "four: 4 trials: 1 done, 1 failed, 1 partial, 1 new; 1 other trial folder(s) not in this sweep"
    h = [s.short_hash for s in specs]
    assert lines[:4] == [
        f"done     {h[0]}  colored_digits erm test_envs=2 draw=0 seed=0",
        f"failed   {h[1]}  colored_digits erm test_envs=2 draw=0 seed=1  reason: non-finite loss (step 20)",
        f"partial  {h[2]}  colored_digits erm test_envs=2 draw=0 seed=2  last evaluation at step 20 of 30",
        f"new      {h[3]}  colored_digits erm test_envs=2 draw=0 seed=3"]
    assert main(["status", str(out), "--summary"]) == 0
    assert capsys.readouterr().out.splitlines() == [lines[-1]]


def test_status_of_one_trial_folder(sweep_dir, capsys):
    out, specs = sweep_dir
    assert main(["status", str(out / "trials" / specs[0].short_hash)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"{specs[0].short_hash}: 1 trial: 1 done, 0 failed, 0 partial, 0 new"


def _file(p: Path, name: str, text: str, give: Path | None = None) -> Path:
    (p / name).write_text(text)
    return give or p


@pytest.mark.parametrize("make,expect", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: _file(p, "f", "x", p / "f"), "is not a folder"),
    (lambda p: p, "is not a sweep folder (no sweep.json) nor a trial folder"),
    (lambda p: _file(p, "sweep.json", "{"), "sweep.json is unreadable"),
    (lambda p: _file(p, "sweep.json", '{"spec": {"name": "x", "datasets": ["nope"], "methods": ["erm"]}}'),
     "unknown dataset 'nope'"),
])
def test_bad_folder_is_one_line_and_exit_2(tmp_path, capsys, make, expect):
    assert main(["status", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shiftbench status: error: ") and expect in err


def test_status_module_imports_no_torch():
    code = "import sys, shiftbench.commands.status; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
