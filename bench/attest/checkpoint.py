"""Tree heads as C2SP checkpoints in signed notes, and witness cosignatures.

Formats (c2sp.org/tlog-checkpoint, c2sp.org/signed-note, c2sp.org/tlog-cosignature):

- checkpoint body: ``<origin>\\n<tree size, decimal>\\n<root hash, standard base64>\\n`` (no extension lines);
- signed note: the body, an empty line, then one line per signature, ``— <key name> <base64(key hash || sig)>``,
  the em dash U+2014 and a space first; the Ed25519 signature covers the body bytes, and the 4-byte key hash is
  ``SHA-256(key name || 0x0A || 0x01 || public key)[:4]``;
- cosignature/v1 (a witness's): the key hash uses type byte 0x04, the signed message is
  ``"cosignature/v1\\ntime <t>\\n" || body``, and the signature bytes are ``key hash || u64 t (big-endian) || sig``.

The operator's key name is the log's origin, ``shiftbench.local/<first 16 hex of the operator's key id>/<log name>``;
a witness signs under its own identity's name.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from dataclasses import dataclass, field

from .dsse import ED25519, PublicKey, SigningKey

DASH = "\u2014"
_ED25519_TYPE, _COSIG_TYPE = b"\x01", b"\x04"


@dataclass(frozen=True)
class Checkpoint:
    """A parsed checkpoint note.

    Attributes:
        origin: the log's name.
        size: tree size.
        root: root hash (32 bytes).
        text: the whole note, as stored.
        signatures: (key name, signature bytes) for every signature line.
    """

    origin: str
    size: int
    root: bytes
    text: str
    signatures: tuple[tuple[str, bytes], ...] = field(default=())

    @property
    def body(self) -> bytes:
        return body(self.origin, self.size, self.root)


def body(origin: str, size: int, root: bytes) -> bytes:
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n".encode("utf-8")


def key_hash(name: str, key: PublicKey, type_byte: bytes = _ED25519_TYPE) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + type_byte + key.raw).digest()[:4]


def _line(name: str, sig: bytes) -> str:
    return f"{DASH} {name} {base64.b64encode(sig).decode()}\n"


def sign(origin: str, size: int, root: bytes, key: SigningKey) -> str:
    """A checkpoint note signed by the operator's Ed25519 key, under the key name ``origin``."""
    if key.scheme != ED25519:
        raise ValueError("signed notes are Ed25519 here (C2SP signed-note algorithm 0x01)")
    b = body(origin, size, root)
    return b.decode("utf-8") + "\n" + _line(origin, key_hash(origin, key.public) + key.sign(b))


def parse(text: str) -> Checkpoint:
    """A checkpoint note's fields; raises ValueError on a malformed note."""
    if not isinstance(text, str) or "\n\n" not in text or not text.endswith("\n"):
        raise ValueError("not a signed note (body, empty line, signature lines)")
    head, sigs = text.split("\n\n", 1)
    lines = head.split("\n")
    if len(lines) < 3:
        raise ValueError("checkpoint body has fewer than three lines")
    origin, size, root_b64 = lines[:3]
    if not size.isdigit() or (size != "0" and size.startswith("0")):
        raise ValueError("checkpoint tree size is not a decimal number")
    root = base64.b64decode(root_b64, validate=True)
    if len(root) != 32 or base64.b64encode(root).decode() != root_b64:
        raise ValueError("checkpoint root hash is not 32 bytes of canonical base64")
    if len(lines) > 3:
        raise ValueError("checkpoint has extension lines this log does not write")
    parsed = []
    for line in sigs.split("\n")[:-1]:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise ValueError("malformed signature line")
        parsed.append((parts[1], base64.b64decode(parts[2], validate=True)))
    if not parsed:
        raise ValueError("signed note has no signature")
    return Checkpoint(origin, int(size), root, text, tuple(parsed))


def verify(cp: Checkpoint, operator: PublicKey) -> bool:
    """Whether the operator (key name = origin) signed the checkpoint."""
    want = key_hash(cp.origin, operator)
    return any(name == cp.origin and sig[:4] == want and operator.verify(cp.body, sig[4:])
               for name, sig in cp.signatures)


def cosign(cp: Checkpoint, name: str, key: SigningKey, timestamp: int | None = None) -> str:
    """The checkpoint note with a witness's cosignature/v1 line added."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    msg = f"cosignature/v1\ntime {t}\n".encode() + cp.body
    return cp.text + _line(name, key_hash(name, key.public, _COSIG_TYPE) + struct.pack(">Q", t) + key.sign(msg))


def cosigned_by(cp: Checkpoint, name: str, witness: PublicKey) -> int | None:
    """The time at which ``witness`` (under key name ``name``) cosigned the checkpoint, or None."""
    want = key_hash(name, witness, _COSIG_TYPE)
    for n, sig in cp.signatures:
        if n == name and len(sig) == 4 + 8 + 64 and sig[:4] == want:
            t = struct.unpack(">Q", sig[4:12])[0]
            if witness.verify(f"cosignature/v1\ntime {t}\n".encode() + cp.body, sig[12:]):
                return t
    return None
