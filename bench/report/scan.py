"""Finding trials: runs folders (one sweep, several, or one trial folder) into done, failed and the rest.

One folder is scanned by :func:`shiftbench.records.scan_runs` (the trial folder's one owner, re-exported here); this
module merges several sweeps into one report and names their rows. A done trial is a dict (:data:`Trial`) that every
other part of the report reads through the accessors here.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..records import Scan, scan_runs

Trial = dict[str, Any]
"""A done trial: every key of spec.json plus ``records``, ``final`` and ``dir`` (see :class:`Scan`)."""


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_trials(runs_dir: str | os.PathLike) -> list[Trial]:
    """The done trials (with final.json) of a runs folder; see :func:`scan_runs` for the accepted layouts."""
    return scan_runs(runs_dir).done


def load_failed(runs_dir: str | os.PathLike) -> list[dict]:
    """The failed trials (failed.json, no final.json): ``{"hash", "dir", "reason", "step", "spec"}`` each."""
    return scan_runs(runs_dir).failed


def sweep_name(runs_dir: str | os.PathLike) -> str:
    """The sweep's name from its ``sweep.json`` (``spec.name``), else the folder's name."""
    root = Path(runs_dir)
    try:
        name = _read_json(root / "sweep.json").get("spec", {}).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else (root.resolve().name or str(root))


def sweep_labels(runs_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """One label per folder: the sweep names, or the folder names where sweep names clash, or the paths as given
    where folder names clash too."""
    for label in (sweep_name, lambda d: Path(d).resolve().name, str):
        labels = [label(d) for d in runs_dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in runs_dirs]  # the same folder given twice: its trials count once anyway


def scan_sweeps(runs_dirs: Sequence[str | os.PathLike]) -> Scan:
    """Scans several runs folders into one :class:`Scan` for one leaderboard over all of them.

    A trial done in two folders (same hash) counts once, from the first folder given; a failed or unfinished trial
    that another folder holds done is not counted as failed or incomplete. Each done trial gets ``sweep`` (its
    folder's label, :func:`sweep_labels`) and ``row`` (its leaderboard row): the method name, or ``method (label)``
    when that method's done trials come from more than one folder.

    Args:
        runs_dirs: sweep output folders (each as :func:`scan_runs` accepts), in order of precedence.

    Returns:
        The merged scan, with ``sweeps`` listing ``{"label", "dir", "done"}`` per folder.
    """
    merged = Scan()
    scans = [scan_runs(d) for d in runs_dirs]
    labels = sweep_labels(runs_dirs)
    done: set[str] = set()
    for d, label, scan in zip(runs_dirs, labels, scans):
        kept = 0
        for t in scan.done:
            if t["hash"] in done:
                merged.duplicates += 1
                continue
            done.add(t["hash"])
            merged.done.append({**t, "sweep": label})
            kept += 1
        merged.sweeps.append({"label": label, "dir": str(d), "done": kept})
    failed: set[str] = set()
    done16 = {h[:16] for h in done}  # an unfinished trial's folder is named by its hash's first 16 digits
    for scan in scans:
        for f in scan.failed:
            if f["hash"] not in done and f["hash"] not in failed:
                failed.add(f["hash"])
                merged.failed.append(f)
        merged.incomplete += [i for i in scan.incomplete if Path(i).name not in done16]
        merged.unreadable += scan.unreadable
    sweeps_of: dict[str, set[str]] = defaultdict(set)
    for t in merged.done:
        sweeps_of[trial_method(t)].add(t["sweep"])
    for t in merged.done:
        t["row"] = f"{trial_method(t)} ({t['sweep']})" if len(sweeps_of[trial_method(t)]) > 1 else trial_method(t)
    return merged


def trial_seed(trial: Trial) -> Any:
    return trial["spec"].get("seed", 0)


def trial_method(trial: Trial) -> str:
    return str(trial["spec"].get("method", "?"))


def trial_row(trial: Trial) -> str:
    """The leaderboard row: the method, or ``method (sweep)`` set by :func:`scan_sweeps`."""
    return str(trial.get("row") or trial_method(trial))

