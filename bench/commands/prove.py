"""``shiftbench prove RUNS --labels COMMITMENT``: the host proves each trial's accuracy on the committed split.

RUNS is a trial folder or a sweep folder (every finished trial under ``trials/``). Per trial it writes
``proof_<split>.stark`` (the zk-STARK), ``proof_<split>.json`` (its statement and digest) and
``proof_<split>.pred-opening.bin`` (private: the seed that rebuilds the predictions' commitment) and
``proof_<split>.dsse.json`` (the host's signed in-toto Statement about the proof: the trial's second attestation),
and mirrors them to the trial's MLflow run (artifacts ``proofs/``, tag ``shiftbench.proof.<split>.sha256``) when the
sweep has a store. A label commitment serves at most its ``max_proofs`` proofs (its zero-knowledge budget); a run
that would exceed it is refused before any proof is made. Anyone checks a proof with
``shiftbench verify --proof FILE [--labels COMMITMENT] [--public-key HOST.pub]``, without labels or predictions.
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
    p.add_argument("--keys", type=Path, default=None, metavar="HOST_KEYS",
                   help="the host's keys folder that signs each proof's Statement (default: your keys folder)")
    p.add_argument("--scheme", action="append", default=None, choices=("ed25519", "slh-dsa-sha2-128s",
                                                                       "slh-dsa-sha2-128f"),
                   help="signature scheme(s) of the Statement (default ed25519; repeat for several)")
    p.add_argument("--no-sign", action="store_true", help="write no signed Statement (the proof alone still verifies)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..records import FINAL, PREDICTIONS, TRIALS, trial_dirs
    from ..stark.files import log_to_mlflow, proofs_left, prove_trial

    runs = args.runs
    if (runs / PREDICTIONS).is_file():
        trials = [runs]
    elif (runs / TRIALS).is_dir():
        trials = trial_dirs(runs, marker=FINAL)
    else:
        raise UserError(f"{runs} is neither a trial folder (with {PREDICTIONS}) nor a sweep folder (with {TRIALS}/)")
    if not trials:
        raise UserError(f"no finished trials under {runs}")
    left, budget = proofs_left(args.labels, args.opening)
    if len(trials) > left:
        raise UserError(f"{len(trials)} trial(s) to prove, but label commitment {args.labels} may serve {max(left, 0)} "
                        f"more of its {budget} proofs (max_proofs, its zero-knowledge budget); commit the labels "
                        f"again with shiftbench labels commit --max-proofs {len(trials)} (or more)")
    host = None
    if not args.no_sign:
        from ..attest import keys as identities

        host = identities.load(tuple(args.scheme or ("ed25519",)), args.keys)
    for t in trials:
        s = prove_trial(t, args.labels, args.opening, host)
        run_id = None if args.no_mlflow else log_to_mlflow(t, s)
        print(f"{t.name}  {s['split']}  {s['correct']}/{s['n']} = {s['accuracy']:.4f}  proof {s['proof_bytes']} B  "
              f"sha256 {s['proof_sha256'][:16]}" + (f"  mlflow run {run_id}" if run_id else ""))
    return 0
