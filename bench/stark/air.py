"""The statement "C = sum_i [pred_i = label_i] over the first n examples" as an algebraic intermediate
representation (AIR) over a trace of N rows (N a power of two, rows i = D - 1 (mod D) random for zero knowledge).

Columns: p (prediction), l (label), e (equality indicator), v (inverse witness), S (running count). With d = p - l
and "next" the next example row (i + 1, or i + 2 across a random row):

    E1:  e * d = 0                 on every non-random row   } together: e = 1 iff d = 0
    E2:  1 - e - d * v = 0         on every non-random row   }   (d != 0 forces v = 1/d and e = 0)
    T1:  S(next) - S - e(next) = 0 on rows i != D-2, D-1 (mod D), next = i + 1
    T2:  S(next) - S - e(next) = 0 on rows i = D-2 (mod D) except N - 2, next = i + 2
    B0:  S - e = 0                 at row 0 (S_0 = e_0)
    B1:  S - C = 0                 at the row of example n - 1

The issue's 0/1 selector column is replaced by the position of B1: the verifier knows n, so it pins S at example
n - 1 and padding rows after it are never counted (the same statement with one column and constraint fewer).
All constraints have degree <= 2. Every vanishing polynomial is sparse because the random rows form the coset
{i = D-1 mod D}: X^N - 1 splits into the factors V_r = X^K - w^(rK) (K = N/D), one per residue r.
"""

from __future__ import annotations

import numpy as np

from . import field as F
from .params import Layout


def column(values: np.ndarray, lay: Layout, random_rows: np.ndarray) -> np.ndarray:
    """A committed column on the trace domain: example j at row(j), padding 0, random rows filled in."""
    active = np.zeros(lay.K * (lay.D - 1), dtype=np.uint64)
    active[:lay.n] = values
    col = np.zeros(lay.N, dtype=np.uint64)
    view = col.reshape(lay.K, lay.D)
    view[:, :lay.D - 1] = active.reshape(lay.K, lay.D - 1)
    view[:, lay.D - 1] = random_rows
    return col


def witness(p: np.ndarray, l: np.ndarray, lay: Layout, random_rows: np.ndarray) -> np.ndarray:
    """The e, v, S columns (3, N) for columns p, l (random rows of both ignored); ``random_rows`` is (3, K)."""
    act = lambda c: c.reshape(lay.K, lay.D)[:, :lay.D - 1].reshape(-1)  # noqa: E731  example rows in order
    d = F.sub(act(p), act(l))
    e = (d == 0).astype(np.uint64)
    v = np.zeros_like(d)
    nz = d != 0
    if nz.any():
        v[nz] = F.batch_inv(d[nz])
    s = np.cumsum(e, dtype=np.uint64) % np.uint64(F.P)
    out = np.zeros((3, lay.N), dtype=np.uint64)
    for k, c in enumerate((e, v, s)):
        view = out[k].reshape(lay.K, lay.D)
        view[:, :lay.D - 1] = c.reshape(lay.K, lay.D - 1)
        view[:, lay.D - 1] = random_rows[k]
    return out


def count(p: np.ndarray, l: np.ndarray, n: int) -> int:
    return int(np.sum(np.asarray(p[:n]) == np.asarray(l[:n])))


def _zeta_powers(lay: Layout) -> tuple[int, int, int, int]:
    w = F.root_of_unity(lay.N)
    return w, pow(w, lay.K * (lay.D - 2), F.P), pow(w, lay.K * (lay.D - 1), F.P), pow(w, lay.last, F.P)


def composition_lde(cols: np.ndarray, xs: np.ndarray, step: int, lay: Layout, C: int, alphas: np.ndarray,
                    x_n: np.ndarray, x_k: np.ndarray) -> np.ndarray:
    """sum_k alpha_k C_k(x) / Z_k(x) at the points ``xs`` (base, shape (M,)), from cols = (p, l, e, v, S) there;
    the value at w x sits ``step`` positions later. x_n, x_k: x^N and x^K (callers use their periodicity)."""
    p, l, e, v, s = cols
    nxt = lambda a, k: np.roll(a, -k * step)  # noqa: E731
    w, c2, c1, wl = _zeta_powers(lay)
    d = F.sub(p, l)
    one = np.uint64(1)
    inv_zn = F.batch_inv(F.sub(x_n, one))
    v1 = F.sub(x_k, np.uint64(c1))  # vanishes on the random rows
    v2 = F.sub(x_k, np.uint64(c2))  # vanishes on rows D - 2 (mod D)
    inv_za = F.mul(v1, inv_zn)
    terms = [F.mul(F.mul(e, d), inv_za),
             F.mul(F.sub(F.sub(one, e), F.mul(d, v)), inv_za)]
    if lay.D > 2:
        t1 = F.sub(F.sub(nxt(s, 1), s), nxt(e, 1))
        terms.append(F.mul(t1, F.mul(F.mul(v1, v2), inv_zn)))
    else:
        terms.append(np.zeros_like(s))
    t2 = F.sub(F.sub(nxt(s, 2), s), nxt(e, 2))
    terms.append(F.mul(t2, F.mul(F.sub(xs, np.uint64(pow(w, lay.N - 2, F.P))), F.batch_inv(v2))))
    b0, b1 = F.sub(xs, one), F.sub(xs, np.uint64(wl))
    inv_both = F.batch_inv(F.mul(b0, b1))
    terms.append(F.mul(F.sub(s, e), F.mul(b1, inv_both)))
    terms.append(F.mul(F.sub(s, np.uint64(C % F.P)), F.mul(b0, inv_both)))
    out = np.zeros((len(xs), 4), dtype=np.uint64)
    for a, t in zip(alphas, terms):
        out = F.add(out, F.ext_scale(np.broadcast_to(a, (len(xs), 4)), t))
    return out


def composition_at(ood: dict, z: np.ndarray, lay: Layout, C: int, alphas: np.ndarray) -> np.ndarray:
    """The same combination at one extension point z, from the claimed values ood[(column, shift)]."""
    em, es, ea, ei = F.ext_mul, F.ext_sub, F.ext_add, F.ext_inv
    w, c2, c1, wl = _zeta_powers(lay)
    one = F.ext(np.uint64(1))
    p, l, v = ood["p", 0], ood["l", 0], ood["v", 0]
    e0, e1, e2 = ood["e", 0], ood["e", 1], ood["e", 2]
    s0, s1, s2 = ood["S", 0], ood["S", 1], ood["S", 2]
    d = es(p, l)
    zn, zk = F.ext_pow(z, lay.N), F.ext_pow(z, lay.K)
    inv_zn = ei(es(zn, one))
    v1, v2 = es(zk, F.ext(np.uint64(c1))), es(zk, F.ext(np.uint64(c2)))
    inv_za = em(v1, inv_zn)
    terms = [em(em(e0, d), inv_za), em(es(es(one, e0), em(d, v)), inv_za)]
    terms.append(em(es(es(s1, s0), e1), em(em(v1, v2), inv_zn)) if lay.D > 2 else np.zeros(4, dtype=np.uint64))
    terms.append(em(es(es(s2, s0), e2), em(es(z, F.ext(np.uint64(pow(w, lay.N - 2, F.P)))), ei(v2))))
    terms.append(em(es(s0, e0), ei(es(z, one))))
    terms.append(em(es(s0, F.ext(np.uint64(C % F.P))), ei(es(z, F.ext(np.uint64(wl))))))
    out = np.zeros(4, dtype=np.uint64)
    for a, t in zip(alphas, terms):
        out = ea(out, em(a, t))
    return out
