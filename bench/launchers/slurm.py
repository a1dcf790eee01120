"""The Slurm launcher: trials as a submitit job array, checkpointed and requeued on a time limit or preemption.

Each pending trial is one task of a Slurm job array (``--slurm-array-parallelism`` of them at once) with
``--slurm-time``, ``--slurm-gpus-per-task`` and ``--cpus-per-trial``. The submitted callable follows submitit's
checkpointing protocol (it has a ``checkpoint`` method): when Slurm signals a job that reaches its time limit or is
preempted, submitit calls it and requeues the job with the same call, which resumes the trial from its own last
checkpoint (written every ``--checkpoint-interval`` seconds). A job that dies without that signal (``kill -9``, a
lost node) is submitted again by the driver, at most ``MAX_RESUBMITS`` times, and resumes the same way.

``--slurm-executor local`` runs the same jobs with submitit's local executor: real subprocesses on this machine,
no Slurm needed (what the tests and the benchmark use). The submitit folder (job scripts, pickles, logs) is
``OUT/.submitit``; like the sweep folder it must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from . import LAUNCHERS, Job, Launcher, Option, Report, _pos_int, check_shared
from .ray import CPUS_PER_TRIAL

MAX_RESUBMITS = 2
"""Submissions again of a trial whose job ended without an answer (killed outright, node lost)."""
POLL_S = 0.25
"""How often the driver asks submitit about unfinished jobs (submitit caches Slurm's answers itself)."""


def slurm_minutes(text: str) -> float:
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``) in minutes."""
    bad = argparse.ArgumentTypeError(f"not a Slurm time limit: {text!r} (e.g. 90, 2:00:00 or 1-12:00:00)")
    days, sep, rest = text.strip().rpartition("-")
    try:
        fields = [int(f) for f in rest.split(":")]
        d = int(days) if sep else 0
    except ValueError:
        raise bad from None
    if sep:  # D-HH[:MM[:SS]]
        if len(fields) > 3:
            raise bad
        h, m, s = (fields + [0, 0])[:3]
    elif len(fields) == 3:
        h, m, s = fields
    elif len(fields) in (1, 2):
        h, m, s = 0, fields[0], fields[1] if len(fields) == 2 else 0
    else:
        raise bad
    if min(d, h, m, s) < 0 or d * 1440 + h * 60 + m + s / 60 <= 0:
        raise argparse.ArgumentTypeError(f"--slurm-time must be positive (got {text!r})")
    return d * 1440 + h * 60 + m + s / 60


def _gpus(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


class SlurmTrial:
    """The job's callable: one trial, after checking the node sees the sweep folder.

    It follows submitit's checkpointing protocol: ``checkpoint`` returns the submission to requeue, the same call,
    because the trial's state is its own checkpoint file, not this object.
    """

    def __call__(self, out: str, sweep_hash: str, spec: dict, directory: str, options: dict, lock: str,
                 wait: bool, threads: int) -> dict:  # fmt: skip
        problem = check_shared(out, sweep_hash)
        if problem:
            return {"status": "error", "reason": problem}
        import torch

        from ..sweep import _run_one

        torch.set_num_threads(threads)
        return _run_one(spec, directory, options, lock, wait)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


@LAUNCHERS.register("slurm")
@dataclass
class SlurmLauncher(Launcher):
    """Trials as a Slurm job array through submitit, requeued on time limits and preemption."""

    OPTIONS = (
        Option("--slurm-partition", "Slurm partition of the trial jobs (default: the cluster's default partition)"),
        Option("--slurm-time", "time limit of one trial job, in Slurm's format: 90, 2:00:00, 1-12:00:00; a job that "
               "reaches it checkpoints and is requeued (default: 60 minutes)", slurm_minutes, 60.0),  # fmt: skip
        Option("--slurm-gpus-per-task", "GPUs per trial job (default: 0)", _gpus, 0),
        Option("--slurm-array-parallelism", "trial jobs of the array running at once (default: 256)", _pos_int, 256),
        Option("--slurm-executor", "slurm, or local: submitit's local executor, real subprocesses on this machine "
               "without Slurm, for trying things out (default: slurm)", str, "slurm"),  # fmt: skip
        CPUS_PER_TRIAL,
    )
    slurm_partition: str | None = None
    slurm_time: float = 60.0
    slurm_gpus_per_task: int = 0
    slurm_array_parallelism: int = 256
    slurm_executor: str = "slurm"
    cpus_per_trial: float | None = None
    signal_delay_s: int = 90
    """Seconds before the time limit at which Slurm signals the job (submitit's ``--signal=USR2@...``)."""

    def executor(self) -> Any:
        """The submitit executor with this launcher's parameters (logs under ``OUT/.submitit``)."""
        if self.slurm_executor not in ("slurm", "local"):
            raise UserError(f"--slurm-executor must be slurm or local (got {self.slurm_executor!r})")
        if self.slurm_executor == "slurm" and shutil.which("sbatch") is None:
            raise UserError("--launcher slurm: no Slurm here (sbatch is not on PATH); run the sweep on a login node "
                            "of the cluster, or try --slurm-executor local")  # fmt: skip
        import submitit

        folder = Path(self.out) / ".submitit" / "%j"
        minutes = max(1, math.ceil(self.slurm_time))
        if self.slurm_executor == "local":
            executor = submitit.LocalExecutor(folder=folder)
            params: dict[str, Any] = {"timeout_min": minutes, "gpus_per_node": self.slurm_gpus_per_task,
                                      "signal_delay_s": min(self.signal_delay_s, minutes * 30)}  # fmt: skip
        else:
            executor = submitit.SlurmExecutor(folder=folder)
            params = {
                "job_name": f"shiftbench-{self.sweep_hash[:8]}", "time": minutes, "nodes": 1, "ntasks_per_node": 1,
                "cpus_per_task": max(1, math.ceil(self.cpus_per_trial or 1)),
                "array_parallelism": self.slurm_array_parallelism, "signal_delay_s": self.signal_delay_s,
            }  # fmt: skip
            if self.slurm_gpus_per_task:
                params["gpus_per_node"] = self.slurm_gpus_per_task
            if self.slurm_partition:
                params["partition"] = self.slurm_partition
        executor.update_parameters(**params)
        return executor

    def run(self, jobs: Sequence[Job], report: Report, stop: Callable[[], bool]) -> None:
        if not jobs:
            return
        executor = self.executor()
        threads = max(1, math.ceil(self.cpus_per_trial or 1))
        fn = SlurmTrial()
        queue = list(jobs)
        tries = {job.key: 0 for job in jobs}
        running: dict[Any, Job] = {}

        def submit(batch: list[Job]) -> None:
            for job in batch:
                tries[job.key] += 1
            if self.slurm_executor == "slurm":  # one array; Slurm itself keeps --slurm-array-parallelism running
                with executor.batch():
                    submitted = [executor.submit(fn, self.out, self.sweep_hash, *j.args(), threads) for j in batch]
            else:
                submitted = [executor.submit(fn, self.out, self.sweep_hash, *j.args(), threads) for j in batch]
            running.update(zip(submitted, batch))

        try:
            while queue or running:
                room = len(queue) if self.slurm_executor == "slurm" else self.slurm_array_parallelism - len(running)
                if queue and room > 0 and not stop():
                    submit(queue[:room])
                    del queue[:room]
                for sj in [sj for sj in running if sj.done()]:
                    job = running.pop(sj)
                    answer = self._answer(sj, job)
                    if answer is None and tries[job.key] <= MAX_RESUBMITS:
                        queue.append(job)  # ended without an answer: submitted again, it resumes
                        continue
                    report(job, answer or {"status": "error", "reason": self._lost(sj, job)})
                if stop():
                    queue.clear()
                    break
                if running:
                    time.sleep(POLL_S)
        finally:
            # Ctrl-C or a refusal: cancelled jobs leave each trial done, or partial with its checkpoint, or unstarted.
            for sj in running:
                sj.cancel(check=False)

    @staticmethod
    def _answer(sj: Any, job: Job) -> dict | None:
        """The job's answer; None when it ended without one (killed, requeued too often, node lost)."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return sj.result()
        except UncompletedJobError:
            return None
        except FailedJobError as e:  # our callable never raises for a trial; this is the job's own breakage
            return {"status": "error", "reason": f"Slurm job {sj.job_id} of trial {job.key[:16]} failed: "
                                                 f"{str(e).strip().splitlines()[-1][:300]}"}  # fmt: skip

    @staticmethod
    def _lost(sj: Any, job: Job) -> str:
        return (f"trial {job.key[:16]}: its Slurm job ended without an answer {MAX_RESUBMITS + 1} times (last: job "
                f"{sj.job_id}, logs {sj.paths.stderr}); rerun the sweep to resume it")
