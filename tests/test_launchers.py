"""Launchers: the seam and its options; Ray, submitit and an MLflow server for real, on 127.0.0.1.

The slow tests start real services (a Ray head with 2 CPUs, submitit's local executor, ``mlflow server``) on this
machine, kill a worker mid-trial and check that the trial resumes from its checkpoint and that every result is
bit-identical to the local launcher's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shiftbench.config import SweepSpec
from shiftbench.errors import UserError
from shiftbench.launchers import LAUNCHERS, add_arguments, check_shared, from_args
from shiftbench.launchers.local import slot_device
from shiftbench.launchers.slurm import slurm_minutes
from shiftbench.sweep import prepare_out, run_sweep, trial_dir, trial_lock
from shiftbench.trainer import RunOptions

TINY = {"env_size": 120, "resolution": 8}
_TIME_KEYS = {"elapsed", "step_time", "wall_time"}


def tiny_sweep(steps: int = 6, methods=("erm",), n_hparams: int = 2, name: str = "tiny") -> SweepSpec:
    return SweepSpec.from_mapping({
        "name": name, "datasets": ["colored_digits"], "methods": list(methods), "test_envs": "default",
        "n_hparams": n_hparams, "n_seeds": 1, "steps": steps, "eval_every": 3,
        "dataset_options": {"colored_digits": TINY},
    })  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def holders(path: Path) -> list[int]:
    """Pids of the processes that have ``path`` open (a trial's lock file: the process training that trial)."""
    target, found = str(path.resolve()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def stop_session(leader: subprocess.Popen, grace: float = 15.0) -> None:
    """End every process of the session ``leader`` started (its own ones only, found by session id)."""

    def members() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.getsid(int(proc.name)) == leader.pid:
                    state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        pids.append(int(proc.name))
            except (OSError, IndexError):
                continue
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while members() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not members():
            break
    leader.wait(timeout=30)


def kill_mid_trial(out: Path, sweep: SweepSpec, sig: int, log: list, after_step: int = 3, timeout: float = 240):
    """Background thread: once some trial has a checkpoint past ``after_step``, send ``sig`` to the process holding
    its lock; ``log`` gets ``(trial hash, pid, the checkpoint's records)``."""
    import torch

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not log:
            for t in sweep.trials():
                ckpt = trial_dir(out, t) / "checkpoint.pt"
                pids = holders(trial_lock(out, t))
                if ckpt.exists() and pids:
                    try:
                        state = torch.load(ckpt, weights_only=True)
                    except Exception:  # replaced while read: try again
                        continue
                    if state["step"] <= after_step:
                        continue
                    os.kill(pids[0], sig)
                    log.append((t.hash, pids[0], state["records"]))
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def results(out: Path, sweep: SweepSpec) -> dict:
    """Per trial: the final record without timings, the predictions and the weights (what must be bit-identical)."""
    import torch

    got = {}
    for t in sweep.trials():
        d = trial_dir(out, t)
        final = json.loads((d / "final.json").read_text())
        with np.load(d / "predictions.npz") as z:
            preds = {k: z[k] for k in z.files}
        weights = torch.load(d / "model.pt", weights_only=True)
        got[t.hash] = ({k: v for k, v in final["record"].items() if k not in _TIME_KEYS}, preds, weights)
    return got


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        (ra, pa, wa), (rb, pb, wb) = a[key], b[key]
        assert ra == rb, key  # exact float equality, not approx
        assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
        assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


def steps_of(out: Path, t) -> list[int]:
    lines = (trial_dir(out, t) / "results.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------- the seam (fast)


def test_launchers_are_registered_and_the_package_imports_nothing_heavy():
    assert LAUNCHERS.names() == ["local", "ray", "slurm"]
    code = ("import sys, shiftbench.launchers as L, argparse; L.add_arguments(argparse.ArgumentParser()); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'submitit', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONSAFEPATH="1"))  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_every_launcher_option_states_its_default_and_builds_its_launcher(monkeypatch):
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=1)
    add_arguments(p)
    group = next(g for g in p._action_groups if g.title == "launchers")
    flags = {a.option_strings[0]: a.help for a in group._group_actions}
    assert set(flags) == {"--launcher", "--tracking-uri", "--gpus-per-trial", "--ray-address", "--cpus-per-trial",
                          "--slurm-partition", "--slurm-time", "--slurm-gpus-per-task", "--slurm-array-parallelism",
                          "--slurm-executor"}  # fmt: skip
    assert all("(default: " in h for h in flags.values()), flags

    a = p.parse_args([])
    local = from_args(a)
    assert type(local).__name__ == "LocalLauncher" and local.workers == 1 and local.gpus_per_trial is None
    a = p.parse_args(["--launcher", "ray", "--ray-address", "10.0.0.1:6379", "--cpus-per-trial", "2",
                      "--gpus-per-trial", "0.25", "--workers", "3"])  # fmt: skip
    ray = from_args(a)
    assert (ray.ray_address, ray.cpus_per_trial, ray.gpus_per_trial) == ("10.0.0.1:6379", 2.0, 0.25)
    a = p.parse_args(["--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-time", "1-02:30:00",
                      "--slurm-gpus-per-task", "1", "--slurm-array-parallelism", "8"])  # fmt: skip
    slurm = from_args(a)
    assert (slurm.slurm_partition, slurm.slurm_time, slurm.slurm_gpus_per_task, slurm.slurm_array_parallelism) == (
        "gpu", 1590.0, 1, 8)

    with pytest.raises(UserError, match=r"--slurm-partition is not an option of --launcher ray"):
        from_args(p.parse_args(["--launcher", "ray", "--slurm-partition", "gpu"]))
    with pytest.raises(UserError, match=r"unknown launcher 'rey': did you mean 'ray'"):
        from_args(p.parse_args(["--launcher", "rey"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--gpus-per-trial", "-1"])
    # setenv first, so that the variable from_args exports is undone after the test even where it was unset
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-after-the-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    from_args(p.parse_args(["--tracking-uri", "http://127.0.0.1:5999"]))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_slurm_time_limits_in_slurms_formats():
    assert [slurm_minutes(t) for t in ("90", "1:30", "2:00:00", "1-12", "1-0:30", "1-0:0:30")] == [
        90.0, 1.5, 120.0, 2160.0, 1470.0, 1440.5]
    for bad in ("", "1:2:3:4", "abc", "0", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            slurm_minutes(bad)


def test_pool_workers_spread_over_gpus_or_pack_them():
    # 2 GPUs: one per worker cycles 0,1,0,1; a quarter GPU each packs four workers per GPU.
    assert [slot_device("auto", s, 1.0, 2) for s in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [slot_device("cuda", s, 0.25, 2) for s in range(8)] == ["cuda:0"] * 4 + ["cuda:1"] * 4
    assert [slot_device("auto", s, 0.5, 3) for s in range(6)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:2",
                                                                  "cuda:2"]  # fmt: skip
    assert slot_device("auto", 3, 1.0, 0) == "cpu" and slot_device("auto", 3, 0.0, 2) == "cpu"
    assert slot_device("cpu", 1, 1.0, 2) == "cpu" and slot_device("cuda:1", 0, 1.0, 2) == "cuda:1"


def test_a_worker_that_cannot_use_the_sweep_folder_is_refused_clearly(tmp_path):
    sweep = tiny_sweep()
    prepare_out(tmp_path / "out", sweep)
    assert check_shared(str(tmp_path / "out"), sweep.hash) is None
    msg = check_shared(str(tmp_path / "elsewhere"), sweep.hash)
    assert "cannot read" in msg and "storage every node sees" in msg
    msg = check_shared(str(tmp_path / "out"), "0" * 64)
    assert "sees another sweep" in msg and f"hash {sweep.hash[:12]}, the driver's is 000000000000" in msg
    (tmp_path / "out" / "sweep.json").chmod(0o444)
    os.chmod(tmp_path / "out", 0o555)
    try:
        if os.geteuid() != 0:  # root writes anyway
            assert "cannot write" in check_shared(str(tmp_path / "out"), sweep.hash)
    finally:
        os.chmod(tmp_path / "out", 0o755)


def test_the_local_launcher_is_the_default_and_refuses_more_than_a_gpu(tmp_path):
    sweep = tiny_sweep(n_hparams=1)
    with pytest.raises(UserError, match="a local trial uses one device"):
        run_sweep(sweep, tmp_path, progress=False, track=False, launcher=LAUNCHERS.get("local")(gpus_per_trial=2))
    counts = run_sweep(sweep, tmp_path, progress=False, track=False)
    assert counts["done"] == 1


# ---------------------------------------------------------------------------------------------- Ray (real cluster)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head on 127.0.0.1 with 2 CPUs (``ray start --head --block``), stopped afterwards."""
    # Read when ray is imported: keep 127.0.0.1 as it is (no turning it into this host's address), and no token
    # authentication on this throwaway cluster (Ray turns it on for clusters it starts).
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    pytest.importorskip("ray")
    port = free_port()
    env = dict(os.environ)
    temp = Path(f"/tmp/rt-{port}")  # short: Ray's socket paths must stay under 107 bytes
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", "2", "--node-ip-address",
         "127.0.0.1", "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir",
         str(temp), "--block"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, Path(log.name).read_text()[-2000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        stop_session(head)
        log.close()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_worker_killed_mid_trial_is_retried_resumes_and_matches_local(ray_cluster, tmp_path):
    sweep = tiny_sweep(steps=60)
    options = RunOptions(device="cpu", checkpoint_interval=0)  # a checkpoint at every evaluation
    killed: list = []
    watcher = kill_mid_trial(tmp_path / "ray", sweep, signal.SIGKILL, killed)
    launcher = LAUNCHERS.get("ray")(ray_address=ray_cluster, cpus_per_trial=1)
    counts = run_sweep(sweep, tmp_path / "ray", options=options, progress=False, track=False, launcher=launcher)
    watcher.join(1)
    assert killed, "no trial was caught mid-run with a checkpoint"
    key, pid, records_at_kill = killed[0]
    assert counts["done"] == 2 and counts["failed_total"] == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    (t,) = [t for t in sweep.trials() if t.hash == key]
    assert steps_of(tmp_path / "ray", t) == [0, *range(3, 60, 3), 59]  # one record per evaluation, none twice
    resumed = [json.loads(x) for x in (trial_dir(tmp_path / "ray", t) / "results.jsonl").read_text().splitlines()]
    # the retry resumed from the checkpoint: the records before the kill are the checkpoint's, timings included
    assert resumed[: len(records_at_kill)] == records_at_kill

    run_sweep(sweep, tmp_path / "local", options=options, progress=False, track=False)
    assert_identical(results(tmp_path / "ray", sweep), results(tmp_path / "local", sweep))

    again = run_sweep(sweep, tmp_path / "ray", options=options, progress=False, track=False, launcher=launcher)
    assert again["skipped_done"] == 2 and again["done"] == 0  # idempotent under Ray too


@pytest.mark.slow
def test_ray_ctrl_c_cancels_and_leaves_every_trial_done_or_resumable(ray_cluster, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_launchers import tiny_sweep
        from shiftbench.launchers import LAUNCHERS
        from shiftbench.sweep import run_sweep
        from shiftbench.trainer import RunOptions
        try:
            run_sweep(tiny_sweep(steps=150, n_hparams=3), {str(tmp_path)!r}, progress=False, track=False,
                      options=RunOptions(device="cpu", checkpoint_interval=0),
                      launcher=LAUNCHERS.get("ray")(ray_address={ray_cluster!r}, cpus_per_trial=1))
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    driver = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONSAFEPATH="1"))
    sweep = tiny_sweep(steps=150, n_hparams=3)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any((trial_dir(tmp_path, t) / "checkpoint.pt").exists()
                                                  for t in sweep.trials()):  # fmt: skip
        assert driver.poll() is None
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130
    deadline = time.monotonic() + 60
    while any(holders(trial_lock(tmp_path, t)) for t in sweep.trials()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the cancelled tasks stop
    states = {t.hash: sorted(p.name for p in trial_dir(tmp_path, t).glob("*")) for t in sweep.trials()}
    assert not any("failed.json" in names for names in states.values())  # done, partial or not started
    assert all(not holders(trial_lock(tmp_path, t)) for t in sweep.trials())  # no task still runs a trial
    assert any("checkpoint.pt" in names for names in states.values())
    counts = run_sweep(sweep, tmp_path, options=RunOptions(device="cpu"), progress=False, track=False,
                       launcher=LAUNCHERS.get("ray")(ray_address=ray_cluster))  # fmt: skip
    assert counts["resumed"] >= 1 and counts["done"] + counts["skipped_done"] == 3 and counts["failed_total"] == 0


# ---------------------------------------------------------------------------------------------- submitit (local)


@pytest.mark.slow
def test_submitit_job_preempted_or_killed_mid_trial_is_requeued_and_resumes(tmp_path):
    pytest.importorskip("submitit")
    sweep = tiny_sweep(steps=60)
    options = RunOptions(device="cpu", checkpoint_interval=0)
    out = tmp_path / "slurm"
    launcher = LAUNCHERS.get("slurm")(slurm_executor="local", slurm_array_parallelism=2, slurm_time=10)
    preempted: list = []
    watcher = kill_mid_trial(out, sweep, signal.SIGUSR2, preempted)  # Slurm's preemption / time-limit signal
    counts = run_sweep(sweep, out, options=options, progress=False, track=False, launcher=launcher)
    watcher.join(1)
    assert preempted and counts["done"] == 2 and counts["failed_total"] == 0
    key, pid, records_at_signal = preempted[0]
    (t,) = [t for t in sweep.trials() if t.hash == key]
    resumed = [json.loads(x) for x in (trial_dir(out, t) / "results.jsonl").read_text().splitlines()]
    assert resumed[: len(records_at_signal)] == records_at_signal and steps_of(out, t) == [0, *range(3, 60, 3), 59]
    logs = "".join(p.read_text() for p in sorted((out / ".submitit").rglob("*_log.out")))
    # submitit's checkpoint-and-requeue path: the signal caught, checkpoint() called, the job requeued and started
    # again (two jobs, three starts)
    assert "Caught signal SIGUSR2" in logs and "Calling checkpoint method" in logs and "Requeued job" in logs
    assert logs.count("Starting with JobEnvironment") == 3

    # kill -9 (no signal to catch): the job ends without an answer; the driver submits it again and it resumes
    out2 = tmp_path / "slurm-kill"
    killed: list = []
    watcher = kill_mid_trial(out2, sweep, signal.SIGKILL, killed)
    counts = run_sweep(sweep, out2, options=options, progress=False, track=False, launcher=launcher)
    watcher.join(1)
    assert killed and counts["done"] == 2 and counts["failed_total"] == 0
    key, pid, records_at_kill = killed[0]
    (t,) = [t for t in sweep.trials() if t.hash == key]
    resumed = [json.loads(x) for x in (trial_dir(out2, t) / "results.jsonl").read_text().splitlines()]
    assert resumed[: len(records_at_kill)] == records_at_kill

    run_sweep(sweep, tmp_path / "local", options=options, progress=False, track=False)
    reference = results(tmp_path / "local", sweep)
    assert_identical(results(out, sweep), reference)
    assert_identical(results(out2, sweep), reference)
    again = run_sweep(sweep, out, options=options, progress=False, track=False, launcher=launcher)
    assert again["skipped_done"] == 2 and again["done"] == 0


# ---------------------------------------------------------------------------------------------- MLflow


def trial_runs(uri: str, name: str = "shiftbench-tiny") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if "shiftbench.trial_hash" in r.data.tags], client  # fmt: skip


def test_sweeps_sharing_a_sqlite_store_keep_their_artifacts_out_of_each_others_folders(tmp_path, monkeypatch):
    import shutil

    store = tmp_path / "shared" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    a, b = tiny_sweep(n_hparams=1), tiny_sweep(n_hparams=1, methods=("vrex",))
    run_sweep(a, tmp_path / "a", progress=False)
    run_sweep(b, tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "a")  # the first sweep's folder goes; the second's runs keep their artifacts
    runs, client = trial_runs(f"sqlite:///{store}")
    assert sorted(r.data.tags["shiftbench.method"] for r in runs) == ["erm", "vrex"]
    for run in runs:
        assert str(tmp_path / "a") not in run.info.artifact_uri
        names = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"spec.json", "final.json", "predictions.npz"} <= names, (run.info.artifact_uri, names)


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a sqlite backend and a local artifact root, stopped afterwards."""
    port = free_port()
    root = tmp_path / "server"
    root.mkdir()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield uri, root
    finally:
        stop_session(server)
        log.close()


@pytest.mark.slow
def test_two_drivers_share_one_mlflow_server_one_run_per_trial_with_artifacts(mlflow_server, tmp_path):
    uri, root = mlflow_server
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, {tests!r})
        from test_launchers import tiny_sweep
        from shiftbench.sweep import run_sweep
        run_sweep(tiny_sweep(n_hparams=2, methods=[sys.argv[1]]), sys.argv[2], progress=False)
    """).format(tests=str(Path(__file__).parent))
    env = dict(os.environ, PYTHONSAFEPATH="1", MLFLOW_TRACKING_URI=uri)
    drivers = [subprocess.Popen([sys.executable, "-c", script, m, str(tmp_path / m)], env=env)
               for m in ("erm", "vrex")]  # fmt: skip
    assert [d.wait(timeout=600) for d in drivers] == [0, 0]
    runs, client = trial_runs(uri)
    expected = {t.hash for m in ("erm", "vrex") for t in tiny_sweep(n_hparams=2, methods=[m]).trials()}
    assert sorted(r.data.tags["shiftbench.trial_hash"] for r in runs) == sorted(expected)  # exactly one each
    exp = client.get_experiment_by_name("shiftbench-tiny")
    parents = {r.data.tags["shiftbench.sweep_hash"]: r.info.run_id
               for r in client.search_runs([exp.experiment_id]) if "shiftbench.sweep_hash" in r.data.tags}  # fmt: skip
    assert len(parents) == 2
    for run in runs:
        names = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"spec.json", "final.json", "predictions.npz", "results.jsonl"} <= names, names
        sweep = tiny_sweep(n_hparams=2, methods=[run.data.tags["shiftbench.method"]])
        assert run.data.tags["mlflow.parentRunId"] == parents[sweep.hash]
    stored = list((root / "artifacts").rglob("final.json"))
    assert len(stored) == 4 and not list((tmp_path / "erm").glob("mlartifacts")) and not list(
        (tmp_path / "vrex").glob("mlartifacts"))
    # a rerun of one driver adds no run
    subprocess.run([sys.executable, "-c", script, "erm", str(tmp_path / "erm")], env=env, check=True, timeout=600)
    assert len(trial_runs(uri)[0]) == 4
