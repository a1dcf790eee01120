"""Attested results: RFC 6962 Merkle trees and proofs, DSSE, keys, the transparency log, and `shiftbench verify`.

The mutation test flips bytes and edits fields in every attested artifact of a real (tiny) trial and its log and
checks that each mutation is detected while the unmutated trial verifies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftbench.attest import dsse
from shiftbench.attest.log import TransparencyLog, verify_log
from shiftbench.attest.merkle import (EMPTY_ROOT, MerkleTree, leaf_hash, merkle_root, node_hash, verify_consistency,
                                     verify_inclusion)
from shiftbench.attest.predictions import encode_leaf, leaf_hashes, load_predictions
from shiftbench.attest.record import ENVELOPE, RECEIPT, attest_trial
from shiftbench.attest.verify import verify_path
from shiftbench.cli import main
from shiftbench.config import TrialSpec
from shiftbench.errors import UserError
from shiftbench.trainer import run_trial

# ------------------------------------------------------------------------------------------------------ Merkle


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962's recursive definition, as the reference."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def test_roots_match_certificate_transparency_vectors_and_the_recursive_definition():
    # The leaves and roots of the Certificate Transparency reference tests for RFC 6962 trees of 1..8 leaves.
    data = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                       "606162636465666768696a6b6c6d6e6f")]
    roots = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
             "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
             "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
             "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
             "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
             "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
    for n, root in enumerate(roots, 1):
        assert MerkleTree.from_data(data[:n]).root.hex() == root
    assert MerkleTree([]).root == EMPTY_ROOT == hashlib.sha256(b"").digest()
    leaves = [bytes([i]) * (i % 5) for i in range(70)]
    for n in range(71):
        tree_root = MerkleTree.from_data(leaves[:n]).root
        assert merkle_root([leaf_hash(x) for x in leaves[:n]]) == tree_root == mth(leaves[:n])


def test_rfc6962_worked_example_of_seven_leaves():
    # RFC 6962 section 2.1.3: a..f are the leaves d0..d5, j is d6, g=(a,b), h=(c,d), i=(e,f), k=(g,h), l=(i,j).
    d = [b"d%d" % i for i in range(7)]
    a, b, c, dd, e, f, j = (leaf_hash(x) for x in d)
    g, h, i = node_hash(a, b), node_hash(c, dd), node_hash(e, f)
    k, l_ = node_hash(g, h), node_hash(i, j)
    t = MerkleTree.from_data(d)
    assert t.root == node_hash(k, l_)
    assert t.inclusion_proof(0) == [b, h, l_]
    assert t.inclusion_proof(3) == [c, g, l_]
    assert t.inclusion_proof(4) == [f, j, k]
    assert t.inclusion_proof(6) == [i, k]
    assert t.consistency_proof(3) == [c, dd, g, l_]
    assert t.consistency_proof(4) == [l_]
    assert t.consistency_proof(6) == [i, j, k]


def test_inclusion_and_consistency_proofs_verify_and_reject_tampering():
    leaves = [b"leaf-%d" % i for i in range(37)]
    t = MerkleTree.from_data(leaves)
    for n in range(1, len(leaves) + 1):
        root = mth(leaves[:n])
        for m in range(n):
            proof = t.inclusion_proof(m, n)
            assert verify_inclusion(leaf_hash(leaves[m]), m, n, proof, root)
            assert not verify_inclusion(leaf_hash(leaves[m] + b"!"), m, n, proof, root)
            if m + 1 < n:
                assert not verify_inclusion(leaf_hash(leaves[m]), m + 1, n, proof, root)
            if proof:
                bad = list(proof)
                bad[-1] = bytes(32)
                assert not verify_inclusion(leaf_hash(leaves[m]), m, n, bad, root)
        for m in range(0, n + 1):
            proof = t.consistency_proof(m, n)
            assert verify_consistency(m, n, mth(leaves[:m]), root, proof)
            if 0 < m < n:
                assert not verify_consistency(m, n, mth(leaves[:m - 1] + [b"x"]), root, proof)
                assert not verify_consistency(m, n, mth(leaves[:m]), node_hash(root, root), proof)


# ------------------------------------------------------------------------------------------------------ DSSE, keys


def test_pae_matches_the_dsse_specification_example():
    assert dsse.pae("http://example.com/HelloWorld", b"hello world") == \
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_keys_are_created_once_with_mode_0600_and_group_readable_keys_are_refused(tmp_path):
    k1 = dsse.load_signing_key("ed25519", tmp_path)
    k2 = dsse.load_signing_key("ed25519", tmp_path)
    assert k1.keyid == k2.keyid
    assert stat.S_IMODE((tmp_path / "ed25519.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) & 0o077 == 0
    from cryptography.hazmat.primitives import serialization

    serialization.load_pem_private_key((tmp_path / "ed25519.key").read_bytes(), None)  # standard PKCS#8
    os.chmod(tmp_path / "ed25519.key", 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        dsse.load_signing_key("ed25519", tmp_path)


def test_key_folder_follows_shiftbench_home_then_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("SHIFTBENCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert dsse.keys_dir() == tmp_path / "xdg" / "shiftbench" / "keys"
    monkeypatch.setenv("SHIFTBENCH_HOME", str(tmp_path / "home"))
    assert dsse.keys_dir() == tmp_path / "home" / "keys"


def test_slh_dsa_signatures_verify_and_reject_other_messages(tmp_path):
    key = dsse.load_signing_key("slh-dsa-sha2-128s", tmp_path)
    env = dsse.sign_envelope("text/plain", b"result", [key])
    pub = dsse.read_public_keys(tmp_path / "slh-dsa-sha2-128s.pub")
    assert len(base64.b64decode(env["signatures"][0]["sig"])) == 7856  # FIPS 205 SLH-DSA-SHA2-128s
    assert dsse.verify_envelope(env, pub, [key.keyid]) == (b"result", [])
    forged = dict(env, payload=base64.b64encode(b"resulT").decode())
    assert "does not verify" in dsse.verify_envelope(forged, pub)[1][0]


# ------------------------------------------------------------------------------------------------------ trials


SMALL = {"env_size": 300, "resolution": 8}


def _spec(seed=0, callbacks=("attest",)):
    return TrialSpec.resolve("colored_digits", "erm", steps=11, eval_every=5, seed=seed, dataset_options=SMALL,
                             callbacks=callbacks)


def _trial(out: Path, spec: TrialSpec) -> Path:
    d = out / "trials" / spec.short_hash
    run_trial(spec, d)
    return d


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private config folder (keys, user log) for the whole module."""
    h = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("SHIFTBENCH_HOME", str(h))
        yield h


@pytest.fixture(autouse=True)
def witness_state(tmp_path, monkeypatch):
    """Each test's own verifier memory (the last checkpoint seen per log), so tests do not see each other's logs."""
    monkeypatch.setattr("shiftbench.attest.witness.default_state", lambda: tmp_path / "witness_state.json")


@pytest.fixture(scope="module")
def pristine(home, tmp_path_factory):
    """A sweep folder with two attested trials (Ed25519) and its log."""
    out = tmp_path_factory.mktemp("sweep")
    _trial(out, _spec(0))
    _trial(out, _spec(1))
    return out


def test_attested_trial_verifies_and_binds_its_files(pristine, home):
    results, sweep = verify_path(pristine, reexecute=12, seed=0)
    assert [r.failures for r in results] == [[], []] and sweep == []
    assert all("all match" in r.notes[0] for r in results)
    t = results[0].trial
    final = json.loads((t / "final.json").read_text())
    assert final["attestation"] == hashlib.sha256((t / ENVELOPE).read_bytes()).hexdigest()
    statement = results[0].statement
    assert {s["name"] for s in statement["subject"]} >= {"predictions.npz", "model.pt", "metrics.json",
                                                           "data_manifest.json"}
    predicate = statement["predicate"]
    arrays = load_predictions(t / "predictions.npz")
    assert predicate["predictions"]["merkle_root"] == merkle_root(leaf_hashes(arrays)).hex()
    assert predicate["predictions"]["leaves"] == len(arrays["idx"]) == 900  # 3 environments x 300
    assert predicate["metrics"] == final["record"] and predicate["spec"]["callbacks"] == ["attest"]
    manifest = json.loads((t / "data_manifest.json").read_text())
    assert manifest["data_version"] == predicate["data_version"] and manifest["options"].items() >= SMALL.items()
    assert main(["verify", str(pristine)]) == 0


def test_attestation_seals_what_other_callbacks_add_wherever_it_is_named(home, tmp_path):
    # attest named first: it still runs after drift, whose statistics join the last record and are signed with it
    t = _trial(tmp_path, _spec(0, callbacks=("attest", "drift")))
    final = json.loads((t / "final.json").read_text())
    last = json.loads((t / "results.jsonl").read_text().splitlines()[-1])
    assert "drift_env2_outputs_pvalue" in final["record"] and last == final["record"]
    (result,), sweep = verify_path(tmp_path)
    assert result.failures == [] and sweep == []
    assert result.statement["predicate"]["metrics"]["drift_env2_outputs_pvalue"] == last["drift_env2_outputs_pvalue"]


def test_leaf_encoding_is_canonical():
    leaf = encode_leaf("env2_in", 7, 1, 0, np.float32(0.75))
    assert leaf == bytes([1, 7]) + b"env2_in" + (7).to_bytes(8, "big") + b"\x01" + (1).to_bytes(8, "big") + \
        b"\x01" + (0).to_bytes(8, "big") + b"\x02" + struct.pack(">d", 0.75)
    arrays = {"split": np.array(["a", "b", "a"]), "idx": np.array([0, 0, 1]), "label": np.array([1, 0, 1]),
              "pred": np.array([1, 1, 0]), "score": np.array([0.9, 0.6, 0.7], dtype=np.float32)}
    assert leaf_hashes(arrays)[2] == leaf_hash(encode_leaf("a", 1, 1, 0, np.float32(0.7)))


def _flip(path: Path, rng: np.random.Generator) -> None:
    data = bytearray(path.read_bytes())
    i = int(rng.integers(len(data)))
    data[i] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))


def _edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _edit_envelope_payload(path: Path, fn) -> None:
    env = json.loads(path.read_text())
    statement = json.loads(base64.b64decode(env["payload"]))
    fn(statement)
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    path.write_text(json.dumps(env))


def _edit_npz(path: Path, fn) -> None:
    arrays = load_predictions(path)
    fn(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_weights(path: Path, fn) -> None:
    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)


def _set(key_path, value):
    """fn(obj) setting obj[k0][k1]... = value(old) (or value itself when it is not callable)."""
    def fn(obj):
        for k in key_path[:-1]:
            obj = obj[k]
        k = key_path[-1](obj) if callable(key_path[-1]) else key_path[-1]
        obj[k] = value(obj[k]) if callable(value) else value
    return fn


def _lines(path: Path, pick) -> None:
    path.write_bytes(b"".join(pick(path.read_bytes().splitlines(keepends=True))))


def _drop_last_row(a):
    for k in list(a):
        a[k] = a[k][:-1]


def _field_edits(trial: Path, log: Path):
    """(artifact, description, mutate) for semantic edits a forger might try."""
    acc = lambda d: next(k for k in sorted(d) if k.endswith("_acc"))  # noqa: E731
    npz, env = trial / "predictions.npz", trial / ENVELOPE
    return [
        ("predictions", "flip one prediction", lambda: _edit_npz(npz, _set(["pred", 0], lambda v: 1 - v))),
        ("predictions", "drop the last row", lambda: _edit_npz(npz, _drop_last_row)),
        ("predictions", "swap two rows", lambda: _edit_npz(npz, lambda a: [v.__setitem__([0, 1], v[[1, 0]])
                                                                         for v in a.values()])),
        ("weights", "scale a tensor", lambda: _edit_weights(trial / "model.pt",
                                                             lambda s: s[next(iter(s))].mul_(1.001))),
        ("metrics", "raise an accuracy", lambda: _edit_json(trial / "metrics.json", _set([acc], lambda v: v + 0.01))),
        ("metrics", "raise it in final.json", lambda: _edit_json(trial / "final.json", _set(["record", acc], 1.0))),
        ("metrics", "raise it in the statement", lambda: _edit_envelope_payload(env, _set(["predicate", "metrics",
                                                                                           acc], 1.0))),
        ("spec", "change the seed", lambda: _edit_json(trial / "spec.json", _set(["spec", "seed"], 9))),
        ("spec", "change the data version", lambda: _edit_json(trial / "data_manifest.json",
                                                                _set(["data_version"], "0" * 64))),
        ("envelope", "drop the signature", lambda: _edit_json(env, _set(["signatures"], []))),
        ("envelope", "change the keyid", lambda: _edit_json(env, _set(["signatures", 0, "keyid"], "0" * 64))),
        ("envelope", "change payloadType", lambda: _edit_json(env, _set(["payloadType"], "text/plain"))),
        ("log", "drop the last entry", lambda: _lines(log / "entries.jsonl", lambda x: x[:-1])),
        ("log", "swap two entries", lambda: _lines(log / "entries.jsonl", lambda x: x[::-1])),
        ("log", "drop the first tree head", lambda: _lines(log / "tree_heads.jsonl", lambda x: x[1:])),
        ("log", "move the receipt's index", lambda: _edit_json(trial / RECEIPT, _set(["log_index"], lambda v: 1 - v))),
    ]


def test_every_mutation_of_an_attested_artifact_is_detected(pristine, tmp_path, capsys):
    work = tmp_path / "sweep"
    shutil.copytree(pristine, work)
    trial = sorted((work / "trials").iterdir())[0]
    log = work / "attestation_log"
    targets = {
        "predictions": [trial / "predictions.npz"],
        "weights": [trial / "model.pt"],
        "metrics": [trial / "metrics.json", trial / "results.jsonl"],
        "spec": [trial / "spec.json", trial / "data_manifest.json"],
        "envelope": [trial / ENVELOPE],
        "log": [log / "entries.jsonl", log / "tree_heads.jsonl"],
    }
    originals = {p: p.read_bytes() for p in [*trial.iterdir(), *log.iterdir()] if p.is_file()}

    def restore():
        for p, data in originals.items():
            p.write_bytes(data)

    def detected() -> bool:
        results, sweep = verify_path(work)
        return bool(sweep) or any(r.failures for r in results)

    assert not detected()
    rng = np.random.default_rng(0)
    counts: dict[str, list[int]] = {k: [0, 0] for k in targets}
    missed = []

    def tally(artifact: str, mutation: str) -> None:
        """Counts the mutation just applied, notes it if verification missed it, and undoes it."""
        counts[artifact][0] += 1
        if detected():
            counts[artifact][1] += 1
        else:
            missed.append(mutation)
        restore()

    for artifact, files in targets.items():
        for n in range(36):
            path = files[n % len(files)]
            _flip(path, rng)
            tally(artifact, f"byte flip in {path.name}")
    for artifact, what, mutate in _field_edits(trial, log):
        mutate()
        tally(artifact, f"{artifact}: {what}")
    assert not detected()  # restored: verifies again
    total = sum(c[0] for c in counts.values())
    with capsys.disabled():
        print(f"\nmutations detected / applied: {sum(c[1] for c in counts.values())}/{total} "
              + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in counts.items()))
    assert total >= 200 and not missed


def test_a_run_dropped_from_the_sweep_is_caught_by_the_log(pristine, tmp_path, capsys):
    work = tmp_path / "sweep"
    shutil.copytree(pristine, work)
    gone = sorted((work / "trials").iterdir())[1]
    shutil.rmtree(gone)
    assert main(["verify", str(work)]) == 1
    assert f"trial {gone.name} is logged but missing from this sweep" in capsys.readouterr().out


def test_reexecution_catches_predictions_not_from_the_stated_weights(pristine, home, tmp_path):
    a, b = sorted((pristine / "trials").iterdir())
    forged = tmp_path / "forged" / "trials" / a.name
    shutil.copytree(a, forged)
    shutil.copy(b / "model.pt", forged / "model.pt")  # weights of another run, predictions of this one
    final = json.loads((forged / "final.json").read_text())
    final["attestation"] = attest_trial(forged, final["record"])  # an honest-looking, correctly signed record
    (forged / "final.json").write_text(json.dumps(final))
    plain, _ = verify_path(forged)
    assert plain[0].ok  # signatures and digests cannot tell: the forger holds the key
    rerun, _ = verify_path(forged, reexecute=30, seed=0)
    assert len(rerun[0].failures) == 1 and rerun[0].failures[0].startswith("re-execution:")
    assert main(["verify", str(forged), "--reexecute", "30", "--seed", "0"]) == 1


def _resigned(pristine: Path, out: Path, schemes=("ed25519",), keys_dir=None) -> Path:
    """A copy of a pristine trial in a new sweep folder, attested afresh (new log) with other schemes or keys."""
    trial = out / "trials" / sorted((pristine / "trials").iterdir())[0].name
    shutil.copytree(pristine / "trials" / trial.name, trial)
    final = json.loads((trial / "final.json").read_text())
    final["attestation"] = attest_trial(trial, final["record"], schemes, keys_dir=keys_dir)
    (trial / "final.json").write_text(json.dumps(final))
    return trial


def test_a_run_signed_by_another_key_is_untrusted_unless_its_public_key_is_given(pristine, home, tmp_path, capsys):
    other = tmp_path / "other_keys"
    trial = _resigned(pristine, tmp_path / "theirs", keys_dir=other)
    key = dsse.read_public_keys(other / "ed25519.pub")[0]
    assert main(["verify", str(trial)]) == 3
    assert f"UNTRUSTED: signed by (unnamed) (ed25519 {key.keyid[:16]}); signed by an unknown key" in \
        capsys.readouterr().out
    assert main(["verify", str(trial), "--public-key", str(other / "ed25519.pub")]) == 0
    assert "trusted: given with --public-key (your own runs; not a policy)" in capsys.readouterr().out
    assert main(["verify", str(trial), "--public-key", str(home / "keys" / "ed25519.pub")]) == 3


def test_hybrid_signatures_are_both_required_and_mlflow_run_ids_resolve(pristine, home, tmp_path, capsys):
    from shiftbench.registry import CALLBACKS
    from shiftbench.tracking import Tracker

    schemes = CALLBACKS.get("attest_hybrid").SCHEMES
    assert schemes == ("ed25519", "slh-dsa-sha2-128f")
    out = tmp_path / "hybrid"
    trial = _resigned(pristine, out, schemes)
    env = json.loads((trial / ENVELOPE).read_text())
    keys = home / "keys"
    both = [str(keys / "ed25519.pub"), str(keys / "slh-dsa-sha2-128f.pub")]
    assert main(["verify", str(trial), "--public-key", both[0], "--public-key", both[1]]) == 0
    capsys.readouterr()
    signers = [s["keyid"] for s in json.loads(base64.b64decode(env["payload"]))["predicate"]["signers"]]
    _, failures = dsse.verify_envelope(dict(env, signatures=env["signatures"][:1]), dsse.local_public_keys(), signers)
    assert failures == [f"required signature by key {signers[1][:16]} is missing"]
    run_id = Tracker(out, "t").mirror_trial(trial)
    assert main(["verify", run_id, "--runs", str(out)]) == 0
    tags = Tracker(out, "t").client.get_run(run_id).data.tags
    assert tags["shiftbench.attestation_sha256"] == hashlib.sha256((trial / ENVELOPE).read_bytes()).hexdigest()


def test_verify_refuses_bad_targets_with_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "neither a folder nor an MLflow run id" in capsys.readouterr().err
    assert main(["verify", "0" * 32]) == 2
    assert "--runs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ the log


def _append_many(path: str, keys_dir: str, tag: int, n: int) -> None:
    key = dsse.load_signing_key("ed25519", keys_dir)
    log = TransparencyLog(path)
    for i in range(n):
        log.append({"envelope_sha256": f"{tag}-{i}", "trial": str(tag), "trial_hash": f"{tag}-{i}"}, key)


def test_concurrent_appends_from_processes_keep_the_log_consistent(tmp_path):
    keys = tmp_path / "keys"
    dsse.load_signing_key("ed25519", keys)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path / "log"), str(keys), p, 15)) for p in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    log = TransparencyLog(tmp_path / "log")
    latest, tree, failures = verify_log(log)
    assert failures == [] and latest.size == 60
    assert len({json.loads(e)["envelope_sha256"] for e in log.entries()}) == 60
    assert len(log.checkpoints()) == 60


def test_a_torn_append_is_dropped_by_the_next_append_and_truncation_is_caught(tmp_path):
    key = dsse.load_signing_key("ed25519", tmp_path / "keys")
    log = TransparencyLog(tmp_path / "log")
    for i in range(5):
        log.append({"envelope_sha256": str(i), "trial": "t", "trial_hash": str(i)}, key)
    with open(tmp_path / "log" / "entries.jsonl", "ab") as f:
        f.write(b'{"envelope_sha256":"crashed"}\n')  # an entry whose tree head was never signed
    receipt = log.append({"envelope_sha256": "5", "trial": "t", "trial_hash": "5"}, key)
    assert receipt["log_index"] == 5 and verify_log(log)[2] == []
    lines = (tmp_path / "log" / "entries.jsonl").read_bytes().splitlines(keepends=True)
    (tmp_path / "log" / "entries.jsonl").write_bytes(b"".join(lines[:3]))
    assert any("entries" in f for f in verify_log(log)[2])


def test_report_prints_tree_head_and_each_trials_digest(pristine, tmp_path):
    from shiftbench.report import build_report

    metrics, text = build_report(pristine, tmp_path / "rep", plots=False)
    section = metrics["sections"]["attestation"]
    head = TransparencyLog(pristine / "attestation_log").latest_checkpoint()
    assert head.root.hex() in text and head.size == 2
    for t in (pristine / "trials").iterdir():
        assert json.loads((t / "final.json").read_text())["attestation"] in text
    assert section["notes"] == []
    assert section["trust"] == [{"dataset": "colored_digits", "method": "erm", "self-attested": 2, "host-verified": 0,
                                 "failed": 0}]


def test_report_counts_proof_verified_rows_and_verify_checks_the_proof_statement(pristine, home, tmp_path, capsys):
    # issue 19: the host proves one trial's env2_in accuracy against committed labels; the report marks that row
    from shiftbench.attest import proofs
    from shiftbench.report import build_report

    sweep = tmp_path / "sweep"
    shutil.copytree(pristine, sweep)
    trials = sorted((sweep / "trials").iterdir())
    com = tmp_path / "labels.json"
    assert main(["labels", "commit", "--from-trial", str(trials[0]), "--split", "env2_in", "--queries", "8",
                 "--grinding", "4", "--max-proofs", "2", "-o", str(com)]) == 0
    assert main(["prove", str(trials[0]), "--labels", str(com), "--no-mlflow"]) == 0
    z = np.load(trials[0] / "predictions.npz")
    rows = z["split"] == "env2_in"
    correct = int(np.sum(z["pred"][rows] == z["label"][rows]))
    statement = json.loads(base64.b64decode(json.loads((trials[0] / "proof_env2_in.dsse.json").read_text())["payload"]))
    assert {s["name"] for s in statement["subject"]} == {"proof_env2_in.stark", "predictions.npz", ENVELOPE}
    assert statement["predicate"]["statement"]["correct"] == correct and statement["predicate"]["statement"]["n"] == 240
    assert statement["predicate"]["prover"]["keys"][0]["keyid"] == dsse.local_public_keys()[0].keyid
    capsys.readouterr()
    assert main(["verify", "--proof", str(trials[0]), "--labels", str(com), "--public-key",
                 str(home / "keys" / "ed25519.pub")]) == 0
    assert f"{correct}/240" in capsys.readouterr().out
    # plain `shiftbench verify TRIAL` checks the proofs it finds too: a flipped byte fails the trial
    from shiftbench.attest.verify import verify_trial

    clean = verify_trial(trials[0], state=None)
    assert not clean.failures and "1 accuracy proof(s)" in clean.checks
    good = (trials[0] / "proof_env2_in.stark").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    (trials[0] / "proof_env2_in.stark").write_bytes(bytes(bad))
    assert any(f.startswith("proof env2_in: ") for f in verify_trial(trials[0]).failures)
    (trials[0] / "proof_env2_in.stark").write_bytes(good)
    metrics, text = build_report(sweep, tmp_path / "rep", plots=False)
    section = metrics["sections"]["attestation"]
    assert section["trust"] == [{"dataset": "colored_digits", "method": "erm", "self-attested": 2, "host-verified": 0,
                                 "failed": 0, "proof-verified": 1}]
    numbers = json.loads((tmp_path / "rep" / "metrics.json").read_text())["sections"]["attestation"]
    assert (numbers["proof_verified"], numbers["proof_failed"], numbers["signed"]) == (1, 0, 2)
    assert "proof-verified" in text and f"{correct} / 240" in text and section["notes"] == []
    # the proof statement names the trial's envelope: re-signing the trial leaves the proof about an old result
    final = json.loads((trials[0] / "final.json").read_text())
    final["attestation"] = attest_trial(trials[0], final["record"])
    (trials[0] / "final.json").write_text(json.dumps(final))
    assert proofs.check(trials[0] / "proof_env2_in.stark")["status"] == proofs.FAILED
    metrics, _ = build_report(sweep, tmp_path / "rep2", plots=False)
    section = metrics["sections"]["attestation"]
    assert section["trust"][0]["proof-verified"] == 0
    assert any("attestation.dsse.json is missing or differs" in n for n in section["notes"])
