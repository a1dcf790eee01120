"""Detection rates of the drift detectors on the digits datasets, on Failing Loudly's sample-size grid.

Rabanser, Günnemann & Lipton, "Failing Loudly: An Empirical Study of Methods for Detecting Dataset Shift"
(NeurIPS 2019) report, per detector and shift, the fraction of repeats that detect the shift at α = 0.05 for test
samples of n ∈ {10, 20, 50, 100, 200, 500, 1000} against a fixed reference sample. This script does the same here.

Per dataset: an ERM model is trained (``shiftbench`` trial, default test environment held out). The reference pool
is the training environments' ``out`` splits (never trained on); each repeat divides it at random into two halves,
draws the reference sample (``--ref-size``, default 1000) from one and shifted test samples from the other:

- ``none``: no shift (a second sample of the same pool): the rate is the false-positive rate;
- ``noise``: Gaussian noise of standard deviation ``--noise`` (default 0.1) added to every test image, clipped to
  [0, 1] (Failing Loudly's "medium" and "large" are 10/255 and 100/255);
- ``label``: class proportions shifted, class 0 three times as frequent as the others relative to the pool;
- ``env``: the held-out environment (its ``in`` split), the benchmark's own shift.

Detectors: ``mmd`` (permutation, 100 permutations), ``ks`` (Bonferroni) and ``classifier`` (the default: logistic
regression, held-out log-odds by permutation) on 32 principal components of the inputs fitted on the training
``in`` splits; ``bbsd`` (KS on softmax outputs) and ``mmd_feat`` (MMD on the penultimate features) of the ERM model.

Run with the project's venv python, e.g. ``bench_scripts/drift_power.py --datasets colored_digits --repeats 20
--null-repeats 60`` (the full grid), or a larger no-shift check on part of it: ``--shifts none --null-repeats 300
--sizes 10,1000 --detectors mmd,bbsd,ks``. Prints Markdown tables; ``--out`` writes the rates (with repeat counts)
as JSON. A dataset takes minutes on 2 idle cores (the ERM training is most of it).

Two synthetic tables need no training (``--tables``; ``--before FILE`` adds the same rows for another version of
``bench/drift.py``, e.g. ``git show 750095b:bench/drift.py > /tmp/old_drift.py``, the code before the block test):

- ``mmd-n``: MMD power on one small Gaussian shift at pooled sizes around the quadratic limit (``--mmd-sizes``,
  default 4000 ... 12000; reference and test halves, 10001 = 5000 vs 5001): power must not drop as n crosses it.
- ``c2st``: the classifier test's size (no shift) and power (a mean shift) per classifier, against the binomial
  test of the accuracy that the code before used.

``--tables mmd-n,c2st --before /tmp/old_drift.py`` prints both in a few CPU-minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shiftbench import drift
from shiftbench.commands.drift import TrialModel
from shiftbench.config import TrialSpec
from shiftbench.trainer import load_dataset, run_trial

SIZES = (10, 20, 50, 100, 200, 500, 1000)
SHIFTS = ("none", "noise", "label", "env")
DETECTORS = ("mmd", "ks", "classifier", "bbsd", "mmd_feat")
ENV_SIZE = {"colored_digits": 8000, "rotated_digits": 8000}
"""Large enough that each half of the reference pool holds 1,000 examples of the shifted class mix."""


def flat(t: torch.Tensor) -> np.ndarray:
    return t.reshape(len(t), -1).double().numpy()


class Setup:
    """A dataset, its trained ERM model, the reference pool and the input reduction."""

    def __init__(self, name: str, steps: int, workdir: Path, seed: int):
        options = {"env_size": ENV_SIZE.get(name, 4000)}
        spec = TrialSpec.resolve(name, "erm", seed=seed, steps=steps, eval_every=steps, dataset_options=options)
        t0 = time.time()
        final = run_trial(spec, workdir / name)
        self.train_time = time.time() - t0
        self.model = TrialModel(workdir / name)
        ds = load_dataset(name, spec.dataset_options)
        self.test_env = spec.test_envs[0]
        train = [j for j in range(len(ds.environments)) if j != self.test_env]
        splits = ds.eval_splits()
        self.pool_x = np.concatenate([flat(splits[f"env{j}_out"].tensors["x"]) for j in train])
        self.pool_y = np.concatenate([splits[f"env{j}_out"].tensors["y"].numpy() for j in train])
        self.env_x = flat(splits[f"env{self.test_env}_in"].tensors["x"])
        fit = np.concatenate([flat(splits[f"env{j}_in"].tensors["x"]) for j in train])
        rng = np.random.default_rng(seed)
        self.pca = drift.PCAReduction(32, seed=seed).fit(fit[rng.choice(len(fit), 2000, replace=False)])
        self.num_classes = ds.num_classes
        rec = final["record"]
        self.acc = {"train_out": float(np.mean([rec[f"env{j}_out_acc"] for j in train])),
                    "test_in": float(rec[f"env{self.test_env}_in_acc"])}  # fmt: skip
        self.env_name = ds.env_names[self.test_env]

    def views(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {"pca": self.pca.transform(x), "outputs": self.model.apply(x, "outputs"),
                "features": self.model.apply(x, "features")}  # fmt: skip


def label_sample(y: np.ndarray, n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` row indices of ``y`` with class 0 three times as frequent (relative to the pool) as before."""
    p = np.bincount(y, minlength=num_classes) / len(y)
    w = p.copy()
    w[0] *= 3.0
    counts = np.floor(n * w / w.sum()).astype(int)
    counts[np.argsort(-(n * w / w.sum() - counts))[: n - counts.sum()]] += 1
    return np.concatenate([rng.choice(np.flatnonzero(y == k), c, replace=False) for k, c in enumerate(counts)])


RUN = {
    "mmd": lambda ref, test, a, seed: drift.mmd_test(ref["pca"], test["pca"], a, n_permutations=100, seed=seed),
    "ks": lambda ref, test, a, seed: drift.ks_test(ref["pca"], test["pca"], a),
    "classifier": lambda ref, test, a, seed: drift.classifier_test(ref["pca"], test["pca"], a, seed=seed),
    "bbsd": lambda ref, test, a, seed: drift.bbsd_test(ref["outputs"], test["outputs"], a),
    "mmd_feat": lambda ref, test, a, seed: drift.mmd_test(ref["features"], test["features"], a, n_permutations=100,
                                                          seed=seed),
}  # fmt: skip


def run_dataset(s: Setup, repeats: int, null_repeats: int, ref_size: int, noise: float,
                grid: tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]) -> dict:  # fmt: skip
    """Detection rates: shift -> detector -> n -> fraction flagged, plus the repeat counts per shift."""
    sizes, shifts, detectors = grid
    hits = {sh: {d: {n: 0 for n in sizes} for d in detectors} for sh in shifts}
    counts = {sh: 0 for sh in shifts}
    t0 = time.time()
    total = max(repeats if set(shifts) - {"none"} else 0, null_repeats if "none" in shifts else 0)
    for r in range(total):
        if r % 10 == 0:
            print(f"  repeat {r} of {total}, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        rng = np.random.default_rng(1000 + r)
        perm = rng.permutation(len(s.pool_x))
        ref_half, test_half = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        ref = s.views(s.pool_x[rng.choice(ref_half, ref_size, replace=False)])
        for shift in shifts:
            if shift != "none" and r >= repeats or shift == "none" and r >= null_repeats:
                continue
            counts[shift] += 1
            for n in sizes:
                if shift == "env":
                    x = s.env_x[rng.choice(len(s.env_x), n, replace=False)]
                elif shift == "label":
                    x = s.pool_x[test_half[label_sample(s.pool_y[test_half], n, s.num_classes, rng)]]
                else:
                    x = s.pool_x[rng.choice(test_half, n, replace=False)]
                    if shift == "noise":
                        x = np.clip(x + rng.normal(0.0, noise, x.shape), 0.0, 1.0)
                test = s.views(x)
                for d in detectors:
                    hits[shift][d][n] += int(RUN[d](ref, test, drift.ALPHA, r).drift)
    return {sh: {d: {str(n): hits[sh][d][n] / counts[sh] for n in sizes} for d in detectors} for sh in shifts} | {
        "repeats": counts}


def table(name: str, s: Setup, rates: dict, grid: tuple) -> str:
    sizes, shifts, detectors = grid
    lines = [f"### {name} (held out: env{s.test_env} {s.env_name}; ERM accuracy training-env out "
             f"{100 * s.acc['train_out']:.1f}%, test-env in {100 * s.acc['test_in']:.1f}%)", "",
             "| shift | detector | " + " | ".join(f"n={n}" for n in sizes) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in sizes) + " |"]  # fmt: skip
    for sh in shifts:
        for d in detectors:
            cells = " | ".join(f"{100 * rates[sh][d][str(n)]:.0f}" for n in sizes)
            lines.append(f"| {sh} (R={rates['repeats'][sh]}) | {d} | {cells} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- synthetic tables

MMD_SIZES = (4000, 6000, 8000, 10000, 10001, 12000)


def load_drift(path: Path):
    """Another version of bench/drift.py, imported as ``shiftbench._before_drift`` (it imports ``.errors``)."""
    spec = importlib.util.spec_from_file_location("shiftbench._before_drift", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mmd_n_table(versions: dict, sizes: tuple[int, ...], repeats: int, dim: int, shift: float) -> str:
    """Power of ``mmd_test`` (auto, 100 permutations) on N(0, I) against N(δ/√d · 1, I), per version and pooled n."""
    hits = {v: dict.fromkeys(sizes, 0) for v in versions}
    plan: dict[str, dict[int, str]] = {v: {} for v in versions}
    secs = {v: dict.fromkeys(sizes, 0.0) for v in versions}
    half = (max(sizes) + 1) // 2
    for r in range(repeats):
        rng = np.random.default_rng(r)
        x, y = rng.normal(size=(half, dim)), rng.normal(shift / math.sqrt(dim), 1.0, size=(half, dim))
        for v, mod in versions.items():
            for n in sizes:
                t0 = time.process_time()
                res = mod.mmd_test(x[: n // 2], y[: n - n // 2], n_permutations=100, seed=r)
                secs[v][n] += time.process_time() - t0
                hits[v][n] += int(res.drift)
                blocks = res.details.get("blocks", 1)
                plan[v][n] = ("linear" if res.detector == "mmd_linear" else
                              f"{blocks} × {(res.n_ref + res.n_test) // blocks}" if blocks > 1 or
                              res.n_ref + res.n_test < n else "whole")  # fmt: skip
        print(f"  mmd-n repeat {r + 1} of {repeats}", file=sys.stderr, flush=True)
    lines = [f"### MMD power across the quadratic limit (d = {dim}, mean shift ‖δ‖ = {shift}, R = {repeats}, "
             f"α = {drift.ALPHA}, 100 permutations)", "",
             "| version | " + " | ".join(f"n={n}" for n in sizes) + " |",
             "| --- | " + " | ".join("---:" for _ in sizes) + " |"]  # fmt: skip
    for v in versions:
        lines.append(f"| {v}: power | " + " | ".join(f"{hits[v][n] / repeats:.2f}" for n in sizes) + " |")
        lines.append(f"| {v}: test | " + " | ".join(plan[v][n] for n in sizes) + " |")
        lines.append(f"| {v}: CPU s | " + " | ".join(f"{secs[v][n] / repeats:.2f}" for n in sizes) + " |")
    return "\n".join(lines)


def c2st_rows(versions: dict, classifiers: tuple[str, ...], repeats: int, null_repeats: int) -> str:
    """Size at α (no shift; 20 vs 20 and 20 vs 60, d = 4) and power (a mean shift of 0.5 on one of 4 coordinates,
    100 vs 100) of the classifier test per classifier: the binomial test of accuracy of the code before, and the
    current code's permutation test of the log-odds and Fisher's exact test of the accuracy."""
    def variants(clf: str) -> dict:
        out = {f"{v}: binomial, accuracy": lambda x, y, r, m=m: m.classifier_test(x, y, classifier=clf, seed=r)
               for v, m in versions.items() if v != "current"}  # fmt: skip
        out["current: permutation, log-odds"] = lambda x, y, r: drift.classifier_test(x, y, classifier=clf, seed=r)
        out["current: Fisher, accuracy"] = lambda x, y, r: drift.classifier_test(x, y, classifier=clf, seed=r,
                                                                                 statistic="accuracy")
        return out

    settings = {"size 20 vs 20": (20, 20, 0.0, null_repeats), "size 20 vs 60": (20, 60, 0.0, null_repeats),
                "power 100 vs 100": (100, 100, 0.5, repeats)}  # fmt: skip
    se = math.sqrt(drift.ALPHA * (1 - drift.ALPHA) / null_repeats)
    lines = [f"### Classifier two-sample test (α = {drift.ALPHA}; size: R = {null_repeats}, an exact test lies in "
             f"{drift.ALPHA - 2 * se:.3f}..{drift.ALPHA + 2 * se:.3f} 95% of the time; power: R = {repeats})", "",
             "| classifier | test | " + " | ".join(settings) + " | CPU s / test |",
             "| --- | --- | " + " | ".join("---:" for _ in settings) + " | ---: |"]  # fmt: skip
    for clf in classifiers:
        for name, fn in variants(clf).items():
            cells, cpu, calls = [], 0.0, 0
            for n_x, n_y, shift, reps in settings.values():
                rng = np.random.default_rng(5)
                flags = 0
                for r in range(reps):
                    x, y = rng.normal(size=(n_x, 4)), rng.normal(size=(n_y, 4))
                    y[:, 0] += shift
                    t0 = time.process_time()
                    flags += int(fn(x, y, r).drift)
                    cpu, calls = cpu + time.process_time() - t0, calls + 1
                cells.append(f"{flags / reps:.3f}")
            lines.append(f"| {clf} | {name} | " + " | ".join(cells) + f" | {cpu / calls:.3f} |")
            print(f"  c2st {lines[-1]}", file=sys.stderr, flush=True)  # rows as they come: the table takes a while
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="colored_digits,rotated_digits")
    ap.add_argument("--repeats", type=int, default=30, help="repeats per shifted cell")
    ap.add_argument("--null-repeats", type=int, default=100, help="repeats of the no-shift cells (FPR)")
    ap.add_argument("--ref-size", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=600, help="ERM training steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="test sample sizes")
    ap.add_argument("--shifts", default=",".join(SHIFTS), help=f"subset of {', '.join(SHIFTS)}")
    ap.add_argument("--detectors", default=",".join(DETECTORS), help=f"subset of {', '.join(DETECTORS)}")
    ap.add_argument("--out", type=Path, default=None, help="write the rates as JSON here")
    ap.add_argument("--tables", default="datasets", help="comma-separated datasets (the grid above), mmd-n, c2st")
    ap.add_argument("--before", type=Path, default=None, help="another bench/drift.py to compare in mmd-n and c2st")
    ap.add_argument("--mmd-sizes", default=",".join(map(str, MMD_SIZES)), help="pooled sizes of the mmd-n table")
    ap.add_argument("--mmd-shift", type=float, default=0.12, help="norm of the mean shift of the mmd-n table")
    ap.add_argument("--mmd-dim", type=int, default=32)
    ap.add_argument("--classifiers", default=",".join(drift.CLASSIFIERS), help="classifiers of the c2st table")
    a = ap.parse_args()
    tables = set(a.tables.split(","))
    if tables - {"datasets", "mmd-n", "c2st"}:
        ap.error(f"unknown tables: {sorted(tables - {'datasets', 'mmd-n', 'c2st'})}")
    torch.set_num_threads(a.threads)
    versions = {"current": drift} | ({"before": load_drift(a.before)} if a.before else {})
    if "mmd-n" in tables:
        sizes = tuple(int(n) for n in a.mmd_sizes.split(","))
        print(mmd_n_table(versions, sizes, a.repeats, a.mmd_dim, a.mmd_shift) + "\n", flush=True)
    if "c2st" in tables:
        print(c2st_rows(versions, tuple(a.classifiers.split(",")), a.repeats, a.null_repeats) + "\n", flush=True)
    if "datasets" not in tables:
        return
    grid = (tuple(int(n) for n in a.sizes.split(",")), tuple(a.shifts.split(",")), tuple(a.detectors.split(",")))
    unknown = (set(grid[1]) - set(SHIFTS)) | (set(grid[2]) - set(DETECTORS))
    if unknown:
        ap.error(f"unknown shifts or detectors: {sorted(unknown)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [d.strip() for d in a.datasets.split(",") if d.strip()]:
            t0 = time.time()
            s = Setup(name, a.steps, Path(tmp), a.seed)
            rates = run_dataset(s, a.repeats, a.null_repeats, a.ref_size, a.noise, grid)
            results[name] = {"rates": rates, "accuracy": s.acc, "test_env": s.test_env,
                             "train_seconds": s.train_time, "seconds": time.time() - t0}  # fmt: skip
            print(table(name, s, rates, grid))
            if "none" in grid[1]:
                worst = max(rates["none"][d][str(n)] for d in grid[2] for n in grid[0])
                se = math.sqrt(drift.ALPHA * (1 - drift.ALPHA) / rates["repeats"]["none"])
                print(f"\nlargest no-shift rate {100 * worst:.0f}% (alpha 5%, one SE at R={rates['repeats']['none']}"
                      f": {100 * se:.1f}%)", flush=True)  # fmt: skip
            print(f"{time.time() - t0:.0f} s\n", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"settings": vars(a) | {"out": str(a.out)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
