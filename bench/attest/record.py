"""Attesting a finished trial: the files it adds to the trial folder, and the log entry.

A trial folder gains::

    data_manifest.json      dataset name, options, data version (see statement.data_manifest)
    metrics.json            the final record (final.json repeats it)
    attestation.dsse.json   the DSSE envelope of the in-toto Statement (its sha256 goes into final.json "attestation")
    attestation.log.json    the log receipt: leaf index, leaf hash, origin, the checkpoint signed right after the append
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import atomic_write, write_json
from ..records import read_predictions, read_spec
from . import keys as identities
from .dsse import ED25519, envelope_bytes, sign_envelope
from .log import TransparencyLog, log_dir_for
from .predictions import commit
from .statement import MANIFEST, METRICS, PAYLOAD_TYPE, build_statement, data_manifest

ENVELOPE = "attestation.dsse.json"
RECEIPT = "attestation.log.json"


def canonical_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def attest_trial(trial_dir: str | os.PathLike, record: Mapping[str, Any], schemes: Sequence[str] = (ED25519,),
                 log_dir: str | os.PathLike | None = None, keys_dir: str | os.PathLike | None = None) -> str:
    """Writes the manifest, the metrics, the signed envelope and the log receipt of a trial whose predictions,
    weights and records are written.

    Args:
        trial_dir: the trial folder.
        record: the final record (``final["record"]``).
        schemes: signature schemes; with several, verification requires every one.
        log_dir: the transparency log's folder (default: :func:`.log.log_dir_for`).
        keys_dir: the signer's keys folder, one identity (default: ``<config>/keys``).

    Returns:
        The sha256 (hex) of the envelope file.
    """
    trial = Path(trial_dir)
    meta = read_spec(trial)
    write_json(trial / MANIFEST, data_manifest(meta["spec"], meta))
    write_json(trial / METRICS, dict(record))
    tree = commit(read_predictions(trial))
    signer = identities.load(schemes, keys_dir)
    keys = list(signer.keys)
    statement = build_statement(trial, meta, record, tree.root, len(tree), [
        {"scheme": k.scheme, "keyid": k.keyid, "identity": signer.name, "public_key": k.public.pem().decode("ascii")}
        for k in keys])
    data = envelope_bytes(sign_envelope(PAYLOAD_TYPE, canonical_bytes(statement), keys))
    atomic_write(trial / ENVELOPE, lambda f: f.write(data), mode="wb")
    digest = hashlib.sha256(data).hexdigest()
    log = TransparencyLog(log_dir if log_dir is not None else log_dir_for(trial))
    operator = identities.log_operator().keys[0]  # the log's own key, never the trial's
    receipt = log.append({"envelope_sha256": digest, "identity": signer.name, "trial": trial.name,
                          "trial_hash": meta["hash"]}, operator)
    write_json(trial / RECEIPT, receipt)
    return digest
