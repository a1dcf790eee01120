"""FRI (Ben-Sasson, Bentov, Horesh, Riabzev, "Fast Reed–Solomon Interactive Oracle Proofs of Proximity", ICALP
2018): a proof that a codeword on the LDE coset is close to a polynomial of degree < N.

Each round folds by ``params.fold`` with one challenge beta (g(y) = sum_s beta^s f_s(y) for f(X) =
sum_s X^s f_s(X^fold), done as log2(fold) binary folds with beta, beta^2, beta^4, ...) and commits the result
(leaf j holding the coset j + t M/fold, unsalted: the FRI input is uniformly random, see docs/proofs.md); once the
degree bound reaches ``final_degree`` the polynomial is sent as coefficients. The verifier folds every queried
coset itself and compares with the next layer's opening, and finally with the sent polynomial.
"""

from __future__ import annotations

import numpy as np

from . import field as F
from . import merkle, ntt
from .merkle import MerkleTree
from .params import Params, fri_rounds
from .proofio import InvalidProof, Reader, Writer
from .transcript import Transcript


def fold2(f: np.ndarray, beta: np.ndarray, offset: int) -> np.ndarray:
    """One binary fold of f (s, 4) on offset * <w_s>: g(x^2) = (f(x) + f(-x))/2 + beta (f(x) - f(-x))/(2x),
    where -x_k = x_(k + s/2)."""
    s = len(f)
    half = s // 2
    a, b = f[:half], f[half:]
    inv2 = (F.P + 1) // 2
    w_inv = pow(F.root_of_unity(s), F.P - 2, F.P)
    inv2x = F.mul(F.powers(w_inv, half), np.uint64(inv2 * pow(offset, F.P - 2, F.P) % F.P))
    even = F.mul(F.add(a, b), np.uint64(inv2))
    odd = F.ext_scale(F.sub(a, b), inv2x)
    return F.add(even, F.ext_mul(odd, beta))


def fold(f: np.ndarray, beta: np.ndarray, offset: int, factor: int) -> tuple[np.ndarray, int]:
    b = beta
    while factor > 1:
        f = fold2(f, b, offset)
        offset = offset * offset % F.P
        b = F.ext_mul(b, b)
        factor //= 2
    return f, offset


def rows(f: np.ndarray, fo: int) -> np.ndarray:
    s = len(f)
    return f.reshape(fo, s // fo, 4).transpose(1, 0, 2).reshape(s // fo, fo * 4)


def commit(f: np.ndarray, N: int, params: Params, ts: Transcript) -> tuple[list[MerkleTree], np.ndarray]:
    """Fold f (M, 4) on GENERATOR * <w_M> round by round, absorbing each layer root and the final coefficients."""
    layers, offset = [], F.GENERATOR
    rounds = fri_rounds(N, params)
    for i in range(rounds):
        f, offset = fold(f, ts.ext(), offset, params.fold)
        if i < rounds - 1:
            tree = MerkleTree(rows(f, params.fold), None, params.hash)
            layers.append(tree)
            ts.absorb(tree.root)
    final = ntt.coset_interpolate(f.T, offset)[:, :N // params.fold ** rounds].T.copy()
    ts.absorb(final.astype("<u4").tobytes())
    return layers, final


def write_commitments(out: Writer, layers: list[MerkleTree], final: np.ndarray) -> None:
    for tree in layers:
        out.raw(tree.root)
    out.elems(final)


def read_commitments(r: Reader, N: int, params: Params) -> tuple[list[bytes], np.ndarray]:
    rounds = fri_rounds(N, params)
    roots = [r.raw(32) for _ in range(rounds - 1)]
    return roots, r.elems((N // params.fold ** rounds, 4))


def replay(ts: Transcript, roots: list[bytes], final: np.ndarray) -> list[np.ndarray]:
    """The verifier's side of ``commit``: the fold challenges."""
    betas = []
    for i in range(len(roots) + 1):
        betas.append(ts.ext())
        if i < len(roots):
            ts.absorb(roots[i])
    ts.absorb(final.astype("<u4").tobytes())
    return betas


def write_openings(out: Writer, layers: list[MerkleTree], idx: list[int], M: int, fo: int) -> None:
    size = M // fo
    for tree in layers:
        size //= fo
        idx = sorted({i % size for i in idx})
        for i in idx:
            out.elems(tree.rows[i])
        nodes = tree.open(idx)
        out.u64(len(nodes))
        out.raw(b"".join(nodes))


def read_nodes(r: Reader) -> list[bytes]:
    count = r.u64()
    if count > 1 << 20:
        raise InvalidProof("too many Merkle nodes")
    raw = r.raw(32 * count)
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]


def _fold_cosets(vals: np.ndarray, offsets: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Fold every row of vals (Q, s, 4), the values on offsets_q * <w_s>, down to one value per row."""
    b = beta
    inv2 = np.uint64((F.P + 1) // 2)
    while vals.shape[1] > 1:
        s = vals.shape[1]
        h = s // 2
        a, c = vals[:, :h], vals[:, h:]
        w_inv = pow(F.root_of_unity(s), F.P - 2, F.P)
        inv2x = F.mul(F.mul(F.batch_inv(offsets)[:, None], F.powers(w_inv, h)[None, :]), inv2)
        odd = F.ext_scale(F.sub(a, c), inv2x)
        vals = F.add(F.mul(F.add(a, c), inv2), F.ext_mul(odd, b))
        offsets = F.mul(offsets, offsets)
        b = F.ext_mul(b, b)
    return vals[:, 0]


def check(vals: np.ndarray, cosets: np.ndarray, roots: list[bytes], betas: list[np.ndarray], final: np.ndarray,
          r: Reader, M: int, params: Params) -> None:
    """Check the queried layer-0 cosets ``vals`` (Q, fold, 4) at leaf indices ``cosets`` (sorted, unique) through
    every layer, reading the layer openings from r; raise InvalidProof on the first failure."""
    fo = params.fold
    size, offset, cur = M, F.GENERATOR, np.asarray(cosets, dtype=np.int64)
    for layer, beta in enumerate(betas):
        x = F.mul(F.powers_at(F.root_of_unity(size), cur), np.uint64(offset))
        folded = _fold_cosets(vals, x, beta)
        size //= fo
        offset = pow(offset, fo, F.P)
        if layer < len(roots):
            leaves_n = size // fo
            nxt = np.array(sorted({int(c) % leaves_n for c in cur}), dtype=np.int64)
            lv = [r.elems((fo * 4,)) for _ in nxt]
            if not merkle.verify(roots[layer], leaves_n.bit_length() - 1, [int(c) for c in nxt],
                                 [b"\x00" + v.astype("<u4").tobytes() for v in lv], read_nodes(r), params.hash):
                raise InvalidProof(f"a FRI layer {layer + 1} opening does not match its root")
            table = {int(c): v.reshape(fo, 4) for c, v in zip(nxt, lv)}
            got = np.stack([table[int(c) % leaves_n][int(c) // leaves_n] for c in cur])
            if not np.array_equal(got, folded):
                raise InvalidProof(f"FRI layer {layer + 1} is not the fold of layer {layer}")
            vals, cur = np.stack([table[int(c)] for c in nxt]), nxt
        else:
            x = F.mul(F.powers_at(F.root_of_unity(size), cur), np.uint64(offset))
            acc = np.zeros((len(cur), 4), dtype=np.uint64)
            for c in final[::-1]:
                acc = F.add(F.ext_scale(acc, x), c)
            if not np.array_equal(acc, folded):
                raise InvalidProof("the last FRI layer is not the sent low-degree polynomial")
