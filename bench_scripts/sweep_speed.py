"""Launcher overhead: one 16-trial sweep on the embedded digits under each launcher, side by side (`make bench-sweep`).

Runs the same sweep (colored_digits, ERM, 16 random-search draws) into a fresh folder under ``local`` (a pool of
``--workers`` processes: the reference), ``ray`` on a local cluster started beforehand (its start-up is timed
apart), and ``slurm`` through submitit's local executor (real subprocesses, ``--workers`` jobs at once). Every
launcher gets the same parallelism. The table gives each one's wall time, its ratio to the pool's, and its
overhead per trial against the pool, ``(wall - pool wall) * parallelism / trials``: the worker-seconds each trial
costs beyond what the pool spends. Less sensitive to load that slows the training itself: each launcher's own
time per trial outside the trainer, ``(wall * parallelism - sum of the trials' wall_time) / trials`` (process
starts, imports, scheduling, results passed back; the trainer's ``wall_time`` includes building its dataset).
MLflow mirroring is off (it is the same driver code under every launcher). With CUDA, the same sweep runs again
under the local launcher with one trial per GPU and with ``--gpus-per-trial 0.25``.

Figures depend on the machine and its load; run on an idle one. Goal: Ray's overhead per trial under 1 s and its
16-trial wall time within 1.2x of the pool's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local Ray cluster binds to 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from shiftbench.config import SweepSpec  # noqa: E402
from shiftbench.launchers import LAUNCHERS  # noqa: E402
from shiftbench.sweep import run_sweep, trial_dir  # noqa: E402
from shiftbench.trainer import RunOptions  # noqa: E402


def sweep(trials: int, steps: int) -> SweepSpec:
    return SweepSpec.from_mapping({
        "name": "sweep-speed", "datasets": ["colored_digits"], "methods": ["erm"], "test_envs": "default",
        "n_hparams": trials, "n_seeds": 1, "steps": steps, "eval_every": max(1, steps // 2),
        "dataset_options": {"colored_digits": {"env_size": 600, "resolution": 14}},
    })  # fmt: skip


def timed(spec: SweepSpec, out: Path, launcher, options: RunOptions) -> tuple[float, float]:
    """(wall seconds of run_sweep, sum of the trials' own training wall_time)."""
    t0 = time.perf_counter()
    counts = run_sweep(spec, out, options=options, progress=False, track=False, launcher=launcher)
    wall = time.perf_counter() - t0
    assert counts["done"] == len(spec.trials()) and counts["failed_total"] == 0, counts
    train = sum(json.loads((trial_dir(out, t) / "final.json").read_text())["wall_time"] for t in spec.trials())
    return wall, train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16, help="trials in the sweep (default: 16)")
    p.add_argument("--steps", type=int, default=100, help="training steps per trial (default: 100)")
    p.add_argument("--workers", type=int, default=2, help="trials at once under every launcher (default: 2)")
    p.add_argument("--launchers", default="local,ray,slurm", help="which to run (default: local,ray,slurm)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args()
    spec, names = sweep(a.trials, a.steps), a.launchers.split(",")
    options = RunOptions(device="cpu")
    root = Path(tempfile.mkdtemp(prefix="sweep-speed-"))
    rows: list[dict] = []
    ray_start = None
    try:
        if "ray" in names:
            import ray

            t0 = time.perf_counter()
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=a.workers, log_to_driver=False,
                     logging_level="WARNING")  # fmt: skip
            ray_start = time.perf_counter() - t0
        launchers = {
            "local": LAUNCHERS.get("local")(workers=a.workers),
            "ray": LAUNCHERS.get("ray")(cpus_per_trial=1, gpus_per_trial=0),
            "slurm": LAUNCHERS.get("slurm")(slurm_executor="local", slurm_array_parallelism=a.workers),
        }
        for name in names:
            wall, train = timed(spec, root / name, launchers[name], options)
            rows.append({"launcher": name, "wall_s": wall, "train_s": train})
            print(f"{name}: {wall:.1f} s", file=sys.stderr)
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            for label, workers, g in ((f"local, 1 trial/GPU x{n}", n, 1.0), (f"local, 0.25 GPU/trial x{4 * n}", 4 * n,
                                                                             0.25)):  # fmt: skip
                launcher = LAUNCHERS.get("local")(workers=workers, gpus_per_trial=g)
                wall, train = timed(spec, root / label.replace(" ", "_").replace("/", "-"), launcher,
                                    RunOptions(device="auto"))  # fmt: skip
                rows.append({"launcher": label, "wall_s": wall, "train_s": train, "gpu": True, "parallel": workers})
    finally:
        if ray_start is not None:
            import ray

            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    pool = next((r["wall_s"] for r in rows if r["launcher"] == "local"), None)
    n = len(spec.trials())
    print(f"\n{n}-trial sweep, colored_digits, {a.steps} steps/trial, {a.workers} at once, CPU "
          f"({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})")  # fmt: skip
    print("| launcher | wall (s) | vs pool | overhead/trial vs pool (s) | sum of trial wall_time (s) "
          "| time/trial outside the trainer (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if pool and not r.get("gpu"):
            r["ratio"] = r["wall_s"] / pool
            r["overhead_per_trial_s"] = (r["wall_s"] - pool) * a.workers / n
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        over = f"{r['overhead_per_trial_s']:+.2f}" if "overhead_per_trial_s" in r else "-"
        r["outside_per_trial_s"] = (r["wall_s"] * r.get("parallel", a.workers) - r["train_s"]) / n
        print(f"| {r['launcher']} | {r['wall_s']:.1f} | {ratio} | {over} | {r['train_s']:.1f} "
              f"| {r['outside_per_trial_s']:.2f} |")
    if ray_start is not None:
        print(f"\nRay local cluster start (not in the ray row): {ray_start:.1f} s")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "ray_start_s": ray_start}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
