"""The MLflow mirror: one run per trial found again by its hash, idempotent, nested under one run per sweep."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest

from shiftbench import tracking

STEPS = (0, 50, 100)
DATA_VERSION = hashlib.sha256(b"colored_digits data").hexdigest()


def write_trial(root: Path, name: str, status: str = "done", seed: int = 0, **spec_overrides: Any) -> Path:
    """A trial folder as docs/records.md describes it, with a hash unique to ``name``."""
    spec = {
        "dataset": "colored_digits",
        "method": "irm",
        "test_envs": [2],
        "seed": seed,
        "hparams_seed": 3,
        "hparams": {"lr": 0.001, "batch_size": 64, "irm_lambda": 100.0},
        "steps": 101,
        "eval_every": 50,
        "model": "mlp",
        "dataset_options": {"env_size": 500, "colours": ["red", "green"]},
        "callbacks": [],
    }
    spec.update(spec_overrides)
    trial_hash = hashlib.sha256(name.encode()).hexdigest()
    trial = root / "trials" / trial_hash[:16]
    trial.mkdir(parents=True)
    meta = {
        "hash": trial_hash,
        "spec": spec,
        "data_version": DATA_VERSION,
        "code_version": "abc123",
        "task": "classification",
        "env_names": ["+90%", "+80%", "-90%"],
    }
    (trial / "spec.json").write_text(json.dumps(meta))
    records = [
        {
            "step": step,
            "loss": 1.0 / (step + 1),
            "penalty": 0.5,
            "env0_in_acc": 0.5 + step / 1000,
            "env2_in_acc": 0.1 + step / 2000,
            "note": "not a number",
            "elapsed": step / 10,
            "step_time": 0.01,
        }
        for step in STEPS
    ]
    (trial / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (trial / "checkpoint.pt").write_bytes(b"working state")
    if status == "done":
        (trial / "predictions.npz").write_bytes(b"fake npz")
        final = {"status": "done", "hash": trial_hash, "record": {**records[-1], "selected_acc": 0.42}}
        (trial / "final.json").write_text(json.dumps(final))
    else:
        (trial / "failed.json").write_text(json.dumps({"status": "failed", "reason": "non-finite loss", "step": 50}))
    return trial


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tracking.Tracker]:
    """One store for the module: creating an sqlite store runs MLflow's migrations (about a second)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tracking.Tracker(tmp_path_factory.mktemp("sweep"), "shiftbench-test")


def runs_of(tracker: tracking.Tracker, trial: Path, view: str = "active") -> list[Any]:
    from mlflow.entities import ViewType

    trial_hash = json.loads((trial / "spec.json").read_text())["hash"]
    return list(
        tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=f"tags.`shiftbench.trial_hash` = '{trial_hash}'",
            run_view_type=ViewType.ACTIVE_ONLY if view == "active" else ViewType.ALL,
        )
    )


def test_tracking_uri_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert shlex.split(tracking.ui_command(tmp_path)) == [
        "mlflow", "ui", "--backend-store-uri", f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/my store.db")
    assert tracking.tracking_uri(tmp_path) == "sqlite:////elsewhere/my store.db"
    assert shlex.split(tracking.ui_command(tmp_path))[-1] == "sqlite:////elsewhere/my store.db"


def test_flatten_and_run_name() -> None:
    spec = {"a": 1, "h": {"lr": 0.1, "inner": {"x": [1, 2]}}, "opts": {}}
    assert tracking.flatten(spec) == {"a": 1, "h.lr": 0.1, "h.inner.x": [1, 2], "opts": {}}
    assert tracking.param_value([0, 1]) == "[0,1]"
    assert tracking.run_name({"method": "erm", "dataset": "d", "test_envs": [0, 1], "hparams_seed": 0, "seed": 2}) == (
        "erm-d-te0_1-h0-s2"
    )


def test_mirror_trial_logs_one_complete_run(tracker: tracking.Tracker) -> None:
    parent = tracker.start_sweep("sweep-mirror", {"datasets": ["colored_digits"]})
    trial = write_trial(tracker.out_dir, "mirror")
    run_id = tracker.mirror_trial(trial, parent_run_id=parent)

    (run,) = runs_of(tracker, trial)
    assert run.info.run_id == run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "irm-colored_digits-te2-h3-s0"
    params = run.data.params
    assert params["dataset"] == "colored_digits"
    assert params["method"] == "irm"
    assert params["test_envs"] == "[2]"
    assert params["seed"] == "0" and params["hparams_seed"] == "3"
    assert params["hparams.lr"] == "0.001" and params["hparams.irm_lambda"] == "100.0"
    assert params["dataset_options.env_size"] == "500"
    assert params["dataset_options.colours"] == '["red","green"]'
    assert params["callbacks"] == "[]" and params["task"] == "classification"
    tags = run.data.tags
    meta = json.loads((trial / "spec.json").read_text())
    assert tags["shiftbench.trial_hash"] == meta["hash"]
    assert tags["shiftbench.code_version"] == "abc123"
    assert tags["shiftbench.data_version"] == DATA_VERSION
    assert tags["shiftbench.status"] == "done" and tags["shiftbench.mirrored"] == "done"
    assert tags["shiftbench.dataset"] == "colored_digits" and tags["shiftbench.method"] == "irm"
    assert tags["mlflow.parentRunId"] == parent

    history = tracker.client.get_metric_history(run_id, "env0_in_acc")
    assert [(m.step, m.value) for m in history] == [(s, pytest.approx(0.5 + s / 1000)) for s in STEPS]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "loss")] == list(STEPS)
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "selected_acc")] == [(100, 0.42)]
    assert "step" not in run.data.metrics and "note" not in run.data.metrics
    assert set(run.data.metrics) >= {"loss", "penalty", "env2_in_acc", "elapsed", "step_time"}

    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "colored_digits"
    assert dataset_input.dataset.digest == DATA_VERSION[:36]
    assert DATA_VERSION in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"

    artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert artifacts == {"spec.json", "results.jsonl", "final.json", "predictions.npz"}
    assert str(tracker.out_dir) in run.info.artifact_uri


def test_mirror_twice_adds_nothing(tracker: tracking.Tracker) -> None:
    trial = write_trial(tracker.out_dir, "twice")
    first = tracker.mirror_trial(trial)
    second = tracker.mirror_trial(trial)
    assert first == second
    assert len(runs_of(tracker, trial, view="all")) == 1
    assert len(tracker.client.get_metric_history(first, "loss")) == len(STEPS)


def test_incomplete_run_is_replaced(tracker: tracking.Tracker) -> None:
    trial = write_trial(tracker.out_dir, "crashed")
    meta = json.loads((trial / "spec.json").read_text())
    crashed = tracker.client.create_run(tracker.experiment_id, tags={"shiftbench.trial_hash": meta["hash"]})
    tracker.client.log_metric(crashed.info.run_id, "loss", 1.0, step=0)

    run_id = tracker.mirror_trial(trial)
    assert run_id != crashed.info.run_id
    assert [r.info.run_id for r in runs_of(tracker, trial)] == [run_id]
    assert tracker.client.get_run(crashed.info.run_id).info.lifecycle_stage == "deleted"
    assert len(tracker.client.get_metric_history(run_id, "loss")) == len(STEPS)


def test_failed_trial_then_rerun(tracker: tracking.Tracker) -> None:
    trial = write_trial(tracker.out_dir, "flaky", status="failed")
    failed_id = tracker.mirror_trial(trial)
    run = tracker.client.get_run(failed_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["shiftbench.status"] == "failed"
    assert run.data.tags["shiftbench.failure_reason"] == "non-finite loss"
    assert run.data.tags["shiftbench.failed_step"] == "50"
    assert "failed.json" in {a.path for a in tracker.client.list_artifacts(failed_id)}
    assert tracker.mirror_trial(trial) == failed_id

    # The sweep reruns the trial and it ends well: the mirror follows the folder.
    (trial / "failed.json").unlink()
    meta = json.loads((trial / "spec.json").read_text())
    (trial / "final.json").write_text(json.dumps({"status": "done", "hash": meta["hash"], "record": {"step": 100}}))
    done_id = tracker.mirror_trial(trial)
    assert done_id != failed_id
    assert [r.info.run_id for r in runs_of(tracker, trial)] == [done_id]
    assert tracker.client.get_run(done_id).info.status == "FINISHED"


def test_unfinished_trial_is_refused(tracker: tracking.Tracker) -> None:
    trial = write_trial(tracker.out_dir, "running")
    (trial / "final.json").unlink()
    with pytest.raises(ValueError, match="has not ended"):
        tracker.mirror_trial(trial)


def test_large_files_and_temporaries_stay_out(tracker: tracking.Tracker, monkeypatch: pytest.MonkeyPatch) -> None:
    trial = write_trial(tracker.out_dir, "large")
    (trial / "model.pt").write_bytes(b"x" * 4096)
    (trial / "final.json.tmp").write_text("{}")
    monkeypatch.setattr(tracker, "max_artifact_bytes", 1024)
    run_id = tracker.mirror_trial(trial)
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert artifacts == {"spec.json", "results.jsonl", "final.json", "predictions.npz"}


def test_long_values_are_clipped(tracker: tracking.Tracker) -> None:
    trial = write_trial(tracker.out_dir, "long", hparams={"note": "x" * 10000})
    run = tracker.client.get_run(tracker.mirror_trial(trial))
    assert run.data.params["hparams.note"].endswith("[truncated]")


def test_parent_run_reused_across_trackers(tracker: tracking.Tracker) -> None:
    sweep = {"datasets": ["colored_digits"], "methods": ["erm", "irm"], "n_hparams": 2}
    parent = tracker.start_sweep("reused", sweep)
    tracker.end_sweep(parent, {"trials_done": 3, "trials_failed": 1})
    again = tracking.Tracker(tracker.out_dir, "shiftbench-test")
    assert again.experiment_id == tracker.experiment_id
    assert again.start_sweep("reused", sweep) == parent
    assert again.client.get_run(parent).info.status == "RUNNING"
    again.end_sweep(parent, {"trials_done": 4, "trials_failed": 0, "selection": "oracle"})

    from mlflow.entities import ViewType

    parents = again.client.search_runs(
        [again.experiment_id], "tags.`shiftbench.sweep_hash` = 'reused'", run_view_type=ViewType.ALL
    )
    assert [r.info.run_id for r in parents] == [parent]
    run = again.client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["trials_done"] == 4 and run.data.metrics["trials_failed"] == 0
    assert run.data.tags["shiftbench.summary.selection"] == "oracle"
    assert run.data.params["methods"] == '["erm","irm"]'
    assert "sweep.json" in {a.path for a in again.client.list_artifacts(parent)}


def test_env_uri_overrides_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "other" / "store.db"
    store.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    out = tmp_path / "out"
    tracker = tracking.Tracker(out, "elsewhere")
    run_id = tracker.mirror_trial(write_trial(out, "env"))
    assert store.exists() and not (out / "mlflow.db").exists()
    assert tracker.uri == f"sqlite:///{store}"
    # a shared store keeps its runs' artifacts beside itself, never in the folder of whichever sweep came first
    assert tracker.client.get_run(run_id).info.artifact_uri.startswith((store.parent / "mlartifacts").as_uri())
    assert str(store) in tracking.ui_command(out)


def test_experiments_open_as_model_training(tracker: tracking.Tracker) -> None:
    """MLflow 3's UI reads the experiment tag mlflow.experimentKind; without it an experiment may open as GenAI."""
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    # An experiment made before the tag existed gets it; one whose kind someone chose keeps that kind.
    old = tracker.client.create_experiment("made-by-hand")
    chosen = tracker.client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert "mlflow.experimentKind" not in tracker.client.get_experiment(old).tags
    assert tracking.Tracker(tracker.out_dir, "made-by-hand").experiment_id == old
    assert tracker.client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    tracking.Tracker(tracker.out_dir, "chosen")
    assert tracker.client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_tag_values_are_plain_text(tracker: tracking.Tracker) -> None:
    trial = write_trial(tracker.out_dir, "degrees")
    meta = json.loads((trial / "spec.json").read_text())
    meta["env_names"] = ["0°", "15°", "−90%"]
    # other environments are other data: MLflow keeps one dataset entity per (name, digest), the first one logged
    meta["data_version"] = "degrees-" + meta["data_version"]
    (trial / "spec.json").write_text(json.dumps(meta))  # json.dumps escapes them in the file; the tag must not
    run = tracker.client.get_run(tracker.mirror_trial(trial))
    assert run.data.tags["shiftbench.env_names"] == '["0°","15°","−90%"]'
    source = json.loads(run.inputs.dataset_inputs[0].dataset.source)
    assert source["tags"]["shiftbench.env_names"] == '["0°","15°","−90%"]'


def test_dataset_insert_lost_to_another_driver_is_tried_again(
    tracker: tracking.Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drivers on one server can both miss the dataset row and insert it; the later one must link it, not die."""
    from mlflow.exceptions import MlflowException

    real = tracker.client.log_inputs
    calls: list[int] = []

    def lost_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # the text MLflow's server answered with in the race CI hit
            raise MlflowException("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets."
                                  "experiment_id, datasets.name, datasets.digest")  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_inputs", lost_once)
    trial = write_trial(tracker.out_dir, "dataset-race")
    run_id = tracker.mirror_trial(trial)
    assert len(calls) == 2
    (dataset_input,) = tracker.client.get_run(run_id).inputs.dataset_inputs
    assert dataset_input.dataset.digest == DATA_VERSION[:36]

    def other_error(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise MlflowException("BAD_REQUEST: something else")

    monkeypatch.setattr(tracker.client, "log_inputs", other_error)
    calls.clear()
    with pytest.raises(MlflowException, match="something else"):
        tracker.mirror_trial(write_trial(tracker.out_dir, "dataset-other-error"))
    assert len(calls) == 1
