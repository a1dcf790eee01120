"""The proof workflow through the CLI: labels commit -> prove -> verify --proof, on a trial folder the test writes."""

import json

import numpy as np

from shiftbench.cli import main


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
    assert names == ["proofs/proof_env1_in.json", "proofs/proof_env1_in.stark"]
