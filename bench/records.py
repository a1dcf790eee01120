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

import numpy as np

from .io import atomic_write, read_json, write_json, write_jsonl

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


# ---------------------------------------------------------------------------------------------------------- writers
# Every writer is atomic (io.atomic_write: a temporary file in the folder, fsync'd, renamed over the target), so a
# reader sees the old file or the new one, never half of one.

PREDICTION_KEYS = ("idx", "label", "pred", "score", "correct", "loss")
"""The per-example arrays of predictions.npz, after ``split``, in the order they are stored (absent ones skipped)."""


def write_spec(trial_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Writes spec.json: ``{"hash", "spec", "data_version", "code_version", "task", "env_names", ...}``."""
    write_json(Path(trial_dir) / SPEC, meta)


def write_results(trial_dir: str | os.PathLike, records: list[dict]) -> None:
    """Rewrites results.jsonl whole: one JSON object per evaluation record, keys sorted, one per line."""
    write_jsonl(Path(trial_dir) / RESULTS, records)


def write_predictions(trial_dir: str | os.PathLike, final_outputs: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes predictions.npz from the last evaluation's outputs, ``{split name: {"idx": ..., "pred": ..., ...}}``.

    Each array is the splits' arrays concatenated in ``final_outputs`` order; ``split`` names each row's split.
    A key no split has is left out; a key only some splits have would misalign rows, so outputs share their keys.
    """
    arrays: dict[str, list[Any]] = {}
    for name, out in final_outputs.items():
        arrays.setdefault("split", []).append(np.array([name] * len(out["idx"])))
        for k in PREDICTION_KEYS:
            if k in out:
                arrays.setdefault(k, []).append(out[k])
    atomic_write(Path(trial_dir) / PREDICTIONS,
                 lambda f: np.savez(f, **{k: np.concatenate(v) for k, v in arrays.items()}), mode="wb")


def write_weights(trial_dir: str | os.PathLike, state_dict: Mapping[str, Any], name: str = WEIGHTS) -> None:
    """Writes a model's state_dict, detached and on the CPU, to model.pt (or ``name``, e.g. a reference model's
    :func:`reference_weights` file); loadable with ``weights_only=True``."""
    import torch

    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    atomic_write(Path(trial_dir) / name, lambda f: torch.save(weights, f), mode="wb")


def write_final(trial_dir: str | os.PathLike, final: Mapping[str, Any]) -> None:
    """Writes final.json, the done marker: written last, so a trial with it is complete."""
    write_json(Path(trial_dir) / FINAL, final)


def write_failed(trial_dir: str | os.PathLike, failure: Mapping[str, Any]) -> None:
    """Writes failed.json: ``{"status": "failed", "hash", "reason", "step", "records"}``."""
    write_json(Path(trial_dir) / FAILED, failure)


def save_checkpoint(trial_dir: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Writes checkpoint.pt: the trainer's resume state (``step``, ``records``, ``algorithm``, ``rng``, ...)."""
    import torch

    atomic_write(Path(trial_dir) / CHECKPOINT, lambda f: torch.save(state, f), mode="wb")


def load_checkpoint(trial_dir: str | os.PathLike, device: Any = "cpu") -> dict[str, Any] | None:
    """checkpoint.pt's state, its tensors mapped to ``device``, with no unpickling; None when there is none."""
    import torch

    path = Path(trial_dir) / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def reference_weights(name: str) -> str:
    """The file name of a cached reference model (finetune, cbft): ``<name>.pt``."""
    return f"{name}.pt"


# ---------------------------------------------------------------------------------------------------------- readers


def read_spec(trial_dir: str | os.PathLike) -> dict[str, Any]:
    """spec.json (OSError when missing, ValueError when not JSON)."""
    return read_json(Path(trial_dir) / SPEC)


def read_final(trial_dir: str | os.PathLike) -> dict[str, Any]:
    """final.json (OSError when missing, ValueError when not JSON)."""
    return read_json(Path(trial_dir) / FINAL)


def read_failed(trial_dir: str | os.PathLike) -> dict[str, Any]:
    """failed.json (OSError when missing, ValueError when not JSON)."""
    return read_json(Path(trial_dir) / FAILED)


def read_results(trial_dir: str | os.PathLike, missing_ok: bool = True) -> list[dict[str, Any]]:
    """results.jsonl's records, through :func:`read_jsonl` (its torn-line policy)."""
    return read_jsonl(Path(trial_dir) / RESULTS, missing_ok=missing_ok)


def read_predictions(trial_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """predictions.npz as ``{key: array}``, read with ``allow_pickle=False`` (an object array raises ValueError)."""
    with np.load(Path(trial_dir) / PREDICTIONS, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_weights(trial_dir: str | os.PathLike, device: Any = "cpu", name: str = WEIGHTS) -> dict[str, Any] | None:
    """model.pt's state_dict (or ``name``'s), mapped to ``device``, with no unpickling; None when missing."""
    import torch

    path = Path(trial_dir) / name
    if not path.exists():
        return None
    return torch.load(path, map_location=device, weights_only=True)


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
