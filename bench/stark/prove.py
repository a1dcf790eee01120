"""The prover: commit columns, build the trace, the composition polynomial, DEEP quotients and FRI, and write the
proof. Protocol (DEEP-ALI + FRI, as in ethSTARK (eprint 2021/582) and Ben-Sasson et al., "Scalable, transparent,
and post-quantum secure computational integrity" (eprint 2018/046)):

1. commit p (the submitter's predictions), l (the host's labels: the published label commitment) and the trace
   (e, v, S, and a random extension polynomial R of degree < N - 1 that masks the FRI input); absorb the roots;
2. alphas -> commit the composition Q = sum alpha_k C_k / Z_k as two blinded chunks Q = Q0 + X^N' Q1;
3. z (out of domain) -> send p, l, v at z and e, S at z, wz, w^2 z, Q0, Q1 at z;
4. gamma -> FRI on F = R + sum_k gamma^(k+1) (f_k(X) - f_k(y_k)) / (X - y_k), folding by ``fold`` with one
   challenge per layer; the last layer is sent as coefficients;
5. grinding, then q query cosets: every committed codeword is opened there and every layer checked.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from . import air, fri
from . import field as F
from . import ntt
from .merkle import MerkleTree
from .params import Layout, Params, layout
from .proofio import MAGIC, Writer
from .transcript import Transcript

DOMAIN_TAG = b"shiftbench/stark/accuracy/v1"
# (column, shift) pairs opened out of domain, in transcript order; columns 0..4 = p, l, e, v, S, 5/6 = Q0/Q1
DEEP_TERMS = [("p", 0), ("l", 0), ("v", 0), ("e", 0), ("e", 1), ("e", 2), ("S", 0), ("S", 1), ("S", 2),
              ("Q0", 0), ("Q1", 0)]


class Randomness:
    """The prover's random bytes: os.urandom, or a SHAKE-256 stream from ``seed`` (tests, and a label
    commitment's opening, which must be rebuilt identically for every proof it serves)."""

    def __init__(self, seed: bytes | None):
        self.seed, self.ctr = seed, 0

    def __call__(self, n: int) -> bytes:
        if self.seed is None:
            return os.urandom(n)
        self.ctr += 1
        return hashlib.shake_256(self.seed + struct.pack("<Q", self.ctr)).digest(n)

    def elems(self, count: int) -> np.ndarray:
        return F.sample_base(self, count)

    def salts(self, count: int, size: int) -> np.ndarray | None:
        return np.frombuffer(self(count * size), dtype=np.uint8).reshape(count, size) if size else None


def leaf_rows(lde: np.ndarray, fold: int) -> np.ndarray:
    """(cols, M) codewords -> (M/fold, fold*cols) leaf rows: leaf j holds positions j + t M/fold, t < fold (a coset
    of the fold-th roots of unity), point-major."""
    cols, m = lde.shape
    return lde.reshape(cols, fold, m // fold).transpose(2, 1, 0).reshape(m // fold, fold * cols)


@dataclass
class Committed:
    """Codewords on the LDE domain, their polynomial coefficients and their Merkle tree."""

    coeffs: np.ndarray
    lde: np.ndarray
    tree: MerkleTree
    params: Params | None = None

    @property
    def root(self) -> bytes:
        return self.tree.root


def _commit(coeffs: np.ndarray, params: Params, rng: Randomness, salted: bool = True) -> Committed:
    lde = ntt.coset_lde(coeffs, coeffs.shape[-1] * params.blowup)
    rows = leaf_rows(lde, params.fold)
    salts = rng.salts(len(rows), params.salt_bytes) if salted else None
    return Committed(coeffs, lde, MerkleTree(rows, salts, params.hash))


def commit_column(values, params: Params, seed: bytes | None = None) -> tuple[Layout, Committed]:
    """Commit a prediction or label vector (ints in [0, p)): its masked column, LDE and salted tree. The same
    (values, params, seed) always give the same root, so a published commitment can be reopened by its owner."""
    values = np.asarray(values, dtype=np.int64)
    if values.ndim != 1 or (values < 0).any() or (values >= F.P).any():
        raise ValueError("values must be a 1-d vector of integers in [0, p)")
    lay = layout(len(values), params)
    rng = Randomness(seed)
    col = air.column(values.astype(np.uint64), lay, rng.elems(lay.K))
    com = _commit(ntt.intt(col)[None, :], params, rng)
    com.params = params
    return lay, com


def statement_bytes(params: Params, lay: Layout, C: int, context: bytes, label_root: bytes, label_context: bytes,
                    pred_root: bytes) -> bytes:
    w = Writer()
    w.raw(MAGIC)
    w.blob(params.encode())
    w.raw(lay.encode())
    w.u64(C)
    w.blob(context)
    w.raw(label_root)
    w.blob(label_context)
    w.raw(pred_root)
    return w.getvalue()


def _eval_many(coeffs: np.ndarray, zpow: np.ndarray) -> np.ndarray:
    """sum_i c_i z^i for base coefficient rows (k, N) against precomputed powers (N, 4): reduced products summed
    in uint64 (N < 2^33 terms below p fit), then reduced once."""
    out = np.zeros((coeffs.shape[0], 4), dtype=np.uint64)
    for r, c in enumerate(coeffs):
        for limb in range(4):
            out[r, limb] = int(np.sum(F.mul(c, zpow[:, limb]), dtype=np.uint64)) % F.P
    return out


def _eval_ext(coeffs: np.ndarray, zpow: np.ndarray) -> np.ndarray:
    """sum_i c_i z^i for extension coefficients (4, N) (limb-major)."""
    prods = F.ext_mul(coeffs.T, zpow)
    return np.array([int(np.sum(prods[:, k], dtype=np.uint64)) % F.P for k in range(4)], dtype=np.uint64)


def inv_x_minus(xs: np.ndarray, z: np.ndarray) -> np.ndarray:
    """1/(x - z) for base points xs and one extension point z, with one base batch inversion: the minimal
    polynomial m(X) = prod_k (X - z^(p^k)) has base coefficients and 1/(x - z) = (m(x)/(x - z)) / m(x)."""
    conj = [F.frobenius(z, k) for k in range(4)]
    poly = [F.ext(np.uint64(1))]  # coefficients of prod (X - conj_k), low degree first
    for c in conj:
        nxt = [np.zeros(4, dtype=np.uint64) for _ in range(len(poly) + 1)]
        for i, a in enumerate(poly):
            nxt[i + 1] = F.ext_add(nxt[i + 1], a)
            nxt[i] = F.ext_sub(nxt[i], F.ext_mul(a, c))
        poly = nxt
    m = [int(c[0]) for c in poly]  # the other limbs are 0
    # synthetic division m(X) / (X - z) = X^3 + b2 X^2 + b1 X + b0
    b2 = F.ext_add(F.ext(np.uint64(m[3])), z)
    b1 = F.ext_add(F.ext(np.uint64(m[2])), F.ext_mul(z, b2))
    b0 = F.ext_add(F.ext(np.uint64(m[1])), F.ext_mul(z, b1))
    x2 = F.mul(xs, xs)
    x3 = F.mul(x2, xs)
    q = F.add(F.add(F.ext_scale(b2, x2), F.ext_scale(b1, xs)), b0)
    q[:, 0] = F.add(q[:, 0], x3)
    full = F.add(F.mul(F.add(F.mul(F.add(F.mul(F.add(xs, np.uint64(m[3])), xs), np.uint64(m[2])), xs),
                             np.uint64(m[1])), xs), np.uint64(m[0]))
    return F.ext_scale(q, F.batch_inv(full))


def prove(pred: tuple[Layout, Committed], label: tuple[Layout, Committed], params: Params, C: int | None = None,
          context: bytes = b"", label_context: bytes = b"", seed: bytes | None = None,
          trace_override=None, tamper_cosets=None) -> bytes:
    """A proof that C = #{i < n : pred_i = label_i} for the committed columns (``commit_column``).

    ``C`` defaults to the true count; tests pass a wrong C, or ``trace_override`` (a function editing the
    (5, N) trace p, l, e, v, S before it is committed), or ``tamper_cosets`` (leaf indices where the committed S
    codeword is off by one while everything else follows the true polynomials: a cheater whose trace codeword is
    that far from any low-degree one), to check that cheating proofs fail."""
    lay, pc = pred
    lay_l, lc = label
    if lay != lay_l:
        raise ValueError(f"prediction layout {lay} differs from the label commitment's {lay_l}")
    if pc.params != params or lc.params != params:
        raise ValueError("a commitment was made with other parameters than the proof's")
    rng = Randomness(seed)
    N, M, Fo = lay.N, lay.N * params.blowup, params.fold
    p_col, l_col = ntt.ntt(pc.coeffs[0]), ntt.ntt(lc.coeffs[0])
    if C is None:
        C = air.count(p_col.reshape(lay.K, lay.D)[:, :-1].reshape(-1), l_col.reshape(lay.K, lay.D)[:, :-1].reshape(-1),
                      lay.n)
    trace = air.witness(p_col, l_col, lay, rng.elems(3 * lay.K).reshape(3, lay.K))
    if trace_override is not None:
        full = trace_override(np.concatenate([p_col[None], l_col[None], trace]))
        trace = full[2:]
        if not (np.array_equal(full[0], p_col) and np.array_equal(full[1], l_col)):
            pc = _commit(ntt.intt(full[0])[None], params, rng)
            lc = _commit(ntt.intt(full[1])[None], params, rng)
    r_coeffs = np.zeros((4, N), dtype=np.uint64)
    r_coeffs[:, :N - 1] = rng.elems(4 * (N - 1)).reshape(4, N - 1)
    tc = _commit(np.concatenate([ntt.intt(trace), r_coeffs]), params, rng)
    committed_tc = tc
    if tamper_cosets:
        bad = tc.lde.copy()
        pos = (np.asarray(sorted(tamper_cosets))[:, None] + np.arange(Fo)[None, :] * (M // Fo)).ravel()
        bad[2, pos] = F.add(bad[2, pos], np.uint64(1))
        committed_tc = Committed(tc.coeffs, bad, MerkleTree(leaf_rows(bad, Fo), tc.tree.salts, params.hash))

    ts = Transcript(DOMAIN_TAG)
    ts.absorb(statement_bytes(params, lay, C, context, lc.root, label_context, pc.root))
    ts.absorb(committed_tc.root)
    alphas = np.stack([ts.ext() for _ in range(6)])

    # composition on the size-2N sub-coset of the LDE domain (its degree is < 2N), then two blinded chunks
    step = params.blowup // 2
    cols = np.concatenate([pc.lde, lc.lde, tc.lde[:3]])[:, ::step]
    xs = F.mul(F.powers(F.root_of_unity(2 * N), 2 * N), np.uint64(F.GENERATOR))
    period = 2 * lay.D
    x_k = np.tile(F.pow_(xs[:period], lay.K), 2 * N // period)
    x_n = np.tile(F.pow_(xs[:2], N), N)
    q_vals = air.composition_lde(cols, xs, 2, lay, C, alphas, x_n, x_k)
    q_coeffs = ntt.coset_interpolate(q_vals.T)
    n_split = N - params.blinding()
    blind = rng.elems(4 * params.blinding()).reshape(4, -1)
    chunks = np.zeros((8, N), dtype=np.uint64)
    chunks[:4, :n_split] = q_coeffs[:, :n_split]
    chunks[:4, n_split:] = blind
    chunks[4:, :] = q_coeffs[:, n_split:n_split + N]
    chunks[4:, :blind.shape[1]] = F.sub(chunks[4:, :blind.shape[1]], blind)
    qc = _commit(chunks, params, rng)
    ts.absorb(qc.root)

    z = sample_ood(ts, lay, params)
    w = F.root_of_unity(N)
    zpow = F.ext_powers(z, N)
    base = np.concatenate([pc.coeffs, lc.coeffs, tc.coeffs[:3]])  # p, l, e, v, S
    names = ["p", "l", "e", "v", "S"]
    ood = {}
    for shift in range(3):
        scaled = F.mul(base, F.powers(pow(w, shift, F.P), N)) if shift else base
        vals = _eval_many(scaled if shift else base, zpow)
        for name, val in zip(names, vals):
            ood[name, shift] = val
    ood["Q0", 0] = _eval_ext(chunks[:4], zpow)
    ood["Q1", 0] = _eval_ext(chunks[4:], zpow)
    ood_arr = np.stack([ood[t] for t in DEEP_TERMS])
    ts.absorb(ood_arr.astype("<u4").tobytes())
    gamma = ts.ext()

    # DEEP: F = R + sum over points y of (sum_k gamma^k f_k(x) - sum_k gamma^k f_k(y)) / (x - y)
    lde_x = F.mul(F.powers(F.root_of_unity(M), M), np.uint64(F.GENERATOR))
    codewords = {"p": pc.lde[0], "l": lc.lde[0], "e": tc.lde[0], "v": tc.lde[1], "S": tc.lde[2]}
    fx = tc.lde[3:7].T.copy()  # R
    inv_z = inv_x_minus(lde_x, z)
    gpows = F.ext_powers(gamma, len(DEEP_TERMS) + 1)
    for shift in range(3):
        num = np.zeros((M, 4), dtype=np.uint64)
        const = np.zeros(4, dtype=np.uint64)
        for k, (name, sh) in enumerate(DEEP_TERMS):
            g = gpows[k + 1]
            if sh != shift:
                continue
            if name in ("Q0", "Q1"):
                lo = 0 if name == "Q0" else 4
                num = F.add(num, F.ext_mul(qc.lde[lo:lo + 4].T, np.broadcast_to(g, (M, 4))))
            else:
                num = F.add(num, F.ext_scale(np.broadcast_to(g, (M, 4)), codewords[name]))
            const = F.add(const, F.ext_mul(g, ood[name, sh]))
        inv = np.roll(inv_z, shift * params.blowup, axis=0)
        if shift:
            inv = F.mul(inv, np.uint64(pow(w, (F.P - 2) * shift, F.P)))
        fx = F.add(fx, F.ext_mul(F.sub(num, const), inv))

    layers, final = fri.commit(fx, N, params, ts)
    nonce = ts.grind(params.grinding)
    ts.absorb(struct.pack("<Q", nonce))
    queries = ts.indices(params.queries, M // Fo)

    out = Writer()
    out.raw(statement_bytes(params, lay, C, context, lc.root, label_context, pc.root))
    out.raw(committed_tc.root)
    out.raw(qc.root)
    out.elems(ood_arr)
    fri.write_commitments(out, layers, final)
    out.u64(nonce)
    idx = sorted(set(queries))
    for com in (pc, lc, committed_tc, qc):
        _write_opening(out, com.tree, idx, params)
    fri.write_openings(out, layers, idx, M, Fo)
    return out.getvalue()


def _write_opening(out: Writer, tree: MerkleTree, idx: list[int], params: Params, salted: bool = True) -> None:
    for i in idx:
        if salted and tree.salts is not None:
            out.raw(tree.salts[i].tobytes())
        out.elems(tree.rows[i])
    nodes = tree.open(idx)
    out.u64(len(nodes))
    out.raw(b"".join(nodes))


def sample_ood(ts: Transcript, lay: Layout, params: Params) -> np.ndarray:
    """z from the extension, redrawn while it lies in the trace domain or the LDE coset (probability ~2^-100)."""
    M = lay.N * params.blowup
    gm = pow(F.GENERATOR, M, F.P)
    while True:
        z = ts.ext()
        zn, zm = F.ext_pow(z, lay.N), F.ext_pow(z, M)
        if not (np.array_equal(zn, F.ext(np.uint64(1))) or np.array_equal(zm, F.ext(np.uint64(gm)))):
            return z
