"""A local append-only transparency log of attestation envelopes (an RFC 6962 Merkle log with signed tree heads).

Folder layout::

    entries.jsonl      one leaf per line: {"envelope_sha256", "trial", "trial_hash"} as compact sorted JSON;
                       the leaf data is the line's bytes (without the newline)
    tree_heads.jsonl   every signed tree head (a DSSE envelope of {"tree_size", "root_hash", "timestamp"}), in order
    .lock              appenders hold an exclusive ``flock`` on it (sweep workers append concurrently)

An append, under the lock, drops a torn tail (lines past the last signed head, left by a crash), adds the entry,
recomputes the root and appends a new signed tree head. A trial keeps its receipt (its leaf index and the head
signed right after its append): :func:`verify_log` checks that every head, and any receipt, is consistent with the
latest one (RFC 6962 consistency proofs), so the log cannot be rewritten, truncated or forked without detection.
A sweep's log lives in ``OUT/attestation_log``; a trial folder outside a sweep uses ``<config>/log``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..config import canonical_json
from .dsse import PublicKey, SigningKey, envelope_bytes, sign_envelope, verify_envelope
from .locking import file_lock
from .merkle import MerkleTree, leaf_hash, merkle_root, verify_consistency, verify_inclusion

ENTRIES, HEADS, LOCK = "entries.jsonl", "tree_heads.jsonl", ".lock"
HEAD_TYPE = "application/vnd.shiftbench.tree-head+json"
LOG_DIRNAME = "attestation_log"


def log_dir_for(trial_dir: str | os.PathLike) -> Path:
    """Where a trial's envelope is logged: its sweep's folder, or the user's config folder."""
    from .dsse import config_home

    trial_dir = Path(trial_dir).resolve()
    if trial_dir.parent.name == "trials":
        return trial_dir.parent.parent / LOG_DIRNAME
    return config_home() / "log"


@dataclass(frozen=True)
class TreeHead:
    """A parsed signed tree head."""

    size: int
    root: bytes
    timestamp: str
    envelope: dict


def _lines(path: Path) -> list[bytes]:
    """Complete lines (a last line without its newline is a torn write and is left out)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    return lines[:-1]  # the part after the last newline is empty or torn


def parse_head(envelope: Mapping[str, Any], trusted: Iterable[PublicKey]) -> tuple[TreeHead | None, list[str]]:
    """A tree head from its envelope, with the failures of its signature check."""
    payload, failures = verify_envelope(envelope, trusted, payload_type=HEAD_TYPE)
    if payload is None:
        return None, failures
    try:
        body = json.loads(payload)
        head = TreeHead(int(body["tree_size"]), bytes.fromhex(body["root_hash"]), str(body["timestamp"]),
                        dict(envelope))
    except (ValueError, KeyError, TypeError):
        return None, failures + ["tree head payload is malformed"]
    return head, failures


class TransparencyLog:
    """The log in folder ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[bytes]:
        return _lines(self.path / ENTRIES)

    def head_envelopes(self) -> list[bytes]:
        return _lines(self.path / HEADS)

    def latest_head(self) -> dict | None:
        heads = self.head_envelopes()
        return json.loads(heads[-1]) if heads else None

    def append(self, entry: Mapping[str, Any], keys: Sequence[SigningKey]) -> dict[str, Any]:
        """Appends one entry and signs the new tree head.

        Returns:
            The receipt: ``{"log_index", "leaf_hash", "tree_head"}``.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        line = canonical_json(dict(entry)).encode("utf-8")
        if b"\n" in line:
            raise ValueError("log entries are single lines")
        with file_lock(self.path / LOCK):
            heads = self.head_envelopes()
            size = _head_size(heads[-1]) if heads else 0
            entries = self.entries()[:size]  # a tail past the last signed head was a crashed append
            self._rewrite_if_torn(ENTRIES, entries)
            self._rewrite_if_torn(HEADS, heads)
            entries.append(line)
            root = merkle_root([leaf_hash(e) for e in entries])
            body = {"tree_size": len(entries), "root_hash": root.hex(),
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            head = sign_envelope(HEAD_TYPE, canonical_json(body).encode("utf-8"), keys)
            _append_line(self.path / ENTRIES, line)
            _append_line(self.path / HEADS, envelope_bytes(head).rstrip(b"\n"))
        return {"log_index": len(entries) - 1, "leaf_hash": leaf_hash(line).hex(), "tree_head": head}

    def _rewrite_if_torn(self, name: str, keep: list[bytes]) -> None:
        path = self.path / name
        want = b"".join(x + b"\n" for x in keep)
        if path.exists() and path.stat().st_size != len(want):
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_bytes(want)
            os.replace(tmp, path)


def _head_size(raw: bytes) -> int:
    """The size in a tree head line; a corrupt line stops appends (extending a damaged log would hide the damage)."""
    import base64

    from ..errors import UserError

    try:
        return int(json.loads(base64.b64decode(json.loads(raw)["payload"]))["tree_size"])
    except (ValueError, KeyError, TypeError):
        raise UserError("the attestation log's last tree head is corrupt; run `shiftbench verify` on it") from None


def _append_line(path: Path, line: bytes) -> None:
    with open(path, "ab") as f:
        f.write(line + b"\n")
        f.flush()
        os.fsync(f.fileno())


def verify_log(log: TransparencyLog, trusted: Iterable[PublicKey]) -> tuple[TreeHead | None, MerkleTree | None,
                                                                             list[str]]:
    """Checks every signed tree head and that each is consistent with the latest, whose root must be the root
    of the entries it covers.

    Returns:
        (latest head, tree over the entries it covers, failures).
    """
    trusted = list(trusted)
    name = log.path.name
    if not (log.path / HEADS).exists():
        return None, None, [f"log {log.path}: no tree_heads.jsonl (nothing was ever logged there)"]
    failures: list[str] = []
    raw_heads = log.head_envelopes()
    heads: list[TreeHead] = []
    for n, raw in enumerate(raw_heads):
        try:
            env = json.loads(raw)
        except ValueError:
            failures.append(f"log {name}: tree head {n} is not valid JSON")
            continue
        head, errs = parse_head(env, trusted)
        failures += [f"log {name}: tree head {n}: {e}" for e in errs]
        if head is not None:
            heads.append(head)
    if (log.path / HEADS).stat().st_size != sum(len(r) + 1 for r in raw_heads):
        failures.append(f"log {name}: tree_heads.jsonl ends in a torn line")
    if not heads:
        return None, None, failures + [f"log {name}: no readable tree head"]
    latest = heads[-1]
    # One head per append, in order: head n covers n + 1 entries, so no head can be dropped or slipped in.
    if len(heads) == len(raw_heads) and [h.size for h in heads] != list(range(1, len(heads) + 1)):
        failures.append(f"log {name}: tree heads do not cover 1, 2, ..., n entries (a head was dropped or added)")
    entries = log.entries()
    if len(entries) < latest.size:
        return latest, None, failures + [f"log {name}: {len(entries)} entries, the latest head covers {latest.size}"]
    tree = MerkleTree([leaf_hash(e) for e in entries[: latest.size]])
    if tree.root != latest.root:
        failures.append(f"log {name}: entries do not hash to the latest tree head's root")
    for n, head in enumerate(heads[:-1]):
        if head.size > latest.size:
            failures.append(f"log {name}: tree head {n} is larger than the latest one")
        elif not verify_consistency(head.size, latest.size, head.root, latest.root,
                                    tree.consistency_proof(head.size)):
            failures.append(f"log {name}: tree head {n} (size {head.size}) is not consistent with the latest")
        elif n + 1 < len(heads) and heads[n + 1].size < head.size:
            failures.append(f"log {name}: tree head {n + 1} shrinks the log")
    return latest, tree, failures


def check_receipt(receipt: Mapping[str, Any], envelope_sha256: str, latest: TreeHead, tree: MerkleTree,
                  log: TransparencyLog, trusted: Iterable[PublicKey]) -> list[str]:
    """Checks that a trial's envelope is in the log at its receipt's index (inclusion proof against the latest
    head) and that the head in its receipt is consistent with the latest."""
    failures = []
    try:
        index = int(receipt["log_index"])
        receipt_head, errs = parse_head(receipt["tree_head"], trusted)
    except (KeyError, TypeError, ValueError):
        return ["attestation.log.json is malformed"]
    failures += [f"receipt tree head: {e}" for e in errs]
    if not 0 <= index < latest.size:
        return failures + [f"log index {index} is outside the latest tree head (size {latest.size})"]
    entry = log.entries()[index]
    try:
        fields = json.loads(entry)
    except ValueError:
        fields = {}
    if fields.get("envelope_sha256") != envelope_sha256:
        failures.append(f"log entry {index} names another envelope than the trial's")
    if receipt.get("leaf_hash") != leaf_hash(entry).hex():
        failures.append(f"log entry {index} differs from the receipt's leaf hash")
    if not verify_inclusion(leaf_hash(entry), index, latest.size, tree.inclusion_proof(index), latest.root):
        failures.append(f"log entry {index} is not included in the latest tree head")
    if receipt_head is not None:
        if receipt_head.size > latest.size or not verify_consistency(
                receipt_head.size, latest.size, receipt_head.root, latest.root,
                tree.consistency_proof(receipt_head.size)):
            failures.append(f"the tree head in the receipt (size {receipt_head.size}) is not consistent with the log")
    return failures
