"""The proof's byte format: little-endian, length-prefixed, read strictly (every field element canonical, every
length as expected, no trailing bytes), so that any change to a proof's bytes either fails to parse or changes a
value the verifier checks."""

from __future__ import annotations

import struct

import numpy as np

from . import field as F

MAGIC = b"SBSTARK1"


class InvalidProof(Exception):
    """The proof does not verify (or does not parse); the message says which check failed."""


class Writer:
    def __init__(self):
        self.parts: list[bytes] = []

    def u64(self, x: int):
        self.parts.append(struct.pack("<Q", x))

    def raw(self, b: bytes):
        self.parts.append(b)

    def blob(self, b: bytes):
        self.u64(len(b))
        self.parts.append(b)

    def elems(self, a: np.ndarray):
        self.parts.append(np.ascontiguousarray(a, dtype="<u4").tobytes())

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidProof("proof is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u64(self) -> int:
        return struct.unpack("<Q", self.raw(8))[0]

    def blob(self, limit: int = 1 << 16) -> bytes:
        n = self.u64()
        if n > limit:
            raise InvalidProof("proof field too long")
        return self.raw(n)

    def elems(self, shape) -> np.ndarray:
        count = int(np.prod(shape))
        a = np.frombuffer(self.raw(4 * count), dtype="<u4").astype(np.uint64).reshape(shape)
        if (a >= F.P).any():
            raise InvalidProof("non-canonical field element")
        return a

    def done(self):
        if self.pos != len(self.data):
            raise InvalidProof("trailing bytes after the proof")
