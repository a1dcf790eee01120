"""DSSE envelopes (PAE encoding) signed with Ed25519 and/or SLH-DSA, and the user's signing keys.

DSSE v1 (github.com/secure-systems-lab/dsse, ``protocol.md``): the signature covers
``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with ASCII decimal lengths; the envelope is
``{"payload": b64(body), "payloadType": type, "signatures": [{"keyid", "sig": b64(sig)}]}``. The PAE is a few lines,
so it is written here rather than pulling in securesystemslib, whose key classes would need an SLH-DSA plug-in anyway.

Schemes:

- ``ed25519`` (RFC 8032) through ``cryptography``; public keys as SubjectPublicKeyInfo PEM.
- ``slh-dsa-sha2-128s`` / ``slh-dsa-sha2-128f``: SLH-DSA (FIPS 205, the hash-based standard derived from SPHINCS+),
  the *pure* interface with an empty context string, through the ``pqcrypto`` package. Keys are stored as
  SubjectPublicKeyInfo / PKCS#8 PEM under NIST's object identifiers (id-slh-dsa-sha2-128s = 2.16.840.1.101.3.4.3.20,
  -128f = ...21), so other FIPS 205 tools can read them.

A key's id is the sha256 of its DER SubjectPublicKeyInfo. Keys live in ``<config>/keys`` (see :func:`config_home`),
created on first use with mode 0600 for private keys, under a file lock so that concurrent workers create one key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UserError
from ..io import atomic_write
from .locking import file_lock

ED25519 = "ed25519"
SLH_DSA = "slh-dsa-sha2-128f"
"""The post-quantum default: the fast-signing set (about 12 ms to sign, under 1 ms to verify, 17,088-byte
signatures). A trial signs twice (its envelope and the log's tree head), and 128s's 0.23 s per signature would cost
about 4.5% of a quickstart trial; 128s (7,856-byte signatures) stays available by name."""
SLH_DSA_PARAMS = {"slh-dsa-sha2-128s": 20, "slh-dsa-sha2-128f": 21}
"""SLH-DSA parameter sets offered, with the last arc of their NIST OID 2.16.840.1.101.3.4.3.<arc>."""
SCHEMES = (ED25519, *SLH_DSA_PARAMS)
_ED25519_OID = bytes([0x2B, 0x65, 0x70])  # 1.3.101.112, RFC 8410
_NIST_SIG_OID = bytes([0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x03])  # 2.16.840.1.101.3.4.3
_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----\s*(.*?)\s*-----END \1-----", re.S)


def config_home() -> Path:
    """``$SHIFTBENCH_HOME``, else ``$XDG_CONFIG_HOME/shiftbench``, else ``~/.config/shiftbench``."""
    if os.environ.get("SHIFTBENCH_HOME"):
        return Path(os.environ["SHIFTBENCH_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "shiftbench"


def keys_dir() -> Path:
    return config_home() / "keys"


# ------------------------------------------------------------------------------------------------ PAE, base64


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: Any) -> bytes:
    """Base64 in either alphabet, with or without padding, as DSSE requires of verifiers (``protocol.md``: "Verifiers
    MUST accept either" the standard or the URL-safe alphabet, "with or without padding").

    The text must still re-encode to itself in the alphabet and padding style it uses: a flipped unused bit in the
    last character is a different envelope, not the same one, so no two texts decode to one payload per style.
    """
    if not isinstance(text, str):
        raise ValueError("not a base64 string")
    urlsafe = "-" in text or "_" in text
    if urlsafe and ("+" in text or "/" in text):
        raise ValueError("malformed base64 (mixes the standard and URL-safe alphabets)")
    bare = text.rstrip("=")
    padded = bare + "=" * (-len(bare) % 4)
    if text not in (bare, padded) or len(bare) % 4 == 1:
        raise ValueError("malformed base64")
    try:
        std = padded.translate(str.maketrans("-_", "+/")) if urlsafe else padded
        data = base64.b64decode(std, validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError("malformed base64") from None
    again = b64encode(data)
    if urlsafe:
        again = again.translate(str.maketrans("+/", "-_"))
    if again.rstrip("=") != bare:
        raise ValueError("non-canonical base64")
    return data


# ------------------------------------------------------------------------------------------------ tiny DER


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 128 else (bytes([0x81, n]) if n < 256 else bytes([0x82, n >> 8, n & 0xFF]))
    return bytes([tag]) + length + body


def _der_read(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """(tag, body, next position) of the TLV at ``pos``."""
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n, pos = int.from_bytes(data[pos : pos + k], "big"), pos + k
    if pos + n > len(data):
        raise ValueError("truncated DER")
    return tag, data[pos : pos + n], pos + n


def _der_items(body: bytes) -> list[tuple[int, bytes]]:
    items, pos = [], 0
    while pos < len(body):
        tag, value, pos = _der_read(body, pos)
        items.append((tag, value))
    return items


def _slh_oid(scheme: str) -> bytes:
    return _der(0x06, _NIST_SIG_OID + bytes([SLH_DSA_PARAMS[scheme]]))


def _slh_scheme(oid_der: bytes) -> str | None:
    return next((s for s in SLH_DSA_PARAMS if _slh_oid(s) == oid_der), None)


def _pem(label: str, der: bytes) -> bytes:
    text = b64encode(der)
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return ("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n").encode("ascii")


# ------------------------------------------------------------------------------------------------ keys


def _pq(scheme: str):
    try:
        import importlib

        return importlib.import_module("pqcrypto.sign." + scheme.replace("-", "_"))
    except ImportError:
        raise UserError(f"{scheme} needs the pqcrypto package: pip install 'pqcrypto>=1.0'") from None


@dataclass(frozen=True)
class PublicKey:
    """A verification key.

    Attributes:
        scheme: one of :data:`SCHEMES`.
        raw: the raw public key bytes.
    """

    scheme: str
    raw: bytes

    @property
    def spki(self) -> bytes:
        """DER SubjectPublicKeyInfo."""
        if self.scheme == ED25519:
            alg = _der(0x30, _der(0x06, _ED25519_OID))  # id-Ed25519, RFC 8410
        else:
            alg = _der(0x30, _slh_oid(self.scheme))
        return _der(0x30, alg + _der(0x03, b"\x00" + self.raw))

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.spki).hexdigest()

    def pem(self) -> bytes:
        return _pem("PUBLIC KEY", self.spki)

    def verify(self, message: bytes, signature: bytes) -> bool:
        if self.scheme == ED25519:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            try:
                Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
                return True
            except (InvalidSignature, ValueError):
                return False
        try:
            _pq(self.scheme).verify(self.raw, message, signature, b"")  # FIPS 205 pure, empty context
            return True
        except UserError:
            raise
        except Exception:  # pqcrypto raises its own error type for a bad signature or a malformed one
            return False

    @classmethod
    def from_spki(cls, der: bytes) -> "PublicKey":
        tag, body, _ = _der_read(der)
        (atag, alg), (btag, bits) = _der_items(body)
        oid = _der_items(alg)[0]
        if oid == (0x06, _ED25519_OID):
            return cls(ED25519, bits[1:])
        scheme = _slh_scheme(_der(*oid))
        if scheme is None:
            raise ValueError("unsupported public key algorithm (expected Ed25519 or SLH-DSA-SHA2-128s/f)")
        return cls(scheme, bits[1:])


@dataclass(frozen=True)
class SigningKey:
    """A private key and its public half."""

    public: PublicKey
    secret: bytes

    @property
    def scheme(self) -> str:
        return self.public.scheme

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        if self.scheme == ED25519:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            return Ed25519PrivateKey.from_private_bytes(self.secret).sign(message)
        return _pq(self.scheme).sign(self.secret, message, b"")

    @classmethod
    def generate(cls, scheme: str) -> "SigningKey":
        if scheme == ED25519:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            sk = Ed25519PrivateKey.generate()
            raw = serialization.Encoding.Raw
            return cls(PublicKey(ED25519, sk.public_key().public_bytes(raw, serialization.PublicFormat.Raw)),
                       sk.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))
        if scheme not in SLH_DSA_PARAMS:
            raise UserError(f"unknown signature scheme {scheme!r}; known: {', '.join(SCHEMES)}")
        pk, sk = _pq(scheme).keygen()
        return cls(PublicKey(scheme, bytes(pk)), bytes(sk))

    def pkcs8(self) -> bytes:
        """PEM PKCS#8; Ed25519 wraps its seed in an OCTET STRING (RFC 8410), SLH-DSA stores the raw key."""
        if self.scheme == ED25519:
            alg, key = _der(0x30, _der(0x06, _ED25519_OID)), _der(0x04, _der(0x04, self.secret))
        else:
            alg, key = _der(0x30, _slh_oid(self.scheme)), _der(0x04, self.secret)
        return _pem("PRIVATE KEY", _der(0x30, _der(0x02, b"\x00") + alg + key))

    @classmethod
    def from_pkcs8(cls, pem: bytes, public: PublicKey) -> "SigningKey":
        blocks = [(label, der) for label, der in _pem_blocks(pem) if label == b"PRIVATE KEY"]
        if not blocks:
            raise ValueError("no PRIVATE KEY block")
        _, body, _ = _der_read(blocks[0][1])
        items = _der_items(body)
        octets = items[2][1]
        secret = _der_items(octets)[0][1] if public.scheme == ED25519 else octets
        return cls(public, secret)


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(m.group(1), base64.b64decode(b"".join(m.group(2).split()))) for m in _PEM.finditer(data)]


def read_public_keys(path: str | os.PathLike) -> list[PublicKey]:
    """Every ``PUBLIC KEY`` PEM block of a file (one file may hold an Ed25519 and an SLH-DSA key)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read public key file {p}: {e.strerror}") from None
    keys = []
    for label, der in _pem_blocks(data):
        if label == b"PUBLIC KEY":
            try:
                keys.append(PublicKey.from_spki(der))
            except (ValueError, IndexError) as e:
                raise UserError(f"{p}: {e}") from None
    if not keys:
        raise UserError(f"{p} holds no PEM 'PUBLIC KEY' block; pass the .pub file from the signer's keys folder")
    return keys


def load_signing_key(scheme: str = ED25519, directory: str | os.PathLike | None = None) -> SigningKey:
    """The user's key for ``scheme``, generated on first use (private key mode 0600, folder mode 0700)."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown signature scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    d = Path(directory) if directory else keys_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    priv, pub = d / f"{scheme}.key", d / f"{scheme}.pub"
    with file_lock(d / ".lock"):
        if not priv.exists():
            key = SigningKey.generate(scheme)
            pem = key.pkcs8()
            atomic_write(priv, lambda f: f.write(pem), mode="wb")  # mkstemp's file is 0600 from its creation
            pub.write_bytes(key.public.pem())
            return key
    if priv.stat().st_mode & 0o077:
        raise UserError(f"{priv} is readable by other users; run: chmod 600 {priv}")
    public = read_public_keys(pub)[0]
    return SigningKey.from_pkcs8(priv.read_bytes(), public)


def local_public_keys(directory: str | os.PathLike | None = None) -> list[PublicKey]:
    """Every public key in the user's keys folder."""
    d = Path(directory) if directory else keys_dir()
    return [k for p in sorted(d.glob("*.pub")) for k in read_public_keys(p)] if d.is_dir() else []


# ------------------------------------------------------------------------------------------------ envelopes


def sign_envelope(payload_type: str, payload: bytes, keys: Sequence[SigningKey]) -> dict[str, Any]:
    """A DSSE envelope over ``payload`` with one signature per key."""
    message = pae(payload_type, payload)
    return {
        "payload": b64encode(payload),
        "payloadType": payload_type,
        "signatures": [{"keyid": k.keyid, "sig": b64encode(k.sign(message))} for k in keys],
    }


def envelope_bytes(envelope: Mapping[str, Any]) -> bytes:
    """The canonical file form of an envelope (sorted keys, no spaces, trailing newline)."""
    return (json.dumps(envelope, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


def verify_envelope(envelope: Any, trusted: Iterable[PublicKey], required: Iterable[str] = (),
                    payload_type: str | None = None) -> tuple[bytes | None, list[str]]:
    """Checks an envelope's signatures.

    Every signature must verify under a trusted key with its keyid, there must be at least one, and every keyid in
    ``required`` must have signed (so a dual-signed envelope stripped of one signature fails).

    Returns:
        (payload, failures): the payload when the envelope is well-formed, and one line per failed check.
    """
    if not isinstance(envelope, Mapping) or not isinstance(envelope.get("signatures"), list):
        return None, ["envelope is not a DSSE envelope (payload, payloadType, signatures)"]
    try:
        payload = b64decode_strict(envelope.get("payload"))
    except ValueError as e:
        return None, [f"envelope payload: {e}"]
    ptype = envelope.get("payloadType")
    if not isinstance(ptype, str) or (payload_type is not None and ptype != payload_type):
        return payload, [f"envelope payloadType is {ptype!r}, expected {payload_type!r}"]
    keys = {k.keyid: k for k in trusted}
    message = pae(ptype, payload)
    failures, good = [], set()
    if not envelope["signatures"]:
        failures.append("envelope has no signature")
    for i, s in enumerate(envelope["signatures"]):
        keyid = s.get("keyid") if isinstance(s, Mapping) else None
        key = keys.get(keyid) if isinstance(keyid, str) else None
        if key is None:
            failures.append(f"signature {i}: key {str(keyid)[:16]} is not trusted "
                            "(give its public key with --public-key)")
            continue
        try:
            sig = b64decode_strict(s.get("sig"))
        except ValueError as e:
            failures.append(f"signature {i} ({key.scheme}): {e}")
            continue
        if key.verify(message, sig):
            good.add(keyid)
        else:
            failures.append(f"signature {i} ({key.scheme}, key {keyid[:16]}) does not verify")
    for keyid in required:
        if keyid not in good and not any(str(keyid)[:16] in f for f in failures):
            failures.append(f"required signature by key {str(keyid)[:16]} is missing")
    return payload, failures
