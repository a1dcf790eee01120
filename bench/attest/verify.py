"""Offline verification of attested trials: signatures, digests, metrics, log inclusion, and re-execution.

Every check appends one line to a list of failures; a trial verifies when that list is empty.
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
from .dsse import PublicKey, b64decode_strict, local_public_keys, read_public_keys, verify_envelope
from .log import LOG_DIRNAME, TransparencyLog, TreeHead, check_receipt, log_dir_for, verify_log
from .merkle import MerkleTree, leaf_hash, merkle_root, verify_inclusion
from .predictions import encode_leaf, leaf_hashes, load_predictions
from .record import ENVELOPE, RECEIPT
from .statement import (MANIFEST, METRICS, PAYLOAD_TYPE, PREDICATE_TYPE, PREDICTIONS, RESULTS, SPEC, STATEMENT_TYPE,
                        SUBJECTS, WEIGHTS)

METRIC_ATOL = 1e-6
"""Recomputed accuracies and losses may differ from the recorded ones by float32 summation order only."""
SCORE_ATOL = 1e-4
"""A re-executed score may differ from the committed one by this much (batch composition changes float32 sums);
predictions and labels must match exactly."""


@dataclass
class Result:
    """What verifying one trial found."""

    trial: Path
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    envelope_sha256: str | None = None
    statement: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class Trust:
    """Which keys are trusted: given public keys (each must have signed) or, by default, the user's own."""

    keys: list[PublicKey]
    required: list[str]

    @classmethod
    def of(cls, public_keys: Sequence[PublicKey] | None = None, keys_dir: str | os.PathLike | None = None) -> "Trust":
        if public_keys:
            return cls(list(public_keys), [k.keyid for k in public_keys])
        return cls(local_public_keys(keys_dir), [])


def _last_record(path: Path) -> Any:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def _same_number(a: Any, b: Any, atol: float) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return abs(a - b) <= atol or a == b or (math.isnan(a) and math.isnan(b))


def _same_json(a: Any, b: Any) -> bool:
    """Equal as canonical JSON (so a NaN metric equals itself)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _check_signatures(res: Result, envelope: Any, trust: Trust) -> dict | None:
    """The statement, once the envelope's signatures are checked against the trust and the statement's signers."""
    try:
        statement = json.loads(b64decode_strict(envelope["payload"]))
        signers = [s["keyid"] for s in statement["predicate"]["signers"]]
    except (ValueError, KeyError, TypeError):
        res.failures.append("envelope payload is not a shiftbench Statement")
        return None
    _, failures = verify_envelope(envelope, trust.keys, [*signers, *trust.required], PAYLOAD_TYPE)
    res.failures += failures
    extra = {s.get("keyid") for s in envelope["signatures"] if isinstance(s, Mapping)} - set(signers)
    if extra:
        res.failures.append(f"envelope carries {len(extra)} signature(s) by keys the statement does not list")
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        res.failures.append("statement type or predicate type is not the shiftbench trial result")
    return statement


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
        final = read_json(t / "final.json")
        if not _same_json(final.get("record"), metrics):
            res.failures.append("final.json: its record differs from the attested metrics")
        if final.get("attestation") != res.envelope_sha256:
            res.failures.append("final.json: its attestation digest is not the envelope's sha256")
    except (OSError, ValueError, AttributeError):
        res.failures.append("final.json: missing or unreadable")
    try:
        if not _same_json(_last_record(t / RESULTS), metrics):
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
        meta = read_json(res.trial / SPEC)
        manifest = read_json(res.trial / MANIFEST)
    except (OSError, ValueError):
        res.failures.append("spec.json or data_manifest.json: missing or unreadable")
        return
    spec = predicate.get("spec")
    if meta.get("spec") != spec or meta.get("hash") != predicate.get("trial_hash"):
        res.failures.append("spec.json: differs from the attested spec")
    if sha256_json(spec) != predicate.get("trial_hash"):
        res.failures.append("statement: the trial hash is not the hash of the attested spec")
    if not (meta.get("data_version") == manifest.get("data_version") == predicate.get("data_version")):
        res.failures.append("data version: spec.json, data_manifest.json and the statement disagree")
    if isinstance(spec, Mapping) and (manifest.get("dataset"), manifest.get("options")) != (
            spec.get("dataset"), spec.get("dataset_options")):
        res.failures.append("data_manifest.json: dataset or options differ from the attested spec")


def _check_log(res: Result, trust: Trust, log_dir: Path, cache: dict) -> None:
    receipt_path = res.trial / RECEIPT
    if not receipt_path.is_file():
        res.failures.append(f"{RECEIPT}: missing (the envelope was never logged)")
        return
    log = TransparencyLog(log_dir)
    if log_dir not in cache:
        cache[log_dir] = verify_log(log, trust.keys)
    latest, tree, failures = cache[log_dir]
    if failures and not cache.get(("reported", log_dir)):
        res.failures += failures
        cache[("reported", log_dir)] = True
    if latest is None or tree is None:
        if not failures:
            res.failures.append(f"log {log_dir}: unusable")
        return
    try:
        receipt = read_json(receipt_path)
    except (OSError, ValueError):
        res.failures.append(f"{RECEIPT}: unreadable")
        return
    res.failures += [f"log: {f}" for f in check_receipt(receipt, res.envelope_sha256 or "", latest, tree, log,
                                                         trust.keys)]


def verify_trial(trial_dir: str | os.PathLike, trust: Trust | None = None, log_dir: str | os.PathLike | None = None,
                 reexecute: int = 0, seed: int | None = None, data_root: str | None = None,
                 log_cache: dict | None = None) -> Result:
    """Verifies one attested trial folder.

    Args:
        trial_dir: the trial folder.
        trust: trusted keys (default: the user's own).
        log_dir: the transparency log (default: the sweep's, or the user's).
        reexecute: re-run the model on this many random committed examples.
        seed: seed of the re-execution sample (None: fresh randomness).
        data_root: folder with real datasets, for re-execution.
        log_cache: shared between trials of one sweep so the log is checked once.
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
    statement = _check_signatures(res, envelope, trust)
    if statement is None:
        return res
    res.statement = statement
    predicate = statement.get("predicate") or {}
    _check_subjects(res, statement)
    arrays = hashes = None
    try:
        arrays = load_predictions(res.trial / PREDICTIONS)
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
    _check_log(res, trust, Path(log_dir) if log_dir else log_dir_for(res.trial), log_cache if log_cache is not None
               else {})
    if reexecute > 0 and arrays is not None and hashes is not None:
        reexecute_sample(res, predicate, arrays, hashes, reexecute, seed, data_root)
    return res


def reexecute_sample(res: Result, predicate: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                     hashes: list[bytes], k: int, seed: int | None, data_root: str | None) -> None:
    """Rebuilds the model from the attested spec, loads ``model.pt`` (tensors only) and re-runs ``k`` random
    committed examples; each committed row must sit under the attested Merkle root (inclusion proof) and match
    what the weights predict."""
    import torch

    from ..config import TrialSpec
    from ..errors import UserError
    from ..models import build_model
    from ..registry import METHODS, TASKS
    from ..trainer import load_dataset

    try:
        spec = TrialSpec.from_dict(predicate["spec"])
        dataset = load_dataset(spec.dataset, spec.dataset_options, data_root, False)
    except (UserError, KeyError, TypeError, ValueError) as e:
        res.failures.append(f"re-execution: cannot rebuild the dataset: {e}")
        return
    if dataset.version() != predicate.get("data_version"):
        res.failures.append("re-execution: the rebuilt dataset's version differs from the attested data version")
    task = TASKS.get(dataset.TASK)()
    model = build_model(spec.model, dataset.input_shape, task.n_outputs(dataset.num_classes), spec.hparams)
    algorithm = METHODS.get(spec.method)(model, task, len(dataset.train_splits(spec.test_envs)), spec.hparams)
    _setup_for_scoring(algorithm, dataset, spec)  # before the weights load: a setup may set the model's weights
    try:
        state = torch.load(res.trial / WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # any unpickling refusal or shape mismatch means the weights are not this spec's model
        res.failures.append(f"re-execution: {WEIGHTS} does not load into the spec's model ({type(e).__name__})")
        return
    algorithm.eval()
    tree = MerkleTree(hashes)
    root = bytes.fromhex((predicate.get("predictions") or {}).get("merkle_root", ""))
    n = len(hashes)
    rows = np.random.default_rng(seed).choice(n, size=min(k, n), replace=False)
    splits = dataset.eval_splits()
    split_col = arrays["split"].astype(str)
    bad: list[int] = []
    for name in sorted(set(split_col[rows])):
        chosen = [int(r) for r in rows if split_col[r] == name]
        if name not in splits:
            res.failures.append(f"re-execution: split {name} is not in the rebuilt dataset")
            continue
        batch = _gather(splits[name], [int(arrays["idx"][r]) for r in chosen])
        if batch is None:
            res.failures.append(f"re-execution: some sampled example ids of {name} are not in the rebuilt dataset")
            continue
        with torch.inference_mode():
            out = task.outputs(algorithm.scores(batch), batch)
        for j, r in enumerate(chosen):
            if not verify_inclusion(hashes[r], r, n, tree.inclusion_proof(r), root):
                bad.append(r)
                continue
            label = int(batch["y"][j]) if "y" in batch else None
            pred, score = int(out["pred"][j]), float(out["score"][j])
            if leaf_hash(encode_leaf(name, int(arrays["idx"][r]), label, pred, np.float32(score))) == hashes[r]:
                continue
            same = (label is None or ("label" in arrays and label == int(arrays["label"][r]))) and \
                pred == int(arrays["pred"][r]) and abs(score - float(arrays["score"][r])) <= SCORE_ATOL
            if not same:
                bad.append(r)
    if bad:
        shown = ", ".join(str(r) for r in sorted(bad)[:8])
        res.failures.append(f"re-execution: {len(bad)} of {len(rows)} sampled predictions do not match the stated "
                            f"weights under the committed Merkle root (rows {shown})")
    else:
        res.notes.append(f"re-executed {len(rows)} committed predictions: all match")


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
    if (path / "spec.json").is_file():
        return [path]
    base = path / "trials" if (path / "trials").is_dir() else path
    return sorted(p for p in base.iterdir() if (p / "final.json").is_file()) if base.is_dir() else []


def verify_path(path: str | os.PathLike, trust: Trust | None = None, log_dir: str | os.PathLike | None = None,
                reexecute: int = 0, seed: int | None = None, data_root: str | None = None
                ) -> tuple[list[Result], list[str]]:
    """Verifies a trial folder or every done trial of a sweep; for a sweep also that no logged run was dropped.

    Returns:
        (per-trial results, sweep-level failures).
    """
    path = Path(path)
    trust = trust or Trust.of()
    cache: dict = {}
    results = [verify_trial(t, trust, log_dir, reexecute, seed, data_root, cache) for t in trial_folders(path)]
    sweep_failures = []
    if (path / "trials").is_dir():
        logs = {Path(log_dir) if log_dir else log_dir_for(r.trial) for r in results} or {path / LOG_DIRNAME}
        present = {r.statement["predicate"]["trial_hash"]: r for r in results if r.statement}
        for ld in logs:
            latest = cache[ld][0] if ld in cache else verify_log(TransparencyLog(ld), trust.keys)[0]
            sweep_failures += dropped_runs(TransparencyLog(ld), latest, present)
    return results, sweep_failures


def dropped_runs(log: TransparencyLog, latest: TreeHead | None, present: Mapping[str, Result]) -> list[str]:
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
