"""The Ray launcher: each trial a Ray task on an existing cluster (``--ray-address``) or a local one on 127.0.0.1.

Every trial is one task reserving ``--cpus-per-trial`` CPUs and ``--gpus-per-trial`` GPUs; Ray's fractional GPUs
pack several small trials on one device. A task whose worker process dies (killed, out of memory, a lost node) is
retried by Ray (``max_retries``, system failures only), and the retry resumes the trial from its checkpoint under
the trial's lock. On Ctrl-C the driver cancels the sweep's tasks: each trial is then done, or partial with its last
checkpoint, or not started, and rerunning the command resumes it.

Workers need this package installed and the sweep folder on storage they all see; each task checks it sees the
driver's ``sweep.json`` and can write beside it, and the sweep stops with that message when not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from . import GPUS_PER_TRIAL, LAUNCHERS, Job, Launcher, Option, Report, _nonneg_float, check_shared

MAX_RETRIES = 3
"""Ray's retries of a trial whose worker process died."""

CPUS_PER_TRIAL = Option("--cpus-per-trial", "CPUs reserved per trial (ray, slurm); a trial's torch threads follow it "
                        "(default: 1)", _nonneg_float, None)  # fmt: skip


def _trial(out: str, sweep_hash: str, spec: dict, directory: str, options: dict, lock: str, wait: bool,
           threads: int) -> dict:  # fmt: skip
    """A Ray task: the trial, after checking this node sees the sweep folder."""
    problem = check_shared(out, sweep_hash)
    if problem:
        return {"status": "error", "reason": problem}
    import torch

    from ..sweep import _run_one

    torch.set_num_threads(threads)
    return _run_one(spec, directory, options, lock, wait)


@LAUNCHERS.register("ray")
@dataclass
class RayLauncher(Launcher):
    """Each trial a Ray task: on the cluster at ``--ray-address`` / ``RAY_ADDRESS``, else on a local one."""

    OPTIONS = (
        Option("--ray-address", "Ray cluster to join, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, else a "
               "local cluster bound to 127.0.0.1, stopped when the sweep ends)"),  # fmt: skip
        CPUS_PER_TRIAL,
        GPUS_PER_TRIAL,
    )
    ray_address: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_retries: int = MAX_RETRIES

    def _connect(self) -> bool:
        """Join or start a cluster; True if this call started it (and so stops it)."""
        address = self.ray_address or os.environ.get("RAY_ADDRESS") or None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a sweep sends no usage report
        if not address or address.rpartition(":")[0].removeprefix("ray://") in ("127.0.0.1", "localhost"):
            # Ray turns 127.0.0.1 into this host's reachable address unless told it runs a one-machine cluster (the
            # setting is read when ray is imported and by the processes it starts).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        if ray.is_initialized():
            return False
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, **quiet)
        return True

    def run(self, jobs: Sequence[Job], report: Report, stop: Callable[[], bool]) -> None:
        if not jobs:
            return
        import ray

        started = self._connect()
        pending: list = []
        try:
            gpus = self.gpus_per_trial
            if gpus is None:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            cpus = 1.0 if self.cpus_per_trial is None else self.cpus_per_trial
            task = ray.remote(_trial).options(num_cpus=cpus, num_gpus=gpus, max_retries=self.max_retries,
                                              retry_exceptions=False, name="shiftbench-trial")  # fmt: skip
            refs = {task.remote(self.out, self.sweep_hash, *job.args(), max(1, int(cpus))): job for job in jobs}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    report(refs[ref], self._answer(ray, ref, refs[ref]))
                if stop():
                    break
        finally:
            # Ctrl-C (or a refusal): a cancelled task gets KeyboardInterrupt, so its trainer stops where it is with
            # its files intact (they are written atomically) and no failure record: the trial stays resumable.
            for ref in pending:
                ray.cancel(ref)
            if started:
                ray.shutdown()

    def _answer(self, ray, ref, job: Job) -> dict:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:  # retries spent, or the task itself broke: no trial record to trust
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return {"status": "error", "reason": f"Ray could not run trial {job.key[:16]} ({type(e).__name__}: "
                                                 f"{first[:300]}); rerun the sweep to resume it"}  # fmt: skip
