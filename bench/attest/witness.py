"""A verifier's or witness's memory of the logs it has seen: the last checkpoint per origin, in a small state file.

Like a Go checksum-database client or a transparency-log witness, a verifier accepts a log only as an extension of
what it saw before: on every later look it requires an RFC 9162 consistency proof from its stored checkpoint to the
log's latest (computed here from the log's entries, and checked against the *stored* root, so a rewritten copy cannot
supply its own), and that the operator's key is the one it saw. Truncating the log, rewriting an entry, forking it or
deleting and recreating it under the same operator key each fail that proof. The first look at a log can only trust
on first use; a trust policy may pin the operator's key (``logs:``).

State file (default ``<config>/witness/state.json``)::

    {"logs": {"<origin>": {"size": n, "root": "<hex>", "operator": "<key id>", "checkpoint": "<note>"}}}
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import read_json, write_json
from .checkpoint import Checkpoint
from .locking import file_lock
from .merkle import MerkleTree, verify_consistency


def default_state() -> Path:
    from .dsse import config_home

    return config_home() / "witness" / "state.json"


class WitnessState:
    """The state file at ``path``."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_state()

    def _read(self) -> dict:
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return {"logs": {}}
        except (OSError, ValueError):
            from ..errors import UserError

            raise UserError(f"witness state {self.path} is unreadable; fix or remove it (it is your memory of the "
                            "logs you have verified)") from None
        return data if isinstance(data.get("logs"), dict) else {"logs": {}}

    def seen(self, origin: str) -> dict | None:
        return self._read()["logs"].get(origin)

    def check(self, cp: Checkpoint, tree: MerkleTree | None, operator_keyid: str) -> list[str]:
        """Failures of ``cp`` (with the tree over the entries it covers) against the stored checkpoint."""
        old = self.seen(cp.origin)
        if old is None:
            return []
        where = f"log {cp.origin}"
        if old.get("operator") != operator_keyid:
            return [f"{where}: operated by key {str(old.get('operator'))[:16]} when last seen, now {operator_keyid[:16]}"]
        size, root = int(old["size"]), bytes.fromhex(old["root"])
        if cp.size < size:
            return [f"{where}: has {cp.size} entries, {size} when last seen: truncated or rolled back"]
        if tree is None or len(tree) < cp.size:
            return [f"{where}: no entries to prove consistency with the checkpoint seen before (size {size})"]
        if not verify_consistency(size, cp.size, root, cp.root, tree.consistency_proof(size, cp.size)):
            return [f"{where}: is not an extension of the checkpoint seen before (size {size}): an entry was "
                    "rewritten, or the log was forked or recreated (if you deleted this sweep and ran it again "
                    f"yourself, that is the recreation: forget the old log with --state NEW_FILE, or remove "
                    f"{cp.origin!r} from {self.path})"]
        return []

    def update(self, cp: Checkpoint, operator_keyid: str) -> None:
        """Stores ``cp`` as the last seen checkpoint of its origin (only ever moving forward)."""
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            data = self._read()
            old = data["logs"].get(cp.origin)
            if old is None or int(old["size"]) <= cp.size:
                data["logs"][cp.origin] = {"size": cp.size, "root": cp.root.hex(), "operator": operator_keyid,
                                           "checkpoint": cp.text}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json(self.path, data)
