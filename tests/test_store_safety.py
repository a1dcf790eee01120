"""The MLflow store survives kills and concurrent drivers: built under a temporary name, rebuilt when damaged,
runs found and written under per-hash locks, trials trained under per-trial locks.

The quick tests build damaged stores by hand and hold locks from the test; the slow ones run real ``shiftbench
sweep`` processes: killed while the store is created, four at once on one shared store, two on one ``--out``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shiftbench import mlflow_store, tracking
from shiftbench.config import SweepSpec
from shiftbench.locks import FileLock
from shiftbench.sweep import run_sweep, trial_dir, trial_lock
from shiftbench.records import FINAL
from shiftbench.trainer import RunOptions, run_trial

SUITE = """\
name: {name}
datasets: [colored_digits]
methods: [erm]
test_envs: each
n_hparams: 1
n_seeds: {seeds}
steps: {steps}
eval_every: 2
dataset_options: {{colored_digits: {{env_size: 120, resolution: 8}}}}
"""


@pytest.fixture(autouse=True)
def default_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One healthy store for the module, copied where a test needs a store to start from (a build takes seconds)."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow_store.ensure_store(db)
    return db


def store_copy(template: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(template, folder / "mlflow.db"))


def write_suite(folder: Path, name: str = "storetest", seeds: int = 1, steps: int = 4) -> Path:
    path = folder / f"{name}-{seeds}-{steps}.yaml"
    path.write_text(SUITE.format(name=name, seeds=seeds, steps=steps))
    return path


def all_runs(uri: str, experiment: str) -> list[Any]:
    """Every run of ``experiment`` in the store at ``uri``, deleted ones included."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    return list(client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000))


def ended_trial(root: Path, name: str) -> Path:
    """A done trial folder as docs/records.md describes it (only what the mirror reads), its hash unique to ``name``."""
    import hashlib

    trial_hash = hashlib.sha256(name.encode()).hexdigest()
    trial = root / "trials" / trial_hash[:16]
    trial.mkdir(parents=True)
    spec = {"dataset": "colored_digits", "method": "erm", "test_envs": [0], "seed": 0, "hparams_seed": 0}
    (trial / "spec.json").write_text(json.dumps({"hash": trial_hash, "spec": spec, "env_names": ["0°", "15°"]}))
    (trial / "results.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0, "elapsed": 0.1}) + "\n")
    (trial / "final.json").write_text(json.dumps({"status": "done", "hash": trial_hash, "record": {"step": 0}}))
    return trial


def trial_hashes(out: Path) -> set[str]:
    return {json.loads(p.read_text())["hash"] for p in out.glob("trials/*/spec.json")}


def assert_one_run_per_trial(uri: str, experiment: str, outs: list[Path], parents: int) -> list[Any]:
    runs = all_runs(uri, experiment)
    assert all(r.info.lifecycle_stage == "active" for r in runs), "a run was deleted"
    by_hash = [r.data.tags["shiftbench.trial_hash"] for r in runs if "shiftbench.trial_hash" in r.data.tags]
    expected = set().union(*(trial_hashes(out) for out in outs))
    assert sorted(by_hash) == sorted(expected)  # each trial exactly once, nothing else
    assert all(r.data.tags.get("shiftbench.mirrored") == "done" for r in runs if "shiftbench.trial_hash" in r.data.tags)
    assert sum("shiftbench.sweep_hash" in r.data.tags for r in runs) == parents
    return runs


# ------------------------------------------------------------------------------------------------ the store


def test_fresh_store_is_built_aside_and_renamed(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    (tmp_path / "mlflow.db.creating-99999-0a1b2c3d").write_bytes(b"half")  # what a killed build leaves
    (tmp_path / "mlflow.db.creating-99999-0a1b2c3d-journal").write_bytes(b"half")
    assert mlflow_store.ensure_store(db) == mlflow_store.StoreState("created")
    assert mlflow_store.problem(db) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "mlflow.db"]  # no temporary left behind
    assert mlflow_store.ensure_store(db) == mlflow_store.StoreState("ok")


def test_sqlite_file_of_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mlflow_store.sqlite_file(f"sqlite:///{tmp_path}/a b.db") == tmp_path / "a b.db"
    monkeypatch.chdir(tmp_path)
    assert mlflow_store.sqlite_file("sqlite:///rel.db") == tmp_path / "rel.db"
    assert mlflow_store.sqlite_file("sqlite://") is None
    assert mlflow_store.sqlite_file("http://localhost:5000") is None
    assert mlflow_store.sqlite_file("postgresql://u@h/db") is None


def _half_migrated(db: Path) -> None:
    """What a kill inside MLflow's own in-place build leaves: a migration's temporary table."""
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE _alembic_tmp_datasets (dataset_uuid VARCHAR(36))")


def _not_at_head(db: Path) -> None:
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")  # MLflow's first revision


def _no_version(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("DROP TABLE alembic_version")
    con.close()


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database, only text" * 100)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_half_migrated, "a migration was cut short: table _alembic_tmp_datasets is left"),
        pytest.param(_garbage, "sqlite cannot read it: file is not a database", marks=pytest.mark.slow),
        pytest.param(_no_version, "it has no schema version", marks=pytest.mark.slow),
        # Claims an old revision over tables that are already at head: upgrading fails, so it is rebuilt.
        pytest.param(_not_at_head, "schema version 451aebb31d03, not the installed MLflow's", marks=pytest.mark.slow),
    ],
    ids=["alembic-tmp-table", "garbage", "no-version", "fake-old-version"],
)
def test_damaged_store_is_moved_aside_and_rebuilt(tmp_path: Path, template: Path, damage: Any, reason: str) -> None:
    out = tmp_path / "out"
    db = store_copy(template, out)
    trial = ended_trial(out, "before")
    damage(db)
    assert mlflow_store.problem(db) is not None

    again = tracking.Tracker(out, "shiftbench-damage")
    assert again.store is not None and again.store.action == "rebuilt"
    assert again.store.reason.startswith(reason)
    broken = again.store.broken
    assert broken is not None and broken.exists() and re.fullmatch(r"mlflow\.db\.broken-\d{8}-\d{6}-\d+", broken.name)
    assert mlflow_store.problem(db) is None
    # The new store starts empty; mirroring the trial folder again (what run_sweep does at start) refills it.
    run_id = again.mirror_trial(trial)
    assert [r.info.run_id for r in all_runs(again.uri, "shiftbench-damage")] == [run_id]


@pytest.mark.slow
def test_store_at_an_older_revision_is_upgraded_keeping_its_data(tmp_path: Path) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db import utils
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from sqlalchemy import create_engine

    db = tmp_path / "old.db"
    uri = f"sqlite:///{db}"
    revisions = list(ScriptDirectory.from_config(utils._get_alembic_config(uri)).walk_revisions())  # head first
    old = revisions[len(revisions) // 2].revision
    engine = create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = utils._get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, old)
        connection.exec_driver_sql(
            "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage) "
            "VALUES (7, 'kept', '/tmp/kept', 'active')"
        )
    engine.dispose()
    assert mlflow_store.problem(db) == f"schema version {old}, not the installed MLflow's {revisions[0].revision}"

    state = mlflow_store.ensure_store(db)
    assert state.action == "upgraded" and state.broken is None
    assert mlflow_store.problem(db) is None
    from mlflow import MlflowClient

    kept = MlflowClient(tracking_uri=uri).get_experiment_by_name("kept")
    assert kept is not None and kept.experiment_id == "7"


def test_store_of_a_newer_mlflow_is_refused(tmp_path: Path, template: Path) -> None:
    from shiftbench.errors import UserError

    db = store_copy(template, tmp_path)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    with pytest.raises(UserError, match="schema version ffffffffffff, which the installed MLflow does not know"):
        mlflow_store.ensure_store(db)
    assert db.exists() and not list(tmp_path.glob("mlflow.db.broken-*"))  # left for the user to deal with


def test_store_check_waits_for_the_lock(tmp_path: Path, template: Path) -> None:
    db = store_copy(template, tmp_path)
    held = FileLock(mlflow_store.store_lock(db))
    assert held.acquire()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(mlflow_store.ensure_store(db)))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive() and not result  # another process is (as far as it knows) building the store
    held.release()
    worker.join(60)
    assert result == [mlflow_store.StoreState("ok")]


# ------------------------------------------------------------------------------------------------ locks and retries


def test_file_lock_excludes_other_holders(tmp_path: Path) -> None:
    a, b = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert a.acquire(blocking=False)
    assert not b.acquire(blocking=False)
    t0 = time.monotonic()
    assert not b.acquire(timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    a.release()
    assert b.acquire(blocking=False) and b.held
    b.release()


def test_locked_database_is_retried_other_errors_are_not() -> None:
    from sqlalchemy.exc import OperationalError

    calls: list[int] = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            try:
                raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
            except OperationalError as e:
                raise RuntimeError("MLflow wrapped it") from e
        return x * 2

    assert tracking._retry(flaky, 21) == 42
    assert calls == [21, 21, 21]

    def broken() -> None:
        calls.append(0)
        raise ValueError("no such table: runs")

    calls.clear()
    with pytest.raises(ValueError, match="no such table"):
        tracking._retry(broken)
    assert calls == [0]


def test_incomplete_run_of_a_live_writer_is_not_deleted(tmp_path: Path, template: Path) -> None:
    """Another driver is writing this trial's run (it holds the run lock): mirroring waits instead of deleting."""
    store_copy(template, tmp_path)
    tracker = tracking.Tracker(tmp_path, "shiftbench-live")
    trial = ended_trial(tmp_path, "live")
    trial_hash = json.loads((trial / "spec.json").read_text())["hash"]
    writer = tracker._run_lock(trial_hash)
    assert writer.acquire()
    in_progress = tracker.client.create_run(tracker.experiment_id, tags={"shiftbench.trial_hash": trial_hash})
    result: list[str] = []
    mirror = threading.Thread(target=lambda: result.append(tracker.mirror_trial(trial)))
    mirror.start()
    mirror.join(1.5)
    assert mirror.is_alive()
    assert tracker.client.get_run(in_progress.info.run_id).info.lifecycle_stage == "active"
    # The other writer finishes its run properly, then lets go: the mirror finds that run and keeps it.
    tracker.client.set_tag(in_progress.info.run_id, "shiftbench.mirrored", "done")
    writer.release()
    mirror.join(60)
    assert result == [in_progress.info.run_id]
    assert [r.info.run_id for r in all_runs(tracker.uri, "shiftbench-live")] == [in_progress.info.run_id]


def test_locked_trial_is_waited_for_and_not_trained_again(tmp_path: Path) -> None:
    """A trial another driver holds is skipped, waited for at the end, and taken as done there."""
    sweep = SweepSpec.from_mapping({
        "name": "locked", "datasets": ["colored_digits"], "methods": ["erm"], "test_envs": "each", "n_hparams": 1,
        "n_seeds": 1, "steps": 4, "eval_every": 2, "dataset_options": {"colored_digits": {"env_size": 120,
                                                                                          "resolution": 8}}})  # fmt: skip
    first, *rest = sweep.trials()
    other = FileLock(trial_lock(tmp_path, first))
    assert other.acquire()
    counts: list[dict] = []
    driver = threading.Thread(target=lambda: counts.append(run_sweep(sweep, tmp_path, progress=False, track=False)))
    driver.start()
    deadline = time.monotonic() + 120
    while not all((trial_dir(tmp_path, t) / FINAL).exists() for t in rest) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert driver.is_alive() and not trial_dir(tmp_path, first).exists()  # skipped, not started
    run_trial(first, trial_dir(tmp_path, first), RunOptions())  # "the other driver" trains it
    stamp = (trial_dir(tmp_path, first) / FINAL).stat().st_mtime_ns
    other.release()
    driver.join(120)
    assert counts and counts[0]["total"] == 3
    assert (counts[0]["done"], counts[0]["elsewhere"], counts[0]["failed_total"]) == (2, 1, 0)
    assert (trial_dir(tmp_path, first) / FINAL).stat().st_mtime_ns == stamp  # not trained a second time


# ------------------------------------------------------------------------------------------------ real processes


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONSAFEPATH="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1", **extra)
    return env


def _sweep(exe: str, suite: Path, out: Path, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([exe, "sweep", "--suite", str(suite), "--out", str(out), "--no-progress"],
                            env=_env(**env), stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # fmt: skip


def _wait_for(paths: Any, proc: subprocess.Popen, limit: float = 120.0) -> bool:
    """Poll until ``paths()`` finds something or ``proc`` exits; True if found."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if paths():
            return True
        time.sleep(0.005)
    return bool(paths())


@pytest.mark.slow
def test_kill_during_store_creation_never_bricks_the_sweep(tmp_path: Path, exe: str) -> None:
    """SIGKILL at a random moment of store creation, until one lands inside it; the relaunch then finishes."""
    suite = write_suite(tmp_path)
    rng = random.Random(12)
    landed, tries, delays = None, 0, []
    while landed is None and tries < 40:
        tries += 1
        out = tmp_path / f"try{tries}"
        proc = _sweep(exe, suite, out, tmp_path / f"try{tries}.log")
        if _wait_for(lambda: list(out.glob("mlflow.db.creating-*")), proc):
            delays.append(round(rng.uniform(0.0, 2.0), 3))  # a build takes 1-4 s here: most kills land inside
            time.sleep(delays[-1])
        proc.kill()
        proc.wait(30)
        if list(out.glob("mlflow.db.creating-*")):
            landed = out
    print(f"kill landed inside store creation on try {tries} (delays after the build began: {delays})")
    assert landed is not None, f"no kill landed inside store creation in {tries} tries"
    assert not (landed / "mlflow.db").exists()  # the final name never holds a half-built store

    relaunch = subprocess.run([exe, "sweep", "--suite", str(suite), "--out", str(landed), "--no-progress"],
                              env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert "3 finished now" in relaunch.stderr
    assert not list(landed.glob("mlflow.db.creating-*")) and mlflow_store.problem(landed / "mlflow.db") is None
    runs = assert_one_run_per_trial(f"sqlite:///{landed}/mlflow.db", "shiftbench-storetest", [landed], parents=1)
    print(f"after the relaunch: {len(runs)} runs (3 trials + the sweep's parent)")
    assert len(runs) == 4


@pytest.mark.slow
def test_store_half_built_by_mlflow_itself_is_rebuilt(tmp_path: Path, exe: str) -> None:
    """The old failure, reproduced: MLflow building a store in place, killed mid-way; a sweep on it recovers."""
    db = tmp_path / "shared" / "store.db"
    db.parent.mkdir()
    build = f"from mlflow import MlflowClient; MlflowClient(tracking_uri='sqlite:///{db}').search_experiments()"
    rng = random.Random(3)
    tries, found = 0, None
    while found is None and tries < 40:
        tries += 1
        for path in db.parent.iterdir():
            path.unlink()
        proc = subprocess.Popen([sys.executable, "-c", build], env=_env(), stderr=subprocess.DEVNULL)
        if _wait_for(db.exists, proc):
            time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait(30)
        found = mlflow_store.problem(db) if db.exists() else None
    print(f"MLflow's in-place build left a damaged store on try {tries}: {found}")
    assert found is not None

    suite = write_suite(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run([exe, "sweep", "--suite", str(suite), "--out", str(out), "--no-progress"],
                          env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}"), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Cut inside a migration, it is rebuilt; cut between two (a consistent older revision), it is upgraded.
    # Cut after a migration's DDL but before its revision was recorded, the store looks like a consistent older
    # revision, the upgrade then fails on a table that already exists, and the store is rebuilt.
    damaged = f"MLflow store {db} is damaged ({found}"
    rebuilt = any(damaged + end in done.stderr for end in (")", "; upgrading it failed ("))
    assert rebuilt or f"MLflow store {db}: {found}; upgraded it" in done.stderr, done.stderr[-2000:]
    # A store killed mid-build leaves its rollback journal; the pair is moved aside together, one store.
    moved = [p for p in db.parent.glob("store.db.broken-*") if not p.name.endswith(mlflow_store._SIDE_FILES)]
    assert len(moved) == (1 if rebuilt else 0)
    assert all(p.name in {m.name + side for m in moved for side in ("",) + mlflow_store._SIDE_FILES}
               for p in db.parent.glob("store.db.broken-*"))  # fmt: skip
    assert mlflow_store.problem(db) is None
    assert_one_run_per_trial(f"sqlite:///{db}", "shiftbench-storetest", [out], parents=1)


@pytest.mark.slow
def test_four_sweeps_at_once_on_one_fresh_shared_store(tmp_path: Path, exe: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    uri = f"sqlite:///{shared}/store.db"
    plan = [("alpha", 4), ("alpha", 6), ("beta", 4), ("beta", 6)]  # two sweeps per experiment
    procs = [_sweep(exe, write_suite(tmp_path, name, steps=steps), tmp_path / f"out{i}", tmp_path / f"out{i}.log",
                    MLFLOW_TRACKING_URI=uri) for i, (name, steps) in enumerate(plan)]  # fmt: skip
    codes = [p.wait(300) for p in procs]
    assert codes == [0, 0, 0, 0], "\n".join((tmp_path / f"out{i}.log").read_text()[-4000:]
                                           for i, c in enumerate(codes) if c)  # fmt: skip
    alpha = assert_one_run_per_trial(uri, "shiftbench-alpha", [tmp_path / "out0", tmp_path / "out1"], parents=2)
    beta = assert_one_run_per_trial(uri, "shiftbench-beta", [tmp_path / "out2", tmp_path / "out3"], parents=2)
    print(f"shared store: {len(alpha)} runs in shiftbench-alpha, {len(beta)} in shiftbench-beta")
    assert len(alpha) == len(beta) == 2 * 3 + 2
    # nothing half-built is left; a shared store keeps its runs' artifacts beside itself (not in the first sweep's folder)
    assert sorted(p.name for p in shared.iterdir()) == [".locks", "mlartifacts", "store.db"]


@pytest.mark.slow
def test_two_drivers_on_one_out(tmp_path: Path, exe: str) -> None:
    suite = write_suite(tmp_path, seeds=2)  # 6 trials
    out = tmp_path / "out"
    procs = [_sweep(exe, suite, out, tmp_path / f"driver{i}.log") for i in range(2)]
    codes = [p.wait(300) for p in procs]
    logs = [(tmp_path / f"driver{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [log[-2000:] for log in logs]
    finished = [int(re.search(r"(\d+) finished now", log).group(1)) for log in logs]  # type: ignore[union-attr]
    waited = ["running in another driver" in log for log in logs]
    print(f"two drivers on one --out: trained {finished} of 6 trials, waited for the other: {waited}")
    assert sum(finished) == 6  # every trial trained once, by one driver or the other
    steps = [[json.loads(line)["step"] for line in p.read_text().splitlines()] for p in out.glob("trials/*/results.jsonl")]
    assert len(steps) == 6 and all(s == steps[0] for s in steps) and steps[0] == sorted(set(steps[0]))
    runs = assert_one_run_per_trial(f"sqlite:///{out}/mlflow.db", "shiftbench-storetest", [out], parents=1)
    assert len(runs) == 7
