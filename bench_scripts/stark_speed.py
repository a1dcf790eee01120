"""Benchmark of shiftbench.stark (issue 19): prover time, verifier time, proof size and peak memory per n.

    python bench_scripts/stark_speed.py                 # n = 10^4, 10^5, 10^6 with the default parameters
    python bench_scripts/stark_speed.py --n 10000 --n 100000

Each n runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own. Predictions and labels
are random 10-class vectors (seeded); the times are wall-clock on this machine, whatever its cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(n: int) -> dict:
    import resource

    import numpy as np

    from shiftbench.stark import Params, commit_column, prove, soundness, verify

    params = Params()
    rng = np.random.default_rng(0)
    label = rng.integers(0, 10, n)
    pred = np.where(rng.random(n) < 0.8, label, rng.integers(0, 10, n))
    t0 = time.perf_counter()
    lc = commit_column(label, params, b"bench-labels")
    t1 = time.perf_counter()
    pc = commit_column(pred, params, b"bench-preds")
    t2 = time.perf_counter()
    proof = prove(pc, lc, params, context=b"bench")
    t3 = time.perf_counter()
    times = []
    for _ in range(5):
        s = time.perf_counter()
        st = verify(proof, label_root=lc[1].root)
        times.append(time.perf_counter() - s)
    assert st.correct == int(np.sum(pred == label))
    sec = soundness(params, n)
    return {"n": n, "N": pc[0].N, "label_commit_s": round(t1 - t0, 2), "pred_commit_s": round(t2 - t1, 2),
            "prove_s": round(t3 - t2, 2), "verify_ms": round(1000 * min(times), 1),
            "proof_kib": round(len(proof) / 1024, 1),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
            "conjectured_bits": sec["conjectured_bits"], "proven_bits": sec["proven_bits"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="example counts (default 10^4, 10^5, 10^6)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    rows = []
    for n in args.n or [10 ** 4, 10 ** 5, 10 ** 6]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
