"""Offline verification of attested trials: signatures and who made them, digests, the data, metrics, the log, and
re-execution.

Every check appends one line to a list of failures. A trial's outcome (:attr:`Result.outcome`) is, first match wins:

- ``FAILED``: some check failed (exit status 1);
- ``UNTRUSTED``: every check holds but no trusted identity signed it, e.g. a valid signature by an unknown key
  (exit status 3);
- ``NOT CHECKED AGAINST DATA``: every check holds and the signer is trusted, but the dataset could not be rebuilt
  here (a real dataset missing from ``--data-root``), so ids, labels and metrics were checked only against the
  submitter's own files (exit status 4);
- ``OK`` (exit status 0).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..io import read_json, sha256_file
from ..records import (
    FINAL, PREDICTIONS, RESULTS, SPEC, TRIALS, WEIGHTS, build_trial_model, read_final, read_predictions, read_results,
    read_spec, read_weights, sweep_of, trial_dirs,
)  # fmt: skip
from . import checkpoint as ckpt
from .dsse import PublicKey, b64decode_strict, read_public_keys, verify_envelope
from .log import COSIGNED, LOG_DIRNAME, TransparencyLog, check_receipt, log_dir_for, verify_log
from .merkle import MerkleTree, leaf_hash, merkle_root, verify_consistency, verify_inclusion
from .policy import Policy
from .predictions import encode_leaf, leaf_hashes
from .record import ENVELOPE, RECEIPT
from .statement import MANIFEST, METRICS, PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE, SUBJECTS
from .witness import WitnessState

METRIC_ATOL = 1e-6
"""Recomputed accuracies and losses may differ from the recorded ones by float32 summation order only."""
SCORE_ATOL = 1e-4
"""A re-executed score may differ from the committed one by this much (batch composition changes float32 sums);
predictions and labels must match exactly."""
LOSS_ATOL = 1e-3
"""A committed cross-entropy must be -log(score) where the prediction is right, and at least -log(1 - score) where it
is wrong (the true class has at most the probability the predicted one leaves); float32 and autocast slack."""

OK, FAILED, UNTRUSTED, NOT_CHECKED = "OK", "FAILED", "UNTRUSTED", "NOT CHECKED AGAINST DATA"
EXIT_STATUS = {OK: 0, FAILED: 1, UNTRUSTED: 3, NOT_CHECKED: 4}


@dataclass
class Result:
    """What verifying one trial found."""

    trial: Path
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    envelope_sha256: str | None = None
    statement: dict | None = None
    signer: str = "nobody"
    """Who signed, as printed: identity and key fingerprints."""
    identity: str | None = None
    trusted: bool = False
    trust_note: str = ""
    """Why the signer is (not) trusted: the policy entry, --public-key, your own keys, or an unknown key."""
    not_checked: str | None = None
    """Why the trial could not be checked against its rebuilt dataset (None when it was)."""
    reexecuted: int = 0
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def outcome(self) -> str:
        if self.failures:
            return FAILED
        if not self.trusted:
            return UNTRUSTED
        return NOT_CHECKED if self.not_checked else OK


@dataclass
class Trust:
    """Who is trusted: a policy, the public keys given with ``--public-key`` (one's own runs), or one's own keys.

    Attributes:
        keys: trusted public keys when no policy is given.
        source: how those keys came to be trusted, as printed.
        policy: the trust policy (it then decides alone).
    """

    keys: list[PublicKey]
    source: str = "your own keys folder"
    policy: Policy | None = None

    @classmethod
    def of(cls, public_keys: Sequence[PublicKey] | None = None, keys_dir: str | os.PathLike | None = None,
           policy: Policy | None = None) -> "Trust":
        if policy is not None:
            return cls([], f"policy {policy.uri}", policy)
        if public_keys:
            return cls(list(public_keys), "given with --public-key (your own runs; not a policy)")
        from . import keys as identities

        return cls(identities.public_keys(keys_dir), "your own keys folder (not a policy)")


def _same_number(a: Any, b: Any, atol: float) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return abs(a - b) <= atol or a == b or (math.isnan(a) and math.isnan(b))


def _same_json(a: Any, b: Any) -> bool:
    """Equal as canonical JSON (so a NaN metric equals itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def sweep_name(trial: Path) -> str | None:
    """The sweep folder's name of a trial in ``<sweep>/trials/``; None for a lone trial."""
    sweep = sweep_of(trial)
    return sweep.name if sweep is not None else None


def _check_signatures(res: Result, envelope: Any, trust: Trust) -> dict | None:
    """The statement, once every signature is checked against the public key its statement lists, and the signer
    is judged against the trust (a policy, --public-key, or one's own keys)."""
    try:
        statement = json.loads(b64decode_strict(envelope["payload"]))
        listed = statement["predicate"]["signers"]
        signers = {s["keyid"]: (PublicKey.from_spki(_pem_der(s["public_key"])), str(s.get("identity")))
                   for s in listed}
    except (ValueError, KeyError, TypeError, IndexError):
        res.failures.append("envelope payload is not a shiftbench Statement with its signers' public keys")
        return None
    for keyid, (key, _) in signers.items():
        if key.keyid != keyid:
            res.failures.append(f"statement: signer key id {keyid[:16]} is not the fingerprint of its public key")
    sigs = envelope.get("signatures") if isinstance(envelope.get("signatures"), list) else []
    extra = [s for s in sigs if not isinstance(s, Mapping) or s.get("keyid") not in signers]
    if extra:
        res.failures.append(f"envelope carries {len(extra)} signature(s) by keys the statement does not list")
    listed_only = dict(envelope, signatures=[s for s in sigs if s not in extra])
    _, failures = verify_envelope(listed_only, [k for k, _ in signers.values()], list(signers), PAYLOAD_TYPE)
    res.failures += failures
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        res.failures.append("statement type or predicate type is not the shiftbench trial result")
    names = {name for _, name in signers.values()}
    if len(names) > 1:
        res.failures.append(f"statement: signers claim more than one identity ({', '.join(sorted(names))})")
    res.identity = next(iter(names), None)
    res.signer = f"{res.identity} (" + ", ".join(f"{k.scheme} {kid[:16]}" for kid, (k, _) in signers.items()) + ")"
    _judge(res, {kid: k for kid, (k, _) in signers.items()}, trust)
    return statement


def _pem_der(pem: str) -> bytes:
    import base64

    body = "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))
    return base64.b64decode(body, validate=True)


def _judge(res: Result, valid: Mapping[str, PublicKey], trust: Trust) -> None:
    """Sets whether the signer is trusted; a policy's requirements that the envelope does not meet are failures."""
    unknown = f"signed by an unknown key ({', '.join(k[:16] for k in valid)}), claiming identity {res.identity!r}"
    policy = trust.policy
    if policy is None:
        ours = {k.keyid for k in trust.keys} & set(valid)
        res.trusted = bool(ours)
        res.trust_note = f"trusted: {trust.source}" if ours else unknown
        return
    principal = next((p for p in map(policy.principal, valid) if p is not None), None)
    if principal is None:
        res.trust_note = unknown
        return
    mine = {kid: k for kid, k in valid.items() if kid in principal.keyids}
    if res.identity != principal.identity:
        res.failures.append(f"statement claims identity {res.identity!r}, but the policy lists key "
                            f"{next(iter(mine))[:16]} as {principal.identity!r}")
    for scheme in policy.require_schemes:
        if not any(k.scheme == scheme for k in mine.values()):
            res.failures.append(f"policy requires a {scheme} signature by {principal.identity}; the envelope has "
                                "none (the statement cannot lower what the policy requires)")
    sweep = sweep_name(res.trial)
    if not principal.covers(sweep):
        res.trust_note = (f"{principal.identity} is trusted by the policy for sweeps {list(principal.sweeps)} only, "
                          f"not {sweep!r}")
        return
    res.trusted = True
    res.trust_note = f"trusted: {principal.identity} in {trust.source}"


def _check_subjects(res: Result, statement: Mapping[str, Any]) -> None:
    subjects = {s.get("name"): (s.get("digest") or {}).get("sha256") for s in statement.get("subject", [])}
    for name in SUBJECTS:
        if name not in subjects:
            res.failures.append(f"{name}: not a subject of the statement")
    for name, digest in subjects.items():
        path = res.trial / str(name)
        if not path.is_file():
            res.failures.append(f"{name}: file missing")
        elif sha256_file(path) != digest:
            res.failures.append(f"{name}: sha256 differs from the attested digest")


def _check_predictions(res: Result, predicate: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None,
                       hashes: list[bytes] | None) -> None:
    committed = predicate.get("predictions") or {}
    if arrays is None or hashes is None:
        res.failures.append(f"{PREDICTIONS}: unreadable, no Merkle root to recompute")
        return
    if merkle_root(hashes).hex() != committed.get("merkle_root") or len(hashes) != committed.get("leaves"):
        res.failures.append(f"{PREDICTIONS}: Merkle root of the predictions differs from the attested one")


def _check_metrics(res: Result, predicate: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None) -> None:
    """metrics.json, final.json and the last record agree with the statement; the committed predictions give the
    recorded accuracies and losses."""
    metrics = predicate.get("metrics")
    t = res.trial
    try:
        if not _same_json(read_json(t / METRICS), metrics):
            res.failures.append(f"{METRICS}: differs from the statement's metrics")
    except (OSError, ValueError):
        res.failures.append(f"{METRICS}: unreadable")
    try:
        final = read_final(t)
        if not _same_json(final.get("record"), metrics):
            res.failures.append(f"{FINAL}: its record differs from the attested metrics")
        if final.get("attestation") != res.envelope_sha256:
            res.failures.append(f"{FINAL}: its attestation digest is not the envelope's sha256")
    except (OSError, ValueError, AttributeError):
        res.failures.append(f"{FINAL}: missing or unreadable")
    try:
        if not _same_json((read_results(t, missing_ok=False) or [None])[-1], metrics):
            res.failures.append(f"{RESULTS}: its last record differs from the attested metrics")
    except (OSError, ValueError):
        res.failures.append(f"{RESULTS}: unreadable")
    if arrays is None or not isinstance(metrics, Mapping):
        return
    split = arrays["split"].astype(str)
    sizes = {}
    try:
        sizes = (read_json(t / MANIFEST) or {}).get("sizes") or {}
    except (OSError, ValueError):
        res.failures.append(f"{MANIFEST}: unreadable")
    for name in np.unique(split):
        rows = split == name
        if name in sizes and int(rows.sum()) != sizes[name]:
            res.failures.append(f"predictions: {rows.sum()} rows for {name}, the data manifest has {sizes[name]}")
        if "label" in arrays and "pred" in arrays:
            correct = (arrays["pred"][rows] == arrays["label"][rows]).astype(np.float32)
            if "correct" in arrays and not np.array_equal(correct, arrays["correct"][rows].astype(np.float32)):
                res.failures.append(f"predictions: {name} 'correct' disagrees with pred == label")
        else:
            correct = arrays["correct"][rows] if "correct" in arrays else None
        checks = {"acc": correct, "loss": arrays["loss"][rows] if "loss" in arrays else None}
        for metric, values in checks.items():
            key = f"{name}_{metric}"
            if values is not None and key in metrics:
                if not _same_number(np.mean(values), metrics[key], METRIC_ATOL):
                    res.failures.append(f"metrics: {key} = {metrics[key]} but the committed predictions give "
                                        f"{float(np.mean(values)):.6g}")


def _check_spec(res: Result, predicate: Mapping[str, Any]) -> None:
    from ..config import sha256_json

    try:
        meta = read_spec(res.trial)
        manifest = read_json(res.trial / MANIFEST)
    except (OSError, ValueError):
        res.failures.append(f"{SPEC} or {MANIFEST}: missing or unreadable")
        return
    spec = predicate.get("spec")
    if meta.get("spec") != spec or meta.get("hash") != predicate.get("trial_hash"):
        res.failures.append(f"{SPEC}: differs from the attested spec")
    if sha256_json(spec) != predicate.get("trial_hash"):
        res.failures.append("statement: the trial hash is not the hash of the attested spec")
    if not (meta.get("data_version") == manifest.get("data_version") == predicate.get("data_version")):
        res.failures.append(f"data version: {SPEC}, {MANIFEST} and the statement disagree")
    if isinstance(spec, Mapping) and (manifest.get("dataset"), manifest.get("options")) != (
            spec.get("dataset"), spec.get("dataset_options")):
        res.failures.append(f"{MANIFEST}: dataset or options differ from the attested spec")


@dataclass
class LogView:
    """One log as this verify saw it: checked once per log, shared by its trials."""

    log: TransparencyLog
    latest: ckpt.Checkpoint | None
    tree: MerkleTree | None
    failures: list[str]
    witnessed: int | None = None
    """The largest checkpoint size cosigned by enough of the policy's witnesses (None: no witnesses required)."""
    reported: bool = False


def _witnessed_size(view: LogView, policy: Policy) -> tuple[int, list[str]]:
    """The largest size of a checkpoint cosigned by at least ``min_witnesses`` of the policy's witnesses and
    consistent with the latest checkpoint."""
    latest, tree, log = view.latest, view.tree, view.log
    sizes: dict[str, int] = {}
    for path in sorted((log.path / COSIGNED).glob("*.note")) if (log.path / COSIGNED).is_dir() else []:
        try:
            cp = ckpt.parse(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if cp.origin != latest.origin or cp.size > latest.size or not verify_consistency(
                cp.size, latest.size, cp.root, latest.root, tree.consistency_proof(cp.size)):
            continue
        for w in policy.witnesses:
            if any(ckpt.cosigned_by(cp, w.identity, k) is not None for k in w.keys.values()):
                sizes[w.identity] = max(sizes.get(w.identity, 0), cp.size)
    ranked = sorted(sizes.values(), reverse=True)
    if len(ranked) < policy.min_witnesses:
        return 0, [f"log {latest.origin}: cosigned by {len(ranked)} of the policy's witnesses, it requires "
                   f"{policy.min_witnesses} (run: shiftbench log witness LOG --key WITNESS_KEYS)"]
    return (ranked[policy.min_witnesses - 1] if policy.min_witnesses else latest.size), []


def open_log(log_dir: Path, trust: Trust, state: WitnessState) -> LogView:
    """Checks a log once: its own consistency, its operator against the policy and the witness state, the
    witnesses' cosignatures; then remembers its latest checkpoint in the state."""
    log = TransparencyLog(log_dir)
    latest, tree, failures = verify_log(log)
    view = LogView(log, latest, tree, list(failures))
    if latest is None:
        return view
    try:
        operator = log.operator()
    except Exception:  # verify_log has reported the unreadable key
        operator = None
    policy = trust.policy
    if operator is not None and policy is not None and policy.log_operators is not None and \
            operator.keyid not in policy.log_operators:
        view.failures.append(f"log {latest.origin}: its operator key {operator.keyid[:16]} is not one the policy "
                             "accepts (logs:)")
    if operator is not None:
        view.failures += state.check(latest, tree, operator.keyid)
    if policy is not None and policy.witnesses and tree is not None:
        view.witnessed, errs = _witnessed_size(view, policy)
        view.failures += errs
    if not view.failures and operator is not None:
        state.update(latest, operator.keyid)
    return view


def _check_log(res: Result, view: LogView) -> None:
    receipt_path = res.trial / RECEIPT
    if not receipt_path.is_file():
        res.failures.append(f"{RECEIPT}: missing (the envelope was never logged)")
        return
    if view.failures and not view.reported:
        res.failures += view.failures
        view.reported = True
    elif view.failures:
        res.failures.append(f"log {view.log.path}: failed its checks (reported above)")
    if view.latest is None or view.tree is None:
        if not view.failures:
            res.failures.append(f"log {view.log.path}: unusable")
        return
    try:
        receipt = read_json(receipt_path)
    except (OSError, ValueError):
        res.failures.append(f"{RECEIPT}: unreadable")
        return
    res.failures += [f"log: {f}" for f in check_receipt(receipt, res.envelope_sha256 or "", view.latest, view.tree,
                                                         view.log)]
    index = receipt.get("log_index") if isinstance(receipt, Mapping) else None
    if view.witnessed is not None and isinstance(index, int) and index >= view.witnessed:
        res.failures.append(f"log: entry {index} is not yet under a checkpoint the policy's witnesses cosigned "
                            f"(they cosigned {view.witnessed} entries)")


def _tensors(split) -> dict:
    """A split's example tensors on the CPU (walked once when the split holds no tensors in memory)."""
    import torch

    tensors = getattr(split, "tensors", None)
    if tensors is None:
        parts = list(split.eval_batches(4096))
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return {k: v.cpu() for k, v in tensors.items()}


@dataclass
class Rebuilt:
    """The dataset rebuilt from the attested spec, and where each of its examples sits in the committed rows."""

    spec: Any
    dataset: Any
    rows: dict[tuple[str, int], int]
    """(split, example id) -> row of predictions.npz, for the dataset's examples that have exactly one row."""
    labels: dict[str, np.ndarray]


def check_against_data(res: Result, predicate: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                       data_root: str | None) -> Rebuilt | None:
    """Rebuilds the trial's dataset from its attested spec and checks, per split, what the submitter cannot choose:
    the committed ids are distinct and exactly the dataset's ids, the labels are the dataset's, and the metrics
    recomputed from the dataset's labels and the committed predictions are the attested ones.

    A dataset that cannot be rebuilt here (real data missing) sets ``res.not_checked``; that is never OK.
    """
    from ..config import TrialSpec
    from ..data import load_dataset
    from ..errors import UserError

    try:
        spec = TrialSpec.from_dict(predicate["spec"])
    except (UserError, KeyError, TypeError, ValueError) as e:
        res.failures.append(f"data: the attested spec does not resolve ({e})")
        return None
    try:
        dataset = load_dataset(spec.dataset, spec.dataset_options, data_root, False)
    except (UserError, OSError) as e:
        res.not_checked = f"dataset {spec.dataset} cannot be rebuilt here ({str(e).splitlines()[0]}); give --data-root"
        return None
    if dataset.version() != predicate.get("data_version"):
        res.failures.append("data: the rebuilt dataset's version differs from the attested data version")
        return None
    splits = dataset.eval_splits()
    col = np.asarray(arrays["split"]).astype(str)
    committed = set(np.unique(col).tolist())
    for name in sorted(committed - set(splits)):
        res.failures.append(f"data: split {name} is not in the rebuilt dataset")
    metrics = predicate.get("metrics") if isinstance(predicate.get("metrics"), Mapping) else {}
    rows_of: dict[tuple[str, int], int] = {}
    labels: dict[str, np.ndarray] = {}
    ids_col = np.asarray(arrays["idx"]).astype(np.int64)
    for name, split in splits.items():
        tensors = _tensors(split)
        ids = tensors["idx"].numpy().astype(np.int64)
        rows = np.flatnonzero(col == name)
        got = ids_col[rows]
        distinct = np.unique(got)
        ok = True
        if len(distinct) != len(got):
            res.failures.append(f"data: {name} has {len(got)} rows but {len(distinct)} distinct example ids "
                                "(rows are repeated)")
            ok = False
        missing, extra = np.setdiff1d(ids, got).size, np.setdiff1d(got, ids).size
        if missing or extra:
            res.failures.append(f"data: {name} commits {len(distinct)} distinct ids, the dataset has {len(ids)}: "
                                f"{missing} of the dataset's are missing, {extra} are not in it")
            ok = False
        order = np.argsort(ids, kind="stable")
        pos = order[np.clip(np.searchsorted(ids, got, sorter=order), 0, len(ids) - 1)]
        present = ids[pos] == got
        for r, i, here in zip(rows.tolist(), got.tolist(), present.tolist()):
            if here:
                rows_of[(name, i)] = r
        if "y" in tensors:
            labels[name] = tensors["y"].numpy()
        if not ok:
            continue
        y = tensors["y"].numpy()[pos] if "y" in tensors else None
        _check_split_metrics(res, dataset, name, rows, arrays, y, metrics)
    if not any(f.startswith("data:") for f in res.failures):
        res.checks.append("ids, labels and metrics against the rebuilt dataset")
    return Rebuilt(spec, dataset, rows_of, labels)


def _check_split_metrics(res: Result, dataset, name: str, rows: np.ndarray, arrays: Mapping[str, np.ndarray],
                         y: np.ndarray | None, metrics: Mapping[str, Any]) -> None:
    """Labels are the dataset's; the dataset's own evaluation of the committed predictions gives the metrics."""
    outputs = {k: np.asarray(arrays[k])[rows] for k in ("idx", "pred", "score", "loss", "correct") if k in arrays}
    if y is not None:
        if "label" in arrays and not np.array_equal(np.asarray(arrays["label"])[rows], y):
            n = int(np.sum(np.asarray(arrays["label"])[rows] != y))
            res.failures.append(f"data: {name}: {n} committed labels differ from the dataset's labels")
        outputs["label"] = y
        if "pred" in outputs:
            outputs["correct"] = (outputs["pred"] == y).astype(np.float32)
        if dataset.TASK == "classification" and {"pred", "score", "loss"} <= set(outputs):
            _check_losses(res, name, outputs)
    try:
        recomputed = dataset.evaluate(name, outputs)
    except Exception as e:  # a dataset's evaluator may need columns a forged file lacks
        res.failures.append(f"data: {name}: the dataset's evaluation of the committed predictions fails "
                            f"({type(e).__name__})")
        return
    for metric, value in recomputed.items():
        key = f"{name}_{metric}"
        if key in metrics and not _same_number(value, metrics[key], METRIC_ATOL):
            res.failures.append(f"data: {key} = {metrics[key]}, but the dataset's labels and the committed "
                                f"predictions give {float(value):.6g}")
        elif key not in metrics:
            res.failures.append(f"data: the attested metrics lack {key}, which the dataset's evaluation reports")


def _check_losses(res: Result, name: str, out: Mapping[str, np.ndarray]) -> None:
    score = np.clip(out["score"].astype(np.float64), 1e-30, 1.0)
    loss = out["loss"].astype(np.float64)
    right = out["correct"] > 0
    bad = int(np.sum(right & (np.abs(loss + np.log(score)) > LOSS_ATOL + 1e-3 * np.abs(loss))))
    with np.errstate(divide="ignore"):
        floor = -np.log(np.clip(1.0 - score, 0.0, 1.0))
    bad += int(np.sum(~right & (loss < floor - LOSS_ATOL - 1e-3 * np.abs(floor))))
    if bad:
        res.failures.append(f"data: {name}: {bad} committed losses are impossible for their scores and the dataset's "
                            "labels")


def verify_trial(trial_dir: str | os.PathLike, trust: Trust | None = None, log_dir: str | os.PathLike | None = None,
                 reexecute: int = 0, seed: int | None = None, data_root: str | None = None,
                 log_cache: dict | None = None, state: WitnessState | None = None) -> Result:
    """Verifies one attested trial folder.

    Args:
        trial_dir: the trial folder.
        trust: who is trusted (default: the user's own keys).
        log_dir: the transparency log (default: the sweep's, or the user's).
        reexecute: re-run the model on this many examples sampled from the rebuilt dataset.
        seed: seed of the re-execution sample (None: fresh randomness).
        data_root: folder with real datasets.
        log_cache: shared between trials of one sweep so each log is checked once.
        state: the verifier's witness state (default: ``<config>/witness/state.json``).
    """
    res = Result(Path(trial_dir))
    trust = trust or Trust.of()
    env_path = res.trial / ENVELOPE
    if not env_path.is_file():
        res.failures.append(f"{ENVELOPE}: missing (the trial was not attested; add `attest` to its callbacks)")
        return res
    res.envelope_sha256 = sha256_file(env_path)
    try:
        envelope = read_json(env_path)
    except (OSError, ValueError):
        res.failures.append(f"{ENVELOPE}: not valid JSON")
        return res
    if not isinstance(envelope, Mapping):
        res.failures.append(f"{ENVELOPE}: not a DSSE envelope")
        return res
    statement = _check_signatures(res, envelope, trust)
    if statement is None:
        return res
    res.statement = statement
    predicate = statement.get("predicate") or {}
    _check_subjects(res, statement)
    arrays = hashes = None
    try:
        arrays = read_predictions(res.trial)
        if len({len(v) for v in arrays.values()}) != 1 or "split" not in arrays or "idx" not in arrays:
            res.failures.append(f"{PREDICTIONS}: columns missing or of unequal length")
            arrays = None
        else:
            hashes = leaf_hashes(arrays)
    except Exception:  # a damaged archive raises zipfile, zlib or numpy errors alike; the Merkle check reports it
        arrays = hashes = None
    _check_predictions(res, predicate, arrays, hashes)
    _check_metrics(res, predicate, arrays)
    _check_spec(res, predicate)
    cache = log_cache if log_cache is not None else {}
    ld = Path(log_dir) if log_dir else log_dir_for(res.trial)
    if ld not in cache:
        cache[ld] = open_log(ld, trust, state or WitnessState())
    _check_log(res, cache[ld])
    res.checks[:0] = ["signatures", "digests", "Merkle root", "metrics", "log"]
    _check_proofs(res)
    rebuilt = check_against_data(res, predicate, arrays, data_root) if arrays is not None else None
    if reexecute > 0 and hashes is not None:
        if rebuilt is None:
            res.notes.append("re-execution skipped: the dataset was not rebuilt")
        else:
            reexecute_sample(res, predicate, arrays, hashes, reexecute, seed, rebuilt)
    return res


def _check_proofs(res: Result) -> None:
    """A host's accuracy proofs in the folder (``shiftbench prove``): each proof and its signed Statement must
    verify (shiftbench.attest.proofs.check); a folder without proofs adds nothing."""
    from .proofs import FAILED as PROOF_FAILED
    from .proofs import check_trial

    results = check_trial(res.trial)
    if not results:
        return
    res.checks.append(f"{len(results)} accuracy proof(s)")
    for r in results:
        if r["status"] == PROOF_FAILED:
            res.failures += [f"proof {r['split']}: {f}" for f in r["failures"]] or [f"proof {r['split']}: invalid"]


def reexecute_sample(res: Result, predicate: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                     hashes: list[bytes], k: int, seed: int | None, rebuilt: Rebuilt) -> None:
    """Loads ``model.pt`` (tensors only) into the spec's model and re-runs ``k`` examples drawn from the rebuilt
    dataset (never from the submitter's rows): each one's committed row must sit under the attested Merkle root
    (inclusion proof) and be what the weights predict, with the dataset's label."""
    import torch

    from ..registry import METHODS, TASKS

    spec, dataset = rebuilt.spec, rebuilt.dataset
    task = TASKS.get(dataset.TASK)()
    with torch.random.fork_rng(devices=[]):  # the trainer's initialisation, leaving the caller's RNG as it was
        model = build_trial_model(spec, dataset.input_shape, dataset.num_classes, dataset.TASK)
        algorithm = METHODS.get(spec.method)(model, task, len(dataset.train_splits(spec.test_envs)), spec.hparams)
    _setup_for_scoring(algorithm, dataset, spec)  # before the weights load: a setup may set the model's weights
    try:
        state = read_weights(res.trial)
        if state is None:
            raise FileNotFoundError(res.trial / WEIGHTS)
        model.load_state_dict(state)
    except Exception as e:  # any unpickling refusal or shape mismatch means the weights are not this spec's model
        res.failures.append(f"re-execution: {WEIGHTS} does not load into the spec's model ({type(e).__name__})")
        return
    algorithm.eval()
    tree = MerkleTree(hashes)
    root = bytes.fromhex((predicate.get("predictions") or {}).get("merkle_root", "") or "00")
    n = len(hashes)
    splits = dataset.eval_splits()
    universe = [(name, int(i)) for name, split in splits.items() for i in _tensors(split)["idx"].tolist()]
    picks = np.random.default_rng(seed).choice(len(universe), size=min(k, len(universe)), replace=False)
    chosen: dict[str, list[int]] = {}
    for p in sorted(picks.tolist()):
        name, i = universe[p]
        chosen.setdefault(name, []).append(i)
    bad, absent = [], 0
    for name, ids in chosen.items():
        batch = _gather(splits[name], ids)
        with torch.inference_mode():
            out = task.outputs(algorithm.scores(batch), batch)
        for j, i in enumerate(ids):
            r = rebuilt.rows.get((name, i))
            if r is None:
                absent += 1
                continue
            if not verify_inclusion(hashes[r], r, n, tree.inclusion_proof(r), root):
                bad.append(r)
                continue
            label = int(batch["y"][j]) if "y" in batch else None
            pred, score = int(out["pred"][j]), float(out["score"][j])
            if leaf_hash(encode_leaf(name, i, label, pred, np.float32(score))) == hashes[r]:
                continue
            same = (label is None or ("label" in arrays and label == int(arrays["label"][r]))) and \
                pred == int(arrays["pred"][r]) and abs(score - float(arrays["score"][r])) <= SCORE_ATOL
            if not same:
                bad.append(r)
    res.reexecuted = len(picks)
    if absent:
        res.failures.append(f"re-execution: {absent} of {len(picks)} examples sampled from the dataset have no "
                            "committed prediction")
    if bad:
        shown = ", ".join(str(r) for r in sorted(bad)[:8])
        res.failures.append(f"re-execution: {len(bad)} of {len(picks)} sampled predictions do not match the stated "
                            f"weights under the committed Merkle root (rows {shown})")
    if not absent and not bad:
        res.checks.append(f"re-execution of {len(picks)} examples")
        res.notes.append(f"re-executed {len(picks)} examples sampled from the rebuilt dataset: all match")


class _NotForScoring(Exception):
    """Raised by the parts of a method's context that only training needs."""


def _setup_for_scoring(algorithm, dataset, spec) -> None:
    """Runs the method's ``setup`` as far as scoring needs (e.g. a coordination method finds its game there);
    what only training needs, such as training a reference model, is skipped, since the weights come from the
    attested file."""
    import tempfile

    import torch

    from ..algorithm import MethodContext

    def not_for_scoring(*_args, **_kwargs):
        raise _NotForScoring

    with tempfile.TemporaryDirectory() as workdir:
        context = MethodContext(
            train_env_names=[name for name, _ in dataset.train_splits(spec.test_envs)],
            splits=dataset.eval_splits(), stream=lambda *_: not_for_scoring, device=torch.device("cpu"),
            workdir=Path(workdir), seed=spec.seed, train_reference=not_for_scoring,
        )  # fmt: skip
        try:
            algorithm.setup(context)
        except _NotForScoring:
            pass


def _gather(split, ids: Sequence[int]) -> dict | None:
    """The examples with these ids, in this order, as one batch on the CPU."""
    import torch

    tensors = getattr(split, "tensors", None)
    if tensors is None:  # a split without in-memory tensors: walk it once
        parts = list(split.eval_batches(4096))
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    ids_all = tensors["idx"].cpu().numpy()
    where = {int(v): i for i, v in enumerate(ids_all)}
    if any(i not in where for i in ids):
        return None
    pos = torch.as_tensor([where[i] for i in ids])
    return {k: v.cpu()[pos] for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------- sweeps


def trial_folders(path: Path) -> list[Path]:
    """One trial folder, or every done trial folder of a sweep output folder."""
    return trial_dirs(path, marker=FINAL)


def verify_path(path: str | os.PathLike, trust: Trust | None = None, log_dir: str | os.PathLike | None = None,
                reexecute: int = 0, seed: int | None = None, data_root: str | None = None,
                state: WitnessState | None = None) -> tuple[list[Result], list[str]]:
    """Verifies a trial folder or every done trial of a sweep; for a sweep also that no logged run was dropped.

    Returns:
        (per-trial results, sweep-level failures).
    """
    path = Path(path)
    trust = trust or Trust.of()
    state = state or WitnessState()
    cache: dict = {}
    results = [verify_trial(t, trust, log_dir, reexecute, seed, data_root, cache, state) for t in trial_folders(path)]
    sweep_failures = []
    if (path / TRIALS).is_dir():
        logs = {Path(log_dir) if log_dir else log_dir_for(r.trial) for r in results} or {path / LOG_DIRNAME}
        present = {r.statement["predicate"]["trial_hash"]: r for r in results if r.statement}
        for ld in logs:
            view = cache[ld] if ld in cache else open_log(ld, trust, state)
            sweep_failures += dropped_runs(view.log, view.latest, present)
    return results, sweep_failures


def dropped_runs(log: TransparencyLog, latest: ckpt.Checkpoint | None, present: Mapping[str, Result]) -> list[str]:
    """Log entries whose trial is missing from the sweep, or whose newest envelope is not the trial's."""
    if latest is None:
        return []
    newest: dict[str, tuple[int, str]] = {}
    for i, line in enumerate(log.entries()[: latest.size]):
        try:
            e = json.loads(line)
            newest[e["trial_hash"]] = (i, e["envelope_sha256"])
        except (ValueError, KeyError, TypeError):
            continue  # a damaged entry already fails the root check
    out = []
    for trial_hash, (i, digest) in newest.items():
        r = present.get(trial_hash)
        if r is None:
            out.append(f"log entry {i}: trial {trial_hash[:16]} is logged but missing from this sweep")
        elif r.envelope_sha256 != digest:
            out.append(f"log entry {i}: trial {trial_hash[:16]} carries another envelope than the one logged last")
    return out


def trusted_from_files(files: Iterable[str | os.PathLike]) -> list[PublicKey]:
    return [k for f in files for k in read_public_keys(f)]
