"""An append-only transparency log of attestation envelopes: an RFC 6962 Merkle log whose tree heads are C2SP
checkpoints signed by the log operator's key (never by the trials' keys).

Folder layout::

    entries.jsonl      one leaf per line: {"envelope_sha256", "identity", "trial", "trial_hash"} as compact sorted
                       JSON; the leaf data is the line's bytes (without the newline)
    tree_heads.jsonl   every checkpoint note (see :mod:`.checkpoint`) as a JSON string, one per append, in order
    checkpoint         the latest checkpoint note (what a witness reads)
    operator.pub       the operator's Ed25519 public key (PEM)
    cosignatures/      checkpoints cosigned by witnesses (``shiftbench log witness``), one file per witness
    .lock              appenders hold an exclusive ``flock`` on it (sweep workers append concurrently)

An append, under the lock, drops a torn tail (lines past the last checkpoint, left by a crash), adds the entry,
recomputes the root and appends a new checkpoint. A trial keeps its receipt (its leaf index and the checkpoint signed
right after its append). :func:`verify_log` checks that every checkpoint is consistent with the latest one; that
only shows the copy is self-consistent, since the operator can rewrite it all. What the operator cannot do unnoticed
is show a verifier, or a witness, a log that is not an extension of the one they saw before: both keep the last
checkpoint they have seen per origin (:mod:`.witness`) and require a consistency proof from it.
A sweep's log lives in ``OUT/attestation_log``; a trial folder outside a sweep uses ``<config>/log``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import canonical_json
from ..errors import UserError
from ..io import atomic_write
from ..records import sweep_of
from . import checkpoint as ckpt
from .dsse import PublicKey, SigningKey, read_public_keys
from .locking import file_lock
from .merkle import MerkleTree, leaf_hash, merkle_root, verify_consistency, verify_inclusion

ENTRIES, HEADS, LATEST, OPERATOR, COSIGNED, LOCK = (
    "entries.jsonl", "tree_heads.jsonl", "checkpoint", "operator.pub", "cosignatures", ".lock")
LOG_DIRNAME = "attestation_log"
ORIGIN_PREFIX = "shiftbench.local"


def log_dir_for(trial_dir: str | os.PathLike) -> Path:
    """Where a trial's envelope is logged: its sweep's folder, or the user's config folder."""
    from .dsse import config_home

    sweep = sweep_of(trial_dir)
    return sweep / LOG_DIRNAME if sweep is not None else config_home() / "log"


def log_name(path: str | os.PathLike) -> str:
    """The name part of a log's origin: its sweep folder's name, or the folder's own."""
    p = Path(path).resolve()
    name = p.parent.name if p.name == LOG_DIRNAME else p.name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "log"


def origin_for(operator: PublicKey, path: str | os.PathLike) -> str:
    """``shiftbench.local/<operator key id, 16 hex>/<log name>``: recreating a deleted log with the same key gives
    the same origin, so a witness that saw the old one notices."""
    return f"{ORIGIN_PREFIX}/{operator.keyid[:16]}/{log_name(path)}"


def _lines(path: Path) -> list[bytes]:
    """Complete lines (a last line without its newline is a torn write and is left out)."""
    if not path.exists():
        return []
    return path.read_bytes().split(b"\n")[:-1]


class TransparencyLog:
    """The log in folder ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[bytes]:
        return _lines(self.path / ENTRIES)

    def checkpoints(self) -> list[bytes]:
        """The raw lines of ``tree_heads.jsonl`` (each a JSON string holding a checkpoint note)."""
        return _lines(self.path / HEADS)

    def latest_checkpoint(self) -> ckpt.Checkpoint | None:
        heads = self.checkpoints()
        try:
            return ckpt.parse(json.loads(heads[-1])) if heads else None
        except (ValueError, TypeError):
            return None

    def operator(self) -> PublicKey | None:
        path = self.path / OPERATOR
        return read_public_keys(path)[0] if path.is_file() else None

    def append(self, entry: Mapping[str, Any], operator: SigningKey) -> dict[str, Any]:
        """Appends one entry and signs the new checkpoint with the operator's key.

        Returns:
            The receipt: ``{"log_index", "leaf_hash", "origin", "checkpoint"}``.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        line = canonical_json(dict(entry)).encode("utf-8")
        if b"\n" in line:
            raise ValueError("log entries are single lines")
        with file_lock(self.path / LOCK):
            known = self.operator()
            if known is None:
                (self.path / OPERATOR).write_bytes(operator.public.pem())
            elif known.keyid != operator.keyid:
                raise UserError(f"log {self.path} is operated by key {known.keyid[:16]}, not "
                                f"{operator.keyid[:16]}; set SHIFTBENCH_LOG_KEYS to its operator's keys folder")
            heads = self.checkpoints()
            size = _head_size(heads[-1]) if heads else 0
            entries = self.entries()[:size]  # a tail past the last checkpoint was a crashed append
            self._rewrite_if_torn(ENTRIES, entries)
            self._rewrite_if_torn(HEADS, heads)
            entries.append(line)
            origin = origin_for(operator.public, self.path)
            note = ckpt.sign(origin, len(entries), merkle_root([leaf_hash(e) for e in entries]), operator)
            _append_line(self.path / ENTRIES, line)
            _append_line(self.path / HEADS, json.dumps(note).encode("utf-8"))
            atomic_write(self.path / LATEST, lambda f: f.write(note.encode("utf-8")), mode="wb")
        return {"log_index": len(entries) - 1, "leaf_hash": leaf_hash(line).hex(), "origin": origin,
                "checkpoint": note}

    def _rewrite_if_torn(self, name: str, keep: list[bytes]) -> None:
        path = self.path / name
        want = b"".join(x + b"\n" for x in keep)
        if path.exists() and path.stat().st_size != len(want):
            atomic_write(path, lambda f: f.write(want), mode="wb")


def _head_size(raw: bytes) -> int:
    """The size in a checkpoint line; a corrupt line stops appends (extending a damaged log would hide the damage)."""
    try:
        return ckpt.parse(json.loads(raw)).size
    except (ValueError, TypeError):
        raise UserError("the attestation log's last checkpoint is corrupt; run `shiftbench verify` on it") from None


def _append_line(path: Path, line: bytes) -> None:
    with open(path, "ab") as f:
        f.write(line + b"\n")
        f.flush()
        os.fsync(f.fileno())


def verify_log(log: TransparencyLog) -> tuple[ckpt.Checkpoint | None, MerkleTree | None, list[str]]:
    """Checks every checkpoint's signature by the log's operator and that each is consistent with the latest, whose
    root must be the root of the entries it covers. This shows the copy is self-consistent; a witness's state
    (:mod:`.witness`) is what shows it extends what was seen before.

    Returns:
        (latest checkpoint, tree over the entries it covers, failures).
    """
    name = log.path.name
    if not (log.path / HEADS).exists():
        return None, None, [f"log {log.path}: no tree_heads.jsonl (nothing was ever logged there)"]
    try:
        operator = log.operator()
    except UserError as e:
        operator = None
        failures = [f"log {name}: {e}"]
    else:
        failures = [] if operator else [f"log {name}: no {OPERATOR} (the operator's public key)"]
    raw_heads = log.checkpoints()
    heads: list[ckpt.Checkpoint] = []
    for n, raw in enumerate(raw_heads):
        try:
            cp = ckpt.parse(json.loads(raw))
        except (ValueError, TypeError) as e:
            failures.append(f"log {name}: checkpoint {n} is malformed ({e})")
            continue
        if operator is not None and not cp.origin.startswith(f"{ORIGIN_PREFIX}/{operator.keyid[:16]}/"):
            failures.append(f"log {name}: checkpoint {n} names origin {cp.origin!r}, not one of the operator's")
        elif operator is not None and not ckpt.verify(cp, operator):
            failures.append(f"log {name}: checkpoint {n} is not signed by the log's operator")
        heads.append(cp)
    if (log.path / HEADS).stat().st_size != sum(len(r) + 1 for r in raw_heads):
        failures.append(f"log {name}: tree_heads.jsonl ends in a torn line")
    if not heads:
        return None, None, failures + [f"log {name}: no readable checkpoint"]
    latest = heads[-1]
    if len({h.origin for h in heads}) > 1:
        failures.append(f"log {name}: checkpoints name more than one origin")
    # One checkpoint per append, in order: checkpoint n covers n + 1 entries, so none can be dropped or slipped in.
    if len(heads) == len(raw_heads) and [h.size for h in heads] != list(range(1, len(heads) + 1)):
        failures.append(f"log {name}: checkpoints do not cover 1, 2, ..., n entries (one was dropped or added)")
    entries = log.entries()
    if len(entries) < latest.size:
        return latest, None, failures + [f"log {name}: {len(entries)} entries, the latest checkpoint covers "
                                         f"{latest.size}"]
    tree = MerkleTree([leaf_hash(e) for e in entries[: latest.size]])
    if tree.root != latest.root:
        failures.append(f"log {name}: entries do not hash to the latest checkpoint's root")
    for n, head in enumerate(heads[:-1]):
        if head.size > latest.size:
            failures.append(f"log {name}: checkpoint {n} is larger than the latest one")
        elif not verify_consistency(head.size, latest.size, head.root, latest.root,
                                    tree.consistency_proof(head.size)):
            failures.append(f"log {name}: checkpoint {n} (size {head.size}) is not consistent with the latest")
    return latest, tree, failures


def check_receipt(receipt: Mapping[str, Any], envelope_sha256: str, latest: ckpt.Checkpoint, tree: MerkleTree,
                  log: TransparencyLog) -> list[str]:
    """Checks that a trial's envelope is in the log at its receipt's index (inclusion proof against the latest
    checkpoint), that the checkpoint in its receipt is the operator's and consistent with the latest, and that no
    later entry of the same trial names another envelope (an older envelope replayed after a rerun)."""
    failures = []
    try:
        index = int(receipt["log_index"])
        receipt_head = ckpt.parse(receipt["checkpoint"])
    except (KeyError, TypeError, ValueError):
        return ["attestation.log.json is malformed"]
    operator = log.operator()
    if operator is not None and not ckpt.verify(receipt_head, operator):
        failures.append("the checkpoint in the receipt is not signed by the log's operator")
    if receipt_head.origin != latest.origin:
        failures.append(f"the receipt is from log {receipt_head.origin!r}, not {latest.origin!r}")
    if not 0 <= index < latest.size:
        return failures + [f"log index {index} is outside the latest checkpoint (size {latest.size})"]
    entries = log.entries()
    entry = entries[index]
    try:
        fields = json.loads(entry)
    except ValueError:
        fields = {}
    if fields.get("envelope_sha256") != envelope_sha256:
        failures.append(f"log entry {index} names another envelope than the trial's")
    if receipt.get("leaf_hash") != leaf_hash(entry).hex():
        failures.append(f"log entry {index} differs from the receipt's leaf hash")
    if not verify_inclusion(leaf_hash(entry), index, latest.size, tree.inclusion_proof(index), latest.root):
        failures.append(f"log entry {index} is not included in the latest checkpoint")
    if receipt_head.size > latest.size or not verify_consistency(
            receipt_head.size, latest.size, receipt_head.root, latest.root, tree.consistency_proof(receipt_head.size)):
        failures.append(f"the checkpoint in the receipt (size {receipt_head.size}) is not consistent with the log")
    for later in range(index + 1, latest.size):
        try:
            other = json.loads(entries[later])
        except ValueError:
            continue
        if other.get("trial_hash") == fields.get("trial_hash") and other.get("envelope_sha256") != envelope_sha256:
            failures.append(f"log entry {later} logs a newer envelope of this trial: this one (entry {index}) was "
                            "superseded")
            break
    return failures
