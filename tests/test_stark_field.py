"""BabyBear, its quartic extension and the NTT, against Python integers and a naive DFT."""

import numpy as np
import pytest

from shiftbench.stark import field as F
from shiftbench.stark import ntt

P = F.P


def _ext_mul_ref(a, b):
    # schoolbook over Python ints, then x^4 = 11
    c = [0] * 7
    for i in range(4):
        for j in range(4):
            c[i + j] += int(a[i]) * int(b[j])
    return [(c[k] + 11 * (c[k + 4] if k + 4 < 7 else 0)) % P for k in range(4)]


def test_prime_and_generator():
    assert P == 2 ** 31 - 2 ** 27 + 1 and all(P % q for q in range(2, 50000))
    # 31 generates F_p^*: p - 1 = 2^27 * 3 * 5, so g^((p-1)/q) != 1 for q in {2, 3, 5}
    assert all(pow(31, (P - 1) // q, P) != 1 for q in (2, 3, 5))
    # x^4 - 11 irreducible: 11 is a non-residue and p = 1 (mod 4)
    assert pow(11, (P - 1) // 2, P) == P - 1 and P % 4 == 1


def test_base_ops_match_python_ints():
    rng = np.random.default_rng(1)
    a = rng.integers(0, P, 1000, dtype=np.uint64)
    b = rng.integers(0, P, 1000, dtype=np.uint64)
    a[:3], b[:3] = P - 1, P - 1  # extremes: (p-1)^2 is the largest product
    ai, bi = [int(x) for x in a], [int(x) for x in b]
    assert [int(x) for x in F.mul(a, b)] == [x * y % P for x, y in zip(ai, bi)]
    assert [int(x) for x in F.add(a, b)] == [(x + y) % P for x, y in zip(ai, bi)]
    assert [int(x) for x in F.sub(a, b)] == [(x - y) % P for x, y in zip(ai, bi)]
    nz = a[a != 0]
    assert [int(x) for x in F.batch_inv(nz)] == [pow(int(x), P - 2, P) for x in nz]
    assert [int(x) for x in F.batch_inv(nz[:7])] == [pow(int(x), P - 2, P) for x in nz[:7]]


def test_extension_mul_inverse_properties():
    rng = np.random.default_rng(2)
    a = rng.integers(0, P, (200, 4), dtype=np.uint64)
    b = rng.integers(0, P, (200, 4), dtype=np.uint64)
    c = rng.integers(0, P, (200, 4), dtype=np.uint64)
    a[0] = P - 1
    ab = F.ext_mul(a, b)
    assert all(list(map(int, ab[k])) == _ext_mul_ref(a[k], b[k]) for k in range(200))
    assert np.array_equal(ab, F.ext_mul(b, a))
    assert np.array_equal(F.ext_mul(ab, c), F.ext_mul(a, F.ext_mul(b, c)))
    assert np.array_equal(F.ext_mul(a, F.add(b, c)), F.add(ab, F.ext_mul(a, c)))
    one = F.ext(np.ones(200, dtype=np.uint64))
    assert np.array_equal(F.ext_mul(a, F.ext_inv(a)), one)
    # Frobenius is the p-th power and has order 4
    x = a[5]
    assert np.array_equal(F.frobenius(x, 1), F.ext_pow(x, P))
    assert np.array_equal(F.frobenius(x, 4), x)


def test_ntt_matches_naive_dft_and_inverts():
    rng = np.random.default_rng(3)
    for n in (1, 2, 8, 64):
        c = rng.integers(0, P, n, dtype=np.uint64)
        w = F.root_of_unity(n)
        ref = [sum(int(c[j]) * pow(w, i * j, P) for j in range(n)) % P for i in range(n)]
        assert [int(x) for x in ntt.ntt(c)] == ref
        assert np.array_equal(ntt.intt(ntt.ntt(c)), c)
    c = rng.integers(0, P, (3, 16), dtype=np.uint64)
    lde = ntt.coset_lde(c, 64)
    w64 = F.root_of_unity(64)
    for k in (0, 1, 37, 63):
        x = 31 * pow(w64, k, P) % P
        assert int(lde[1, k]) == sum(int(c[1, j]) * pow(x, j, P) for j in range(16)) % P
    assert np.array_equal(ntt.coset_interpolate(lde)[:, :16], c)
    assert not ntt.coset_interpolate(lde)[:, 16:].any()
    with pytest.raises(ValueError):
        ntt.ntt(np.zeros(12, dtype=np.uint64))


def test_sampling_is_rejection_not_modular():
    # words >= p are dropped, never reduced: feed a stream of all-ones words (2^31 - 1 >= p) then a small one
    calls = []

    def source(n):
        calls.append(n)
        word = b"\xff\xff\xff\x7f" if len(calls) == 1 else (5).to_bytes(4, "little")
        return word * (n // 4)

    out = F.sample_base(source, 3)
    assert [int(x) for x in out] == [5, 5, 5] and len(calls) == 2
