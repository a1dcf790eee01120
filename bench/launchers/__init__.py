"""Launchers: what runs a sweep's pending trials (a process pool here, a Ray cluster, Slurm job arrays).

A launcher only runs trials. The sweep driver (``shiftbench.sweep.run_sweep``) alone decides which trials are
pending, books each result, mirrors it to MLflow and draws the progress bar; a launcher gets the pending trials as
``Job``s and hands each one's end record back through a callback, in the driver's process. Every launcher runs a
job through ``shiftbench.sweep._run_one`` (the trial's lock, then the trainer), so content-addressed trial folders,
skipped done trials and resumed partial ones behave the same under all of them.

One file per launcher, registered with ``@LAUNCHERS.register(name)`` like methods; external launchers come through
the entry-point group ``shiftbench.launchers``. This module imports nothing heavy (no torch, ray, submitit or
mlflow): ``add_arguments`` and ``from_args`` run while the command line is parsed.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..errors import UserError
from ..registry import Registry

DEFAULT = "local"

LAUNCHERS: Registry = Registry("launcher", "shiftbench.launchers")


@dataclass(frozen=True)
class Option:
    """One command-line option of a launcher (``dest`` is the flag without dashes, ``-`` as ``_``).

    Attributes:
        flag: e.g. ``--ray-address``.
        help: its help text; it states the default.
        type: the argparse type.
        default: the value when the flag is absent.
    """

    flag: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Job:
    """One trial as the driver hands it to a launcher: the arguments of ``shiftbench.sweep._run_one``.

    Attributes:
        key: the trial's hash (how the driver finds the trial again).
        spec: ``TrialSpec.to_dict()``.
        directory: the trial folder.
        options: ``RunOptions`` as a dict.
        lock: the trial's lock file.
        wait: wait for another driver holding the lock instead of answering ``{"status": "busy"}``.
    """

    key: str
    spec: dict
    directory: str
    options: dict
    lock: str
    wait: bool = False

    def args(self) -> tuple:
        return self.spec, self.directory, self.options, self.lock, self.wait


Report = Callable[[Job, dict], None]
"""The driver's callback: one job's end record (``_run_one``'s answer), called in the driver's process."""


@dataclass
class Launcher:
    """Base class: runs jobs and reports each one's answer; knows nothing of MLflow or progress.

    Subclasses declare ``OPTIONS`` (shared flags such as ``--gpus-per-trial`` may appear in several launchers;
    they are added once) and implement ``run``. Their constructor takes the options' ``dest`` names as keywords.

    Attributes:
        workers: trials run at once (``--workers``); launchers with their own parallelism may ignore it.
        out: the sweep folder (set by the driver before ``run``).
        sweep_hash: the sweep's hash (set by the driver; remote workers check it to prove they see ``out``).
    """

    OPTIONS: ClassVar[tuple[Option, ...]] = ()
    workers: int = 1
    out: str = ""
    sweep_hash: str = ""

    def run(self, jobs: Sequence[Job], report: Report, stop: Callable[[], bool]) -> None:
        """Run ``jobs``, calling ``report(job, answer)`` for each as it ends (in this process).

        Args:
            jobs: the pending trials, in the driver's order.
            report: the driver's callback.
            stop: True once the driver wants no more jobs started (a refusal ended the sweep); unstarted jobs are
                then dropped and running ones may be cancelled.
        """
        raise NotImplementedError


LAUNCHERS.base = Launcher


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _pos_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


TRACKING_URI = Option("--tracking-uri", "MLflow tracking URI shared by many drivers, e.g. http://host:5000 (default: "
                      "$MLFLOW_TRACKING_URI, else OUT/mlflow.db)")  # fmt: skip
GPUS_PER_TRIAL = Option(
    "--gpus-per-trial",
    "GPUs per trial (local, ray); a fraction packs several trials on one GPU, e.g. 0.25 runs four per GPU "
    "(default: 1 where CUDA is seen, else 0)",
    _nonneg_float,
)


def _options() -> dict[str, Option]:
    """Every launcher's options by flag, shared ones (``--gpus-per-trial``) once."""
    found = {TRACKING_URI.flag: TRACKING_URI}
    for name in LAUNCHERS.names():
        for option in LAUNCHERS.get(name).OPTIONS:
            found.setdefault(option.flag, option)
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--launcher`` and every launcher's options (in a group of their own) to ``parser``."""
    group = parser.add_argument_group("launchers", "where the trials run (see docs/launchers.md)")
    group.add_argument("--launcher", default=DEFAULT, metavar="NAME",
                       help=f"{' | '.join(LAUNCHERS.names())} (default: {DEFAULT}, a pool of --workers "
                            "processes on this machine)")  # fmt: skip
    for option in _options().values():
        group.add_argument(option.flag, dest=option.dest, type=option.type, default=option.default, help=option.help)


def from_args(args: argparse.Namespace) -> Launcher:
    """The launcher the parsed command line asks for; ``--tracking-uri`` is exported as ``MLFLOW_TRACKING_URI``.

    Raises:
        UserError: an unknown launcher name (with near misses), or an option of another launcher.
    """
    name = getattr(args, "launcher", None) or DEFAULT
    cls = LAUNCHERS.get(name)
    if getattr(args, "tracking_uri", None):
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri  # the driver's Tracker reads it (tracking_uri())
    own = {o.dest for o in cls.OPTIONS}
    foreign = sorted(o.flag for o in _options().values() if o is not TRACKING_URI and o.dest not in own
                     and getattr(args, o.dest, o.default) != o.default)  # fmt: skip
    if foreign:
        raise UserError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not an option of --launcher "
                        f"{name} (see shiftbench sweep --help)")  # fmt: skip
    kwargs = {dest: getattr(args, dest) for dest in own if hasattr(args, dest)}
    return cls(workers=int(getattr(args, "workers", 1) or 1), **kwargs)


def check_shared(out: str, sweep_hash: str) -> str | None:
    """Why this (remote) worker cannot use the sweep folder ``out``, or None when it can.

    It must see the driver's ``sweep.json`` (same sweep hash: the same storage, not a node-local folder of the
    same name) and be able to create files there.
    """
    host = socket.gethostname()
    meta = Path(out) / "sweep.json"
    hint = "the sweep folder must be on storage every node sees (see docs/launchers.md)"
    try:
        import json

        held = json.loads(meta.read_text(encoding="utf-8")).get("hash")
    except (OSError, ValueError):
        return f"a worker on {host} cannot read {meta}; {hint}"
    if held != sweep_hash:
        return (f"a worker on {host} sees another sweep in {out} (hash {str(held)[:12]}, the driver's is "
                f"{sweep_hash[:12]}); {hint}")
    probe = Path(out) / f".write-probe-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"a worker on {host} cannot write in {out} ({e.strerror or e}); {hint}"
    return None


__all__ = ["DEFAULT", "GPUS_PER_TRIAL", "Job", "LAUNCHERS", "Launcher", "Option", "add_arguments", "check_shared",
           "from_args"]
