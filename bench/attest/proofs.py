"""The host's signed statement about an accuracy proof: the second in-toto Statement of a proof-attested trial.

The trial's own envelope is signed by the submitter when training ends, before any proof exists; a zk-STARK of its
accuracy on private labels is made later by the host (``shiftbench prove``). So the proof joins the trial's
attestation as a second Statement v1, in ``proof_<split>.dsse.json`` beside ``proof_<split>.stark``:

- subjects: the proof file, ``predictions.npz`` (the predictions the proof's commitment was built from) and, when
  the trial is attested, ``attestation.dsse.json`` (the submitter's envelope, so the proof is about that result);
- predicate (type :data:`PREDICATE_TYPE`): what the proof establishes (n, correct, accuracy, split, trial, label and
  prediction roots, both contexts), the proof system, its parameters in full and their digest, the soundness
  figures, the label commitment (root, digest of its file, context), and the prover's public keys (signed, as in
  the trial's Statement, so anyone checks the signature before deciding whether they trust that host).

:func:`check` verifies a statement: its signatures under the keys it lists, every subject digest, the STARK itself
(:func:`shiftbench.stark.verify`) and that the predicate says exactly what the verified proof says.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..io import atomic_write, sha256_file
from ..records import SPEC, read_spec
from .dsse import PublicKey, b64decode_strict, envelope_bytes, sign_envelope, verify_envelope
from .keys import Identity
from .record import ENVELOPE, canonical_bytes
from .statement import PAYLOAD_TYPE, PREDICTIONS, STATEMENT_TYPE

PREDICATE_TYPE = "urn:shiftbench:accuracy-proof:v1"
PROOF_SYSTEM = "shiftbench-stark/1: DEEP-ALI + FRI over BabyBear^4, SHA-256 Fiat-Shamir (docs/proofs.md)"
VERIFIED, FAILED, UNSIGNED = "proof-verified", "proof-failed", "proof-unsigned"


def proof_file(trial: Path, split: str) -> Path:
    return Path(trial) / f"proof_{split}.stark"


def statement_file(proof: Path) -> Path:
    return proof.with_suffix(".dsse.json")


def build(trial: Path, summary: Mapping[str, Any], commitment: Path, host: Identity) -> dict[str, Any]:
    """The Statement about the proof that ``summary`` (``shiftbench.stark-proof/1``) describes."""
    trial = Path(trial)
    doc = json.loads(Path(commitment).read_text())
    proof = proof_file(trial, summary["split"])
    subject = [{"name": proof.name, "digest": {"sha256": summary["proof_sha256"]}},
               {"name": PREDICTIONS, "digest": {"sha256": sha256_file(trial / PREDICTIONS)}}]
    if (trial / ENVELOPE).is_file():
        subject.append({"name": ENVELOPE, "digest": {"sha256": sha256_file(trial / ENVELOPE)}})
    predicate = {
        "statement": {k: summary[k] for k in ("split", "trial", "n", "correct", "accuracy", "label_root",
                                              "pred_root")},
        "proof": {"system": PROOF_SYSTEM, "bytes": summary["proof_bytes"], "sha256": summary["proof_sha256"],
                  "params": doc["params"], "params_digest": summary["params_digest"],
                  "soundness": summary["soundness"]},
        "label_commitment": {"root": doc["root"], "sha256": sha256_file(commitment), "context": doc["context"],
                             "split": doc["split"], "n": doc["n"]},
        "prover": {"identity": host.name, "keys": [{"scheme": k.scheme, "keyid": k.keyid,
                                                     "public_key": k.public.pem().decode("ascii")}
                                                    for k in host.keys]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def write(trial: Path, summary: Mapping[str, Any], commitment: Path, host: Identity) -> Path:
    """Sign the Statement with the host's keys and write it beside the proof."""
    data = envelope_bytes(sign_envelope(PAYLOAD_TYPE, canonical_bytes(build(trial, summary, commitment, host)),
                                        list(host.keys)))
    path = statement_file(proof_file(trial, summary["split"]))
    atomic_write(path, lambda f: f.write(data), mode="wb")
    path.chmod(0o644)  # public, like the proof (atomic_write's temporary file is private)
    return path


def _der(pem: str) -> bytes:
    import base64

    return base64.b64decode("".join(x for x in pem.strip().splitlines() if not x.startswith("-----")), validate=True)


def check(proof: Path, label_root: bytes | None = None, trusted: Iterable[PublicKey] | None = None) -> dict[str, Any]:
    """Verify one proof file and its signed Statement.

    Returns ``{"status", "split", "host", "keyids", "trusted", "failures", "statement"}``: status :data:`VERIFIED`
    (every check holds), :data:`FAILED` (one line per failed check in ``failures``) or :data:`UNSIGNED` (the
    proof verifies but has no Statement); ``statement`` is the verified :class:`shiftbench.stark.Statement` or None;
    ``trusted`` is None without ``trusted`` keys, else whether one of them signed.
    """
    from ..stark import InvalidProof, verify

    proof = Path(proof)
    out: dict[str, Any] = {"status": FAILED, "split": proof.stem.removeprefix("proof_"), "host": None, "keyids": [],
                           "trusted": None, "failures": [], "statement": None}
    fail = out["failures"].append
    try:
        st = verify(proof.read_bytes(), label_root=label_root)
        out["statement"] = st
    except OSError as e:
        fail(f"{proof.name}: unreadable ({e.strerror})")
        return out
    except InvalidProof as e:
        fail(f"{proof.name}: {e}")
    path = statement_file(proof)
    if not path.is_file():
        if not out["failures"]:
            out["status"] = UNSIGNED
        return out
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
        statement = json.loads(b64decode_strict(env["payload"]))
        pred = statement["predicate"]
        listed = {k["keyid"]: PublicKey.from_spki(_der(k["public_key"])) for k in pred["prover"]["keys"]}
        out["host"] = str(pred["prover"]["identity"])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        fail(f"{path.name}: not a signed accuracy-proof Statement with its prover's public keys")
        return out
    out["keyids"] = list(listed)
    if any(k.keyid != kid for kid, k in listed.items()):
        fail(f"{path.name}: a prover key id is not the fingerprint of its public key")
    sigs = env.get("signatures") if isinstance(env.get("signatures"), list) else []
    if any(not isinstance(s, Mapping) or s.get("keyid") not in listed for s in sigs):
        fail(f"{path.name}: signed by keys the Statement does not list")
    _, bad = verify_envelope(env, list(listed.values()), list(listed), PAYLOAD_TYPE)
    out["failures"] += [f"{path.name}: {b}" for b in bad]
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        fail(f"{path.name}: not an in-toto Statement of predicate type {PREDICATE_TYPE}")
    if trusted is not None:
        out["trusted"] = bool({k.keyid for k in trusted} & set(listed))
    subjects = {s.get("name"): (s.get("digest") or {}).get("sha256") for s in statement.get("subject") or []}
    if proof.name not in subjects or PREDICTIONS not in subjects:
        fail(f"{path.name}: its subjects do not name {proof.name} and {PREDICTIONS}")
    for name, digest in subjects.items():
        f = proof.parent / str(name)
        if not f.is_file() or sha256_file(f) != digest:
            fail(f"{path.name}: {name} is missing or differs from the digest it names")
    if out["statement"] is not None:
        _same_as_proof(pred, out["statement"], proof, fail)
    if not out["failures"]:
        out["status"] = VERIFIED
    return out


def _same_as_proof(pred: Mapping[str, Any], st, proof: Path, fail) -> None:
    """The predicate must say what the verified proof says, and the proof must be about this trial."""
    said = pred.get("statement") or {}
    ctx = json.loads(st.context) if st.context.startswith(b"{") else {}
    truth = {"n": st.n, "correct": st.correct, "accuracy": st.accuracy, "label_root": st.label_root.hex(),
             "pred_root": st.pred_root.hex(), "split": ctx.get("split"), "trial": ctx.get("trial")}
    for key, value in truth.items():
        if said.get(key) != value:
            fail(f"{proof.name}: the Statement's {key} is {said.get(key)!r}, the proof's {value!r}")
    info = pred.get("proof") or {}
    if info.get("params") != json.loads(st.params.encode()) or info.get("params_digest") != st.params.digest:
        fail(f"{proof.name}: the Statement names other proof parameters than the proof's")
    if (pred.get("label_commitment") or {}).get("root") != st.label_root.hex():
        fail(f"{proof.name}: the Statement's label commitment is not the one the proof is about")
    if (proof.parent / SPEC).is_file():
        trial_hash = read_spec(proof.parent).get("hash")
        if trial_hash and ctx.get("trial") != trial_hash:
            fail(f"{proof.name}: the proof is about trial {str(ctx.get('trial'))[:16]}, this folder is "
                 f"{trial_hash[:16]}")
    if ctx.get("split") != proof.stem.removeprefix("proof_"):
        fail(f"{proof.name}: the proof is about split {ctx.get('split')!r}")


def check_trial(trial: Path) -> list[dict[str, Any]]:
    """:func:`check` for every ``proof_*.stark`` in a trial folder (none: [])."""
    return [check(p) for p in sorted(Path(trial).glob("proof_*.stark"))]
