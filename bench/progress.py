"""``shiftbench train``'s progress: one line per evaluation on stderr, so that a long trial is not silent.

The line names the step, the training loss, the headline metric averaged over the training environments'
validation (``out``) splits and over the test environments, and the time so far, e.g.::

    [trial 3f2a9c1b04de] step 200/5001 (4%)  loss 0.412  acc: train-env val 0.832, test env 0.104  12.3 s

It only reads the record; nothing it does enters the trial's files or hash.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from .records import env_key, parse_env_key
from .callbacks import Callback, TrialRun


def headline_metric(record: dict[str, Any]) -> str | None:
    """``acc`` when the record has it, else the first per-environment metric that is not a loss."""
    names = [p[2] for k in record if (p := parse_env_key(k))]
    if "acc" in names:
        return "acc"
    return next((n for n in names if "loss" not in n), None)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class ProgressLine(Callback):
    """Prints a line per evaluation to ``stream`` (stderr by default)."""

    ORDER = 1_000  # after every callback that adds to the record

    def __init__(self, stream: IO[str] | None = None):
        super().__init__("progress")
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.time()

    def on_start(self, run: TrialRun) -> None:
        self.t0 = time.time()

    def on_eval(self, run: TrialRun, record: dict[str, Any]) -> None:
        spec = run.spec
        step, total = int(record["step"]), int(spec.steps)
        parts = [f"[trial {spec.short_hash}] step {step}/{total} ({100 * (step + 1) // total}%)"]
        if isinstance(record.get("loss"), float):
            parts.append(f"loss {record['loss']:.4g}")
        metric = headline_metric(record)
        if metric is not None:
            test = set(spec.test_envs)
            envs = sorted({p[0] for k in record if (p := parse_env_key(k))})
            val = _mean([record[k] for i in envs if i not in test and (k := env_key(i, "out", metric)) in record])
            held = _mean([record[k] for i in envs if i in test and (k := env_key(i, "in", metric)) in record])
            said = [f"train-env val {val:.3f}"] if val is not None else []
            said += [f"test env{'s' if len(test) > 1 else ''} {held:.3f}"] if held is not None else []
            if said:
                parts.append(f"{metric}: {', '.join(said)}")
        parts.append(f"{time.time() - self.t0:.1f} s")
        print("  ".join(parts), file=self.stream, flush=True)
