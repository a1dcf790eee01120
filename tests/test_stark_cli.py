"""The proof workflow through the CLI: labels commit -> prove -> verify --proof, on a trial folder the test writes."""

import base64
import hashlib
import json

import numpy as np
import pytest

from shiftbench.cli import main


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A private config folder: ``shiftbench prove`` signs with the keys folder found there."""
    monkeypatch.setenv("SHIFTBENCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _trial(tmp_path, name="t1", n=40, shuffle=True, seed=0):
    rng = np.random.default_rng(seed)
    trial = tmp_path / "sweep" / "trials" / name
    trial.mkdir(parents=True)
    label = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, label, (label + 1) % 3)
    idx = rng.permutation(n) if shuffle else np.arange(n)  # rows stored in any order; ids decide
    np.savez(trial / "predictions.npz", split=np.array(["env1_in"] * n), idx=idx, label=label[idx], pred=pred[idx])
    (trial / "spec.json").write_text(json.dumps({"hash": name * 8}))
    (trial / "final.json").write_text("{}")
    return trial, label, pred


def test_commit_prove_verify(tmp_path, capsys):
    trial, label, pred = _trial(tmp_path)
    np.save(tmp_path / "labels.npy", label)
    com = tmp_path / "labels.json"
    assert main(["labels", "commit", "--npy", str(tmp_path / "labels.npy"), "--split", "env1_in", "--queries", "8",
                 "--grinding", "4", "--max-proofs", "2", "--context", "digits v1", "-o", str(com)]) == 0
    assert (tmp_path / "labels.json.opening.npz").is_file()
    assert main(["prove", str(tmp_path / "sweep"), "--labels", str(com)]) == 0
    summary = json.loads((trial / "proof_env1_in.json").read_text())
    assert summary["correct"] == int(np.sum(label == pred)) and summary["n"] == 40
    capsys.readouterr()
    assert main(["verify", "--proof", str(trial / "proof_env1_in.stark"), "--labels", str(com)]) == 0
    assert f"{summary['correct']}/40" in capsys.readouterr().out
    # another host's commitment to the same labels: the proof is not about it
    other = tmp_path / "other.json"
    main(["labels", "commit", "--npy", str(tmp_path / "labels.npy"), "--split", "env1_in", "--queries", "8",
          "--grinding", "4", "--max-proofs", "2", "-o", str(other)])
    assert main(["verify", "--proof", str(trial), "--labels", str(other)]) == 1
    bad = bytearray((trial / "proof_env1_in.stark").read_bytes())
    bad[len(bad) // 2] ^= 1
    (trial / "proof_env1_in.stark").write_bytes(bytes(bad))
    assert main(["verify", "--proof", str(trial)]) == 1


def test_bad_inputs_exit_2(tmp_path, capsys):
    trial, label, _ = _trial(tmp_path, shuffle=False)
    np.savez(trial / "predictions.npz", split=np.array(["env1_in"] * 3), idx=np.array([0, 0, 2]),
             label=np.array([1, 1, 1]), pred=np.array([1, 1, 1]))
    assert main(["labels", "commit", "--from-trial", str(trial), "--split", "env1_in", "-o",
                 str(tmp_path / "c.json")]) == 2
    assert "copied or dropped" in capsys.readouterr().err
    assert main(["labels", "commit", "--from-trial", str(trial), "--split", "nope", "-o",
                 str(tmp_path / "c.json")]) == 2
    assert main(["verify", "--proof", str(tmp_path / "missing.stark")]) == 2
    assert main(["prove", str(tmp_path), "--labels", str(tmp_path / "c.json")]) == 2


def test_module_import_is_light():
    import subprocess
    import sys

    code = "import sys, shiftbench.commands.prove, shiftbench.commands.labels; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_proof_is_mirrored_to_the_trials_mlflow_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from shiftbench.tracking import TAG_TRIAL_HASH, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trial, label, _ = _trial(tmp_path)
    sweep = tmp_path / "sweep"
    client = MlflowClient(tracking_uri=tracking_uri(sweep))
    exp = client.create_experiment("s", artifact_location=(sweep / "mlartifacts").as_uri())
    run = client.create_run(exp, tags={TAG_TRIAL_HASH: "t1" * 8})
    np.save(tmp_path / "labels.npy", label)
    com = tmp_path / "labels.json"
    main(["labels", "commit", "--npy", str(tmp_path / "labels.npy"), "--split", "env1_in", "--queries", "8",
          "--grinding", "4", "--max-proofs", "2", "-o", str(com)])
    assert main(["prove", str(sweep), "--labels", str(com)]) == 0
    summary = json.loads((trial / "proof_env1_in.json").read_text())
    got = client.get_run(run.info.run_id)
    assert got.data.tags["shiftbench.proof.env1_in.sha256"] == summary["proof_sha256"]
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "proofs"))
    assert names == ["proofs/proof_env1_in.dsse.json", "proofs/proof_env1_in.json", "proofs/proof_env1_in.stark"]
    statement = (trial / "proof_env1_in.dsse.json").read_bytes()
    assert got.data.tags["shiftbench.proof.env1_in.statement_sha256"] == hashlib.sha256(statement).hexdigest()


def _commit(tmp_path, label, name="labels.json", max_proofs=2):
    np.save(tmp_path / "labels.npy", label)
    com = tmp_path / name
    assert main(["labels", "commit", "--npy", str(tmp_path / "labels.npy"), "--split", "env1_in", "--queries", "8",
                 "--grinding", "4", "--max-proofs", str(max_proofs), "-o", str(com)]) == 0
    return com


def _payload(path):
    return json.loads(base64.b64decode(json.loads(path.read_text())["payload"]))


def test_the_signed_statement_binds_the_proof_to_the_trial(tmp_path, home, capsys):
    from shiftbench.stark import Params

    trial, label, pred = _trial(tmp_path)
    com = _commit(tmp_path, label)
    assert main(["prove", str(trial), "--labels", str(com)]) == 0
    path = trial / "proof_env1_in.dsse.json"
    assert path.stat().st_mode & 0o777 == 0o644  # public
    st = _payload(path)
    assert st["predicateType"] == "urn:shiftbench:accuracy-proof:v1"
    proof_digest = hashlib.sha256((trial / "proof_env1_in.stark").read_bytes()).hexdigest()
    assert {s["name"]: s["digest"]["sha256"] for s in st["subject"]} == {
        "proof_env1_in.stark": proof_digest,
        "predictions.npz": hashlib.sha256((trial / "predictions.npz").read_bytes()).hexdigest()}
    pred_ = st["predicate"]
    c = int(np.sum(label == pred))
    assert pred_["statement"]["correct"] == c and pred_["statement"]["n"] == 40 and pred_["statement"]["trial"] == \
        "t1" * 8
    assert pred_["proof"]["params"] == {"blowup": 4, "final_degree": 64, "fold": 8, "grinding": 4, "hash": "sha256",
                                        "max_proofs": 2, "queries": 8, "salt_bytes": 16}
    assert pred_["proof"]["params_digest"] == Params(queries=8, grinding=4, max_proofs=2).digest
    assert pred_["label_commitment"]["sha256"] == hashlib.sha256(com.read_bytes()).hexdigest()
    capsys.readouterr()
    host_pub = home / "keys" / "ed25519.pub"
    assert main(["verify", "--proof", str(trial), "--public-key", str(host_pub)]) == 0
    out = capsys.readouterr().out
    assert f"{c}/40" in out and "signed by (unnamed)" in out
    # a key the verifier trusts did not sign it: valid but untrusted
    from shiftbench.attest import dsse

    dsse.load_signing_key("ed25519", tmp_path / "stranger")
    assert main(["verify", "--proof", str(trial), "--public-key", str(tmp_path / "stranger" / "ed25519.pub")]) == 3
    assert "UNTRUSTED" in capsys.readouterr().out


def _resign(path, edit, keys_dir):
    """Edit a Statement's predicate and sign it again with the keys it lists (a host lying about its proof)."""
    from shiftbench.attest import keys as identities
    from shiftbench.attest.dsse import envelope_bytes, sign_envelope
    from shiftbench.attest.record import canonical_bytes

    st = _payload(path)
    edit(st)
    host = identities.load(("ed25519",), keys_dir)
    path.write_bytes(envelope_bytes(sign_envelope("application/vnd.in-toto+json", canonical_bytes(st),
                                                  list(host.keys))))


@pytest.mark.parametrize("edit,why", [
    (lambda st: st["predicate"]["statement"].update(correct=st["predicate"]["statement"]["correct"] + 1),
     "Statement's correct"),
    (lambda st: st["predicate"]["statement"].update(trial="x" * 16), "Statement's trial"),
    (lambda st: st["predicate"]["proof"]["params"].update(queries=9), "other proof parameters"),
    (lambda st: st["predicate"]["label_commitment"].update(root="00" * 32), "label commitment"),
    (lambda st: st["subject"][1]["digest"].update(sha256="0" * 64), "predictions.npz is missing or differs"),
    (lambda st: st.update(predicateType="urn:other"), "predicate type"),
])
def test_a_statement_that_misdescribes_its_proof_fails(tmp_path, home, capsys, edit, why):
    trial, label, _ = _trial(tmp_path)
    com = _commit(tmp_path, label)
    assert main(["prove", str(trial), "--labels", str(com)]) == 0
    _resign(trial / "proof_env1_in.dsse.json", edit, home / "keys")
    capsys.readouterr()
    assert main(["verify", "--proof", str(trial)]) == 1
    assert why in capsys.readouterr().out


def test_statement_tampering_and_moved_proofs_fail(tmp_path, capsys):
    trial, label, _ = _trial(tmp_path)
    com = _commit(tmp_path, label)
    assert main(["prove", str(trial), "--labels", str(com)]) == 0
    path = trial / "proof_env1_in.dsse.json"
    good = path.read_bytes()
    env = json.loads(good)
    env["payload"] = base64.b64encode(base64.b64decode(env["payload"]).replace(b'"correct":', b'"correct": ')).decode()
    path.write_text(json.dumps(env))
    capsys.readouterr()
    assert main(["verify", "--proof", str(trial)]) == 1
    assert "does not verify" in capsys.readouterr().out
    path.write_bytes(good)
    # predictions changed after proving: the Statement names the old file
    z = dict(np.load(trial / "predictions.npz"))
    z["pred"] = z["pred"].copy()
    z["pred"][0] = (z["pred"][0] + 1) % 3
    saved = (trial / "predictions.npz").read_bytes()
    np.savez(trial / "predictions.npz", **z)
    assert main(["verify", "--proof", str(trial)]) == 1
    (trial / "predictions.npz").write_bytes(saved)
    assert main(["verify", "--proof", str(trial)]) == 0
    # the same proof and Statement copied into another trial's folder are not about that trial
    other, _, _ = _trial(tmp_path, name="t2", seed=0)
    for suffix in (".stark", ".dsse.json"):
        (other / f"proof_env1_in{suffix}").write_bytes((trial / f"proof_env1_in{suffix}").read_bytes())
    capsys.readouterr()
    assert main(["verify", "--proof", str(other)]) == 1
    assert "the proof is about trial t1t1" in capsys.readouterr().out
    # without a Statement the proof alone still verifies, and says it is unsigned
    path.unlink()
    assert main(["verify", "--proof", str(trial)]) == 0
    assert "unsigned" in capsys.readouterr().out


def test_a_label_commitment_serves_at_most_max_proofs(tmp_path, capsys):
    for i in range(3):
        _trial(tmp_path, name=f"t{i}", seed=i)
    label = np.random.default_rng(0).integers(0, 3, 40)
    com = _commit(tmp_path, label, max_proofs=2)
    sweep = tmp_path / "sweep"
    assert main(["prove", str(sweep), "--labels", str(com), "--no-mlflow"]) == 2
    assert "may serve 2 more of its 2 proofs" in capsys.readouterr().err
    assert not list(sweep.glob("trials/*/proof_*.stark"))  # refused before any proof
    assert main(["prove", str(sweep / "trials" / "t0"), "--labels", str(com), "--no-sign"]) == 0
    assert not (sweep / "trials" / "t0" / "proof_env1_in.dsse.json").exists()
    assert main(["prove", str(sweep / "trials" / "t1"), "--labels", str(com)]) == 0
    served = (tmp_path / "labels.json.opening.npz.served.jsonl").read_text().splitlines()
    assert [json.loads(x)["trial"] for x in served] == ["t0" * 8, "t1" * 8]
    assert main(["prove", str(sweep / "trials" / "t2"), "--labels", str(com)]) == 2
    assert "may serve 0 more of its 2 proofs" in capsys.readouterr().err
    from shiftbench.errors import UserError
    from shiftbench.stark.files import prove_trial

    with pytest.raises(UserError, match="has served its 2 proofs"):
        prove_trial(sweep / "trials" / "t2", com)
