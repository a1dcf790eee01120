"""The in-toto Statement v1 of a finished trial, and the files it binds.

Statement v1 (github.com/in-toto/attestation, ``spec/v1/statement.md``): ``_type``, ``subject`` (name + digest
set), ``predicateType`` and ``predicate``. Subjects are the sha256 of the trial files that hold its result:

- ``predictions.npz`` (also committed leaf by leaf in a Merkle tree, see :mod:`.predictions`),
- ``model.pt`` (the final weights), ``metrics.json`` (the final record, as ``final.json`` repeats it),
- ``data_manifest.json`` (dataset name, options and content version; see :func:`data_manifest`),
- ``results.jsonl`` (every evaluation: model selection picks checkpoints from it) and ``spec.json``.

The predicate (type :data:`PREDICATE_TYPE`) holds the resolved spec and its hash, the code version (git commit, a
sha256 of the uncommitted diff of tracked files, the digest of the installed source), package versions, the data
version, the MLflow run id when the trial runs inside one (``MLFLOW_RUN_ID``; a sweep mirrors trials to MLflow only
after they end, so there the MLflow run carries the envelope's digest as a tag instead), the Merkle root of the
predictions, the metrics, and the signers: scheme, key id, identity and public key of each (signed, so that no
signature can be stripped unnoticed and the identity cannot be swapped).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import sha256_file
from ..records import PREDICTIONS, RESULTS, SPEC, WEIGHTS
from .predictions import LEAF_FORMAT

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:shiftbench:trial-result:v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
MERKLE_HASH = "RFC6962-SHA256"

METRICS, MANIFEST = "metrics.json", "data_manifest.json"
"""The attest callbacks' own files in a trial folder (the trainer's are in :mod:`shiftbench.records`)."""
SUBJECTS = (PREDICTIONS, WEIGHTS, METRICS, MANIFEST, RESULTS, SPEC)
PACKAGES = ("shiftbench", "torch", "numpy", "scipy", "scikit-learn", "cryptography", "pqcrypto")


@functools.lru_cache(maxsize=1)
def code_identity() -> dict[str, Any]:
    """Git commit, whether tracked files differ from it, the sha256 of that diff, and the installed source digest."""
    from ..provenance import code_version, git_commit, source_digest

    commit, dirty = git_commit()
    diff_digest = None
    if commit and dirty:
        root = Path(__file__).resolve().parent
        try:
            diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=root, capture_output=True, timeout=10).stdout
            diff_digest = hashlib.sha256(diff).hexdigest()
        except (OSError, subprocess.SubprocessError):
            diff_digest = None
    return {"version": code_version(), "git_commit": commit, "git_dirty": dirty, "diff_sha256": diff_digest,
            "source_sha256": source_digest()}


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def data_manifest(spec: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a trial's data: for generated datasets the name, the options and the content version are a
    complete recipe (rebuilding with them must give the same version); real datasets add their description.

    Args:
        spec: the resolved trial spec.
        meta: ``spec.json`` (``data_version``, ``dataset`` description, ``env_names``, ``task``).
    """
    described = meta.get("dataset") or {}
    return {
        "dataset": spec["dataset"],
        "options": spec.get("dataset_options", {}),
        "data_version": meta.get("data_version"),
        "task": meta.get("task"),
        "env_names": meta.get("env_names"),
        "sizes": described.get("sizes"),
        "input_shape": described.get("input_shape"),
        "num_classes": described.get("num_classes"),
    }


def build_statement(trial_dir: Path, meta: Mapping[str, Any], metrics: Mapping[str, Any], merkle_root: bytes,
                    n_leaves: int, signers: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The Statement over the files in ``trial_dir`` (they must all be written).

    Args:
        trial_dir: the trial folder.
        meta: ``spec.json``.
        metrics: the final record.
        merkle_root: root of the predictions' Merkle tree.
        n_leaves: number of committed predictions.
        signers: ``{"scheme", "keyid", "identity", "public_key"}`` (PEM) of every key that will sign: the identity
            is bound into the signed payload, and the public key lets anyone check the signature is valid before
            deciding (by a policy) whether its holder is trusted.
    """
    subjects = [{"name": name, "digest": {"sha256": sha256_file(trial_dir / name)}} for name in SUBJECTS]
    predicate = {
        "trial_hash": meta["hash"],
        "spec": meta["spec"],
        "code": code_identity(),
        "packages": package_versions(),
        "data_version": meta.get("data_version"),
        "mlflow_run_id": os.environ.get("MLFLOW_RUN_ID") or None,
        "predictions": {"merkle_root": merkle_root.hex(), "leaves": n_leaves, "hash": MERKLE_HASH,
                        "leaf_format": LEAF_FORMAT},
        "metrics": dict(metrics),
        "signers": [dict(s) for s in signers],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": predicate}
