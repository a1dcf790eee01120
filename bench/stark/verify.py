"""The verifier: replay the transcript, check the out-of-domain composition identity, the proof of work, every
Merkle opening and every FRI fold. It needs no labels and no predictions, only the proof (and, to pin the labels,
the published label commitment root)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from . import air, fri
from . import field as F
from . import merkle
from .params import Params, layout
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


def verify(proof: bytes, label_root: bytes | None = None, record: dict | None = None) -> Statement:
    """Verify a proof; return its statement or raise InvalidProof naming the failed check. With ``label_root``,
    also require that the proof is about those committed labels. ``record``, if given, receives what the proof
    reveals (out-of-domain values and opened leaves), for the zero-knowledge tests."""
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
    try:
        lay = layout(n, params)
    except UserError as e:  # n too large for these parameters: a proof cannot exist
        raise InvalidProof(f"bad n: {e}") from None
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
    layer_roots, final = fri.read_commitments(r, N, params)
    fo, M = params.fold, N * params.blowup
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
    betas = fri.replay(ts, layer_roots, final)
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
        nodes = fri.read_nodes(r)
        if not merkle.verify(root, depth, idx, leaves, nodes, params.hash):
            raise InvalidProof("a Merkle opening does not match its root")
        opened.append(np.stack(vals))
    p_v, l_v, t_v, q_v = opened
    if record is not None:
        record.update(ood=ood_arr, pred=p_v, label=l_v, trace=t_v, comp=q_v, queries=idx, z=z, layout=lay)

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

    fri.check(vals, j, layer_roots, betas, final, r, M, params)
    r.done()
    return Statement(n, C, context, l_root, label_context, p_root, params)


def _domain_points(M: int, pos: np.ndarray) -> np.ndarray:
    return F.mul(F.powers_at(F.root_of_unity(M), pos), np.uint64(F.GENERATOR))
