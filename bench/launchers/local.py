"""The local launcher (the default): trials in a pool of worker processes on this machine, spread over its GPUs.

With one worker the trials run one after another in the driver's own process. With ``--workers N`` each worker is
a spawned process with a slot number 0..N-1; on a machine with CUDA devices a trial whose ``--device`` is ``auto``
or ``cuda`` runs on the slot's GPU, resolved in the worker: ``floor(slot * gpus_per_trial) mod n_gpus``. So
``--gpus-per-trial 1`` (the default) is one GPU per worker, and ``--gpus-per-trial 0.25`` packs four workers on
each GPU. ``--device cpu`` or an explicit ``cuda:i`` is kept as given.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import UserError
from . import GPUS_PER_TRIAL, LAUNCHERS, Job, Launcher, Report

_SLOT: int | None = None
_GPUS_PER_TRIAL = 1.0


def slot_device(device: str, slot: int, gpus_per_trial: float, n_gpus: int) -> str:
    """The device a pool worker's trials use: ``device`` with ``auto``/``cuda`` pinned to the slot's GPU.

    Args:
        device: the ``--device`` asked for (``auto``, ``cpu``, ``cuda`` or ``cuda:i``).
        slot: the worker's number, 0..workers-1.
        gpus_per_trial: GPUs per trial; a fraction packs ``1 / gpus_per_trial`` workers on a GPU, 0 means CPU.
        n_gpus: the CUDA devices this worker sees.

    Returns:
        e.g. ``cuda:1`` for slot 5 with ``gpus_per_trial=0.25`` and two GPUs; ``cpu`` for ``auto`` without GPUs.
    """
    if device not in ("auto", "cuda"):
        return device
    if n_gpus == 0 or gpus_per_trial == 0:
        return "cpu" if device == "auto" else device
    return f"cuda:{int(slot * gpus_per_trial) % n_gpus}"


def _init_worker(threads: int, slots: Any, gpus_per_trial: float) -> None:
    global _SLOT, _GPUS_PER_TRIAL
    import torch

    torch.set_num_threads(threads)
    _SLOT, _GPUS_PER_TRIAL = slots.get(), gpus_per_trial


def _pool_job(args: tuple) -> dict:
    """A pool worker's entry point: the trial with ``--device`` resolved for this worker's slot."""
    import torch

    from ..sweep import _run_one

    spec, directory, options, lock, wait_ = args
    if _SLOT is not None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        options = {**options, "device": slot_device(options["device"], _SLOT, _GPUS_PER_TRIAL, n)}
    return _run_one(spec, directory, options, lock, wait_)


@LAUNCHERS.register("local")
@dataclass
class LocalLauncher(Launcher):
    """A pool of ``--workers`` processes on this machine (one worker: the driver's own process)."""

    OPTIONS = (GPUS_PER_TRIAL,)
    gpus_per_trial: float | None = None

    def run(self, jobs: Sequence[Job], report: Report, stop: Callable[[], bool]) -> None:
        from ..sweep import _run_one

        if self.workers <= 0:
            raise UserError(f"--workers must be positive (got {self.workers})")
        g = 1.0 if self.gpus_per_trial is None else float(self.gpus_per_trial)
        if g > 1:
            raise UserError(f"--gpus-per-trial {g:g}: a local trial uses one device; give at most 1 (a fraction "
                            "packs several trials on one GPU)")  # fmt: skip
        if self.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                report(job, _run_one(*job.args()))
                if stop():
                    return
            return
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        ctx = mp.get_context("spawn")
        slots = ctx.Queue()
        for slot in range(self.workers):
            slots.put(slot)
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, slots, g)) as pool:  # fmt: skip
            futures = {pool.submit(_pool_job, job.args()): job for job in jobs}
            remaining = set(futures)
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for f in done:
                    report(futures[f], f.result())
                if stop():
                    for f in remaining:
                        f.cancel()
                    return
