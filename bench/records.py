"""The trial folder, owned here alone: its file names, its status, every writer and reader of its files (one JSONL
reader, one torn-line policy), the scanner of runs folders, loading a finished trial's model, and the keys of its
records.

No other module names a trial file (tests/test_records.py checks the string literals under bench/): the trainer
writes through :func:`write_spec`, :func:`save_checkpoint`, :func:`write_results`, :func:`write_predictions`,
:func:`write_weights`, :func:`write_final` and :func:`write_failed`; everything downstream reads through the
``read_*`` functions, :func:`scan_runs` and :func:`load_trial_model`. The layout is documented in docs/records.md.

Record keys are DomainBed's flat ``<split>_<metric>``; for environment datasets the split is ``env{i}_in`` or
``env{i}_out``, so a key is ``env{i}_{in|out}_{metric}`` (:func:`env_key`, :func:`parse_env_key`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import UserError
from .io import atomic_write, write_json, write_jsonl

FINAL, FAILED, SPEC, CHECKPOINT, RESULTS, PREDICTIONS, WEIGHTS = (
    "final.json", "failed.json", "spec.json", "checkpoint.pt", "results.jsonl", "predictions.npz", "model.pt",
)  # fmt: skip
"""The trainer's files in a trial folder: done marker, failure marker, spec, working checkpoint, one record per
evaluation, final per-example outputs, final weights."""
TRIALS = "trials"
"""The folder of a sweep's output folder that holds its trial folders (``<out>/trials/<hash16>/``)."""


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
# reader sees the old file or the new one, never half of one. torch is imported inside the functions that need it, so
# that reading records (the report, status) never loads it.

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


def write_weights(trial_dir: str | os.PathLike, state_dict: Mapping[str, Any]) -> None:
    """Writes the final model's state_dict to model.pt as a plain dict of detached CPU tensors (loadable with
    ``weights_only=True`` on any machine)."""
    import torch

    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    atomic_write(Path(trial_dir) / WEIGHTS, lambda f: torch.save(weights, f), mode="wb")


def write_reference(trial_dir: str | os.PathLike, name: str, state_dict: Mapping[str, Any]) -> None:
    """Writes a cached reference model (finetune, cbft: ``reference_<method>_<steps>``) to ``<name>.pt``, the
    state_dict as given (its version metadata included, as the trainer has always written it)."""
    import torch

    atomic_write(Path(trial_dir) / reference_weights(name), lambda f: torch.save(state_dict, f), mode="wb")


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
    return _load_tensors(Path(trial_dir) / CHECKPOINT, device)


def remove_checkpoint(trial_dir: str | os.PathLike) -> None:
    """Drops checkpoint.pt (a trial that finished or failed no longer resumes); nothing when there is none."""
    (Path(trial_dir) / CHECKPOINT).unlink(missing_ok=True)


def clear_failed(trial_dir: str | os.PathLike) -> None:
    """Drops failed.json, so a failed trial can be run again (``--retry-failed``)."""
    (Path(trial_dir) / FAILED).unlink(missing_ok=True)


def has_spec(trial_dir: str | os.PathLike) -> bool:
    """Whether the trial folder's spec.json has been written (the trial started at least once)."""
    return (Path(trial_dir) / SPEC).exists()


def refuse_other_trial(trial_dir: str | os.PathLike, trial_hash: str) -> None:
    """Raises UserError when the folder's first record (spec, final or failed) carries another trial's hash, or is
    not readable JSON: a folder never passes one trial's metrics off as another's."""
    trial_dir = Path(trial_dir)
    for name in (SPEC, FINAL, FAILED):
        path = trial_dir / name
        if not path.is_file():
            continue
        try:
            held = _read_json(path)
        except (OSError, ValueError):
            raise UserError(f"{path} is not readable JSON; use another --out or delete that folder") from None
        if isinstance(held, dict) and held.get("hash") not in (None, trial_hash):
            what = held.get("spec", {})
            label = f"{what.get('dataset')}/{what.get('method')}, " if what else ""
            raise UserError(f"{trial_dir} holds a different trial ({label}hash {str(held['hash'])[:16]}; this "
                            f"one is {str(trial_hash)[:16]}); use another --out or delete that folder")
        return


def reference_weights(name: str) -> str:
    """The file name of a cached reference model (finetune, cbft): ``<name>.pt``."""
    return f"{name}.pt"


# ---------------------------------------------------------------------------------------------------------- readers


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_spec(trial_dir: str | os.PathLike) -> dict[str, Any]:
    """spec.json (OSError when missing, ValueError when not JSON)."""
    return _read_json(Path(trial_dir) / SPEC)


def read_final(trial_dir: str | os.PathLike) -> dict[str, Any]:
    """final.json (OSError when missing, ValueError when not JSON)."""
    return _read_json(Path(trial_dir) / FINAL)


def read_failed(trial_dir: str | os.PathLike) -> dict[str, Any]:
    """failed.json (OSError when missing, ValueError when not JSON)."""
    return _read_json(Path(trial_dir) / FAILED)


def read_results(trial_dir: str | os.PathLike, missing_ok: bool = True) -> list[dict[str, Any]]:
    """results.jsonl's records, through :func:`read_jsonl` (its torn-line policy)."""
    return read_jsonl(Path(trial_dir) / RESULTS, missing_ok=missing_ok)


def read_predictions(trial_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """predictions.npz as ``{key: array}`` (:func:`read_npz`: never unpickling)."""
    return read_npz(Path(trial_dir) / PREDICTIONS)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, read with ``allow_pickle=False``: an object array raises ValueError, so a
    forged file cannot run code."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_weights(trial_dir: str | os.PathLike, device: Any = "cpu") -> dict[str, Any] | None:
    """model.pt's state_dict, mapped to ``device``, with no unpickling; None when missing."""
    return _load_tensors(Path(trial_dir) / WEIGHTS, device)


def read_reference(trial_dir: str | os.PathLike, name: str, device: Any = "cpu") -> dict[str, Any] | None:
    """A cached reference model's state_dict (:func:`write_reference`), mapped to ``device``; None when missing."""
    return _load_tensors(Path(trial_dir) / reference_weights(name), device)


def _load_tensors(path: Path, device: Any) -> Any:
    import torch

    return torch.load(path, map_location=device, weights_only=True) if path.exists() else None


# ------------------------------------------------------------------------------------------------- scanning folders


def trial_path(out: str | os.PathLike, trial_hash: str) -> Path:
    """The folder of a trial in a sweep output folder: ``<out>/trials/<first 16 hex digits of its hash>``."""
    return Path(out) / TRIALS / str(trial_hash)[:16]


def sweep_of(trial_dir: str | os.PathLike) -> Path | None:
    """The sweep output folder of a trial folder in ``<sweep>/trials/`` (resolved); None for a lone trial."""
    trial_dir = Path(trial_dir).resolve()
    return trial_dir.parent.parent if trial_dir.parent.name == TRIALS else None


def trial_dirs(root: str | os.PathLike, marker: str = SPEC) -> list[Path]:
    """The trial folders under ``root``, in name order: ``root`` itself when it holds a spec.json (one trial folder),
    else the folders of ``root/trials/`` (a sweep output folder) or of ``root`` (a folder of trial folders) that
    hold ``marker`` (spec.json: every started trial; final.json: the done ones). [] when ``root`` is no folder."""
    root = Path(root)
    if (root / SPEC).is_file():
        return [root]
    base = root / TRIALS if (root / TRIALS).is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / marker).is_file()) if base.is_dir() else []


@dataclass
class Scan:
    """The trial folders of a runs folder, sorted by status (:func:`scan_runs`).

    Attributes:
        done: trials with final.json, as dicts: spec.json in full (``hash``, ``spec``, and ``env_names``,
            ``data_version``, ``code_version``, ``task``, None where absent) plus ``records``
            (results.jsonl), ``final`` (final.json) and ``dir`` (the folder).
        failed: trials with failed.json and no final.json: ``{"hash", "dir", "reason", "step", "spec"}``.
        incomplete: folders of trials with neither marker (running or interrupted); ignored by the report.
        unreadable: ``{"dir", "reason"}`` for done trials whose files could not be parsed; ignored by the report.
        sweeps: with several folders (the report's ``scan_sweeps``), ``{"label", "dir", "done"}`` per folder.
        duplicates: done trials left out because an earlier folder holds the same trial (same hash).
    """

    done: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    sweeps: list[dict] = field(default_factory=list)
    duplicates: int = 0

    @property
    def counts(self) -> dict[str, int]:
        """How many trials of each kind: ``{"done", "failed", "incomplete", "unreadable"}``."""
        return {"done": len(self.done), "failed": len(self.failed), "incomplete": len(self.incomplete),
                "unreadable": len(self.unreadable)}


def scan_runs(runs_dir: str | os.PathLike) -> Scan:
    """Sorts the trial folders of a runs folder into done, failed, incomplete and unreadable.

    Args:
        runs_dir: a sweep output folder (with ``trials/``), a folder of trial folders, or one trial folder
            (:func:`trial_dirs`); a missing folder scans as empty.

    Returns:
        The scan; done trials are deduplicated by hash (first folder in name order wins). A done trial whose
        results.jsonl is missing or empty gets final.json's record as its one record.
    """
    scan = Scan()
    seen: set[str] = set()
    for d in trial_dirs(runs_dir):
        try:
            meta = read_spec(d)
        except (OSError, ValueError) as e:
            scan.unreadable.append({"dir": str(d), "reason": f"{SPEC}: {e}"})
            continue
        trial_hash = str(meta.get("hash") or d.name)
        if (d / FINAL).is_file():
            try:
                final = read_final(d)
                results = read_results(d)
            except (OSError, ValueError) as e:
                scan.unreadable.append({"dir": str(d), "reason": str(e)})
                continue
            if not results and isinstance(final.get("record"), dict):
                results = [final["record"]]
            if trial_hash in seen:
                continue
            seen.add(trial_hash)
            trial: dict[str, Any] = {k: meta.get(k) for k in ("env_names", "data_version", "code_version", "task")}
            trial.update(meta)  # spec.json in full, whatever else the trainer adds
            trial.update({"hash": trial_hash, "spec": meta.get("spec") or {}, "records": results, "final": final,
                          "dir": str(d)})  # fmt: skip
            scan.done.append(trial)
        elif (d / FAILED).is_file():
            try:
                info = read_failed(d)
            except (OSError, ValueError) as e:
                info = {"reason": f"{FAILED} unreadable: {e}"}
            scan.failed.append({"hash": trial_hash, "dir": str(d), "reason": str(info.get("reason", "unknown")),
                                "step": info.get("step"), "spec": meta.get("spec", {})})  # fmt: skip
        else:
            scan.incomplete.append(str(d))
    return scan


# ------------------------------------------------------------------------------------------------- a trial's model


def build_trial_model(spec: Any, input_shape, num_classes: int, task: str) -> Any:
    """The trial's model as the trainer builds it, before training: the global torch seed set to
    ``seed_hash(seed, "init")``, then ``build_model(model, input_shape, n_outputs, hparams)`` with the task's
    ``n_outputs(num_classes)``.

    Args:
        spec: a ``TrialSpec`` or spec.json's ``"spec"`` dict (``seed``, ``model``, ``hparams``).
        input_shape: the dataset's input shape.
        num_classes: the dataset's number of classes.
        task: the dataset's task name (``classification``, ``preference``, ``coordination``).
    """
    import torch

    from .hparams import seed_hash
    from .models import build_model
    from .registry import TASKS

    s = spec.to_dict() if hasattr(spec, "to_dict") else spec
    torch.manual_seed(seed_hash(s["seed"], "init"))
    return build_model(s["model"], tuple(input_shape), TASKS.get(task)().n_outputs(num_classes), s["hparams"])


def load_trial_model(trial_dir: str | os.PathLike, data_root: str | None = None, device: Any = "cpu"):
    """A finished trial's model: its dataset rebuilt from spec.json, the model built as the trainer builds it
    (:func:`build_trial_model`), then model.pt loaded (tensors only), in eval mode on ``device``.

    The caller's torch RNG state is left as it was. The model scores a batch as ``task.scores(model, batch)``;
    a method that scores otherwise (its own ``scores``) needs its algorithm around the model.

    Returns:
        ``(model, spec, dataset)``: the model, the ``TrialSpec`` and the rebuilt ``ShiftDataset``.

    Raises:
        OSError: spec.json or model.pt is missing.
        UserError: the spec does not resolve or its dataset cannot be built here (e.g. real data missing).
    """
    import torch

    from .config import TrialSpec
    from .data import load_dataset

    trial_dir = Path(trial_dir)
    spec = TrialSpec.from_dict(read_spec(trial_dir)["spec"])
    state = read_weights(trial_dir)
    if state is None:
        raise FileNotFoundError(f"{trial_dir / WEIGHTS}: missing (the trial has not finished)")
    dataset = load_dataset(spec.dataset, spec.dataset_options, data_root, False)
    with torch.random.fork_rng(devices=[]):
        model = build_trial_model(spec, dataset.input_shape, dataset.num_classes, dataset.TASK)
    model.load_state_dict(state)
    return model.to(device).eval(), spec, dataset


def load_described_model(trial_dir: str | os.PathLike, device: Any = "cpu"):
    """A finished trial's model built from spec.json's description of its dataset (``input_shape``,
    ``num_classes``, ``task``) without rebuilding the dataset, then model.pt loaded, in eval mode.

    Returns:
        ``(model, meta)``: the model and spec.json.

    Raises:
        OSError: spec.json or model.pt is missing.
        ValueError: spec.json does not describe the dataset's input shape and classes, or is not JSON.
    """
    import torch

    trial_dir = Path(trial_dir)
    meta = read_spec(trial_dir)
    described = meta.get("dataset") or {}
    if "input_shape" not in described or "num_classes" not in described:
        raise ValueError(f"{trial_dir / SPEC} does not describe the dataset's input shape and classes")
    state = read_weights(trial_dir)
    if state is None:
        raise FileNotFoundError(f"{trial_dir / WEIGHTS}: missing (the trial has not finished)")
    with torch.random.fork_rng(devices=[]):
        model = build_trial_model(meta["spec"], described["input_shape"], described["num_classes"],
                                  meta.get("task") or described.get("task") or "classification")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


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
