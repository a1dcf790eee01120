"""Sweeps: expand a SweepSpec into content-addressed trials and run the unfinished ones.

A launcher (``shiftbench.launchers``: a local pool of worker processes by default, a Ray cluster, Slurm job arrays)
runs the pending trials; the driver alone decides what is pending, books each answer, prints progress and writes
the MLflow mirror, after each trial ends. Rerunning a sweep skips done trials, resumes partial ones from their
checkpoints, and creates no new MLflow runs.

Several drivers may run one sweep on one ``--out`` at once (e.g. a relaunch while the first launch still runs, or
two launches to use two machines' worth of workers on a shared disk): a trial runs only while its worker holds the
trial's lock file (``OUT/.locks/trial-<hash16>.lock``). A driver whose worker finds a trial locked skips it for
now; once its own trials are through it waits for each skipped one, then mirrors it (or, if the other driver died
before finishing it, runs it itself, resuming from its checkpoint). So no trial is trained twice at once, and every
driver ends with the whole sweep done and mirrored.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .config import SweepSpec, TrialSpec
from .errors import UserError
from .io import check_out_dir, read_json, write_json
from .launchers import Job, Launcher
from .locks import FileLock
from .mlflow_store import LOCK_DIR
from .callbacks import RunOptions
from .records import TRIALS, trial_path, trial_status, write_failed
from .trainer import run_trial


def trial_dir(out: Path, spec: TrialSpec) -> Path:
    """The folder of ``spec``'s trial in the sweep folder ``out`` (``records.trial_path``)."""
    return trial_path(out, spec.hash)


def trial_lock(out: Path, spec: TrialSpec) -> Path:
    """The lock file held while a trial of the sweep in ``out`` runs (outside the trial folder: it is no result)."""
    return Path(out) / LOCK_DIR / f"trial-{spec.short_hash}.lock"


def _run_one(spec_dict: dict, directory: str, options: dict, lock_path: str, wait: bool = False) -> dict[str, Any]:
    """Worker entry point: runs the trial while holding its lock; never raises for a trial's own failure.

    Args:
        spec_dict: the trial spec (``TrialSpec.to_dict``).
        directory: the trial folder.
        options: ``RunOptions`` as a dict.
        lock_path: the trial's lock file (``trial_lock``).
        wait: wait for another driver that holds the lock, instead of returning ``{"status": "busy"}``.

    Returns:
        The trial's end record (``final.json`` or ``failed.json``), with ``"elsewhere": True`` when the trial
        turned out to have ended in another driver meanwhile; ``{"status": "busy"}``; or ``{"status": "error"}``
        for a refusal (``UserError``) that stops the sweep.
    """
    if "pack" in spec_dict:
        return _run_pack(spec_dict["pack"], options, wait)
    lock = FileLock(lock_path)
    if not lock.acquire(blocking=wait):
        return {"status": "busy"}
    try:
        before = trial_status(Path(directory))  # read under the lock: another driver may have ended it since
        result = _train(spec_dict, directory, options)
        if before == "done" or (before == "failed" and not options.get("retry_failed")):
            result = {**result, "elsewhere": True}
        return result
    finally:
        lock.release()


def pack_job_spec(members: list[tuple[TrialSpec, Path, Path]]) -> dict:
    """The ``spec`` of a launcher job that trains several trials as one vectorised program (``--pack``): each
    member's spec, folder and lock. Launchers pass it through ``_run_one`` untouched, like a one-trial job."""
    return {"pack": [{"spec": t.to_dict(), "directory": str(d), "lock": str(lk)} for t, d, lk in members]}


def _run_pack(members: list[dict], options: dict, wait: bool = False) -> dict[str, Any]:
    """Worker entry point of a pack: takes every member's lock (a member another driver holds answers busy, as
    ``_run_one`` would), trains the rest as one program, and answers ``{"status": "pack", "results": {hash:
    answer}}`` with each member's answer as ``_run_one`` gives it. If the packed program itself breaks (not one
    trial's failure: those are the member's own failed.json), the members it had not finished run one at a time."""
    from .pack import run_pack

    results: dict[str, dict] = {}
    held: list[tuple[dict, FileLock, str]] = []
    try:
        for m in members:
            lock = FileLock(m["lock"])
            key = TrialSpec.from_dict(m["spec"]).hash
            if not lock.acquire(blocking=wait):
                results[key] = {"status": "busy"}
                continue
            held.append((m, lock, trial_status(Path(m["directory"]))))
        todo = [(m, before) for m, _, before in held]
        specs = [TrialSpec.from_dict(m["spec"]) for m, _ in todo]
        answers: list[dict | None] = [None] * len(todo)
        if len(todo) > 1:
            try:
                answers = list(run_pack(specs, [Path(m["directory"]) for m, _ in todo], RunOptions(**options)))
            except UserError as e:
                return {"status": "pack", "results": {**results, **{s.hash: {"status": "error", "reason": str(e)}
                                                                     for s in specs}}}
            except Exception as e:  # the program broke: what it had not ended runs as plain trials (below)
                if _during_interrupt(e):
                    raise KeyboardInterrupt(f"interrupted ({type(e).__name__} while stopping)") from e
                print(f"packed program of {len(todo)} trials failed ({type(e).__name__}: {e}); running them one "
                      "at a time", file=sys.stderr)
                answers = [None] * len(todo)
        for (m, before), spec, answer in zip(todo, specs, answers):
            if answer is None or answer.get("status") not in ("done", "failed"):
                answer = _train(m["spec"], m["directory"], options)
            if before == "done" or (before == "failed" and not options.get("retry_failed")):
                answer = {**answer, "elsewhere": True}
            results[spec.hash] = answer
        return {"status": "pack", "results": results}
    finally:
        for _, lock, _ in held:
            lock.release()


def _during_interrupt(e: BaseException) -> bool:
    """Whether ``e`` was raised while a KeyboardInterrupt (Ctrl-C, or a launcher cancelling the task) was being
    handled: the trial was stopped, not broken, and must stay resumable rather than be marked failed."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _train(spec_dict: dict, directory: str, options: dict) -> dict[str, Any]:
    spec = TrialSpec.from_dict(spec_dict)
    try:
        return run_trial(spec, Path(directory), RunOptions(**options))
    except UserError as e:
        return {"status": "error", "reason": str(e)}
    except Exception as e:  # a crash in one trial must not take the sweep down; it is recorded, not hidden
        if _during_interrupt(e):  # e.g. torch.save's writer failing as a Ctrl-C or a cancel lands inside it
            raise KeyboardInterrupt(f"interrupted ({type(e).__name__} while stopping)") from e
        reason = f"{type(e).__name__}: {e}"
        write_failed(Path(directory), {"status": "failed", "hash": spec.hash, "reason": reason,
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
    if (out / TRIALS).exists():
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
    launcher: Launcher | None = None,
    announce: Callable[[int], None] | None = None,
    pack: str | int = "off",
) -> dict[str, Any]:
    """Runs every unfinished trial of ``sweep`` under ``out``; returns counts and the MLflow parent run id.

    ``launcher`` runs the pending trials (``shiftbench.launchers``); None is the local pool of ``workers`` processes.
    ``pack`` (``off``, ``auto`` or a pack size K) trains pending trials that can share one vectorised program as
    packs (``shiftbench.pack``); every trial's folder, records and MLflow run are those it would have alone, its
    numbers equal up to float rounding (batched arithmetic), which long or unstable runs can amplify.
    ``announce(n)`` is called with the number of trials once the data is checked and ``out`` claimed, before any
    trial runs (the CLI prints its header line there).

    The counts: ``total``, ``skipped_done`` (done before this call), ``resumed``, ``done`` and ``failed`` (trials
    this call ran), ``elsewhere`` (trials another driver on ``out`` ended while this one waited), ``failed_total``.
    """
    options = options or RunOptions()
    out = Path(out)
    trials = sweep.trials()
    check_data(sweep, options)
    prepare_out(out, sweep)
    if announce:
        announce(len(trials))
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
    busy: list[TrialSpec] = []  # locked by another driver on this --out
    counts["elsewhere"] = 0  # pending here, but ended by another driver (not in "done"/"failed")

    def finished(t: TrialSpec, result: dict) -> bool:
        """Book one worker's answer; False if the trial is still to come (another driver holds it)."""
        if result.get("status") == "busy":
            busy.append(t)
            return False
        if result.get("status") == "error":
            errors.append(result["reason"])
            return True
        if result.get("elsewhere"):
            counts["elsewhere"] += 1
        else:
            counts["done" if result.get("status") == "done" else "failed"] += 1
        if tracker:
            tracker.mirror_trial(trial_dir(out, t), parent)
        if on_result:
            on_result(t, result)
        return True

    bar = _progress(len(pending), progress)
    opts = asdict(options)
    if launcher is None:
        from .launchers import LAUNCHERS

        launcher = LAUNCHERS.get("local")(workers=workers)
    launcher.out, launcher.sweep_hash = str(out.resolve()), sweep.hash
    by_key = {t.hash: t for t in pending}

    def job(t: TrialSpec, wait: bool = False) -> Job:
        return Job(t.hash, t.to_dict(), str(trial_dir(out, t)), opts, str(trial_lock(out, t)), wait)

    def report(j: Job, result: dict) -> None:
        if result.get("status") == "pack":
            for key, answer in result["results"].items():
                if finished(by_key[key], answer):
                    bar.update(1)
            return
        if finished(by_key[j.key], result) or j.wait:
            bar.update(1)

    launcher.run(pack_jobs(pending, out, opts, pack) if pack != "off" else [job(t) for t in pending], report,
                 lambda: bool(errors))
    if busy and not errors:
        # Usually the other driver is mid-trial and finishes it; if it died, the trial resumes from its checkpoint.
        bar.write(f"{len(busy)} trial(s) are running in another driver on {out}; waiting for them", file=sys.stderr)
        waiting, busy[:] = list(busy), []
        launcher.run([job(t, wait=True) for t in waiting], report, lambda: bool(errors))
    bar.close()
    if errors:
        raise UserError(errors[0])
    counts["failed_total"] = sum(trial_status(trial_dir(out, t)) == "failed" for t in unique)
    if tracker:
        tracker.end_sweep(parent, counts)
        counts["mlflow_parent_run"] = parent
    return counts


def pack_jobs(pending: list[TrialSpec], out: Path, options: dict, pack: str | int) -> list[Job]:
    """The launcher jobs of ``pending`` under ``--pack``: each group of trials that can share a program
    (``shiftbench.pack.group_trials``), cut into packs of K (``auto``: ``choose_k``), becomes one job; a trial
    alone in its group stays a one-trial job. Order: the driver's, by each job's first trial."""
    from .pack import packs_of

    jobs = []
    for chunk in packs_of(pending, pack, options.get("device", "auto")):
        if len(chunk) == 1:
            t = chunk[0]
            jobs.append(Job(t.hash, t.to_dict(), str(trial_dir(out, t)), options, str(trial_lock(out, t))))
        else:
            members = [(t, trial_dir(out, t), trial_lock(out, t)) for t in chunk]
            key = "pack:" + ",".join(t.short_hash for t in chunk)
            jobs.append(Job(key, pack_job_spec(members), str(Path(out) / TRIALS), options,
                            str(Path(out) / LOCK_DIR / "pack.lock")))
    order = {t.hash: i for i, t in enumerate(pending)}
    first = lambda j: order[TrialSpec.from_dict(j.spec["pack"][0]["spec"]).hash] if "pack" in j.spec \
        else order[j.key]  # noqa: E731
    return sorted(jobs, key=first)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="trials", unit="trial", disable=not enabled or total == 0, dynamic_ncols=True)
