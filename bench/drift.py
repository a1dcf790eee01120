"""Two-sample drift detectors with valid p-values, input reductions and a label-shift estimate.

Every detector answers one question about a reference sample ``x`` (n_ref × d) and a test sample ``y``
(n_test × d): are they drawn from the same distribution? Each returns a :class:`DriftResult` whose p-value is
valid: its false-positive rate is at most ``alpha`` when they are (shown by ``tests/test_drift.py``); the
permutation p-values are close to exact (size ≈ α), the KS and Bonferroni ones conservative. Built on numpy, scipy,
torch and scikit-learn only.

Detectors (the names of :data:`DETECTORS`):

- ``mmd``: maximum mean discrepancy with a Gaussian (RBF) kernel, bandwidth by the median heuristic, and a
  permutation p-value ``(1 + #{b: MMD²_b ≥ MMD²_obs}) / (1 + B)`` (Gretton et al., "A Kernel Two-Sample Test",
  JMLR 2012; the +1 makes the test exact at any B: Phipson & Smyth, 2010). One kernel matrix serves every
  permutation: it is built once, in blocks of rows, each multiplied at once by a matrix whose columns are the
  permutations' sample indicators, so memory grows with n·B plus one 64 MB block, never with n² (the whole matrix
  at 5000 per side would take 400 MB in float32). Beyond ``max_quadratic`` pooled examples the same permutation
  test runs on disjoint blocks (:func:`mmd_blocks`), sized so that power never drops as n grows; the linear-time
  MMD²_l with its normal approximation (Gretton et al. 2012, section 6) is there by name only: when it took over
  above 10,000 pooled examples, power on a small shift fell from 0.82 at 5000 vs 5000 to 0.17 at 5000 vs 5001
  (``bench_scripts/drift_power.py --tables mmd-n``).
- ``ks``: a Kolmogorov–Smirnov test per feature, combined by Bonferroni (p = d · min p_j) or, with
  ``correction="fdr"``, by Simes' global test (p = min_k d · p_(k) / k), which rejects exactly when the
  Benjamini–Hochberg procedure rejects at least one feature.
- ``classifier``: a classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017): train a classifier to tell the
  samples apart on half of the pooled data and test its held-out log-odds (Liu et al. 2020's C2ST-L) by permuting
  the held-out labels, an exact null; or its accuracy with Fisher's exact test.
- ``bbsd``: black-box shift detection (Lipton et al., ICML 2018; Rabanser et al., "Failing Loudly", NeurIPS 2019):
  ``ks`` on a classifier's softmax outputs; the default for classifiers. For two classes one column suffices.

Reductions (:func:`make_reduction`): ``none``, ``pca:K`` and ``rp:K`` (Gaussian random projection) of flattened
inputs; the model-based ones (penultimate ``features``, softmax ``outputs``) are computed by the caller with
:func:`softmax_outputs` and passed in as the samples.

A reduction fitted on data other than the two samples (or on their pooled union, which is symmetric in them) keeps
the tests exact; fitting it on the reference alone would not.

:func:`bbse` estimates the test label distribution under label shift from a classifier's confusion matrix
(Lipton et al. 2018).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import UserError

ALPHA = 0.05
"""Default significance level."""
MAX_QUADRATIC = 10_000
"""The most pooled examples ``mmd`` (method="auto") puts in one kernel matrix (about 1 CPU-second at B = 100);
beyond, the permutation test runs on disjoint blocks of at most this size (:func:`mmd_blocks`)."""
_BLOCK_BYTES = 64 * 2**20
"""Kernel rows are built in blocks of at most this many bytes."""
_SINGLE_THREAD_ROWS = 2048
"""Pooled samples up to this size run on one torch thread (see :func:`_threads`)."""


@dataclass
class DriftResult:
    """The outcome of one two-sample test.

    Attributes:
        detector: detector name (``mmd``, ``mmd_linear``, ``ks``, ``classifier``, ``bbsd``).
        statistic: the test statistic (MMD², the largest KS distance, the held-out accuracy).
        p_value: the p-value; drift is declared when ``p_value <= alpha``.
        alpha: the significance level.
        n_ref: reference sample size used.
        n_test: test sample size used.
        n_features: dimension of the samples the detector saw.
        details: detector-specific extras (bandwidth, permutations, per-feature p-values, ...).
    """

    detector: str
    statistic: float
    p_value: float
    alpha: float
    n_ref: int
    n_test: int
    n_features: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def drift(self) -> bool:
        return bool(self.p_value <= self.alpha)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (with ``drift``)."""
        d = asdict(self)
        d["drift"] = self.drift
        return d


def as_matrix(a: Any, name: str = "sample") -> np.ndarray:
    """A sample as a 2-D float array (rows = examples); higher-rank arrays are flattened per example."""
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim > 2:
        arr = arr.reshape(len(arr), -1)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{name} must be a numeric array of examples, got shape {arr.shape} and dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _check_pair(x: Any, y: Any, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_matrix(x, "reference sample"), as_matrix(y, "test sample")
    if x.shape[1] != y.shape[1]:
        raise UserError(f"reference and test have different feature counts ({x.shape[1]} vs {y.shape[1]}); "
                        "compare data with the same columns")  # fmt: skip
    if len(x) < min_n or len(y) < min_n:
        raise UserError(f"each sample needs at least {min_n} examples (got {len(x)} and {len(y)})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise UserError("the samples contain NaN or infinite values; drop or impute them first")
    return x, y


@contextlib.contextmanager
def _threads(rows: int):
    """One torch thread for small problems: their products take milliseconds, and on a shared machine waiting for
    a second thread costs more than it saves (measured: 10-20x slower under load)."""
    if rows > _SINGLE_THREAD_ROWS or torch.get_num_threads() == 1:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def permutation_pvalue(observed: float, permuted: np.ndarray, tol: float = 0.0) -> float:
    """``(1 + #{permuted ≥ observed}) / (1 + B)``: exact under exchangeability (Phipson & Smyth 2010).

    Args:
        observed: the statistic of the observed split.
        permuted: the statistics of B random splits.
        tol: values within ``tol`` below ``observed`` count as ties: splits equal in exact arithmetic (the mirror
            image of a split when both samples have one size, repeated rows) may differ by rounding, and counting
            them as smaller would make the p-value too small.
    """
    permuted = np.asarray(permuted, dtype=np.float64)
    return float((1 + np.count_nonzero(permuted >= observed - tol)) / (1 + len(permuted)))


# ------------------------------------------------------------------------------------------------------------ MMD


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d2 = torch.addmm((a * a).sum(1, keepdim=True), a, b.T, alpha=-2.0)
    d2 += (b * b).sum(1)
    return d2.clamp_min_(0.0)


def median_bandwidth(z: np.ndarray, max_points: int = 300, seed: int | np.random.SeedSequence = 0) -> float:
    """The median heuristic: the median Euclidean distance between distinct pooled points (Gretton et al. 2012).

    Taken over all pairs of at most ``max_points`` pooled rows drawn at random (44,850 pairs at 300 rows, from one
    small matrix product). The rows are drawn independently of the data and of the permutations, and the median
    is the same whichever rows are reference, so the permutation test stays exact.

    Args:
        z: pooled sample (n × d).
        max_points: rows the distances are taken between.
        seed: seed (or seed sequence) of the row subset.

    Returns:
        σ of the kernel ``exp(-‖a − b‖² / (2σ²))``; 1.0 when all points coincide.
    """
    pick = np.random.default_rng(seed).choice(len(z), min(len(z), max_points), replace=False)
    t = torch.as_tensor(z[np.sort(pick)], dtype=torch.float64)
    d2 = _sq_dists(t, t)
    iu = np.triu_indices(len(t), 1)
    vals = d2.numpy()[iu]
    vals = vals[vals > 0]
    return float(np.sqrt(np.median(vals))) if len(vals) else 1.0


def mmd_permutation_stats(z: np.ndarray, indicators: np.ndarray, bandwidth: float,
                          dtype: torch.dtype = torch.float64) -> np.ndarray:  # fmt: skip
    """Unbiased MMD² of many splits of one pooled sample, from one kernel matrix.

    Column b of ``indicators`` marks (1) the rows forming the first sample in split b. With K the kernel matrix
    and u a column, the within/between block sums are S_XX = uᵀKu, S_XY = uᵀK(1 − u) = uᵀr − S_XX with r = K1,
    and S_YY = 1ᵀK1 − 2 S_XY − S_XX; the unbiased estimate drops the diagonal (k(a, a) = 1). So every split costs
    one column of the product K·U, built block by block of kernel rows without storing K.

    Args:
        z: pooled sample (n × d).
        indicators: (n × S) 0/1 matrix; every column has the same number m of ones, 2 ≤ m ≤ n − 2.
        bandwidth: σ of the RBF kernel.
        dtype: arithmetic of the kernel and the product (reductions are float64).

    Returns:
        (S,) MMD² values, float64.
    """
    n = len(z)
    zt = torch.as_tensor(z, dtype=dtype)
    # the last column of ones yields the row sums r = K1 from the same product (a separate sum is slower)
    u = torch.cat([torch.as_tensor(indicators, dtype=dtype), torch.ones(n, 1, dtype=dtype)], 1)
    m = int(round(float(u[:, 0].sum())))
    k = n - m
    gamma = 1.0 / (2.0 * bandwidth**2)
    gsq = gamma * (zt * zt).sum(1)
    ku = torch.empty(n, u.shape[1], dtype=dtype)
    block = max(64, min(n, _BLOCK_BYTES // (n * zt.element_size())))
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        # -γ‖a − b‖² = 2γ a·b − γ‖a‖² − γ‖b‖², clamped at 0 against rounding, in as few passes as possible
        kb = torch.addmm(gsq[i0:i1, None], zt[i0:i1], zt.T, beta=-1.0, alpha=2.0 * gamma)
        kb.sub_(gsq).clamp_max_(0.0).exp_()
        kb.diagonal(i0).fill_(1.0)
        torch.mm(kb, u, out=ku[i0:i1])
    r = ku[:, -1].double()
    ku64, u64 = ku[:, :-1].double(), u[:, :-1].double()
    s_xx = (u64 * ku64).sum(0)
    s_xy = u64.T @ r - s_xx
    s_yy = r.sum() - 2.0 * s_xy - s_xx
    stats = (s_xx - m) / (m * (m - 1)) + (s_yy - k) / (k * (k - 1)) - 2.0 * s_xy / (m * k)
    return stats.numpy()


def _indicators(n: int, m: int, n_permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(n × (1 + B)) 0/1 matrix: column 0 is the observed split (first m rows), then B random ones."""
    u = np.zeros((n, n_permutations + 1), dtype=np.float32)
    u[:m, 0] = 1.0
    if n_permutations:
        picks = np.argsort(rng.random((n_permutations, n)), axis=1)[:, :m]
        u[picks, np.arange(1, n_permutations + 1)[:, None]] = 1.0
    return u


def mmd_test(x: Any, y: Any, alpha: float = ALPHA, n_permutations: int = 100, bandwidth: float | None = None,
             seed: int = 0, method: str = "auto", max_quadratic: int = MAX_QUADRATIC,
             dtype: str = "float32") -> DriftResult:  # fmt: skip
    """MMD two-sample test with an RBF kernel (median-heuristic bandwidth) and a permutation p-value.

    Args:
        x: reference sample (n_ref × d).
        y: test sample (n_test × d).
        alpha: significance level.
        n_permutations: B, the number of random permutations.
        bandwidth: kernel σ; None for the median heuristic on the pooled sample.
        seed: seed of the permutations, the blocks and (a separate stream) the median's subsample.
        method: "auto" (default: the permutation test on the whole sample up to ``max_quadratic`` pooled examples,
            on disjoint blocks of at most that many beyond, see :func:`mmd_blocks`), "permutation" (whole sample at
            any size: time and memory grow with n²·B) or "linear" (linear-time MMD²_l with a normal approximation:
            fast but far less powerful, asked for by name only).
        max_quadratic: see ``method``.
        dtype: "float32" (default; the statistic agrees with float64 to ~1e-5 relative) or "float64".

    Returns:
        The result; ``statistic`` is the unbiased MMD² (the mean over blocks when blocked) or MMD²_l (linear).
    """
    x, y = _check_pair(x, y)
    z = np.concatenate([x, y])
    if method not in ("auto", "permutation", "linear"):
        raise UserError(f"unknown MMD method {method!r}: use auto, permutation or linear")
    if max_quadratic < 8:
        raise UserError(f"max_quadratic must be at least 8 pooled examples (got {max_quadratic})")
    # the bandwidth's rows and the permutations come from independent streams: the permutations must not depend
    # on which rows set the kernel
    bw_seed, perm_seed = np.random.SeedSequence(seed).spawn(2)
    linear = method == "linear"
    with _threads(0 if linear else min(len(z), max_quadratic)):  # the linear statistic is O(n d) work
        sigma = float(bandwidth) if bandwidth else median_bandwidth(z, seed=bw_seed)
        if linear:
            return _mmd_linear(x, y, alpha, sigma, seed)
        limit = len(z) if method == "permutation" else max_quadratic
        return _mmd_permutation(x, y, alpha, n_permutations, sigma, perm_seed, dtype, limit)


def _mmd_permutation(x: np.ndarray, y: np.ndarray, alpha: float, n_permutations: int, sigma: float,
                     seed: np.random.SeedSequence, dtype: str, limit: int) -> DriftResult:  # fmt: skip
    """The permutation test on the whole pooled sample, or on K disjoint blocks of it.

    With blocks, the statistic is the mean of the blocks' MMD² and each random split permutes every block
    independently: under no shift the pooled examples are exchangeable, so the data's law is invariant under the
    product of the within-block permutation groups and the p-value stays exact (the randomisation test over any
    group; Hemerik & Goeman, "Exact testing with random permutations", TEST 2018).
    """
    if n_permutations < 1:
        raise UserError(f"n_permutations must be positive (got {n_permutations})")
    rng = np.random.default_rng(seed)
    tdtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if tdtype is None:
        raise UserError(f"unknown dtype {dtype!r}: use float32 or float64")
    k, m_x, m_y = mmd_blocks(len(x), len(y), limit)
    if k == 1 and m_x == len(x) and m_y == len(y):
        blocks = [(np.arange(len(x)), np.arange(len(y)))]
    else:
        blocks = _block_rows(len(x), len(y), k, m_x, m_y, rng)
    stats = np.zeros(n_permutations + 1)
    for ix, iy in blocks:
        u = _indicators(len(ix) + len(iy), len(ix), n_permutations, rng)
        stats += mmd_permutation_stats(np.concatenate([x[ix], y[iy]]), u, sigma, tdtype)
    # the terms of MMD² are means of kernel values in [0, 1]: rounding errors stay below these absolute sizes
    tol = (1e-6 if tdtype == torch.float32 else 1e-12) * len(blocks)
    details = {"bandwidth": sigma, "n_permutations": n_permutations, "blocks": len(blocks)}
    return DriftResult("mmd", float(stats[0]) / len(blocks), permutation_pvalue(stats[0], stats[1:], tol), alpha,
                       m_x, m_y, x.shape[1], details)  # fmt: skip


def mmd_blocks(n_x: int, n_y: int, limit: int) -> tuple[int, int, int]:
    """How the block permutation test divides a pooled sample larger than ``limit``: (K blocks, m_x, m_y used).

    Within a block of s/K pooled examples the unbiased MMD² has mean MMD² and a null spread ∝ K/s (a degenerate
    U-statistic: Gretton et al. 2012, Theorem 12), so the mean over K independent blocks has a signal-to-noise ratio
    ∝ √K · s/K = s/√K for small shifts (the block form is Zaremba, Gretton & Blaschko's B-test, NeurIPS 2013, with
    many small blocks and a normal null; here the blocks are as large as allowed and the null is a permutation one).
    Blocks hold at most ``limit`` examples, so with k = ⌊n/limit⌋ the choice is k full blocks (dropping the rest)
    or k + 1 blocks sharing all n, whichever has the larger s/√K. That ratio is continuous and non-decreasing in n:
    power does not drop as n crosses a block boundary. Each side keeps its share of the pooled sample and every
    block at least two examples of each.

    Args:
        n_x: reference sample size.
        n_y: test sample size.
        limit: the most pooled examples in one block (:data:`MAX_QUADRATIC`).

    Returns:
        (K, m_x, m_y); (1, n_x, n_y) when the pooled sample fits one block.
    """
    n = n_x + n_y
    if n <= limit:
        return 1, n_x, n_y
    k = n // limit
    k, s = (k, k * limit) if math.sqrt(k) * limit >= n / math.sqrt(k + 1) else (k + 1, n)
    k = max(1, min(k, n_x // 2, n_y // 2))
    s = min(s, k * limit)
    m_x = min(n_x, max(2 * k, round(s * n_x / n)))
    return k, m_x, min(n_y, max(2 * k, s - m_x))


def _block_rows(n_x: int, n_y: int, k: int, m_x: int, m_y: int,
                rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """K disjoint random (reference rows, test rows) blocks of ``m_x`` and ``m_y`` rows in all."""
    px, py = rng.permutation(n_x)[:m_x], rng.permutation(n_y)[:m_y]
    return list(zip(np.array_split(px, k), np.array_split(py, k)))


def _mmd_linear(x: np.ndarray, y: np.ndarray, alpha: float, sigma: float, seed: int) -> DriftResult:
    """Linear-time MMD²_l over disjoint pairs (Gretton et al. 2012, Lemma 14, Corollary 16); one-sided z-test."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    half = min(len(x), len(y)) // 2
    if half < 2:
        raise UserError("linear-time MMD needs at least 4 examples per sample")
    xs = torch.as_tensor(x[rng.permutation(len(x))[: 2 * half]])
    ys = torch.as_tensor(y[rng.permutation(len(y))[: 2 * half]])
    x1, x2, y1, y2 = xs[0::2], xs[1::2], ys[0::2], ys[1::2]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((a - b) ** 2).sum(1) / (2 * sigma**2))

    h = (k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)).numpy()
    stat, sd = float(h.mean()), float(h.std(ddof=1))
    p = float(norm.sf(stat / (sd / math.sqrt(half)))) if sd > 0 else (0.0 if stat > 0 else 1.0)
    return DriftResult("mmd_linear", stat, p, alpha, 2 * half, 2 * half, x.shape[1],
                       {"bandwidth": sigma, "pairs": half})  # fmt: skip


# ------------------------------------------------------------------------------------------------------------- KS


def combine_pvalues(p: np.ndarray, correction: str = "bonferroni") -> float:
    """One global p-value from per-feature ones: Bonferroni ``min(1, d · min p)`` or, for "fdr", Simes'
    ``min_k d · p_(k) / k`` (its rejection at α is the Benjamini–Hochberg procedure rejecting anything at α)."""
    p = np.sort(np.asarray(p, dtype=np.float64).ravel())
    d = len(p)
    if correction == "bonferroni":
        return float(min(1.0, d * p[0]))
    if correction == "fdr":
        return float(min(1.0, np.min(d * p / np.arange(1, d + 1))))
    raise UserError(f"unknown correction {correction!r}: use bonferroni or fdr")


def ks_test(x: Any, y: Any, alpha: float = ALPHA, correction: str = "bonferroni", detector: str = "ks",
            **_: Any) -> DriftResult:  # fmt: skip
    """Kolmogorov–Smirnov per feature, combined by Bonferroni (default) or Simes/BH (``correction="fdr"``).

    Features constant in both samples carry no evidence and are left out of the correction.

    Returns:
        The result; ``statistic`` is the largest KS distance over features.
    """
    from scipy.stats import ks_2samp

    x, y = _check_pair(x, y, min_n=1)
    keep = ~((x.min(0) == x.max(0)) & (y.min(0) == y.max(0)) & (x[0] == y[0]))
    if not keep.any():
        return DriftResult(detector, 0.0, 1.0, alpha, len(x), len(y), x.shape[1], {"correction": correction})
    with warnings.catch_warnings():  # scipy falls back to the asymptotic p-value where the exact one fails; fine
        warnings.filterwarnings("ignore", message=".*Exact calculation unsuccessful", category=RuntimeWarning)
        res = ks_2samp(x[:, keep], y[:, keep], axis=0)
    pv, st = np.atleast_1d(res.pvalue), np.atleast_1d(res.statistic)
    return DriftResult(detector, float(st.max()), combine_pvalues(pv, correction), alpha, len(x), len(y),
                       x.shape[1], {"correction": correction, "feature_pvalues": [float(v) for v in pv],
                                    "features_tested": int(keep.sum())})  # fmt: skip


def bbsd_test(x: Any, y: Any, alpha: float = ALPHA, correction: str = "bonferroni", **_: Any) -> DriftResult:
    """Black-box shift detection: KS on softmax outputs (rows of class probabilities), Bonferroni-combined.

    With two classes the second column is one minus the first, so only the first is tested.
    """
    x, y = as_matrix(x, "reference outputs"), as_matrix(y, "test outputs")
    if x.shape[1] == 2 and y.shape[1] == 2:
        x, y = x[:, 1:], y[:, 1:]
    return ks_test(x, y, alpha, correction, detector="bbsd")


def looks_like_probabilities(a: np.ndarray) -> bool:
    """Whether every row is a probability vector (non-negative, summing to one)."""
    return a.ndim == 2 and a.shape[1] >= 2 and bool((a >= -1e-6).all()) and np.allclose(a.sum(1), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------- classifier


CLASSIFIERS = ("logistic", "mlp", "gbm")
"""Models of the classifier test; the first is the default (the most powerful of the three in
``bench_scripts/drift_power.py --c2st``)."""


def _classifier(name: str, seed: int, n_train: int):
    if name == "logistic":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    if name == "gbm":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=100, random_state=seed)
    if name == "mlp":
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # early stopping needs a stratified validation cut: only with enough examples
        return make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=300, early_stopping=n_train >= 40,
                                                             random_state=seed))  # fmt: skip
    raise UserError(f"unknown classifier {name!r}: use {', '.join(CLASSIFIERS)}")


_CONTROLLER: list = []


def _one_thread():
    """threadpoolctl's limit to one BLAS/OpenMP thread, from one controller: building one scans the process's
    libraries (about 20 ms, more than a small fit)."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1)


def _scores(clf, z: np.ndarray) -> np.ndarray:
    """The classifier's log-odds that a row is from the test sample."""
    if hasattr(clf, "decision_function"):
        return np.asarray(clf.decision_function(z), dtype=np.float64).ravel()
    p = np.clip(clf.predict_proba(z)[:, 1], 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p)


def classifier_test(x: Any, y: Any, alpha: float = ALPHA, classifier: str = CLASSIFIERS[0], seed: int = 0,
                    test_fraction: float = 0.5, n_permutations: int = 1000, statistic: str = "logit",
                    **_: Any) -> DriftResult:  # fmt: skip
    """Classifier two-sample test (Lopez-Paz & Oquab, ICLR 2017) with an exact null.

    The pooled sample is labelled by origin (1 = test), a classifier is trained on a stratified
    ``1 − test_fraction`` of it and scores the rest. That classifier never saw the held-out rows, so under no shift
    their labels are exchangeable given its scores: permuting the held-out labels gives an exact null for any
    statistic of (scores, labels), whatever the class balance of the predictions (a binomial test of the accuracy
    is valid too but conservative: size 0.023 at α = 0.05 on 20 vs 20, and power 0.46 on a mean shift at 100 vs
    100 where this test has 0.66, both with logistic regression; ``bench_scripts/drift_power.py --tables c2st``).
    Statistics:

    - ``logit`` (default): the mean held-out log-odds of test rows minus that of reference rows, the C2ST-L of Liu
      et al., "Learning Deep Kernels for Non-Parametric Two-Sample Tests" (ICML 2020), with ``n_permutations``
      random permutations and the +1 rule; size ≈ α, and more power than accuracy, which throws the margins away.
    - ``accuracy``: the held-out accuracy; its permutation null is hypergeometric given the number of rows
      predicted "test" (Fisher's exact test on the predicted-by-true table), computed exactly. Valid, but discrete:
      conservative on small samples (size 0.027 at 20 vs 20, 0 at 20 vs 60, where the log-odds test has 0.053).

    Classifiers (:data:`CLASSIFIERS`): ``logistic`` (default), ``mlp`` (one hidden layer of 64) and ``gbm``
    (histogram gradient boosting; uses OpenMP threads, slow on a loaded machine), all scikit-learn.

    Returns:
        The result; ``statistic`` is the log-odds difference or the accuracy; ``details`` hold both, the
        held-out count and the number correct.
    """
    from sklearn.model_selection import train_test_split

    if statistic not in ("logit", "accuracy"):
        raise UserError(f"unknown classifier-test statistic {statistic!r}: use logit or accuracy")
    if n_permutations < 1:
        raise UserError(f"n_permutations must be positive (got {n_permutations})")
    x, y = _check_pair(x, y, min_n=4)
    rng = np.random.default_rng(seed)
    z, lab = np.concatenate([x, y]), np.r_[np.zeros(len(x), int), np.ones(len(y), int)]
    z_tr, z_te, l_tr, l_te = train_test_split(z, lab, test_size=test_fraction, stratify=lab,
                                              random_state=int(rng.integers(2**31)))  # fmt: skip
    from sklearn.exceptions import ConvergenceWarning

    # logistic and MLP fits multiply small matrices: extra threads only add waiting (gbm keeps its OpenMP threads)
    with _one_thread() if classifier != "gbm" else contextlib.nullcontext(), warnings.catch_warnings():
        # with no shift there is nothing to learn, so an iteration cap is reached by design
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = _classifier(classifier, seed, len(z_tr)).fit(z_tr, l_tr)
        s = _scores(clf, z_te)
    pred = (s > 0).astype(int)
    correct = int((pred == l_te).sum())
    n1 = int(l_te.sum())
    diff = float(s[l_te == 1].mean() - s[l_te == 0].mean())
    details = {"classifier": classifier, "statistic": statistic, "n_held_out": len(l_te), "correct": correct,
               "accuracy": correct / len(l_te), "logit_difference": diff}  # fmt: skip
    if statistic == "accuracy":
        from scipy.stats import hypergeom

        # correct = 2·TP + n − n₁ − (rows predicted test): given the predictions, monotone in TP ~ hypergeometric
        tp = int(((pred == 1) & (l_te == 1)).sum())
        p = float(hypergeom.sf(tp - 1, len(l_te), n1, int(pred.sum())))
        return DriftResult("classifier", correct / len(l_te), p, alpha, len(x), len(y), x.shape[1], details)
    # the difference of means is monotone in the sum of the test-labelled scores: permute that sum
    picks = np.argsort(rng.random((n_permutations, len(s))), axis=1)[:, :n1]
    sums = s[picks].sum(1)
    tol = 1e-9 * float(np.abs(s).sum() + 1.0)
    p = permutation_pvalue(float(s[l_te == 1].sum()), sums, tol)
    details["n_permutations"] = n_permutations
    return DriftResult("classifier", diff, p, alpha, len(x), len(y), x.shape[1], details)


# ------------------------------------------------------------------------------------------------------ registry


DETECTORS: dict[str, Callable[..., DriftResult]] = {
    "mmd": mmd_test,
    "ks": ks_test,
    "classifier": classifier_test,
    "bbsd": bbsd_test,
}
"""Detector name -> ``fn(x, y, alpha=..., **options) -> DriftResult``."""

_OPTIONS = {
    "mmd": {"n_permutations", "bandwidth", "seed", "method", "max_quadratic", "dtype"},
    "ks": {"correction"},
    "bbsd": {"correction"},
    "classifier": {"classifier", "seed", "test_fraction", "n_permutations", "statistic"},
}


def check_detector(name: str) -> None:
    """Raises a UserError (with a did-you-mean hint) unless ``name`` is a key of :data:`DETECTORS`."""
    if name not in DETECTORS:
        import difflib

        near = difflib.get_close_matches(name, DETECTORS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"unknown detector {name!r}: {hint}known: {', '.join(DETECTORS)}")


def run_detector(name: str, x: Any, y: Any, alpha: float = ALPHA, **options: Any) -> DriftResult:
    """Runs a detector by name, passing only the options it takes.

    Raises:
        UserError: unknown detector, or alpha outside (0, 1).
    """
    check_detector(name)
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha must be strictly between 0 and 1 (got {alpha})")
    kwargs = {k: v for k, v in options.items() if k in _OPTIONS[name] and v is not None}
    return DETECTORS[name](x, y, alpha=alpha, **kwargs)


# ----------------------------------------------------------------------------------------------------- reductions


class Reduction:
    """A fixed map from flattened inputs to a few dimensions; ``fit`` on data other than (or pooled from) the two
    samples, then ``transform`` both."""

    name = "none"

    def fit(self, data: np.ndarray) -> "Reduction":
        return self

    def transform(self, data: np.ndarray) -> np.ndarray:
        return as_matrix(data)


class PCAReduction(Reduction):
    """Principal components: the top-k eigenvectors of the covariance, from the smaller of the covariance (d × d)
    and the Gram matrix (n × n), so wide inputs cost nothing extra. Deterministic (signs fixed so each component's
    largest entry is positive); numpy only, which keeps scikit-learn's import out of every trial.

    Args:
        k: number of components (fewer when the data has fewer features or rows).
        seed: unused (the solution is deterministic); kept so every reduction takes the same arguments.
    """

    def __init__(self, k: int, seed: int = 0):
        self.k, self.seed, self.name = k, seed, f"pca:{k}"

    def fit(self, data: np.ndarray) -> "PCAReduction":
        data = as_matrix(data)
        self.mean = data.mean(0)
        c = data - self.mean
        k = min(self.k, data.shape[1], len(data))
        if data.shape[1] <= len(data):
            vals, vecs = np.linalg.eigh(c.T @ c)
            comps = vecs[:, ::-1][:, :k]
        else:  # eigenvectors of C Cᵀ mapped back through Cᵀ are those of CᵀC
            vals, vecs = np.linalg.eigh(c @ c.T)
            vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
            comps = (c.T @ vecs) / np.sqrt(np.clip(vals, 1e-12, None))
        signs = np.sign(comps[np.abs(comps).argmax(0), np.arange(comps.shape[1])])
        self.components = comps * np.where(signs == 0, 1.0, signs)
        return self

    def transform(self, data: np.ndarray) -> np.ndarray:
        return (as_matrix(data) - self.mean) @ self.components


class RandomProjection(Reduction):
    """Gaussian random projection to k dimensions (entries N(0, 1/k)); needs no data but the width."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.seed, self.name = k, seed, f"rp:{k}"

    def fit(self, data: np.ndarray) -> "RandomProjection":
        d = as_matrix(data).shape[1]
        self.w = np.random.default_rng(self.seed).normal(0.0, 1.0 / math.sqrt(self.k), (d, self.k))
        return self

    def transform(self, data: np.ndarray) -> np.ndarray:
        return as_matrix(data) @ self.w


def make_reduction(spec: str, n_features: int, seed: int = 0, auto_k: int = 32) -> Reduction:
    """A reduction from its name: ``none``, ``pca:K``, ``rp:K`` or ``auto`` (none up to ``auto_k`` features, else
    ``pca:auto_k``).

    Raises:
        UserError: an unknown name or a bad K.
    """
    if spec == "auto":
        spec = "none" if n_features <= auto_k else f"pca:{auto_k}"
    if spec == "none":
        return Reduction()
    kind, _, k = spec.partition(":")
    if kind in ("pca", "rp"):
        if not k.isdigit() or int(k) < 1:
            raise UserError(f"reduction {spec!r} needs a positive number of components, e.g. {kind}:32")
        return (PCAReduction if kind == "pca" else RandomProjection)(int(k), seed)
    raise UserError(f"unknown reduction {spec!r}: use auto, none, pca:K, rp:K (or outputs/features with a model)")


def softmax_outputs(scores: torch.Tensor, task: str = "classification") -> np.ndarray:
    """What BBSD tests: class probabilities for classification, the raw scores (n × k) for any other task."""
    scores = scores.detach().float()
    if task == "classification":
        scores = scores.softmax(-1)
    return scores.reshape(len(scores), -1).cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------------------ BBSE


def bbse(ref_labels: Sequence[int], ref_preds: Sequence[int], test_preds: Sequence[int],
         num_classes: int) -> dict[str, Any]:  # fmt: skip
    """Black-box shift estimation of the test label distribution (Lipton et al., ICML 2018).

    Under label shift (p(x | y) fixed), the prediction distribution on the test set is μ = C w, where
    C[i, j] = P_ref(ŷ = i, y = j) and w[j] = q(y = j) / p(y = j). So ŵ = C⁻¹ μ̂ (least squares when C is singular),
    clipped at zero, and q̂ = ŵ ⊙ p̂ renormalised.

    Args:
        ref_labels: true labels of a held-out reference sample.
        ref_preds: the classifier's predictions on it.
        test_preds: its predictions on the test sample.
        num_classes: number of classes.

    Returns:
        ``{"weights": ŵ, "q_test": q̂, "p_ref": p̂, "condition_number": cond(C)}`` (lists of floats).
    """
    yl, yp = np.asarray(ref_labels, int), np.asarray(ref_preds, int)
    tp = np.asarray(test_preds, int)
    if len(yl) == 0 or len(tp) == 0 or len(yl) != len(yp):
        raise UserError("BBSE needs reference labels and predictions of equal, non-zero length and test predictions")
    conf = np.zeros((num_classes, num_classes))
    np.add.at(conf, (yp, yl), 1.0)
    conf /= len(yl)
    mu = np.bincount(tp, minlength=num_classes) / len(tp)
    p_ref = np.bincount(yl, minlength=num_classes) / len(yl)
    w = np.clip(np.linalg.lstsq(conf, mu, rcond=None)[0], 0.0, None)
    q = w * p_ref
    q = q / q.sum() if q.sum() > 0 else p_ref
    return {"weights": w.tolist(), "q_test": q.tolist(), "p_ref": p_ref.tolist(),
            "condition_number": float(np.linalg.cond(conf))}  # fmt: skip
