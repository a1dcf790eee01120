"""The verifier: replay the transcript, check the out-of-domain composition identity, the proof of work, every
Merkle opening and every FRI fold. It needs no labels and no predictions, only the proof (and, to pin the labels,
the published label commitment root)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from . import air
from . import field as F
from . import merkle
from .params import Params, fri_rounds, layout
from .proofio import MAGIC, InvalidProof, Reader
from .prove import DEEP_TERMS, DOMAIN_TAG, sample_ood
from .transcript import Transcript

WIDTHS = (1, 1, 7, 8)  # columns per leaf point: predictions, labels, trace (e, v, S, R0..R3), chunks (Q0, Q1)


@dataclass(frozen=True)
class Statement:
    """What a verified proof establishes."""

    n: int
    correct: int
    context: bytes
    label_root: bytes
    label_context: bytes
    pred_root: bytes
    params: Params

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


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


def verify(proof: bytes, label_root: bytes | None = None) -> Statement:
    """Verify a proof; return its statement or raise InvalidProof naming the failed check. With ``label_root``,
    also require that the proof is about those committed labels."""
    r = Reader(proof)
    if r.raw(len(MAGIC)) != MAGIC:
        raise InvalidProof("not a shiftbench STARK proof (bad magic)")
    raw_params = r.blob()
    try:
        params = Params.decode(raw_params)
    except Exception:
        raise InvalidProof("unreadable parameters") from None
    if params.encode() != raw_params:
        raise InvalidProof("parameters not canonically encoded")
    n, N, D = struct.unpack("<QQQ", r.raw(24))
    if n < 1 or n > 1 << 27:
        raise InvalidProof("bad n")
    lay = layout(n, params)
    if (lay.N, lay.D) != (N, D):
        raise InvalidProof("trace layout does not match n and the parameters")
    C = r.u64()
    context = r.blob()
    l_root = r.raw(32)
    label_context = r.blob()
    p_root = r.raw(32)
    statement = r.data[:r.pos]
    if C > n:
        raise InvalidProof("claimed count exceeds n")
    if label_root is not None and l_root != label_root:
        raise InvalidProof("proof is about other labels than the given label commitment")
    t_root, q_root = r.raw(32), r.raw(32)
    ood_arr = r.elems((len(DEEP_TERMS), 4))
    rounds = fri_rounds(N, params)
    layer_roots = [r.raw(32) for _ in range(rounds - 1)]
    fo, M = params.fold, N * params.blowup
    d_final = N // fo ** rounds
    final = r.elems((d_final, 4))
    nonce = r.u64()

    ts = Transcript(DOMAIN_TAG)
    ts.absorb(statement)
    ts.absorb(t_root)
    alphas = np.stack([ts.ext() for _ in range(6)])
    ts.absorb(q_root)
    z = sample_ood(ts, lay, params)
    ts.absorb(ood_arr.astype("<u4").tobytes())
    ood = {t: ood_arr[k] for k, t in enumerate(DEEP_TERMS)}
    gamma = ts.ext()
    betas = []
    for i in range(rounds):
        betas.append(ts.ext())
        if i < rounds - 1:
            ts.absorb(layer_roots[i])
    ts.absorb(final.astype("<u4").tobytes())
    if not ts.pow_ok(nonce, params.grinding):
        raise InvalidProof("proof of work does not hold")
    ts.absorb(struct.pack("<Q", nonce))
    queries = ts.indices(params.queries, M // fo)

    # the constraints at z, from the claimed values, against the committed composition chunks
    n_split = N - params.blinding()
    q_z = F.ext_add(ood["Q0", 0], F.ext_mul(F.ext_pow(z, n_split), ood["Q1", 0]))
    if not np.array_equal(air.composition_at(ood, z, lay, C, alphas), q_z):
        raise InvalidProof("the constraints do not hold at the out-of-domain point")

    idx = sorted(set(queries))
    depth = (M // fo).bit_length() - 1
    opened = []
    for root, width in zip((p_root, l_root, t_root, q_root), WIDTHS):
        leaves, vals = [], []
        for _ in idx:
            salt = r.raw(params.salt_bytes)
            v = r.elems((fo * width,))
            leaves.append(b"\x00" + salt + v.astype("<u4").tobytes())
            vals.append(v.reshape(fo, width))
        nodes = _nodes(r)
        if not merkle.verify(root, depth, idx, leaves, nodes, params.hash):
            raise InvalidProof("a Merkle opening does not match its root")
        opened.append(np.stack(vals))
    p_v, l_v, t_v, q_v = opened

    # DEEP values on the queried cosets
    j = np.array(idx, dtype=np.int64)
    pos = (j[:, None] + np.arange(fo)[None, :] * (M // fo)).ravel()
    xs = _domain_points(M, pos)
    cols = {"p": p_v[..., 0].ravel(), "l": l_v[..., 0].ravel(), "e": t_v[..., 0].ravel(), "v": t_v[..., 1].ravel(),
            "S": t_v[..., 2].ravel()}
    fx = t_v[..., 3:7].reshape(-1, 4).copy()
    gpows = F.ext_powers(gamma, len(DEEP_TERMS) + 1)
    w = F.root_of_unity(N)
    for shift in range(3):
        num = np.zeros((len(xs), 4), dtype=np.uint64)
        const = np.zeros(4, dtype=np.uint64)
        for k, (name, sh) in enumerate(DEEP_TERMS):
            if sh != shift:
                continue
            g = gpows[k + 1]
            if name in ("Q0", "Q1"):
                lo = 0 if name == "Q0" else 4
                num = F.add(num, F.ext_mul(q_v[..., lo:lo + 4].reshape(-1, 4), g))
            else:
                num = F.add(num, F.ext_scale(g, cols[name]))
            const = F.add(const, F.ext_mul(g, ood[name, sh]))
        y = F.ext_mul(z, F.ext(np.uint64(pow(w, shift, F.P))))
        fx = F.add(fx, F.ext_mul(F.sub(num, const), F.ext_inv(F.sub(F.ext(xs), y))))
    vals = fx.reshape(len(idx), fo, 4)

    size, offset = M, F.GENERATOR
    cur = j
    for layer in range(rounds):
        coset_x = F.mul(F.powers_at(F.root_of_unity(size), cur), np.uint64(offset))
        folded = _fold_cosets(vals, coset_x, betas[layer])
        size //= fo
        offset = pow(offset, fo, F.P)
        if layer < rounds - 1:
            leaves_n = size // fo
            nxt = np.array(sorted({int(c) % leaves_n for c in cur}), dtype=np.int64)
            lv = [r.elems((fo * 4,)) for _ in nxt]
            nodes = _nodes(r)
            if not merkle.verify(layer_roots[layer], (leaves_n).bit_length() - 1, [int(c) for c in nxt],
                                 [b"\x00" + v.astype("<u4").tobytes() for v in lv], nodes, params.hash):
                raise InvalidProof(f"a FRI layer {layer + 1} opening does not match its root")
            table = {int(c): v.reshape(fo, 4) for c, v in zip(nxt, lv)}
            got = np.stack([table[int(c) % leaves_n][int(c) // leaves_n] for c in cur])
            if not np.array_equal(got, folded):
                raise InvalidProof(f"FRI layer {layer + 1} is not the fold of layer {layer}")
            vals = np.stack([table[int(c)] for c in nxt])
            cur = nxt
        else:
            x = F.mul(F.powers_at(F.root_of_unity(size), cur), np.uint64(offset))
            acc = np.zeros((len(cur), 4), dtype=np.uint64)
            for c in final[::-1]:
                acc = F.add(F.ext_scale(acc, x), c)
            if not np.array_equal(acc, folded):
                raise InvalidProof("the last FRI layer is not the sent low-degree polynomial")
    r.done()
    return Statement(n, C, context, l_root, label_context, p_root, params)


def _nodes(r: Reader) -> list[bytes]:
    count = r.u64()
    if count > 1 << 20:
        raise InvalidProof("too many Merkle nodes")
    raw = r.raw(32 * count)
    return [raw[i:i + 32] for i in range(0, len(raw), 32)]


def _domain_points(M: int, pos: np.ndarray) -> np.ndarray:
    return F.mul(F.powers_at(F.root_of_unity(M), pos), np.uint64(F.GENERATOR))
