"""The files of the proof workflow: a label commitment (public JSON), its opening (private: the labels and the
seed that rebuilds the masked column), and per trial and split a proof, its summary and the predictions' opening.

Label commitment ``shiftbench.label-commitment/1``::

    {"format", "root" (hex), "n", "N", "D", "params" {...}, "params_digest", "context", "split"}

Proof summary ``shiftbench.stark-proof/1`` (next to ``proof_<split>.stark``)::

    {"format", "split", "trial", "n", "correct", "accuracy", "label_root", "pred_root", "params_digest",
     "proof_sha256", "proof_bytes", "soundness" {...}}

The host's signed in-toto Statement about the proof (``proof_<split>.dsse.json``) is :mod:`shiftbench.attest.proofs`.
A label commitment serves at most ``max_proofs`` proofs (its zero-knowledge budget, docs/proofs.md): every proof made
is counted in ``<opening>.served.jsonl`` beside the private opening, and ``prove`` refuses the proof past the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..records import PREDICTIONS, SPEC, read_npz, read_spec
from .params import Params, soundness
from .proofio import InvalidProof
from .prove import commit_column, prove
from .verify import Statement, verify

COMMITMENT_FORMAT = "shiftbench.label-commitment/1"
PROOF_FORMAT = "shiftbench.stark-proof/1"


def canonical_split(preds_npz: Path, split: str, key: str) -> np.ndarray:
    """Column ``key`` (``label`` or ``pred``) of one split of a predictions.npz, in example-id order; refuses a
    split whose ids are not exactly 0..n-1 (a copied or dropped row would otherwise change the statement)."""
    try:
        arrays = read_npz(preds_npz)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {preds_npz}: {e}") from None
    if key not in arrays or "split" not in arrays or "idx" not in arrays:
        raise UserError(f"{preds_npz} has no {key!r}/split/idx arrays (a classification trial's {PREDICTIONS})")
    rows = arrays["split"] == split
    if not rows.any():
        names = sorted(set(arrays["split"].tolist()))
        raise UserError(f"{preds_npz} has no split {split!r}; it has {', '.join(names)}")
    idx, vals = arrays["idx"][rows], arrays[key][rows]
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise UserError(f"split {split!r} of {preds_npz}: example ids are not exactly 0..{len(idx) - 1} "
                        "(copied or dropped rows); a proof needs every example once")
    vals = np.asarray(vals[order])
    if vals.dtype.kind not in "iu" or (vals < 0).any():
        raise UserError(f"split {split!r} of {preds_npz}: {key} must be non-negative class indices")
    return vals.astype(np.int64)


def commit_labels(labels: np.ndarray, split: str, context: str, out: Path, params: Params = Params()) -> dict:
    """Write the public commitment ``out`` and its private opening ``out``.opening.npz; return the commitment."""
    seed = os.urandom(32)
    lay, com = commit_column(labels, params, seed)
    doc = {"format": COMMITMENT_FORMAT, "root": com.root.hex(), "n": lay.n, "N": lay.N, "D": lay.D,
           "params": json.loads(params.encode()), "params_digest": params.digest, "context": context, "split": split}
    opening = opening_path(out)
    with open(os.open(opening, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        np.savez(f, seed=np.frombuffer(seed, dtype=np.uint8), labels=labels, root=np.frombuffer(com.root, np.uint8))
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def opening_path(commitment: Path) -> Path:
    return commitment.with_name(commitment.name + ".opening.npz")


def read_commitment(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read label commitment {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != COMMITMENT_FORMAT:
        raise UserError(f"{path} is not a label commitment ({COMMITMENT_FORMAT}); make one with shiftbench labels "
                        "commit")
    return doc


def label_context(doc: dict) -> bytes:
    return json.dumps({"context": doc["context"], "split": doc["split"], "n": doc["n"]}, sort_keys=True).encode()


def served_path(opening: Path) -> Path:
    return opening.with_name(opening.name + ".served.jsonl")


def proofs_left(commitment: Path, opening: Path | None = None) -> tuple[int, int]:
    """(proofs the label commitment may still serve before its openings could leak labels, its max_proofs)."""
    doc = read_commitment(commitment)
    served = served_path(opening or opening_path(commitment))
    used = len(served.read_text().splitlines()) if served.is_file() else 0
    budget = Params(**doc["params"]).max_proofs
    return budget - used, budget


def prove_trial(trial: Path, commitment: Path, opening: Path | None = None, host=None) -> dict:
    """Prove the accuracy of one trial's predictions on the committed split; write proof_<split>.stark and
    proof_<split>.json into the trial folder (and the predictions' opening seed, private), and with ``host`` (a
    :class:`shiftbench.attest.keys.Identity`) the signed Statement proof_<split>.dsse.json; return the summary."""
    doc = read_commitment(commitment)
    params = Params(**doc["params"])
    opening = opening or opening_path(commitment)
    if proofs_left(commitment, opening)[0] < 1:
        raise UserError(f"label commitment {commitment} has served its {params.max_proofs} proofs (max_proofs): "
                        "another would open its masked labels at more points than its random rows hide; commit the "
                        "labels again (shiftbench labels commit --max-proofs K)")
    try:
        with np.load(opening, allow_pickle=False) as z:
            seed, labels, root = z["seed"].tobytes(), z["labels"], z["root"].tobytes()
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the label opening {opening} (kept by whoever ran labels commit): {e}") from None
    if root.hex() != doc["root"]:
        raise UserError(f"{opening} opens another commitment than {commitment}")
    split = doc["split"]
    preds = canonical_split(trial / PREDICTIONS, split, "pred")
    if len(preds) != doc["n"]:
        raise UserError(f"{trial}: split {split!r} has {len(preds)} examples, the label commitment {doc['n']}")
    lc = commit_column(labels, params, seed)
    if lc[1].root.hex() != doc["root"]:
        raise UserError(f"{opening} does not rebuild the committed root (labels or seed changed)")
    pred_seed = os.urandom(32)
    pc = commit_column(preds, params, pred_seed)
    spec = read_spec(trial) if (trial / SPEC).is_file() else {}
    context = json.dumps({"trial": spec.get("hash", trial.name), "split": split}, sort_keys=True).encode()
    proof = prove(pc, lc, params, context=context, label_context=label_context(doc))
    st = verify(proof, label_root=lc[1].root)
    summary = {"format": PROOF_FORMAT, "split": split, "trial": spec.get("hash", trial.name), "n": st.n,
               "correct": st.correct, "accuracy": st.accuracy, "label_root": doc["root"],
               "pred_root": st.pred_root.hex(), "params_digest": params.digest,
               "proof_sha256": hashlib.sha256(proof).hexdigest(), "proof_bytes": len(proof),
               "soundness": soundness(params, st.n)}
    base = trial / f"proof_{split}"
    tmp = base.with_suffix(".stark.tmp")
    tmp.write_bytes(proof)
    tmp.replace(base.with_suffix(".stark"))
    with open(os.open(trial / f"proof_{split}.pred-opening.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              "wb") as f:
        f.write(pred_seed)
    base.with_suffix(".json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    with open(served_path(opening), "a") as f:
        f.write(json.dumps({"trial": summary["trial"], "split": split, "proof_sha256": summary["proof_sha256"]},
                           sort_keys=True) + "\n")
    stale = proof_statement(base.with_suffix(".stark"))
    if host is not None:
        from ..attest.proofs import write

        write(trial, summary, commitment, host)
    elif stale.is_file():
        stale.unlink()  # a Statement about the previous proof would fail against this one
    return summary


def proof_statement(proof: Path) -> Path:
    from ..attest.proofs import statement_file

    return statement_file(proof)


def verify_file(proof_path: Path, commitment: Path | None = None) -> Statement:
    """Verify a proof file, optionally against a published label commitment (its root and its context)."""
    try:
        proof = Path(proof_path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read proof {proof_path}: {e}") from None
    root = ctx = None
    if commitment is not None:
        doc = read_commitment(commitment)
        root, ctx = bytes.fromhex(doc["root"]), label_context(doc)
    st = verify(proof, label_root=root)
    if ctx is not None and st.label_context != ctx:
        raise InvalidProof("the proof's label context differs from the commitment's")
    return st


def verify_paths(target: Path, commitment: Path | None = None, trusted=None) -> int:
    """``shiftbench verify --proof``: verify a proof file or every proof_*.stark of a trial folder, with the host's
    signed Statement beside it; print one line each. Exit status: 0 all verify, 1 some do not, 3 all verify but
    ``trusted`` keys (``--public-key``) are given and a proof is not signed by one of them."""
    from ..attest.proofs import UNSIGNED, check

    if target.is_dir():
        files = sorted(target.glob("proof_*.stark"))
        if not files:
            raise UserError(f"{target} holds no proof_*.stark (make them with shiftbench prove)")
    elif target.is_file():
        files = [target]
    else:
        raise UserError(f"{target} is neither a proof file nor a folder")
    root = ctx = None
    if commitment is not None:
        doc = read_commitment(commitment)
        root, ctx = bytes.fromhex(doc["root"]), label_context(doc)
    failed = untrusted = False
    for f in files:
        r = check(f, root, trusted)
        st = r["statement"]
        if st is not None and ctx is not None and st.label_context != ctx:
            r["failures"].append(f"{f.name}: the proof's label context differs from the commitment's")
        summary = f.with_suffix(".json")
        if summary.is_file():
            try:
                named = json.loads(summary.read_text()).get("proof_sha256")
            except (ValueError, AttributeError):
                named = None
            if named != hashlib.sha256(f.read_bytes()).hexdigest():
                r["failures"].append(f"{summary.name} is unreadable or names another proof digest")
        if r["failures"]:
            for line in r["failures"]:
                print(f"FAILED  {f}: {line}")
            failed = True
            continue
        if r["status"] == UNSIGNED:
            who = f"unsigned: no {proof_statement(f).name}"
        else:
            who = f"signed by {r['host']} (" + ", ".join(k[:16] for k in r["keyids"]) + ")"
        if trusted is not None and not r["trusted"]:
            who += "; UNTRUSTED: not by a key given with --public-key"
            untrusted = True
        bits = soundness(st.params, st.n)
        print(f"OK      {f}: {st.correct}/{st.n} = {st.accuracy:.4f} correct against labels {st.label_root.hex()[:16]}"
              f" (predictions {st.pred_root.hex()[:16]}; {bits['conjectured_bits']} conjectured / "
              f"{bits['proven_bits']} proven bits); {who}")
    return 1 if failed else 3 if untrusted else 0


def log_to_mlflow(trial: Path, summary: dict, sweep: Path | None = None) -> str | None:
    """Mirror a trial's proof to its MLflow run (found by its trial-hash tag): the proof and its summary as
    artifacts under ``proofs/``, the proof digest as tag ``shiftbench.proof.<split>.sha256``. Returns the run id,
    or None when there is no store (no mlflow.db in the sweep folder and no MLFLOW_TRACKING_URI) or no such run."""
    from ..tracking import TAG_TRIAL_HASH, quiet_mlflow, tracking_uri

    sweep = sweep or trial.parent.parent
    if not (sweep / "mlflow.db").is_file() and not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from mlflow import MlflowClient

    quiet_mlflow()
    client = MlflowClient(tracking_uri=tracking_uri(sweep))
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], f"tags.`{TAG_TRIAL_HASH}` = '{summary['trial']}'")]
    if not runs:
        return None
    run_id = runs[0].info.run_id
    split = summary["split"]
    for suffix in (".stark", ".json", ".dsse.json"):
        if (trial / f"proof_{split}{suffix}").is_file():
            client.log_artifact(run_id, str(trial / f"proof_{split}{suffix}"), artifact_path="proofs")
    client.set_tag(run_id, f"shiftbench.proof.{split}.sha256", summary["proof_sha256"])
    statement = trial / f"proof_{split}.dsse.json"
    if statement.is_file():
        client.set_tag(run_id, f"shiftbench.proof.{split}.statement_sha256",
                       hashlib.sha256(statement.read_bytes()).hexdigest())
    client.set_tag(run_id, f"shiftbench.proof.{split}.accuracy", repr(summary["accuracy"]))
    return run_id
