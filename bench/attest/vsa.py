"""A host's countersignature: a SLSA Verification Summary Attestation per verified trial, in a DSSE envelope.

``shiftbench verify --reexecute N --countersign HOST_KEYS`` writes ``verification.dsse.json`` into each trial folder:
an in-toto Statement v1 whose predicate type is ``https://slsa.dev/verification_summary/v1`` (slsa.dev/spec/v1.0/
verification_summary), with its fields ``verifier.id``, ``timeVerified``, ``resourceUri``, ``policy`` (uri and
digest), ``inputAttestations`` (the trial's envelope), ``verificationResult`` (``PASSED``/``FAILED``),
``verifiedLevels`` and ``slsaVersion``. The levels are shiftbench's own (the VSA allows levels of other frameworks):
``SHIFTBENCH_SIGNED`` (signatures valid), ``SHIFTBENCH_DATA_CHECKED`` (ids, labels and metrics against the rebuilt
dataset), ``SHIFTBENCH_REEXECUTED`` (sampled examples re-run). What was checked, how many examples were re-executed,
the submitter's identity and whether the host's trust trusted it, and the host's public keys (so anyone can check
the countersignature before deciding whether they trust the host) are in the extension object ``shiftbench``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

from ..io import atomic_write, sha256_file
from ..records import PREDICTIONS, WEIGHTS, read_spec
from .dsse import PublicKey, b64decode_strict, envelope_bytes, sign_envelope, verify_envelope
from .keys import Identity
from .record import ENVELOPE, canonical_bytes
from .statement import PAYLOAD_TYPE, STATEMENT_TYPE

VSA_TYPE = "https://slsa.dev/verification_summary/v1"
SUMMARY = "verification.dsse.json"
PASSED, FAILED_ = "PASSED", "FAILED"
SELF, HOST, FAILED_ROW = "self-attested", "host-verified", "failed"


def build(res, host: Identity, policy_uri: str, policy_digest: str, seed: int | None) -> dict[str, Any]:
    """The VSA Statement of one verify :class:`.verify.Result`."""
    # The host vouches for what it checked, not for the submitter's identity (that is recorded beside it).
    passed = not res.failures and not res.not_checked and res.reexecuted > 0
    levels = ["SHIFTBENCH_SIGNED"] if not any(f.startswith(("signature", "envelope")) for f in res.failures) else []
    if not res.not_checked and not any(f.startswith("data:") for f in res.failures):
        levels.append("SHIFTBENCH_DATA_CHECKED")
    if res.reexecuted and not any(f.startswith("re-execution") for f in res.failures):
        levels.append("SHIFTBENCH_REEXECUTED")
    predicate_in = (res.statement or {}).get("predicate") or {}
    trial_hash = predicate_in.get("trial_hash", "")
    digest = {"sha256": res.envelope_sha256 or ""}
    predicate = {
        "verifier": {"id": f"urn:shiftbench:verifier:{host.name}", "version": {"shiftbench": _version()}},
        "timeVerified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resourceUri": f"urn:shiftbench:trial:{trial_hash}",
        "policy": {"uri": policy_uri, "digest": {"sha256": policy_digest}},
        "inputAttestations": [{"uri": ENVELOPE, "digest": digest}],
        "verificationResult": PASSED if passed else FAILED_,
        "verifiedLevels": levels if passed else [],
        "slsaVersion": "1.0",
        "shiftbench": {
            "outcome": res.outcome,
            "checks": list(res.checks),
            "reexecuted": res.reexecuted,
            "seed": seed,
            "not_checked_against_data": res.not_checked,
            "failures": list(res.failures),
            "submitter": {"identity": res.identity, "signer": res.signer, "trusted_by_host": res.trusted,
                          "trust": res.trust_note},
            "verifier_keys": [{"scheme": k.scheme, "keyid": k.keyid, "identity": host.name,
                               "public_key": k.public.pem().decode("ascii")} for k in host.keys],
        },
    }
    subject = [{"name": ENVELOPE, "digest": digest}]
    for name in (PREDICTIONS, WEIGHTS):
        if (res.trial / name).is_file():
            subject.append({"name": name, "digest": {"sha256": sha256_file(res.trial / name)}})
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": VSA_TYPE, "predicate": predicate}


def _version() -> str:
    from ..provenance import code_version

    return code_version()


def write(res, host: Identity, policy_uri: str, policy_digest: str, seed: int | None) -> Path:
    """Signs the summary with the host's keys and writes it into the trial folder."""
    statement = build(res, host, policy_uri, policy_digest, seed)
    data = envelope_bytes(sign_envelope(PAYLOAD_TYPE, canonical_bytes(statement), list(host.keys)))
    path = res.trial / SUMMARY
    atomic_write(path, lambda f: f.write(data), mode="wb")
    return path


def read(trial_dir: str | Path) -> dict[str, Any]:
    """What a trial's countersignature says, checked: ``{"status", "host", "note"}``, status one of
    :data:`SELF`, :data:`HOST`, :data:`FAILED_ROW`.

    The summary counts only if its signatures verify under the host keys it lists and it names the trial's current
    envelope; whether that host is one to trust is the reader's call (the host is named).
    """
    t = Path(trial_dir)
    path = t / SUMMARY
    if not path.is_file():
        return {"status": SELF, "host": None, "note": ""}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
        statement = json.loads(b64decode_strict(env["payload"]))
        pred = statement["predicate"]
        keys = [PublicKey.from_spki(_der(k["public_key"])) for k in pred["shiftbench"]["verifier_keys"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {"status": SELF, "host": None, "note": f"{SUMMARY} is unreadable"}
    _, failures = verify_envelope(env, keys, [k.keyid for k in keys], PAYLOAD_TYPE)
    host = str(pred.get("verifier", {}).get("id", "")).removeprefix("urn:shiftbench:verifier:")
    if failures or statement.get("predicateType") != VSA_TYPE:
        return {"status": SELF, "host": host, "note": f"{SUMMARY} does not verify"}
    envelope = t / ENVELOPE
    current = sha256_file(envelope) if envelope.is_file() else None
    if [a.get("digest", {}).get("sha256") for a in pred.get("inputAttestations", [])] != [current]:
        return {"status": SELF, "host": host, "note": f"{SUMMARY} is about another envelope"}
    status = HOST if pred.get("verificationResult") == PASSED else FAILED_ROW
    return {"status": status, "host": host, "note": "", "keyids": [k.keyid for k in keys],
            "reexecuted": pred.get("shiftbench", {}).get("reexecuted")}


def _der(pem: str) -> bytes:
    import base64

    return base64.b64decode("".join(x for x in pem.strip().splitlines() if not x.startswith("-----")), validate=True)


def mlflow_tags(trial_dir: str | Path) -> dict[str, str]:
    """Tags for a trial's MLflow run: the signer identity, and the host's outcome once countersigned."""
    t = Path(trial_dir)
    tags: dict[str, str] = {}
    try:
        statement = json.loads(b64decode_strict(json.loads((t / ENVELOPE).read_text())["payload"]))
        names = {str(s.get("identity")) for s in statement["predicate"]["signers"]}
        tags["shiftbench.signer_identity"] = ", ".join(sorted(names))
        tags["shiftbench.signer_keyids"] = ",".join(s["keyid"][:16] for s in statement["predicate"]["signers"])
    except (OSError, ValueError, KeyError, TypeError):
        return tags
    summary = read(t)
    if summary["status"] != SELF:
        tags["shiftbench.verification"] = PASSED if summary["status"] == HOST else FAILED_
        tags["shiftbench.verifier"] = str(summary["host"])
        tags["shiftbench.verification_sha256"] = hashlib.sha256((t / SUMMARY).read_bytes()).hexdigest()
    return tags


def mirror_to_mlflow(trial_dir: Path, uri: str) -> str | None:
    """Tags the trial's MLflow run (found by its trial hash) with :func:`mlflow_tags` and logs the summary as an
    artifact; returns the run id, or None when the store has no run of this trial."""
    from mlflow import MlflowClient

    from ..tracking import quiet_mlflow

    quiet_mlflow()
    meta = read_spec(trial_dir)
    client = MlflowClient(tracking_uri=uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], f"tags.`shiftbench.trial_hash` = '{meta['hash']}'")]
    if not runs:
        return None
    run_id = runs[0].info.run_id
    for k, v in mlflow_tags(trial_dir).items():
        client.set_tag(run_id, k, v)
    for name in (ENVELOPE, SUMMARY):
        if (trial_dir / name).is_file():
            client.log_artifact(run_id, str(trial_dir / name))
    return run_id


def summary_counts(trials: Mapping[str, Any] | list) -> dict[str, int]:
    """Counts of self-attested / host-verified / failed among trial folders."""
    out = {SELF: 0, HOST: 0, FAILED_ROW: 0}
    for t in trials:
        out[read(t)["status"]] += 1
    return out
