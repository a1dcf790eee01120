"""Sweeps: expand a SweepSpec into content-addressed trials and run the unfinished ones.

The local launcher runs trials in a pool of worker processes; the driver alone writes the MLflow mirror, after
each trial ends, so the store never sees concurrent writers. Rerunning a sweep skips done trials, resumes partial
ones from their checkpoints, and creates no new MLflow runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .config import SweepSpec, TrialSpec
from .errors import UserError
from .io import check_out_dir, read_json, write_json
from .trainer import FAILED, RunOptions, run_trial, trial_status


def trial_dir(out: Path, spec: TrialSpec) -> Path:
    return Path(out) / "trials" / spec.short_hash


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_one(spec_dict: dict, directory: str, options: dict) -> dict[str, Any]:
    """Worker entry point: never raises for a trial's own failure (the sweep goes on)."""
    spec = TrialSpec.from_dict(spec_dict)
    try:
        return run_trial(spec, Path(directory), RunOptions(**options))
    except UserError as e:
        return {"status": "error", "reason": str(e)}
    except Exception as e:  # a crash in one trial must not take the sweep down; it is recorded, not hidden
        reason = f"{type(e).__name__}: {e}"
        write_json(Path(directory) / FAILED, {"status": "failed", "hash": spec.hash, "reason": reason,
                                              "traceback": traceback.format_exc()})  # fmt: skip
        return {"status": "failed", "reason": reason}


def check_data(sweep: SweepSpec, options: RunOptions) -> None:
    """Missing data fails here, once, before anything is written or any worker starts."""
    from .registry import DATASETS

    for name in sweep.datasets:
        DATASETS.get(name).check(options.data_root, sweep.dataset_options.get(name, {}), options.download)


def prepare_out(out: Path, sweep: SweepSpec) -> None:
    """Claims ``out`` for this sweep, or refuses if it holds a different one or can never be written."""
    out = check_out_dir(out)
    meta = out / "sweep.json"
    if meta.exists():
        held = read_json(meta)
        if held.get("hash") != sweep.hash:
            raise UserError(
                f"{out} holds a different sweep ({held.get('spec', {}).get('name', '?')}, hash "
                f"{str(held.get('hash'))[:12]}); choose a new --out or delete that folder"
            )
        return
    if (out / "trials").exists():
        raise UserError(f"{out} holds trials of an unknown sweep (no sweep.json); choose a new --out")
    write_json(meta, {"hash": sweep.hash, "spec": sweep.to_dict()})


def run_sweep(
    sweep: SweepSpec,
    out: Path,
    workers: int = 1,
    options: RunOptions | None = None,
    progress: bool = True,
    track: bool = True,
    on_result: Callable[[TrialSpec, dict], None] | None = None,
) -> dict[str, Any]:
    """Runs every unfinished trial of ``sweep`` under ``out``; returns counts and the MLflow parent run id."""
    options = options or RunOptions()
    out = Path(out)
    trials = sweep.trials()
    check_data(sweep, options)
    prepare_out(out, sweep)
    tracker = parent = None
    if track:
        from .tracking import Tracker

        tracker = Tracker(out, f"shiftbench-{sweep.name}")  # the experiment exists before any worker starts
        parent = tracker.start_sweep(sweep.hash, sweep.to_dict())

    seen: set[str] = set()
    unique = [t for t in trials if not (t.hash in seen or seen.add(t.hash))]
    status = {t.hash: trial_status(trial_dir(out, t)) for t in unique}
    pending = [t for t in unique if status[t.hash] in ("new", "partial")
               or (status[t.hash] == "failed" and options.retry_failed)]  # fmt: skip
    counts = {"total": len(unique), "skipped_done": sum(s == "done" for s in status.values()),
              "resumed": sum(status[t.hash] == "partial" for t in pending), "done": 0, "failed": 0}  # fmt: skip

    if tracker:
        for t in unique:
            if status[t.hash] in ("done", "failed") and t not in pending:
                tracker.mirror_trial(trial_dir(out, t), parent)

    errors: list[str] = []

    def finished(t: TrialSpec, result: dict) -> None:
        if result.get("status") == "error":
            errors.append(result["reason"])
            return
        counts["done" if result.get("status") == "done" else "failed"] += 1
        if tracker:
            tracker.mirror_trial(trial_dir(out, t), parent)
        if on_result:
            on_result(t, result)

    bar = _progress(len(pending), progress)
    opts = asdict(options)
    if workers <= 1 or len(pending) <= 1:
        for t in pending:
            finished(t, _run_one(t.to_dict(), str(trial_dir(out, t)), opts))
            bar.update(1)
            if errors:
                break
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_one, t.to_dict(), str(trial_dir(out, t)), opts): t for t in pending}
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for f in done:
                    finished(futures[f], f.result())
                    bar.update(1)
                if errors:
                    for f in remaining:
                        f.cancel()
                    break
    bar.close()
    if errors:
        raise UserError(errors[0])
    counts["failed_total"] = sum(trial_status(trial_dir(out, t)) == "failed" for t in unique)
    if tracker:
        tracker.end_sweep(parent, counts)
        counts["mlflow_parent_run"] = parent
    return counts


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="trials", unit="trial", disable=not enabled or total == 0, dynamic_ncols=True)
