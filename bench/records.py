"""The trial folder: its file names, its status, its one JSONL reader, and the keys of its records.

Every module that reads a trial folder names its files through the constants here and reads ``results.jsonl``
through :func:`read_jsonl`; the layout itself is documented in docs/records.md.

Record keys are DomainBed's flat ``<split>_<metric>``; for environment datasets the split is ``env{i}_in`` or
``env{i}_out``, so a key is ``env{i}_{in|out}_{metric}`` (:func:`env_key`, :func:`parse_env_key`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

FINAL, FAILED, SPEC, CHECKPOINT, RESULTS, PREDICTIONS, WEIGHTS = (
    "final.json", "failed.json", "spec.json", "checkpoint.pt", "results.jsonl", "predictions.npz", "model.pt",
)  # fmt: skip
"""The trainer's files in a trial folder: done marker, failure marker, spec, working checkpoint, one record per
evaluation, final per-example outputs, final weights."""


def trial_status(trial_dir: str | os.PathLike) -> str:
    """'done' (has final.json), 'failed' (failed.json), 'partial' (a checkpoint) or 'new'."""
    trial_dir = Path(trial_dir)
    if (trial_dir / FINAL).exists():
        return "done"
    if (trial_dir / FAILED).exists():
        return "failed"
    return "partial" if (trial_dir / CHECKPOINT).exists() else "new"


def read_jsonl(path: str | os.PathLike, missing_ok: bool = True) -> list[Any]:
    """The objects of a JSON-lines file, one per non-blank line.

    The torn-line policy: a last line that does not end in a newline and does not parse is a write cut short (a
    crash, or another process still appending) and is skipped; any other line that does not parse, the last one
    included when it ends in a newline, is damage and raises.

    Args:
        path: the file.
        missing_ok: a missing file reads as no records (else OSError).

    Raises:
        ValueError: a malformed line, as ``"<file name> line <n>: <reason>"`` (n counts from 1, blank lines too);
            also for bytes that are not UTF-8.
        OSError: the file cannot be read (or is missing and ``missing_ok`` is false).
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and not line.endswith("\n"):
                break  # torn last line
            raise ValueError(f"{path.name} line {n}: {e.msg}") from None
    return out


# ------------------------------------------------------------------------------------------------------ record keys

_ENV_KEY = re.compile(r"^env(\d+)_(in|out)_(\w+)$")


def env_split(i: int, part: str) -> str:
    """The name of environment ``i``'s ``part`` ("in" or "out") split: ``env{i}_{part}``."""
    return f"env{i}_{part}"


def metric_key(split: str, metric: str) -> str:
    """The record key of a split's metric: ``<split>_<metric>``."""
    return f"{split}_{metric}"


def env_key(i: int, part: str, metric: str) -> str:
    """The record key of environment ``i``'s ``part`` split and ``metric``: ``env{i}_{part}_{metric}``."""
    return metric_key(env_split(i, part), metric)


def parse_env_key(key: str) -> tuple[int, str, str] | None:
    """``(i, part, metric)`` of a key ``env{i}_{in|out}_{metric}``, else None (``step``, ``val_acc``, ...)."""
    m = _ENV_KEY.match(key)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def held_out_envs(trial: Mapping[str, Any]) -> list[int]:
    """A trial's held-out environments (its spec's ``test_envs``), as ints, in spec order; [] when it names none."""
    return [int(e) for e in (trial.get("spec") or {}).get("test_envs") or []]
