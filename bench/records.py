"""The trial folder: its file names, its status and its one JSONL reader.

Every module that reads a trial folder names its files through the constants here and reads ``results.jsonl``
through :func:`read_jsonl`; the layout itself is documented in docs/records.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
