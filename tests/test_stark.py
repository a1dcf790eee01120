"""The soundness battery for shiftbench.stark: honest proofs verify, every cheat we can state fails, the rates are
the predicted ones and the format is pinned. Small parameters keep it fast; the exhaustive sweeps are marked slow."""

import hashlib
import math

import numpy as np
import pytest

from shiftbench.stark import InvalidProof, Params, commit_column, layout, prove, soundness, verify
from shiftbench.stark import field as F
from shiftbench.stark import fri, ntt
from shiftbench.stark.proofio import Reader, Writer
from shiftbench.stark.transcript import Transcript

SMALL = Params(queries=2, fold=4, final_degree=8, grinding=2, max_proofs=1)
P = F.P


def _case(n, acc=None, seed=0, params=SMALL):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, n)
    pred = rng.integers(0, 10, n) if acc is None else (label if acc == 1 else (label + 1) % 10)
    return pred, label, commit_column(pred, params, b"p%d" % seed), commit_column(label, params, b"l%d" % seed)


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 10_000])
def test_honest_proofs_verify(n):
    pred, label, pc, lc = _case(n)
    st = verify(prove(pc, lc, SMALL, seed=b"s"), label_root=lc[1].root)
    assert (st.n, st.correct) == (n, int(np.sum(pred == label)))


@pytest.mark.parametrize("acc", [0, 1])
def test_accuracy_zero_and_one(acc):
    _, _, pc, lc = _case(33, acc=acc)
    assert verify(prove(pc, lc, SMALL, seed=b"s")).correct == 33 * acc


def test_default_parameters_prove_and_verify():
    pred, label, pc, lc = _case(300, params=Params())
    st = verify(prove(pc, lc, Params()), label_root=lc[1].root)
    assert st.correct == int(np.sum(pred == label)) and st.params == Params()


def test_claiming_c_plus_or_minus_one_fails():
    pred, label, pc, lc = _case(50)
    c = int(np.sum(pred == label))
    for wrong in (c - 1, c + 1):
        with pytest.raises(InvalidProof, match="out-of-domain"):
            verify(prove(pc, lc, SMALL, C=wrong, seed=b"s"))


def _valid(trace, lay, C):
    """An independent check of the AIR over Python ints (the statement, not the code under test)."""
    p, l, e, v, s = ([int(x) for x in row] for row in trace)
    N, D = lay.N, lay.D
    for i in range(N):
        if i % D == D - 1:
            continue
        d = (p[i] - l[i]) % P
        if e[i] * d % P or (1 - e[i] - d * v[i]) % P:
            return False
        if i % D < D - 2 and (s[i + 1] - s[i] - e[i + 1]) % P:
            return False
        if i % D == D - 2 and i != N - 2 and (s[i + 2] - s[i] - e[i + 2]) % P:
            return False
    return s[0] == e[0] and s[lay.last] == C


def _cell_changes(n, cells):
    pred, label, pc, lc = _case(n, seed=n)
    lay = pc[0]
    C = int(np.sum(pred == label))
    outcomes = []
    for col, row in cells:
        def edit(t, col=col, row=row):
            t = t.copy()
            t[col, row] = (int(t[col, row]) + 1) % P
            return t
        captured = {}

        def spy(t, edit=edit):
            captured["t"] = edit(t)
            return captured["t"]
        proof = prove(pc, lc, SMALL, C=C, seed=b"cell", trace_override=spy)
        try:
            verify(proof)
            accepted = True
        except InvalidProof:
            accepted = False
        outcomes.append((accepted, _valid(captured["t"], lay, C)))
    return outcomes


def _all_cells(n):
    lay = layout(n, SMALL)
    return [(c, r) for c in range(5) for r in range(lay.N) if r % lay.D != lay.D - 1]


@pytest.mark.slow
@pytest.mark.parametrize("n", [16, 32])
def test_every_single_cell_change_fails_exhaustive(n):
    outcomes = _cell_changes(n, _all_cells(n))
    # accepted exactly when the edited trace is still a witness (only v where p = l is free)
    assert all(acc == valid for acc, valid in outcomes)
    assert sum(not v for _, v in outcomes) >= 4 * len(outcomes) // 5


def test_single_cell_changes_sampled():
    cells = _all_cells(16)
    rng = np.random.default_rng(5)
    picks = [cells[i] for i in rng.choice(len(cells), 24, replace=False)] + [(4, layout(16, SMALL).last)]
    outcomes = _cell_changes(16, picks)
    assert all(acc == valid for acc, valid in outcomes)
    assert sum(not v for _, v in outcomes) >= 15


def _flip_positions(proof, every):
    return range(len(proof)) if every else sorted(set(range(0, 200)) | set(range(0, len(proof), 37))
                                                    | set(range(len(proof) - 64, len(proof))))


@pytest.mark.parametrize("every", [pytest.param(True, marks=pytest.mark.slow), False])
def test_every_byte_flip_fails(every):
    params = Params(queries=1, fold=4, final_degree=8, grinding=2, max_proofs=1)  # one query keeps every-byte fast
    _, _, pc, lc = _case(5, seed=3, params=params)
    proof = prove(pc, lc, params, seed=b"s")
    verify(proof)
    for i in _flip_positions(proof, every):
        bad = bytearray(proof)
        bad[i] ^= 0x01 if i % 2 else 0x80
        with pytest.raises(InvalidProof):
            verify(bytes(bad))
    with pytest.raises(InvalidProof):
        verify(proof + b"\x00")
    with pytest.raises(InvalidProof):
        verify(proof[:-1])


def _fri_run(coeffs, N, params, seed=b"fri"):
    """Run FRI on the codeword of ``coeffs`` (ext, (4, k)) on the size-M coset: prover, then verifier."""
    return _fri_codeword(ntt.coset_lde(coeffs, N * params.blowup).T.copy(), N, params)


def _fri_codeword(f, N, params):
    M = len(f)
    ts = Transcript(b"fri-test")
    layers, final = fri.commit(f, N, params, ts)
    out = Writer()
    fri.write_commitments(out, layers, final)
    idx = sorted(set(ts.indices(params.queries, M // params.fold)))
    fri.write_openings(out, layers, idx, M, params.fold)
    r = Reader(out.getvalue())
    vt = Transcript(b"fri-test")
    roots, fin = fri.read_commitments(r, N, params)
    betas = fri.replay(vt, roots, fin)
    assert sorted(set(vt.indices(params.queries, M // params.fold))) == idx  # the verifier draws the same queries
    cos = np.array(idx)
    vals = f.reshape(params.fold, M // params.fold, 4).transpose(1, 0, 2)[cos]
    fri.check(vals, cos, roots, betas, fin, r, M, params)
    r.done()


def test_fri_accepts_degree_bound_and_rejects_beyond():
    params = Params(queries=20, fold=4, final_degree=4, grinding=0)
    N = 64
    rng = np.random.default_rng(9)
    ok = rng.integers(0, P, (4, N), dtype=np.uint64)  # degree N - 1 = d
    _fri_run(ok, N, params)
    for deg in (N + 1, 2 * N):  # degree d + 1 and ~2d
        bad = rng.integers(0, P, (4, deg), dtype=np.uint64)
        bad[:, -1] = 1
        with pytest.raises(InvalidProof):
            _fri_run(bad, N, params)
    with pytest.raises(InvalidProof):
        _fri_codeword(rng.integers(0, P, (N * params.blowup, 4), dtype=np.uint64), N, params)


def test_proof_for_one_submission_fails_for_another():
    pred, label, pc, lc = _case(40, seed=1)
    _, _, pc2, lc2 = _case(40, seed=2)
    proof = prove(pc, lc, SMALL, context=b"trial:aaaa split:env0_out", seed=b"s")
    with pytest.raises(InvalidProof, match="other labels"):
        verify(proof, label_root=lc2[1].root)

    def swapped(old: bytes, new: bytes) -> bytes:
        assert proof.count(old) == 1
        return proof.replace(old, new)
    for bad in (swapped(lc[1].root, lc2[1].root), swapped(pc[1].root, pc2[1].root),
                swapped(b"env0_out", b"env1_out"), swapped(b'"queries": 2', b'"queries": 3')):
        with pytest.raises(InvalidProof):
            verify(bad)
    # another n: the 24 layout bytes after the parameters
    raw = Params.encode(SMALL)
    at = proof.index(raw) + len(raw)
    for n2 in (39, 41):
        bad = proof[:at] + n2.to_bytes(8, "little") + proof[at + 8:]
        with pytest.raises(InvalidProof):
            verify(bad)
    # another parameter set cannot reuse a commitment made for this one
    with pytest.raises(ValueError):
        prove(pc, commit_column(label, Params(queries=3, fold=4, final_degree=8, grinding=2, max_proofs=1)), SMALL)


def _cheater_rate(q, trials, delta_den=4):
    params = Params(queries=q, fold=4, final_degree=8, grinding=0, max_proofs=1)
    _, _, pc, lc = _case(16, seed=4, params=params)
    M = pc[0].N * params.blowup
    bad = {j for j in range(M // params.fold) if j % delta_den == 0}
    accepted = 0
    for t in range(trials):
        try:
            verify(prove(pc, lc, params, seed=b"cheat%d" % t, tamper_cosets=bad))
            accepted += 1
        except InvalidProof:
            pass
    return accepted, (1 - 1 / delta_den) ** q


@pytest.mark.parametrize("q,trials", [(1, 120), (3, 120)])
def test_cheater_accepted_at_predicted_rate(q, trials):
    accepted, rate = _cheater_rate(q, trials)
    sd = math.sqrt(trials * rate * (1 - rate))
    assert abs(accepted - trials * rate) <= 4 * sd, (accepted, trials * rate)


def test_frozen_known_answer_proof():
    pred = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 1])
    label = np.array([0, 1, 2, 0, 4, 0, 6, 0, 8, 0, 1, 0])
    proof = prove(commit_column(pred, SMALL, b"kat-p"), commit_column(label, SMALL, b"kat-l"), SMALL,
                  context=b"kat", seed=b"kat")
    st = verify(proof)
    assert (st.n, st.correct, st.context) == (12, 7, b"kat")
    assert hashlib.sha256(proof).hexdigest() == KAT_DIGEST, hashlib.sha256(proof).hexdigest()
    assert len(proof) == KAT_SIZE


KAT_DIGEST = "db2e4bd5604cc0bd629faf02547dc64e80975f0ffdcb9e19ac9d4724c07d8066"
KAT_SIZE = 3040


def test_frozen_known_answer_proof_blake2s_fold_2_blowup_8():
    # the other hash, the smallest fold and another blowup and salt size: their byte layout is pinned too
    params = Params(queries=3, fold=2, final_degree=4, grinding=3, max_proofs=1, hash="blake2s", blowup=8,
                    salt_bytes=8)
    pred = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2])
    label = pred.copy()
    label[[2, 7, 11]] = 0
    lc = commit_column(label, params, b"kat2-l")
    assert (lc[0].N, lc[0].D) == (64, 2)  # 64 rows, 32 random; one proof's view: 3 (2 * 3 + 4) = 30 conditions
    assert lc[1].root.hex() == "0c29c6bcd46dc88e1149a41185e09a30c1da0ce3df9495132f74a6925bddb31e"
    proof = prove(commit_column(pred, params, b"kat2-p"), lc, params, context=b"kat2", label_context=b"digits",
                  seed=b"kat2")
    st = verify(proof, label_root=lc[1].root)
    assert (st.n, st.correct, st.label_context) == (17, 14, b"digits")
    assert (len(proof), hashlib.sha256(proof).hexdigest()) == (
        4911, "87de4f94a632bbfb0dc9be4ea7ad5d49e1acf9db83caa512b978e576afd56d2c")


@pytest.mark.slow
def test_zero_knowledge_openings_do_not_tell_label_vectors_apart():
    # two label vectors with the same count against the same predictions: all zeros vs all ones, C = 8 of 16
    from sklearn.linear_model import LogisticRegression

    pred = np.array([0] * 8 + [1] * 8)
    labels = [np.array([0] * 8 + [0] * 8), np.array([1] * 8 + [1] * 8)]
    feats, ys = [], []
    for t in range(60):
        for y, lab in enumerate(labels):
            lc = commit_column(lab, SMALL, b"zk-l%d-%d" % (t, y))
            pc = commit_column(pred, SMALL, b"zk-p%d-%d" % (t, y))
            rec = {}
            assert verify(prove(pc, lc, SMALL, seed=b"zk%d%d" % (t, y)), record=rec).correct == 8
            vals = np.concatenate([rec["label"][0].ravel(), rec["ood"][1], rec["trace"][0, :, :3].ravel()])
            feats.append(np.concatenate([(vals >> np.uint64(k)) & np.uint64(1) for k in range(4)]).astype(float))
            ys.append(y)
    X, y = np.array(feats), np.array(ys)
    clf = LogisticRegression(max_iter=2000).fit(X[:60], y[:60])  # proofs 0..29 train, 30..59 test
    acc = clf.score(X[60:], y[60:])
    # 60 held-out proofs: chance is 0.5 with sd 0.065; a leak of the labels would show as accuracy near 1
    assert abs(acc - 0.5) < 4 * 0.5 / math.sqrt(60), acc
    # the same classifier on the raw labels at the example rows (what an unmasked trace would reveal) is perfect
    raw = np.array([np.concatenate([lab, lab]) for lab in labels] * 10, dtype=float)
    assert LogisticRegression().fit(raw, [0, 1] * 10).score(raw, [0, 1] * 10) == 1.0


def test_soundness_figures_match_the_formulas():
    p = Params()
    s = soundness(p, 10 ** 6)
    ext_bits = 4 * math.log2(P)
    assert s["lde"] == 2 ** 22
    assert s["conjectured_bits"] == round(min(ext_bits - 22, 41 * 2 + 20) - 1, 1) >= 100
    assert s["per_query_proven_bits"] == round(-math.log2(math.sqrt(0.25) * (1 + 1 / 6)), 3)
    assert 45 < s["proven_bits"] < s["conjectured_bits"]
    assert soundness(Params(queries=20), 10 ** 6)["conjectured_bits"] == round(20 * 2 + 20 - 1, 1)


def _rank_mod_p(rows):
    """Rank over F_p of a list of integer rows (Gaussian elimination on Python ints)."""
    rows = [list(r) for r in rows]
    rank, cols = 0, len(rows[0]) if rows else 0
    for c in range(cols):
        pivot = next((i for i in range(rank, len(rows)) if rows[i][c] % P), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        inv = pow(rows[rank][c], P - 2, P)
        rows[rank] = [x * inv % P for x in rows[rank]]
        for i in range(len(rows)):
            if i != rank and rows[i][c] % P:
                f = rows[i][c]
                rows[i] = [(a - f * b) % P for a, b in zip(rows[i], rows[rank])]
        rank += 1
    return rank


def _masking_map(lay, base_points, ext_points):
    """The linear map from a column's K random rows to what a view sees of it: one row per base point y
    (L_r(y), r the random rows) and four per extension point (the limbs of L_r(z)), L_r the Lagrange basis of the
    trace domain. The random rows hide the view exactly when this map has full row rank (it is then onto)."""
    N = lay.N
    w = F.root_of_unity(N)
    random_rows = [k * lay.D + lay.D - 1 for k in range(lay.K)]
    inv_n = pow(N, P - 2, P)
    out = []
    for y in sorted(set(base_points)):
        yn = (pow(y, N, P) - 1) % P
        out.append([pow(w, i, P) * yn * inv_n * pow((y - pow(w, i, P)) % P, P - 2, P) % P for i in random_rows])
    for z in ext_points:
        zn = F.ext_sub(F.ext_pow(z, N), F.ext(np.uint64(1)))
        wi = np.array([pow(w, i, P) for i in random_rows], dtype=np.uint64)
        lag = F.ext_scale(F.ext_mul(zn, F.ext_inv(F.ext_sub(np.broadcast_to(z, (lay.K, 4)), F.ext(wi)))),
                          F.mul(wi, np.uint64(inv_n)))
        out += [[int(v) for v in lag[:, limb]] for limb in range(4)]
    return out


def test_random_rows_hide_every_column_view_of_max_proofs_proofs():
    # the zero-knowledge argument's core claim, checked exactly: the points a view depends on impose linearly
    # independent conditions on a column's random rows, so the view is uniform whatever the labels
    params = Params(queries=3, fold=4, final_degree=8, grinding=2, max_proofs=2)
    label = np.arange(20) % 3
    lc = commit_column(label, params, b"hide-l")
    lay = lc[0]
    assert lay.K >= params.max_proofs * params.points_per_proof() == 2 * 3 * (4 * 3 + 4)
    # the map is right: applied to random rows c it gives the interpolated column's values (an NTT, Horner)
    c = np.random.default_rng(1).integers(0, P, lay.K)
    col = np.zeros(lay.N, dtype=np.uint64)
    col.reshape(lay.K, lay.D)[:, -1] = c
    z0 = np.array([5, 7, 11, 13], dtype=np.uint64)
    m = _masking_map(lay, [123456789], [z0])
    want = [int(F.poly_eval_ext(ntt.intt(col), F.ext(np.uint64(123456789)))[0])] + \
        [int(v) for v in F.poly_eval_ext(ntt.intt(col), z0)]
    assert [sum(a * int(b) for a, b in zip(row, c)) % P for row in m] == want
    M = lay.N * params.blowup
    w = F.root_of_unity(lay.N)
    label_base, label_ext = [], []
    for t in range(params.max_proofs):
        rec = {}
        verify(prove(commit_column((label + t) % 3, params, b"hide-p%d" % t), lc, params, seed=b"hide%d" % t),
               record=rec)
        xs = [F.GENERATOR * pow(F.root_of_unity(M), j + s * (M // params.fold), P) % P
              for j in rec["queries"] for s in range(params.fold)]
        shifted = [x * pow(w, k, P) % P for x in xs for k in range(3)]
        zs = [F.ext_mul(rec["z"], F.ext(np.uint64(pow(w, k, P)))) for k in range(3)]
        # a trace column of this proof (e, v, S): opened cosets and their two shifts, and z, wz, w^2 z
        m = _masking_map(lay, shifted, zs)
        assert _rank_mod_p(m) == len(m) == len(set(shifted)) + 12 <= params.points_per_proof()
        label_base += xs
        label_ext.append(rec["z"])
    # the label column is shared by both proofs: their openings and out-of-domain points together
    m = _masking_map(lay, label_base, label_ext)
    assert _rank_mod_p(m) == len(m) == len(set(label_base)) + 8


def test_a_proof_claiming_an_impossible_n_is_invalid_not_bad_input():
    # n = 2^26 fits the format's bound but needs an LDE beyond BabyBear's 2^27 points at blowup 4
    _, _, pc, lc = _case(5, seed=3)
    proof = prove(pc, lc, SMALL, seed=b"s")
    raw = Params.encode(SMALL)
    at = proof.index(raw) + len(raw)
    with pytest.raises(InvalidProof, match="bad n"):
        verify(proof[:at] + (1 << 26).to_bytes(8, "little") + proof[at + 8:])
