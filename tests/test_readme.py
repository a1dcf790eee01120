"""Every ``shiftbench …`` command of the README, run as written, in order, through the console script.

Only what the README itself documents is lowered, so that the whole file runs in a few minutes on 2 cores:
``--steps`` and ``--eval-every`` (``ft_reference_steps``, a step count, likewise), and dataset sizes through
``--option`` (``train`` and ``sweep`` both take it). Nothing else changes: the MLflow mirror stays on (no
``--no-mlflow`` is added), callbacks, methods, seeds, draws and test environments are the README's. Paths are the
README's too, relative to a scratch folder (absolute ``/tmp/…`` ones are moved into it); ``params.yaml`` is the
repository's. A README command that fails fails this test with its command line and its stderr.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SIZES = {
    "colored_digits": ["env_size=120", "resolution=8"],
    "rotated_digits": ["env_size=120", "resolution=8"],
    "cue_digits": ["env_size=120", "resolution=8", "nc_size=40"],
    "spurious_prefs": ["n_pairs=60", "bon_prompts=1", "encoder=hashing:64,32,16"],
}
"""Dataset options that shrink each dataset the README trains on (a dataset not here runs at its own size)."""
SUITE_DATASETS = {"quickstart": "colored_digits", "prefs": "spurious_prefs", "params.yaml": "colored_digits"}
"""The dataset whose sizes stand for a suite's (both digits datasets take the same options)."""
STEPS, EVAL_EVERY, REFERENCE_STEPS = "4", "2", "4"
EXIT_OK = {"drift": {0, 1}}
"""Exit statuses that mean success: drift's gate exits 1 when it finds drift, which is its job."""


def readme_commands(readme: Path) -> list[str]:
    """The README's ``shiftbench …`` lines inside fenced code blocks, continuation lines joined, comments cut."""
    out, block, pending = [], False, ""
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        text = pending + " " + line.strip() if pending else line.strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        pending = ""
        text = re.sub(r"\s+#\s.*$", "", text).strip()
        if text.startswith("shiftbench "):
            out.append(text)
    return out


def lowered(command: str, scratch: Path) -> list[str]:
    """The command's arguments with steps, evaluation interval and sizes lowered, paths moved into ``scratch``."""
    argv = [scratch / a[len("/tmp/"):] if a.startswith("/tmp/") else a for a in shlex.split(command)]
    argv = [str(a) for a in argv]
    sub = argv[1]
    if sub not in ("train", "sweep"):
        return argv
    value = lambda flag: argv[argv.index(flag) + 1] if flag in argv else None  # noqa: E731
    for flag, new in (("--steps", STEPS), ("--eval-every", EVAL_EVERY)):
        if flag in argv:
            argv[argv.index(flag) + 1] = new
        else:
            argv += [flag, new]
    argv = [re.sub(r"^ft_reference_steps=\d+$", f"ft_reference_steps={REFERENCE_STEPS}", a) for a in argv]
    dataset = value("--dataset") or SUITE_DATASETS.get(value("--suite") or "") or (value("--datasets") or "")
    sizes = SIZES.get(dataset.split(",")[0], [])
    if sizes:
        if "--option" in argv:  # the README's own options stay; its sizes give way to the small ones
            i = argv.index("--option") + 1
            j = next((k for k in range(i, len(argv)) if argv[k].startswith("--")), len(argv))
            keys = {s.split("=")[0] for s in sizes}
            kept = [a for a in argv[i:j] if a.split("=")[0] not in keys]
            argv[i:j] = kept + sizes
        else:
            argv += ["--option", *sizes]
    return argv


def test_readme_lists_the_commands_this_test_expects(repo):
    commands = readme_commands(repo / "README.md")
    assert commands[0] == "shiftbench list"
    subs = {c.split()[1] for c in commands}
    assert {"list", "train", "sweep", "report", "verify", "drift", "prepare"} <= subs
    assert not [c for c in commands if "\\" in c]  # every continuation was joined


def test_lowering_touches_only_steps_intervals_and_sizes(tmp_path):
    cmd = ("shiftbench train --dataset colored_digits --method irm --test-envs 2 --seed 0 --steps 2001 --out runs/one "
           "--hparams irm_lambda=100 irm_penalty_anneal_iters=500 --option env_size=4000")
    assert lowered(cmd, tmp_path) == [
        "shiftbench", "train", "--dataset", "colored_digits", "--method", "irm", "--test-envs", "2", "--seed", "0",
        "--steps", "4", "--out", "runs/one", "--hparams", "irm_lambda=100", "irm_penalty_anneal_iters=500",
        "--option", "env_size=120", "resolution=8", "--eval-every", "2",
    ]  # fmt: skip
    assert lowered("shiftbench verify /tmp/cb", tmp_path) == ["shiftbench", "verify", str(tmp_path / "cb")]


@pytest.mark.slow
def test_every_readme_command_runs_as_written(repo, exe, cli_env, tmp_path):
    scratch = tmp_path / "work"
    scratch.mkdir()
    # a new user: their own keys and witness state (a verifier remembers each log's last checkpoint by its name, so
    # runs/qs of an earlier test run on this machine would look like this log, recreated)
    cli_env = dict(cli_env, SHIFTBENCH_HOME=str(tmp_path / "home"))
    shutil.copy(repo / "params.yaml", scratch / "params.yaml")
    commands = readme_commands(repo / "README.md")
    times = []
    for command in commands:
        argv = lowered(command, scratch)
        t0 = time.time()
        out = subprocess.run([exe, *argv[1:]], cwd=scratch, env=cli_env, capture_output=True, text=True)
        times.append((time.time() - t0, command))
        ok = EXIT_OK.get(argv[1], {0})
        assert out.returncode in ok, f"README command failed (exit {out.returncode}): {shlex.join(argv)}\n{out.stderr}"
        assert "Traceback" not in out.stderr, f"{shlex.join(argv)}\n{out.stderr}"
        if argv[1] == "train":
            assert "[trial " in out.stderr and " step " in out.stderr  # progress per evaluation
            if "--no-mlflow" not in argv:
                assert "MLflow run " in out.stderr and (scratch / argv[argv.index("--out") + 1] / "mlflow.db").exists()
    total = sum(t for t, _ in times)
    print(f"\nREADME: {len(commands)} commands in {total:.0f} s; slowest: "
          + "; ".join(f"{t:.0f} s {c[:60]}" for t, c in sorted(times, reverse=True)[:3]))
