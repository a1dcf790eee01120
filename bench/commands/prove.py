"""``shiftbench prove RUNS --labels COMMITMENT``: the host proves each trial's accuracy on the committed split.

RUNS is a trial folder or a sweep folder (every finished trial under ``trials/``). Per trial it writes
``proof_<split>.stark`` (the zk-STARK), ``proof_<split>.json`` (its statement and digest) and
``proof_<split>.pred-opening.bin`` (private: the seed that rebuilds the predictions' commitment), and mirrors the
proof to the trial's MLflow run (artifacts ``proofs/``, tag ``shiftbench.proof.<split>.sha256``) when the sweep has a
store. Anyone checks a
proof with ``shiftbench verify --proof FILE [--labels COMMITMENT]``, without labels or predictions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("prove", help="prove trials' accuracies against committed private labels (zk-STARK)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, metavar="RUNS", help="a trial folder or a sweep folder")
    p.add_argument("--labels", type=Path, required=True, metavar="COMMITMENT", help="label commitment (JSON)")
    p.add_argument("--opening", type=Path, default=None, help="its private opening (default <COMMITMENT>.opening.npz)")
    p.add_argument("--no-mlflow", action="store_true", help="do not mirror the proofs to the trials' MLflow runs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..stark.files import log_to_mlflow, prove_trial

    runs = args.runs
    if (runs / "predictions.npz").is_file():
        trials = [runs]
    elif (runs / "trials").is_dir():
        trials = sorted(t for t in (runs / "trials").iterdir() if (t / "final.json").is_file())
    else:
        raise UserError(f"{runs} is neither a trial folder (with predictions.npz) nor a sweep folder (with trials/)")
    if not trials:
        raise UserError(f"no finished trials under {runs}")
    for t in trials:
        s = prove_trial(t, args.labels, args.opening)
        run_id = None if args.no_mlflow else log_to_mlflow(t, s)
        print(f"{t.name}  {s['split']}  {s['correct']}/{s['n']} = {s['accuracy']:.4f}  proof {s['proof_bytes']} B  "
              f"sha256 {s['proof_sha256'][:16]}" + (f"  mlflow run {run_id}" if run_id else ""))
    return 0
