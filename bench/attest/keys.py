"""Signing identities: a keys folder holds one identity (a name or e-mail) and its keys, one per scheme.

Layout of a keys folder (default ``<config>/keys``, see :func:`.dsse.config_home`)::

    identity.json                         {"identity": "alice@example.org"}
    ed25519.key / ed25519.pub             PKCS#8 / SubjectPublicKeyInfo PEM (see :mod:`.dsse`)
    slh-dsa-sha2-128f.key / .pub          the post-quantum key, when the identity has one

A key's fingerprint is its key id: the lowercase hex sha256 of its DER SubjectPublicKeyInfo. The identity is bound
into what is signed: every statement lists its signers as (scheme, key id, identity, public key), inside the signed
payload. The name is a claim, not a proof: a trust policy (:mod:`.policy`) is what says which keys speak for whom.

A folder without ``identity.json`` (keys made on first use by the ``attest`` callback before any ``shiftbench keys
create``) signs as an unnamed identity; ``verify`` reports it as such.

The transparency log's tree heads are signed by a log operator's key, never by a trial's: ``$SHIFTBENCH_LOG_KEYS``
names the operator's keys folder (e.g. a leaderboard host's), else ``<keys>/log-operator`` is used, made on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..io import read_json, write_json
from .dsse import ED25519, SCHEMES, PublicKey, SigningKey, keys_dir, load_signing_key, read_public_keys

IDENTITY_FILE = "identity.json"
UNNAMED = "(unnamed)"
_MAX_NAME = 200


@dataclass(frozen=True)
class Identity:
    """A named signer and its keys.

    Attributes:
        name: the identity (a name or e-mail), or :data:`UNNAMED`.
        keys: its signing keys, in the order asked for.
        directory: its keys folder.
    """

    name: str
    keys: tuple[SigningKey, ...]
    directory: Path


def check_name(name: str) -> str:
    """An identity must be one printable line (it goes into statements and signed notes)."""
    name = str(name).strip()
    if not name or len(name) > _MAX_NAME or any(not c.isprintable() for c in name) or "\n" in name:
        raise UserError(f"identity {name!r} must be one printable line of 1 to {_MAX_NAME} characters, "
                        "e.g. --identity alice@example.org")
    return name


def identity_name(directory: str | os.PathLike | None = None) -> str:
    """The identity of a keys folder (:data:`UNNAMED` when it has none)."""
    path = Path(directory or keys_dir()) / IDENTITY_FILE
    try:
        return check_name(read_json(path)["identity"])
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return UNNAMED


def create(name: str, schemes: Sequence[str] = (ED25519,), directory: str | os.PathLike | None = None) -> Identity:
    """Creates (or extends with new schemes) the identity of a keys folder.

    A folder keeps one identity: naming an existing one differently is refused, since its keys have signed as the
    old name already.
    """
    name = check_name(name)
    d = Path(directory or keys_dir())
    old = identity_name(d)
    if old != UNNAMED and old != name:
        raise UserError(f"{d} already holds identity {old!r}; use another folder (--dir) for {name!r}")
    for s in schemes:
        if s not in SCHEMES:
            raise UserError(f"unknown signature scheme {s!r}; known: {', '.join(SCHEMES)}")
    keys = tuple(load_signing_key(s, d) for s in dict.fromkeys(schemes))
    write_json(d / IDENTITY_FILE, {"identity": name})
    return Identity(name, keys, d)


def load(schemes: Sequence[str] = (ED25519,), directory: str | os.PathLike | None = None) -> Identity:
    """The identity of a keys folder with a key per scheme (keys are made on first use)."""
    d = Path(directory or keys_dir())
    return Identity(identity_name(d), tuple(load_signing_key(s, d) for s in dict.fromkeys(schemes)), d)


def public_keys(directory: str | os.PathLike | None = None) -> list[PublicKey]:
    """The public keys of a keys folder."""
    d = Path(directory or keys_dir())
    return [k for p in sorted(d.glob("*.pub")) for k in read_public_keys(p)] if d.is_dir() else []


def export_pem(directory: str | os.PathLike | None = None) -> str:
    """The folder's public keys as one PEM file, each block preceded by comment lines naming its identity, scheme
    and fingerprint (PEM readers, ours included, skip text outside the blocks)."""
    d = Path(directory or keys_dir())
    keys = public_keys(d)
    if not keys:
        raise UserError(f"{d} holds no keys; create them with: shiftbench keys create --identity NAME")
    name = identity_name(d)
    out = []
    for k in keys:
        out += [f"# identity: {name}", f"# scheme: {k.scheme}", f"# fingerprint: {k.keyid}", k.pem().decode()]
    return "\n".join(out)


def operator_dir() -> Path:
    """The log operator's keys folder: ``$SHIFTBENCH_LOG_KEYS``, else ``<keys>/log-operator``."""
    env = os.environ.get("SHIFTBENCH_LOG_KEYS")
    return Path(env).expanduser() if env else keys_dir() / "log-operator"


def log_operator() -> Identity:
    """The log operator's Ed25519 identity (signed notes are Ed25519), named after its owner on first use."""
    d = operator_dir()
    if identity_name(d) == UNNAMED and not os.environ.get("SHIFTBENCH_LOG_KEYS"):
        owner = identity_name(keys_dir())
        create(f"log operator of {owner}" if owner != UNNAMED else "local log operator", (ED25519,), d)
    return load((ED25519,), d)
