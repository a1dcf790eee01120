"""``shiftbench verify PATH|RUN_ID``: check an attested trial (or every trial of a sweep) offline.

Per trial it prints the outcome, who signed and whether that signer is trusted, and one line per failed check.
Exit status (the worst trial decides):
  0  OK: every check holds, against the rebuilt dataset, and a trusted identity signed
  1  FAILED: some check failed
  2  bad input (no such folder, unreadable policy, ...)
  3  UNTRUSTED: every check holds, but the signer is not trusted (e.g. a valid signature by an unknown key)
  4  NOT CHECKED AGAINST DATA: trusted and self-consistent, but the dataset could not be rebuilt (--data-root)
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
    p.add_argument("--trust", type=Path, default=None, metavar="POLICY",

                                       help="trust policy (YAML/JSON): trusted identities and keys, required schemes, "
                                            "sweeps (default: none: "
                        "the keys of your own keys folder, reported as such)")
    p.add_argument("--public-key", action="append", default=[], metavar="FILE",
                   help="for your own runs: trust these public key(s) (PEM) instead of your keys folder; reported as "
                        "such, never as a policy")
    p.add_argument("--state", type=Path, default=None, metavar="FILE",
                   help="witness state: the last checkpoint seen per log (default <config>/witness/state.json)")
    p.add_argument("--countersign", type=Path, default=None, metavar="HOST_KEYS",
                   help="a host's keys folder (shiftbench keys create --dir): write a signed SLSA verification "
                        "summary into each trial folder (needs --reexecute N; default: none, nothing is written)")
    p.add_argument("--log", type=Path, default=None, help="transparency log folder (default: the sweep's, or yours)")
    p.add_argument("--runs", type=Path, default=None,
                   help="sweep folder whose mlflow.db resolves RUN_ID (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the re-execution sample (default: fresh randomness, so a submitter cannot know it)")
    p.add_argument("--data-root", default=os.environ.get("SHIFTBENCH_DATA"),
                   help="folder with real datasets (default: $SHIFTBENCH_DATA; unset: embedded datasets only)")
    p.add_argument("--proof", action="store_true",
                   help="PATH is a zk-STARK accuracy proof (shiftbench prove) or a trial folder holding "
                        "proof_*.stark: check it, and the host's signed Statement beside it, without labels or "
                        "predictions (exit 0 verified, 1 invalid, 3 valid but not signed by a --public-key)")
    p.add_argument("--labels", type=Path, default=None, metavar="COMMITMENT",
                   help="with --proof: the published label commitment the proof must be about (default: none: checked "
                        "against the label root the proof names, which is printed)")
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
    from ..records import SPEC, trial_path

    candidates = []
    if runs is not None:
        candidates.append(trial_path(runs, trial_hash))
    if uri.startswith("sqlite:///"):
        candidates.append(trial_path(Path(uri[len("sqlite:///"):]).parent, trial_hash))
    for c in candidates:
        if (c / SPEC).is_file():
            return c, run.data.tags.get("shiftbench.attestation_sha256")
    raise UserError(f"MLflow run {run_id} is trial {trial_hash[:16]}, but its folder is not under "
                    f"{runs or 'the store folder'}; pass the sweep folder with --runs")


def run(a) -> int:
    from ..attest.verify import EXIT_STATUS, FAILED, NOT_CHECKED, OK, UNTRUSTED, Trust, trusted_from_files, \
        verify_path
    from ..attest.witness import WitnessState
    from ..records import FINAL

    if a.proof:
        from ..stark.files import verify_paths

        return verify_paths(Path(a.target), a.labels, trusted_from_files(a.public_key) if a.public_key else None)
    if a.reexecute < 0:
        raise UserError(f"--reexecute must be >= 0 (got {a.reexecute})")
    if a.countersign is not None and a.reexecute < 1:
        raise UserError("--countersign needs --reexecute N (N >= 1): a host countersigns only what it re-ran")
    if a.trust is not None and a.public_key:
        raise UserError("give either --trust POLICY or --public-key, not both (the policy decides alone)")
    target, tagged = Path(a.target), None
    if not target.exists():
        if not _RUN_ID.match(a.target):
            raise UserError(f"{a.target} is neither a folder nor an MLflow run id (32 hex digits)")
        target, tagged = resolve_run(a.target, a.runs)
    host = None
    if a.countersign is not None:
        from ..attest import keys as identities

        if not (a.countersign / "identity.json").is_file():
            raise UserError(f"{a.countersign} is not a keys folder with an identity; create one with: "
                            f"shiftbench keys create --identity HOST --dir {a.countersign}")
        host = identities.load(("ed25519",), a.countersign)
    if a.trust is not None:
        from ..attest.policy import load_policy

        trust = Trust.of(policy=load_policy(a.trust))
    else:
        trust = Trust.of(trusted_from_files(a.public_key) if a.public_key else None)
    results, sweep_failures = verify_path(target, trust, a.log, a.reexecute, a.seed, a.data_root,
                                          WitnessState(a.state))
    if not results:
        raise UserError(f"{target} holds no finished trial (looked for {FINAL})")
    if tagged is not None and results[0].envelope_sha256 != tagged:
        results[0].failures.append("MLflow tag shiftbench.attestation_sha256 is not the sha256 of the trial's envelope")
    counts = {OK: 0, FAILED: 0, UNTRUSTED: 0, NOT_CHECKED: 0}
    for r in results:
        counts[r.outcome] += 1
        why = r.not_checked if r.outcome == NOT_CHECKED else r.trust_note
        print(f"{r.trial.name}: {r.outcome}: signed by {r.signer}; {why}")
        for line in r.failures:
            print(f"{r.trial.name}: {line}")
    for line in sweep_failures:
        print(f"sweep: {line}")
    for r in results[:1] if len(results) == 1 else []:
        for note in r.notes:
            print(f"{r.trial.name}: {note}", file=sys.stderr)
    if host is not None:
        _countersign(results, host, trust, a)
    outcomes = {r.outcome for r in results} | ({FAILED} if sweep_failures else set())
    worst = EXIT_STATUS[next(o for o in (FAILED, UNTRUSTED, NOT_CHECKED, OK) if o in outcomes or o == OK)]
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    checks = "signatures, digests, data, metrics, log" + (", re-execution" if a.reexecute else "")
    word = {0: "OK", 1: "FAILED", 3: "UNTRUSTED", 4: NOT_CHECKED}[worst]
    print(f"verify: {word} ({len(results)} trial{'s' if len(results) != 1 else ''}: {summary}; "
          f"{len(sweep_failures)} sweep-level problems; {checks}; trust: {trust.source})", file=sys.stderr)
    return worst


def _countersign(results, host, trust, a) -> None:
    """Writes each trial's signed verification summary and mirrors it to the trial's MLflow run when one is known."""
    from ..attest import vsa
    from ..io import sha256_file

    uri = None
    if a.runs is not None or os.environ.get("MLFLOW_TRACKING_URI"):
        from ..tracking import tracking_uri

        uri = tracking_uri(a.runs or ".")
    policy_uri = trust.policy.uri if trust.policy else "urn:shiftbench:verify:default-checks"
    policy_digest = trust.policy.sha256 if trust.policy else ""
    if a.trust is not None:
        policy_digest = sha256_file(a.trust)
    for r in results:
        path = vsa.write(r, host, policy_uri, policy_digest, a.seed)
        print(f"{r.trial.name}: countersigned by {host.name}: {path.name}", file=sys.stderr)
        if uri is not None:
            try:
                vsa.mirror_to_mlflow(r.trial, uri)
            except Exception as e:  # a missing or foreign store must not undo the summaries already written
                print(f"{r.trial.name}: MLflow run not updated ({type(e).__name__})", file=sys.stderr)
