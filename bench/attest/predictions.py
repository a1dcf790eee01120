"""The canonical leaf of one prediction, and the Merkle commitment over a trial's ``predictions.npz``.

A leaf (format ``shiftbench.prediction-leaf/1``) is, big-endian::

    u8 version (1) | u8 len(split) | split (UTF-8) | i64 example id | field(label) | field(pred) | field(score)

where ``field`` is a u8 type tag (0 absent, 1 int64, 2 float64) and 8 bytes of value (zeros when absent). Scores are
stored as float32 by the trainer and widen to float64 exactly. Leaves are in the row order of ``predictions.npz``, so a
row's index is its leaf index. Rows of one split share a length, which lets the hashing run over numpy byte rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .merkle import MerkleTree, leaf_hashes_fixed

LEAF_FORMAT = "shiftbench.prediction-leaf/1"
LEAF_VERSION = 1
ABSENT, INT64, FLOAT64 = 0, 1, 2


def _field(values: np.ndarray | None, n: int) -> np.ndarray:
    """(n, 9) uint8: a type tag and 8 big-endian bytes per row."""
    out = np.zeros((n, 9), dtype=np.uint8)
    if values is None:
        return out
    values = np.asarray(values)
    if values.dtype.kind in "biu":
        out[:, 0] = INT64
        out[:, 1:] = values.astype(">i8").view(np.uint8).reshape(n, 8)
    else:
        out[:, 0] = FLOAT64
        out[:, 1:] = values.astype(">f8").view(np.uint8).reshape(n, 8)
    return out


def encode_rows(split: str, idx: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None,
                score: np.ndarray | None) -> np.ndarray:
    """The leaves of rows that share one split, as an (n, width) uint8 array."""
    name = split.encode("utf-8")
    if len(name) > 255:
        raise ValueError(f"split name {split!r} is longer than 255 bytes")
    n = len(idx)
    head = np.frombuffer(bytes([LEAF_VERSION, len(name)]) + name, dtype=np.uint8)
    parts = [np.broadcast_to(head, (n, len(head))), np.asarray(idx).astype(">i8").view(np.uint8).reshape(n, 8),
             _field(label, n), _field(pred, n), _field(score, n)]
    return np.concatenate(parts, axis=1)


def encode_leaf(split: str, idx: int, label: Any, pred: Any, score: Any) -> bytes:
    """One leaf (see the module docstring); ``None`` marks an absent field."""
    col = (lambda v: None if v is None else np.asarray([v]))  # noqa: E731
    return encode_rows(split, np.asarray([idx]), col(label), col(pred), col(score)).tobytes()


def leaf_hashes(arrays: Mapping[str, np.ndarray]) -> list[bytes]:
    """Leaf hashes of every row of a predictions mapping (``split``, ``idx`` and optional ``label``, ``pred``,
    ``score``), in row order."""
    split = np.asarray(arrays["split"]).astype(str)
    n = len(split)
    out: list[bytes] = [b""] * n
    names, first = np.unique(split, return_index=True)
    for name in names[np.argsort(first)]:
        rows = np.flatnonzero(split == name)
        cols = {k: (np.asarray(arrays[k])[rows] if k in arrays else None) for k in ("label", "pred", "score")}
        hashes = leaf_hashes_fixed(encode_rows(str(name), np.asarray(arrays["idx"])[rows], **cols))
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):  # contiguous block: one slice assignment
            out[rows[0] : rows[-1] + 1] = hashes
        else:
            for r, h in zip(rows.tolist(), hashes):
                out[r] = h
    return out


def load_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``predictions.npz`` at ``path`` (never unpickling: object arrays are refused); a trial
    folder's own is ``records.read_predictions(trial_dir)``."""
    from ..records import read_npz

    return read_npz(path)


def commit(arrays: Mapping[str, np.ndarray]) -> MerkleTree:
    """The Merkle tree over a trial's predictions."""
    return MerkleTree(leaf_hashes(arrays))
