"""BabyBear arithmetic on numpy arrays: the base field F_p and its degree-4 extension F_p[x]/(x^4 - 11).

p = 2^31 - 2^27 + 1 = 15 * 2^27 + 1, so F_p^* has a subgroup of order 2^27 (NTTs up to 2^27 points) and a product
of two reduced elements is below 2^62: it fits a uint64 and is reduced (``%``) after every single product, never
summed first. Elements are uint64 arrays holding canonical values in [0, p).

The extension uses x^4 = W with W = 11, the binomial BabyBear quartic used by RISC Zero and Plonky3; x^4 - W is
irreducible because p = 1 (mod 4) and W is a quadratic non-residue (Lang, Algebra, VI Thm 9.1; a test checks the
residue symbol). An extension element is an array whose last axis holds the 4 coefficients (a0 + a1 x + a2 x^2 +
a3 x^3); its field has p^4 ~ 2^124 elements, which is where every random challenge is drawn.
"""

from __future__ import annotations

import numpy as np

P = 2013265921
GENERATOR = 31  # a generator of F_p^* (its order is p - 1: checked in the tests)
TWO_ADICITY = 27
W = 11
_P = np.uint64(P)
_W = np.uint64(W)


def arr(x) -> np.ndarray:
    """Canonical uint64 array of field elements (Python ints reduced mod p)."""
    a = np.asarray(x)
    if a.dtype == object or a.dtype.kind == "i" and (a < 0).any():
        return np.asarray(np.vectorize(lambda v: int(v) % P, otypes=[object])(a), dtype=np.uint64)
    return np.asarray(a, dtype=np.uint64) % _P


def add(a, b):
    with np.errstate(over="ignore"):
        c = np.add(a, b, dtype=np.uint64)
        return np.minimum(c, c - _P)  # below p the subtraction wraps to a huge value, so min picks the reduced one


def sub(a, b):
    with np.errstate(over="ignore"):
        c = np.subtract(a, b, dtype=np.uint64)
        return np.minimum(c, c + _P)


def neg(a):
    return sub(np.uint64(0), a)


def mul(a, b):
    return np.multiply(a, b, dtype=np.uint64) % _P


def pow_(a, e: int):
    """a**e elementwise (square and multiply over the bits of the scalar exponent e >= 0)."""
    result = np.ones_like(np.asarray(a, dtype=np.uint64))
    base = np.asarray(a, dtype=np.uint64)
    while e:
        if e & 1:
            result = mul(result, base)
        base = mul(base, base)
        e >>= 1
    return result


def inv(a):
    """a^{-1} elementwise by Fermat (a^(p-2)); 0 maps to 0, callers never invert 0."""
    return pow_(a, P - 2)


def root_of_unity(n: int) -> int:
    """A primitive n-th root of unity, n a power of two up to 2^27."""
    if n & (n - 1) or n > 1 << TWO_ADICITY:
        raise ValueError(f"no {n}-th root of unity in BabyBear")
    return pow(GENERATOR, (P - 1) // n, P)


def powers(x: int, n: int) -> np.ndarray:
    """[1, x, x^2, ..., x^(n-1)] built by doubling (log n vector steps, not n scalar ones)."""
    out = np.ones(max(n, 1), dtype=np.uint64)
    k, xk = 1, x % P
    while k < n:
        m = min(k, n - k)
        out[k:k + m] = mul(out[:m], np.uint64(xk))
        k, xk = 2 * k, xk * xk % P
    return out[:n]


# ---- the quartic extension ------------------------------------------------------------------------------------

def ext(a) -> np.ndarray:
    """Embed base elements (any shape) as extension elements (shape + (4,))."""
    a = np.asarray(a, dtype=np.uint64)
    out = np.zeros(a.shape + (4,), dtype=np.uint64)
    out[..., 0] = a
    return out


def ext_add(a, b):
    return add(a, b)


def ext_sub(a, b):
    return sub(a, b)


def ext_mul(a, b):
    """Product in F_p[x]/(x^4 - W); each of the 16 coefficient products is reduced before it is summed."""
    a, b = np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)
    shape = np.broadcast_shapes(a.shape, b.shape)
    out = [np.zeros(shape[:-1], dtype=np.uint64) for _ in range(4)]
    for i in range(4):
        for j in range(4):
            t = mul(a[..., i], b[..., j])
            if i + j >= 4:
                t = mul(t, _W)
            k = (i + j) % 4
            out[k] = add(out[k], t)
    return np.stack(out, axis=-1)


def ext_scale(a, s):
    """Extension element(s) a times base element(s) s."""
    return mul(np.asarray(a, dtype=np.uint64), np.asarray(s, dtype=np.uint64)[..., None])


# x^p = W^((p-1)/4) x because p = 1 (mod 4), so the Frobenius map scales coefficient i by FROB^i.
_FROB = pow(W, (P - 1) // 4, P)


def frobenius(a, k: int = 1):
    """a^(p^k), applying the map a -> a^p (coefficient i times FROB^i) k times."""
    c = _FROB
    out = np.asarray(a, dtype=np.uint64)
    for _ in range(k):
        out = mul(out, np.array([1, c, c * c % P, c * c * c % P], dtype=np.uint64))
    return out


def ext_inv(a):
    """a^{-1} = a^(p + p^2 + p^3) / N(a), with the norm N(a) = a^(1 + p + p^2 + p^3) in F_p (vectorised)."""
    a = np.asarray(a, dtype=np.uint64)
    f1 = frobenius(a, 1)
    f2 = frobenius(f1, 1)
    f3 = frobenius(f2, 1)
    conj = ext_mul(ext_mul(f1, f2), f3)
    norm = ext_mul(a, conj)[..., 0]  # the other coefficients are 0: the norm lies in F_p
    return ext_scale(conj, inv(norm))


def ext_pow(a, e: int):
    result = ext(np.ones(np.asarray(a).shape[:-1], dtype=np.uint64))
    base = np.asarray(a, dtype=np.uint64)
    while e:
        if e & 1:
            result = ext_mul(result, base)
        base = ext_mul(base, base)
        e >>= 1
    return result


def ext_powers(x, n: int) -> np.ndarray:
    """[1, x, ..., x^(n-1)] for one extension element x, shape (n, 4)."""
    out = ext(np.ones(n, dtype=np.uint64))
    k, xk = 1, np.asarray(x, dtype=np.uint64)
    while k < n:
        m = min(k, n - k)
        out[k:k + m] = ext_mul(out[:m], xk)
        k, xk = 2 * k, ext_mul(xk, xk)
    return out


def poly_eval_ext(coeffs, x):
    """Horner evaluation of a polynomial with base (n,) or extension (n, 4) coefficients at one extension point."""
    coeffs = np.asarray(coeffs, dtype=np.uint64)
    if coeffs.ndim == 1:
        coeffs = ext(coeffs)
    acc = np.zeros(4, dtype=np.uint64)
    for c in coeffs[::-1]:
        acc = add(ext_mul(acc, x), c)
    return acc


def batch_inv(a):
    """Inverses of many base elements with one exponentiation: a product tree up, then down (Montgomery's trick,
    about 3 multiplications per element instead of Fermat's ~45). Zeros are not allowed."""
    a = np.asarray(a, dtype=np.uint64).ravel()
    levels = [a]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        if len(cur) % 2:
            cur = np.concatenate([cur, np.ones(1, dtype=np.uint64)])
        levels.append(mul(cur[0::2], cur[1::2]))
    out = np.array([pow(int(levels[-1][0]), P - 2, P)], dtype=np.uint64)
    for lvl in reversed(levels[:-1]):
        size = len(lvl)
        if size % 2:
            lvl = np.concatenate([lvl, np.ones(1, dtype=np.uint64)])
        nxt = np.empty(len(lvl), dtype=np.uint64)
        nxt[0::2] = mul(out, lvl[1::2])
        nxt[1::2] = mul(out, lvl[0::2])
        out = nxt[:size]
    return out[: len(a)]


def sample_base(rand_bytes, count: int) -> np.ndarray:
    """``count`` uniform elements of F_p by rejection sampling 31-bit words from a byte source (callable n -> bytes):
    no modular bias."""
    out = np.empty(0, dtype=np.uint64)
    while len(out) < count:
        need = count - len(out)
        words = np.frombuffer(rand_bytes(4 * (need + need // 8 + 8)), dtype="<u4").astype(np.uint64) & 0x7FFFFFFF
        out = np.concatenate([out, words[words < P]])
    return out[:count]


def powers_at(x: int, exps) -> np.ndarray:
    """x^e for an array of non-negative exponents e (square and multiply over their bits, vectorised)."""
    exps = np.asarray(exps, dtype=np.int64)
    out = np.ones(exps.shape, dtype=np.uint64)
    base = x % P
    e = exps.copy()
    while e.any():
        odd = (e & 1).astype(bool)
        out[odd] = mul(out[odd], np.uint64(base))
        e >>= 1
        base = base * base % P
    return out
