"""``shiftbench verify PATH|RUN_ID``: check an attested trial (or every trial of a sweep) offline.

Exit status 0 only if every check holds; otherwise one line per failed check on stdout and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..errors import UserError

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def register(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check a trial's attestation: signatures, digests, metrics, log",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="PATH|RUN_ID", help="a trial folder, a sweep folder, or an MLflow run id")
    p.add_argument("--reexecute", type=int, default=0, metavar="K",
                   help="reload the weights and re-run K random committed examples against their Merkle proofs")
    p.add_argument("--public-key", action="append", default=[], metavar="FILE",
                   help="trust this signer's public key(s) (PEM; repeat for several) instead of your own keys; "
                        "every key given must have signed")
    p.add_argument("--log", type=Path, default=None, help="transparency log folder (default: the sweep's, or yours)")
    p.add_argument("--runs", type=Path, default=None,
                   help="sweep folder whose mlflow.db resolves RUN_ID (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--seed", type=int, default=None, help="seed of the re-execution sample")
    p.add_argument("--data-root", default=os.environ.get("SHIFTBENCH_DATA"), help="folder with real datasets")
    p.set_defaults(func=run)


def resolve_run(run_id: str, runs: Path | None) -> tuple[Path, str | None]:
    """The trial folder of an MLflow run (its ``shiftbench.trial_hash`` tag names ``<sweep>/trials/<hash16>``) and
    the envelope digest the run is tagged with."""
    from ..tracking import quiet_mlflow, tracking_uri

    if runs is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError(f"{run_id} is not a folder; to resolve it as an MLflow run id give --runs SWEEP_FOLDER "
                        "(holding mlflow.db) or set MLFLOW_TRACKING_URI")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    quiet_mlflow()
    uri = tracking_uri(runs or ".")
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        raise UserError(f"no MLflow run {run_id} in {uri}") from None
    trial_hash = run.data.tags.get("shiftbench.trial_hash")
    if not trial_hash:
        raise UserError(f"MLflow run {run_id} is not a shiftbench trial (no shiftbench.trial_hash tag)")
    candidates = []
    if runs is not None:
        candidates.append(runs / "trials" / trial_hash[:16])
    if uri.startswith("sqlite:///"):
        candidates.append(Path(uri[len("sqlite:///"):]).parent / "trials" / trial_hash[:16])
    for c in candidates:
        if (c / "spec.json").is_file():
            return c, run.data.tags.get("shiftbench.attestation_sha256")
    raise UserError(f"MLflow run {run_id} is trial {trial_hash[:16]}, but its folder is not under "
                    f"{runs or 'the store folder'}; pass the sweep folder with --runs")


def run(a) -> int:
    from ..attest.verify import Trust, trusted_from_files, verify_path

    if a.reexecute < 0:
        raise UserError(f"--reexecute must be >= 0 (got {a.reexecute})")
    target, tagged = Path(a.target), None
    if not target.exists():
        if not _RUN_ID.match(a.target):
            raise UserError(f"{a.target} is neither a folder nor an MLflow run id (32 hex digits)")
        target, tagged = resolve_run(a.target, a.runs)
    trust = Trust.of(trusted_from_files(a.public_key) if a.public_key else None)
    if not trust.keys:
        raise UserError("no public key to verify with: you have no keys yet; pass the signer's with --public-key")
    results, sweep_failures = verify_path(target, trust, a.log, a.reexecute, a.seed, a.data_root)
    if not results:
        raise UserError(f"{target} holds no finished trial (looked for final.json)")
    if tagged is not None and results[0].envelope_sha256 != tagged:
        results[0].failures.append("MLflow tag shiftbench.attestation_sha256 is not the sha256 of the trial's envelope")
    n_bad = 0
    for r in results:
        for line in r.failures:
            print(f"{r.trial.name}: {line}")
        n_bad += not r.ok
    for line in sweep_failures:
        print(f"sweep: {line}")
    if len(results) == 1:
        for note in results[0].notes:
            print(f"{results[0].trial.name}: {note}", file=sys.stderr)
    if n_bad or sweep_failures:
        print(f"verify: FAILED ({n_bad} of {len(results)} trials, {len(sweep_failures)} sweep-level problems)",
              file=sys.stderr)
        return 1
    print(f"verify: OK ({len(results)} trial{'s' if len(results) != 1 else ''}; signatures, digests, metrics, log"
          f"{', re-execution' if a.reexecute else ''})", file=sys.stderr)
    return 0
