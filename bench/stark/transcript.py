"""Fiat–Shamir transcript: a SHA-256 hash chain that absorbs every public value and squeezes challenges.

Field challenges are drawn by rejection sampling 31-bit words (no bias); query indices are below a power of two,
so masking a 32-bit word is exact; grinding asks for ``bits`` leading zero bits of H(state || nonce).
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from . import field as F


class Transcript:
    def __init__(self, tag: bytes):
        self.state = hashlib.sha256(b"shiftbench-stark-transcript" + struct.pack("<I", len(tag)) + tag).digest()

    def absorb(self, data: bytes) -> None:
        self.state = hashlib.sha256(b"A" + self.state + struct.pack("<Q", len(data)) + data).digest()

    def _squeeze(self, n: int) -> bytes:
        out, ctr = b"", 0
        while len(out) < n:
            out += hashlib.sha256(b"S" + self.state + struct.pack("<Q", ctr)).digest()
            ctr += 1
        self.state = hashlib.sha256(b"N" + self.state).digest()
        return out[:n]

    def ext(self) -> np.ndarray:
        """A uniform element of F_p^4."""
        return F.sample_base(self._squeeze, 4)

    def indices(self, count: int, bound: int) -> list[int]:
        """``count`` uniform indices in [0, bound), bound a power of two, drawn with replacement."""
        words = np.frombuffer(self._squeeze(4 * count), dtype="<u4")
        return [int(w) & (bound - 1) for w in words]

    def pow_ok(self, nonce: int, bits: int) -> bool:
        d = hashlib.sha256(b"G" + self.state + struct.pack("<Q", nonce)).digest()
        return int.from_bytes(d[:8], "big") >> (64 - bits) == 0 if bits else True

    def grind(self, bits: int) -> int:
        """The smallest nonce whose hash with the state has ``bits`` leading zeros (2^bits tries on average)."""
        base = hashlib.sha256(b"G" + self.state)
        limit = 1 << (64 - bits)
        nonce = 0
        while True:
            h = base.copy()
            h.update(struct.pack("<Q", nonce))
            if int.from_bytes(h.digest()[:8], "big") < limit:
                return nonce
            nonce += 1
