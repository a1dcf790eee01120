"""``shiftbench status RUNS``: where a sweep stands, trial by trial, without running anything.

Every trial the sweep expects (its ``sweep.json`` spec, expanded as ``shiftbench sweep`` expands it) is listed as
done, failed (with the reason from ``failed.json``), partial (a checkpoint to resume from; the last evaluation's
step from ``results.jsonl``) or new (not started), then the counts. Rerunning the sweep's command skips done trials,
resumes partial ones and starts new ones; ``--retry-failed`` reruns failed ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..records import FAILED, SPEC, TRIALS, read_failed, read_results, read_spec

STATES = ("done", "failed", "partial", "new")


def register(subparsers) -> None:
    p = subparsers.add_parser("status", help="list a sweep's trials as done / failed / partial / new, with counts",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, metavar="RUNS", help="a sweep folder (holding sweep.json), or one trial folder")
    p.add_argument("--summary", action="store_true", help="print only the counts (default: one line per trial too)")
    p.set_defaults(func=run)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}); {what}") from None


def _last_step(trial_dir: Path) -> int | None:
    """The step of results.jsonl's last record (a torn last line is skipped: records.read_jsonl's policy); None
    when the file is missing, damaged or holds no step."""
    try:
        records = read_results(trial_dir)
        return int(records[-1]["step"]) if records else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _detail(state: str, trial_dir: Path, steps: int) -> str:
    if state == "failed":
        try:
            info = read_failed(trial_dir)
        except (OSError, UnicodeDecodeError, ValueError):
            return f"reason: {FAILED} unreadable"
        at = f" (step {info['step']})" if isinstance(info, dict) and info.get("step") is not None else ""
        return f"reason: {info.get('reason', 'unknown') if isinstance(info, dict) else 'unknown'}{at}"
    if state == "partial":
        step = _last_step(trial_dir)
        return f"last evaluation at step {step} of {steps}" if step is not None else f"checkpointed, of {steps} steps"
    return ""


def _describe(spec) -> str:
    envs = ",".join(map(str, spec.test_envs))
    return f"{spec.dataset} {spec.method} test_envs={envs} draw={spec.hparams_seed} seed={spec.seed}"


def expected_trials(runs: Path) -> tuple[str, list]:
    """The sweep's name and its trial specs (unique by hash, in sweep order), from ``runs/sweep.json``."""
    from ..config import SweepSpec

    meta = _read_json(runs / "sweep.json", "it is written by shiftbench sweep; rerun the sweep to rewrite it")
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict):
        raise UserError(f"{runs / 'sweep.json'} holds no sweep spec (expected {{\"hash\", \"spec\"}})")
    sweep = SweepSpec.from_mapping(meta["spec"], where=str(runs / "sweep.json"))
    seen: set[str] = set()
    return sweep.name, [t for t in sweep.trials() if not (t.hash in seen or seen.add(t.hash))]


def run(a) -> int:
    from ..config import TrialSpec
    from ..records import trial_status
    from ..sweep import trial_dir

    runs: Path = a.runs
    if not runs.is_dir():
        raise UserError(f"{runs} {'is not a folder' if runs.exists() else 'does not exist'}; give a sweep folder "
                        "(the --out of shiftbench sweep)")
    if (runs / "sweep.json").is_file():
        name, specs = expected_trials(runs)
        dirs = [trial_dir(runs, s) for s in specs]
    elif (runs / SPEC).is_file():  # one trial folder (shiftbench train --out)
        try:
            meta = read_spec(runs)
        except (OSError, ValueError) as e:
            raise UserError(f"{runs / SPEC} is unreadable ({type(e).__name__}: {e}); the trial folder is "
                            "damaged") from None
        try:
            specs = [TrialSpec.from_dict(meta["spec"])]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{runs / SPEC} holds no trial spec ({e})") from None
        name, dirs = runs.name, [runs]
    else:
        raise UserError(f"{runs} is not a sweep folder (no sweep.json) nor a trial folder (no {SPEC}); give the "
                        "--out of shiftbench sweep or shiftbench train")
    counts = dict.fromkeys(STATES, 0)
    lines = []
    for spec, d in zip(specs, dirs):
        state = trial_status(d)
        counts[state] += 1
        detail = _detail(state, d, spec.steps)
        lines.append(f"{state:8s} {spec.short_hash}  {_describe(spec)}" + (f"  {detail}" if detail else ""))
    if not a.summary:
        print("\n".join(lines))
    expected = {d.name for d in dirs}
    others = sorted(p.name for p in (runs / TRIALS).glob("*") if p.is_dir() and p.name not in expected) if (
        runs / TRIALS).is_dir() else []
    extra = f"; {len(others)} other trial folder(s) not in this sweep" if others else ""
    print(f"{name}: {len(specs)} trial{'s' if len(specs) != 1 else ''}: "
          + ", ".join(f"{counts[s]} {s}" for s in STATES) + extra)
    return 0
