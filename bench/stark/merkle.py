"""Merkle commitments over rows of field elements, with salted leaves and batched (deduplicated) openings.

A leaf is H(0x00 || salt || row bytes) and a node H(0x01 || left || right): the prefixes keep a leaf from posing as
a node (second-preimage separation). The salt is random per leaf and revealed only with an opened leaf, so the
root and the sibling hashes of a proof say nothing about unopened rows (the hiding half of item 4). Openings for
several leaves share their paths: a node is sent only when the verifier cannot compute it.
"""

from __future__ import annotations

import hashlib

import numpy as np

DIGEST = 32


def _hash_rows(buf: np.ndarray, algo: str) -> np.ndarray:
    """Hash every row of a (count, width) uint8 array; one hashlib call per row (hashlib releases nothing faster)."""
    h = getattr(hashlib, algo)
    width = buf.shape[1]
    mv = memoryview(np.ascontiguousarray(buf)).cast("B")
    out = b"".join([h(mv[i:i + width]).digest() for i in range(0, len(mv), width)])
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, DIGEST)


def leaf_bytes(rows: np.ndarray, salts: np.ndarray | None) -> np.ndarray:
    """(count, k) canonical field elements (+ (count, s) salt bytes) -> (count, 1 + s + 4k) leaf preimages."""
    rows = np.ascontiguousarray(rows.astype("<u4")).view(np.uint8).reshape(len(rows), -1)
    parts = [np.zeros((len(rows), 1), dtype=np.uint8)]
    if salts is not None:
        parts.append(salts)
    parts.append(rows)
    return np.concatenate(parts, axis=1)


class MerkleTree:
    """A tree over ``rows`` (count a power of two): levels[0] the leaf hashes, levels[-1] the root."""

    def __init__(self, rows: np.ndarray, salts: np.ndarray | None, algo: str = "sha256"):
        self.algo = algo
        self.rows, self.salts = rows, salts
        level = _hash_rows(leaf_bytes(rows, salts), algo)
        self.levels = [level]
        while len(level) > 1:
            pairs = np.concatenate([np.ones((len(level) // 2, 1), dtype=np.uint8),
                                    level.reshape(-1, 2 * DIGEST)], axis=1)
            level = _hash_rows(pairs, algo)
            self.levels.append(level)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0].tobytes()

    def open(self, indices: list[int]) -> list[bytes]:
        """Sibling nodes that the verifier of leaves ``indices`` (sorted, unique) cannot compute, level by level."""
        nodes, known = [], list(indices)
        for level in self.levels[:-1]:
            have = set(known)
            for i in known:
                if i ^ 1 not in have:
                    nodes.append(level[i ^ 1].tobytes())
            known = sorted({i >> 1 for i in known})
        return nodes


def node_hash(left: bytes, right: bytes, algo: str) -> bytes:
    return getattr(hashlib, algo)(b"\x01" + left + right).digest()


def verify(root: bytes, depth: int, indices: list[int], leaves: list[bytes], nodes: list[bytes], algo: str) -> bool:
    """Check that the leaf preimages ``leaves`` sit at ``indices`` (sorted, unique) under ``root``; every sent node
    must be used."""
    h = getattr(hashlib, algo)
    cur = {i: h(leaf).digest() for i, leaf in zip(indices, leaves)}
    it = iter(nodes)
    try:
        for _ in range(depth):
            nxt = {}
            for i in sorted(cur):
                if i & 1 and i ^ 1 in cur:
                    continue
                left, right = (cur[i], cur[i ^ 1]) if i ^ 1 in cur else ((cur[i], next(it)) if not i & 1
                                                                            else (next(it), cur[i]))
                nxt[i >> 1] = node_hash(left, right, algo)
            cur = nxt
    except StopIteration:
        return False
    if next(it, None) is not None:
        return False
    return list(cur) == [0] and cur[0] == root
