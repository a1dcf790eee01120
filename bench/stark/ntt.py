"""Number-theoretic transforms over BabyBear along the last axis: iterative radix-2 Cooley–Tukey, one vectorised
butterfly layer per stage (log2 n numpy passes, never a Python loop over points).

``ntt(c)`` evaluates the polynomial with coefficients c at 1, w, w^2, ... (w the primitive n-th root from
``field.root_of_unity``); ``intt`` inverts it; ``coset_lde`` evaluates at offset * w_m^k on a larger domain.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from . import field as F


@lru_cache(maxsize=64)
def _bitrev(n: int) -> np.ndarray:
    bits = n.bit_length() - 1
    idx = np.arange(n, dtype=np.int64)
    rev = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    return rev


@lru_cache(maxsize=64)
def _twiddles(n: int, inverse: bool) -> np.ndarray:
    w = F.root_of_unity(n)
    if inverse:
        w = pow(w, F.P - 2, F.P)
    return F.powers(w, max(n // 2, 1))


def _transform(a: np.ndarray, inverse: bool) -> np.ndarray:
    a = np.asarray(a, dtype=np.uint64)
    n = a.shape[-1]
    if n & (n - 1):
        raise ValueError(f"NTT size {n} is not a power of two")
    lead = a.shape[:-1]
    a = np.ascontiguousarray(a[..., _bitrev(n)])
    out = np.empty_like(a)
    tmp = np.empty(lead + (n // 2,), dtype=np.uint64)
    t = np.empty(lead + (n // 2,), dtype=np.uint64)
    tw = _twiddles(n, inverse)
    m = 1
    while m < n:
        shape = lead + (n // (2 * m), 2, m)
        b, o = a.reshape(shape), out.reshape(shape)
        tv, tmpv = t.reshape(shape[:-2] + (m,)), tmp.reshape(shape[:-2] + (m,))
        if m == 1:
            tv[...] = b[..., 1, :]
        else:
            np.multiply(b[..., 1, :], tw[:: n // (2 * m)][:m], out=tv)
            np.remainder(tv, F.P, out=tv)
        u, o0, o1 = b[..., 0, :], o[..., 0, :], o[..., 1, :]
        np.add(u, tv, out=o0)
        np.subtract(o0, F.P, out=tmpv)
        np.minimum(o0, tmpv, out=o0)  # below p the subtraction wraps to a huge value
        np.subtract(u, tv, out=o1)
        np.add(o1, F.P, out=tmpv)
        np.minimum(o1, tmpv, out=o1)
        a, out = out, a
        m *= 2
    if inverse:
        a = F.mul(a, np.uint64(pow(n, F.P - 2, F.P)))
    return a


def ntt(coeffs: np.ndarray) -> np.ndarray:
    """Evaluations on the order-n subgroup (n = last axis length) in natural order."""
    return _transform(coeffs, False)


def intt(evals: np.ndarray) -> np.ndarray:
    """Coefficients of the degree < n polynomial through the given subgroup evaluations."""
    return _transform(evals, True)


def coset_lde(coeffs: np.ndarray, size: int, offset: int = F.GENERATOR) -> np.ndarray:
    """Evaluate polynomials (coefficients on the last axis, length <= size) at offset * w_size^k, k < size."""
    coeffs = np.asarray(coeffs, dtype=np.uint64)
    k = coeffs.shape[-1]
    scaled = F.mul(coeffs, F.powers(offset, k))
    padded = np.zeros(coeffs.shape[:-1] + (size,), dtype=np.uint64)
    padded[..., :k] = scaled
    return ntt(padded)


def coset_interpolate(evals: np.ndarray, offset: int = F.GENERATOR) -> np.ndarray:
    """Coefficients of the polynomial whose values at offset * w_n^k are evals (inverse of coset_lde at size n)."""
    c = intt(evals)
    return F.mul(c, F.powers(pow(offset, F.P - 2, F.P), c.shape[-1]))
