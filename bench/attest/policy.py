"""Trust policies: which identities and keys a verifier trusts, which schemes it requires, for which sweeps.

The policy, never the statement, decides what is required: a statement lists its signers, but a downgraded one that
lists fewer schemes still fails a policy that requires more. A policy is YAML or JSON::

    identities:                       # who may sign results
      - identity: alice@example.org
        keys: [3f2a...e1, alice.pub]  # fingerprints (key ids, 64 hex) or public-key files (paths relative to the policy)
        sweeps: ["cmnist-*"]          # optional: fnmatch patterns of the sweep folder names it is trusted for
    require_schemes: [ed25519, slh-dsa-sha2-128f]   # each needs a valid signature by the trusted identity
    logs:                             # optional: the only log operators accepted
      - keys: [9c01...77]
    witnesses:                        # optional: trials must sit under a checkpoint cosigned by these
      - identity: witness.example.org
        keys: [witness.pub]
    min_witnesses: 1                  # default: 1 when witnesses are listed
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .dsse import SCHEMES, read_public_keys

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Principal:
    """A trusted identity: its name, its key ids and (optionally) the sweeps it may sign for."""

    identity: str
    keyids: frozenset[str]
    sweeps: tuple[str, ...] = ()
    keys: dict = field(default_factory=dict, compare=False, hash=False)
    """keyid -> PublicKey for keys given as files (witnesses need the key itself, not only its id)."""

    def covers(self, sweep: str | None) -> bool:
        return not self.sweeps or (sweep is not None and any(fnmatch.fnmatchcase(sweep, p) for p in self.sweeps))


@dataclass(frozen=True)
class Policy:
    """A parsed trust policy (see the module docstring)."""

    identities: tuple[Principal, ...]
    require_schemes: tuple[str, ...]
    log_operators: frozenset[str] | None
    witnesses: tuple[Principal, ...]
    min_witnesses: int
    uri: str
    sha256: str

    def principal(self, keyid: str) -> Principal | None:
        return next((p for p in self.identities if keyid in p.keyids), None)


def _keys(entry: Any, base: Path, where: str) -> tuple[frozenset[str], dict]:
    if not isinstance(entry, list) or not entry:
        raise UserError(f"{where}: 'keys' must be a non-empty list of fingerprints or public-key files")
    ids, keys = set(), {}
    for k in entry:
        k = str(k)
        if _HEX64.match(k.lower()):
            ids.add(k.lower())
            continue
        for pk in read_public_keys(base / k):
            ids.add(pk.keyid)
            keys[pk.keyid] = pk
    return frozenset(ids), keys


def _principals(items: Any, base: Path, where: str) -> tuple[Principal, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise UserError(f"{where} must be a list of {{identity, keys}} entries")
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("identity"), str):
            raise UserError(f"{where}[{n}] needs an 'identity' (a name or e-mail) and 'keys'")
        ids, keys = _keys(item.get("keys"), base, f"{where}[{n}]")
        sweeps = item.get("sweeps") or []
        if not isinstance(sweeps, list):
            raise UserError(f"{where}[{n}].sweeps must be a list of patterns, e.g. [\"cmnist-*\"]")
        out.append(Principal(item["identity"], ids, tuple(map(str, sweeps)), keys))
    return tuple(out)


def load_policy(path: str | Path) -> Policy:
    """Reads a policy file; a malformed one is a :class:`UserError` naming what is wrong."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read trust policy {p}: {e.strerror}") from None
    try:
        if p.suffix == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
    except Exception as e:  # yaml and json raise their own error types
        raise UserError(f"trust policy {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"trust policy {p} must be a mapping with 'identities' (and optionally 'require_schemes')")
    unknown = set(data) - {"identities", "require_schemes", "logs", "witnesses", "min_witnesses"}
    if unknown:
        raise UserError(f"trust policy {p}: unknown field(s) {sorted(unknown)}")
    base = p.parent
    identities = _principals(data.get("identities"), base, "identities")
    if not identities:
        raise UserError(f"trust policy {p} trusts nobody: list at least one entry under 'identities'")
    schemes = tuple(data.get("require_schemes") or ())
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        raise UserError(f"trust policy {p}: unknown scheme(s) {bad}; known: {', '.join(SCHEMES)}")
    operators = None
    if data.get("logs") is not None:
        operators = frozenset().union(*(_keys((e or {}).get("keys"), base, f"logs[{n}]")[0]
                                        for n, e in enumerate(data["logs"])))
    witnesses = _principals(data.get("witnesses"), base, "witnesses")
    missing = [w.identity for w in witnesses if not w.keys]
    if missing:
        raise UserError(f"trust policy {p}: witnesses {missing} need their public-key files, not only fingerprints")
    k = data.get("min_witnesses", 1 if witnesses else 0)
    if not isinstance(k, int) or not 0 <= k <= len(witnesses):
        raise UserError(f"trust policy {p}: min_witnesses must be between 0 and the number of witnesses listed")
    return Policy(identities, schemes, operators, witnesses, k, str(p.resolve()), hashlib.sha256(raw).hexdigest())
