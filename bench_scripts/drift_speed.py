"""Speed of the drift detectors (`make bench-drift`).

The headline is the MMD permutation test with 100 permutations on n = 1000 vs 1000 and 5000 vs 5000 examples at
d = 32 (goals: under 0.25 s and under 2 s on 2 cores), with the growth of the process's resident memory during the
5000 case. Then, for scale, the other detectors at 1000 vs 1000 and, at 50,000 vs 50,000, the MMD test that
``method="auto"`` runs there (the permutation test on 10 disjoint blocks of 10,000, one run after the warm-up) and
the linear-time MMD (asked for by name: fast, far less powerful).
Figures depend on the machine and on its load; each is the median (and minimum) of several repeats after a warm-up.
The CPU column (process CPU seconds, all threads) is less sensitive to other processes: wall time on idle cores is
at least CPU / threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from shiftbench import drift


def _kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """Median and minimum wall seconds, and median CPU seconds of the process (all threads) per call."""
    fn()  # warm-up: thread pools, first allocations
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), min(times), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the goal's 2 cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"drift detector speed: torch {torch.__version__}, {a.threads} thread(s), d = {a.dim}, "
          f"median (min) of {a.repeats} runs")  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) at start: {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'test':44s} {'median s':>9s} {'min s':>8s} {'CPU s':>7s}  goal")
    for n, goal in ((1000, 0.25), (5000, 2.0)):
        x, y = rng.normal(size=(n, a.dim)), rng.normal(size=(n, a.dim))
        rss0 = _kib("VmRSS")
        med, best, cpu = timed(lambda x=x, y=y: drift.mmd_test(x, y, n_permutations=100, seed=1), a.repeats)
        hwm = _kib("VmHWM")
        mem = f", peak RSS +{(hwm - rss0) / 1024:.0f} MiB" if rss0 is not None and hwm is not None else ""
        verdict = "met" if med < goal else "MISSED"
        name = f"MMD, 100 permutations, {n} vs {n}"
        print(f"{name:44s} {med:9.3f} {best:8.3f} {cpu:7.3f}  < {goal} s: {verdict}{mem}")
    x, y = rng.normal(size=(1000, a.dim)), rng.normal(size=(1000, a.dim))
    others = {
        "KS per feature (Bonferroni), 1000 vs 1000": lambda: drift.ks_test(x, y),
        "classifier test (logistic), 1000 vs 1000": lambda: drift.classifier_test(x, y),
        "classifier test (mlp), 1000 vs 1000": lambda: drift.classifier_test(x, y, classifier="mlp"),
        "MMD, 1000 permutations, 1000 vs 1000": lambda: drift.mmd_test(x, y, n_permutations=1000),
    }
    for name, fn in others.items():
        med, best, cpu = timed(fn, a.repeats)
        print(f"{name:44s} {med:9.3f} {best:8.3f} {cpu:7.3f}")
    big_x, big_y = rng.normal(size=(50_000, a.dim)), rng.normal(size=(50_000, a.dim))
    med, best, cpu = timed(lambda: drift.mmd_test(big_x, big_y, n_permutations=100), 1)
    print(f"{'MMD auto, 10 blocks, 100 perm., 50000 vs 50000':44s} {med:9.3f} {best:8.3f} {cpu:7.3f}")
    med, best, cpu = timed(lambda: drift.mmd_test(big_x, big_y, method="linear"), a.repeats)
    print(f"{'MMD linear time, 50000 vs 50000':44s} {med:9.3f} {best:8.3f} {cpu:7.3f}")


if __name__ == "__main__":
    main()
