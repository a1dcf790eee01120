"""``shiftbench labels commit``: the host's salted commitment to one split's labels (for proof-attested scores).

The labels are taken in canonical example-id order (row i is example i), from a ``.npy`` vector or from the
``label`` column of a trial's ``predictions.npz``. Writes the public commitment (JSON, publish it before any
submission) and, next to it, ``<out>.opening.npz`` (private: the labels and the seed of their masking; keep it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("labels", help="commit to a split's private test labels (proof-attested scores)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="labels_cmd", required=True)
    c = sub.add_parser("commit", help="write a salted label commitment and its private opening")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-trial", type=Path, metavar="TRIAL",
                     help="take the split's labels from this trial (this or --npy is required)")
    src.add_argument("--npy", type=Path, metavar="FILE",
                     help="labels as a 1-d integer .npy, row i = example i (this or --from-trial is required)")
    c.add_argument("--split", required=True, help="split name, e.g. env2_in")
    c.add_argument("--context", default="", help="what the labels are (dataset, version); bound into every proof")
    c.add_argument("--queries", type=int, default=None, help="FRI queries (default: the 100-bit default)")
    c.add_argument("--max-proofs", type=int, default=None,
                   help="zero-knowledge budget: proofs this commitment may serve (default 8; more random "
                        "rows, so a larger trace)")
    c.add_argument("--grinding", type=int, default=None, help="proof-of-work bits (default 20)")
    c.add_argument("-o", "--out", type=Path, required=True, help="commitment file to write (JSON)")
    c.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..records import PREDICTIONS
    from ..stark.files import canonical_split, commit_labels
    from ..stark.params import Params

    if args.npy is not None:
        try:
            labels = np.load(args.npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {args.npy}: {e}") from None
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels < 0).any():
            raise UserError(f"{args.npy} must hold a 1-d vector of non-negative integer labels")
    else:
        labels = canonical_split(args.from_trial / PREDICTIONS, args.split, "label")
    given = {"queries": args.queries, "max_proofs": args.max_proofs, "grinding": args.grinding}
    kw = {k: v for k, v in given.items() if v is not None}
    doc = commit_labels(labels.astype(np.int64), args.split, args.context, args.out, Params(**kw))
    print(f"committed {doc['n']} labels of split {args.split}: root {doc['root']}")
    print(f"  public: {args.out}   private (keep it): {args.out}.opening.npz")
    return 0
