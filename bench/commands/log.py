"""``shiftbench log witness LOG``: check a transparency log's latest checkpoint and cosign it.

The witness checks the operator's signature on the checkpoint, that the entries hash to its root, and a consistency
proof from the last checkpoint it cosigned for that log (its state file); only then it adds its cosignature
(C2SP tlog-cosignature/v1) and writes the cosigned note to ``LOG/cosignatures/``. A log that was truncated,
rewritten, forked or recreated since the witness last looked is refused (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("log", help="transparency-log tools (witness: check and cosign a checkpoint)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="log_command", required=True)
    w = sub.add_parser("witness", help="check a log's consistency with what you saw before and cosign its checkpoint")
    w.add_argument("log", type=Path, metavar="LOG", help="the log folder (a sweep's attestation_log, or the sweep)")
    w.add_argument("--key", type=Path, required=True, metavar="WITNESS_KEYS",
                   help="the witness's keys folder (shiftbench keys create --identity NAME --dir DIR)")
    w.add_argument("--state", type=Path, default=None,
                   help="the witness's state file (default <config>/witness/state.json)")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..attest import checkpoint as ckpt
    from ..attest import keys as identities
    from ..attest.log import COSIGNED, LOG_DIRNAME, TransparencyLog, verify_log
    from ..attest.witness import WitnessState

    path = a.log / LOG_DIRNAME if (a.log / LOG_DIRNAME).is_dir() else a.log
    if not (path / "tree_heads.jsonl").is_file():
        raise UserError(f"{a.log} is not a transparency log (no tree_heads.jsonl)")
    if not (a.key / "identity.json").is_file():
        raise UserError(f"{a.key} is not a keys folder with an identity; create one with: "
                        f"shiftbench keys create --identity NAME --dir {a.key}")
    witness = identities.load(("ed25519",), a.key)
    log = TransparencyLog(path)
    latest, tree, failures = verify_log(log)
    state = WitnessState(a.state)
    operator = log.operator() if latest is not None else None
    if latest is not None and operator is not None:
        failures += state.check(latest, tree, operator.keyid)
    if failures or latest is None or operator is None:
        for f in failures or ["the log has no usable checkpoint"]:
            print(f"witness: {f}")
        print("witness: REFUSED (not cosigned)", file=sys.stderr)
        return 1
    note = ckpt.cosign(latest, witness.name, witness.keys[0])
    out = path / COSIGNED / f"{witness.keys[0].keyid[:16]}.note"
    out.parent.mkdir(exist_ok=True)
    out.write_text(note, encoding="utf-8")
    state.update(latest, operator.keyid)
    sys.stdout.write(note)
    print(f"witness: cosigned {latest.origin} at size {latest.size} as {witness.name} ({out})", file=sys.stderr)
    return 0
