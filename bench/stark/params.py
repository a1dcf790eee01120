"""Proof parameters, the trace layout they imply, and the soundness they buy.

Soundness (both figures in bits, -log2 of the probability that a false claim is accepted):

* conjectured: ethSTARK (Starkware, eprint 2021/582) section 5.10.1 eq. (19), under its Conjecture 1 (FRI on
  Reed–Solomon codes is sound up to distance 1 - rho): min(field term, q * log2(blowup) + grinding) - 1, with the
  field term log2|F_p^4| - log2|LDE domain| (every random challenge lives in the extension);
* proven: the Johnson-bound regime of Ben-Sasson, Carmon, Ishai, Kopparty, Saraf, "Proximity Gaps for Reed–Solomon
  Codes" (FOCS 2020) Thm 1.2/1.5 as applied in ethSTARK section 5 (and summarised by Haböck, eprint 2022/1216):
  with alpha = sqrt(rho) (1 + 1/(2m)) each query passes a far word with probability <= alpha, the DEEP batching and
  each fold add (terms - 1) (m + 1/2)^7 |D|^2 / (3 rho^(3/2) |F|), and DEEP-ALI adds the list size
  L = (m + 1/2)/sqrt(rho) times (constraints + deg bound * shifts) / |F| (Ben-Sasson, Goldberg, Kopparty, Saraf,
  "DEEP-FRI", ITCS 2020, and ethSTARK Thm 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass

from ..errors import UserError

EXT_BITS = 4 * math.log2(2013265921)  # |F_p^4| ~ 2^123.6
N_CONSTRAINTS = 6
N_DEEP_TERMS = 11  # p, l, v at z; e, S at z, wz, w^2 z; the two composition chunks at z
SHIFTS = 3


@dataclass(frozen=True)
class Params:
    """What a proof (and a label commitment) is made with; all of it is absorbed into the Fiat–Shamir transcript."""

    blowup: int = 4
    """LDE domain size / trace length (rate rho = 1/blowup); a power of two >= 2."""
    queries: int = 41
    """FRI queries q; each tests one coset of ``fold`` points of every committed codeword."""
    fold: int = 8
    """FRI folding factor (a power of two); layers shrink by this factor and leaves hold this many points."""
    final_degree: int = 64
    """Folding stops once the degree bound is at most this; the remaining polynomial is sent in the clear."""
    grinding: int = 20
    """Proof-of-work bits demanded before the queries are drawn (each bit costs a cheater a factor 2)."""
    max_proofs: int = 8
    """Zero-knowledge budget of a label commitment: proofs it may serve before openings could leak labels."""
    salt_bytes: int = 16
    """Random bytes per Merkle leaf of the private columns."""
    hash: str = "sha256"
    """Merkle hash (``sha256`` or ``blake2s``)."""

    def __post_init__(self):
        pow2 = lambda x: x >= 1 and x & (x - 1) == 0  # noqa: E731
        if not pow2(self.blowup) or self.blowup < 2:
            raise UserError(f"blowup {self.blowup} must be a power of two >= 2")
        if not pow2(self.fold) or self.fold < 2:
            raise UserError(f"fold {self.fold} must be a power of two >= 2")
        if self.queries < 1 or self.grinding < 0 or self.grinding > 40 or self.max_proofs < 1:
            raise UserError("queries and max_proofs must be >= 1 and grinding in [0, 40]")
        if not pow2(self.final_degree):
            raise UserError(f"final_degree {self.final_degree} must be a power of two")
        if self.hash not in ("sha256", "blake2s"):
            raise UserError(f"hash {self.hash!r} is not sha256 or blake2s")
        if not 0 <= self.salt_bytes <= 64:
            raise UserError("salt_bytes must be in [0, 64]")

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Params:
        return cls(**json.loads(raw))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()

    def points_per_proof(self) -> int:
        """Base-field conditions on a trace column that one proof's view depends on: for every queried coset of
        ``fold`` points x, the values at x, wx, w^2 x (the composition at x reads them), one each; and the values at
        z, wz, w^2 z, four each, since a point of F_p^4 fixes a base-field column's residue modulo its degree-4
        minimal polynomial. The column's random rows hide the view as long as they outnumber these conditions."""
        return SHIFTS * (self.fold * self.queries + 4)

    def blinding(self) -> int:
        """Random coefficients (in F_p^4) moved between the two composition chunks: one per point a chunk is
        opened at (an extension coefficient per base point, and a spare one for z, are enough: docs/proofs.md)."""
        return self.fold * self.queries + 1


@dataclass(frozen=True)
class Layout:
    """Where the n examples sit in the trace: rows i = D - 1 (mod D) are random (zero-knowledge), the others hold
    examples in order, then padding. ``row(j)`` is example j's row; ``last`` the row of example n - 1."""

    n: int
    N: int
    D: int

    @property
    def K(self) -> int:
        return self.N // self.D

    def row(self, j: int) -> int:
        return j + j // (self.D - 1)

    @property
    def last(self) -> int:
        return self.row(self.n - 1)

    def encode(self) -> bytes:
        return struct.pack("<QQQ", self.n, self.N, self.D)


def layout(n: int, params: Params) -> Layout:
    """The smallest power-of-two trace with room for n examples and enough random rows for ``max_proofs`` proofs;
    among the strides that fit, the smallest (most random rows)."""
    if n < 1:
        raise UserError("a proof needs at least one example (n >= 1)")
    need = params.max_proofs * params.points_per_proof()
    N = 8
    while True:
        for D in (2 ** k for k in range(1, int(math.log2(N)) + 1)):
            K = N // D
            if K < need:
                break
            if N - K >= n and K + params.blinding() <= N and N >= params.final_degree:
                if N * params.blowup > 1 << 27:
                    raise UserError(f"n = {n} needs an LDE of {N * params.blowup} points, beyond BabyBear's 2^27")
                return Layout(n, N, D)
        N *= 2


def fri_rounds(N: int, params: Params) -> int:
    r, d = 0, N
    while d > params.final_degree and d >= params.fold:
        d //= params.fold
        r += 1
    return r


def soundness(params: Params, n: int, m: int = 3) -> dict:
    """Conjectured and proven soundness bits of a proof for n examples with ``params`` (see the module docstring;
    m >= 3 is the Johnson-regime proximity parameter of ethSTARK section 5)."""
    lay = layout(n, params)
    rho = 1 / params.blowup
    lde = lay.N * params.blowup
    field_term = EXT_BITS - math.log2(lde)
    query_term = params.queries * math.log2(params.blowup) + params.grinding
    conjectured = min(field_term, query_term) - 1

    alpha = math.sqrt(rho) * (1 + 1 / (2 * m))
    gap = (m + 0.5) ** 7 / (3 * rho ** 1.5) / 2 ** EXT_BITS
    eps = alpha ** params.queries * 2.0 ** -params.grinding
    eps += (N_DEEP_TERMS - 1) * gap * lde ** 2  # DEEP batching with powers of gamma
    size = lde
    for _ in range(fri_rounds(lay.N, params)):
        eps += (params.fold - 1) * gap * size ** 2
        size //= params.fold
    list_size = (m + 0.5) / math.sqrt(rho)
    eps += list_size * (N_CONSTRAINTS + SHIFTS * 2 * lay.N) / (2 ** EXT_BITS - lde - lay.N)
    return {"conjectured_bits": round(conjectured, 1), "proven_bits": round(-math.log2(eps), 1),
            "query_bits_conjectured": round(query_term, 1), "field_bits": round(field_term, 1),
            "per_query_proven_bits": round(-math.log2(alpha), 3), "N": lay.N, "lde": lde}
