"""Trials per hour with and without packing (issue 18): ``--pack off`` against ``--pack auto``, side by side.

Four sweeps (``--sweeps``; each side runs in this process, with the same threads and prebuilt data, and the script
checks that their final accuracies agree):

- ``shared64`` and ``shared256``: colored_digits, ERM, IRM, V-REx and GroupDRO x ``--draws`` random-search draws x
  ``--seeds`` seeds, the architecture and batch size fixed (``mlp_width`` 64 or 256, ``mlp_depth`` 2, no dropout,
  batch 64) so that trials share a shape; learning rate, weight decay and each method's own hyperparameters are
  drawn per trial. The 3x CPU goal is for sweeps like these.
- ``domainbed``: the same four methods with DomainBed's whole random search (batch size 2^3-2^9, ``mlp_width``
  2^6-2^10, ``mlp_depth`` 1-3, dropout 0/0.1/0.5), so draws differ in shape: packs are the buckets of equal shape,
  and a trial with dropout trains alone.
- ``quickstart``: the ``quickstart`` suite as it is (both datasets, its callbacks: drift tests and attestation).

``off`` runs the trials one after another with ``run_trial``; ``auto`` cuts them into the packs ``sweep --pack auto``
trains (``packs_of``: buckets of one shape, each cut at its own ``choose_k``) and runs each with ``run_pack``. On CPU
always, and on CUDA as well when one is present.

Memory per packed trial: the measured peak growth of the process (RSS on CPU, allocated device memory on CUDA)
while the packs ran, divided by K, beside the optimiser-state floor (parameters, gradients, two Adam moments).

    python bench_scripts/pack_speed.py            # all four sweeps (about 45 minutes on 2 CPU cores)
    python bench_scripts/pack_speed.py --sweeps shared64 --draws 16
    python bench_scripts/pack_speed.py --quick    # a few seconds (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from shiftbench.callbacks import RunOptions
from shiftbench.config import TrialSpec
from shiftbench.data import load_dataset
from shiftbench.pack import packs_of, run_pack
from shiftbench.pack.group import trial_cost
from shiftbench.trainer import run_trial

METHODS = ("erm", "irm", "vrex", "groupdro")
FIXED = {"batch_size": 64, "mlp_width": 256, "mlp_depth": 2, "mlp_dropout": 0.0}


def sweep(draws: int, seeds: int, steps: int, eval_every: int, options: dict, fixed: dict) -> list[TrialSpec]:
    """colored_digits x METHODS x draws x seeds; ``fixed`` hyperparameters are not drawn (draw 0 is the defaults,
    as in DomainBed)."""
    return [TrialSpec.resolve("colored_digits", m, seed=s, hparams_seed=h, steps=steps, eval_every=eval_every,
                              hparams=fixed, dataset_options=options)
            for m in METHODS for h in range(draws) for s in range(seeds)]  # fmt: skip


def quickstart() -> list[TrialSpec]:
    """The quickstart suite's trials; its attestations are signed with a key made for this run (a fresh
    SHIFTBENCH_HOME), not the user's."""
    import os

    from shiftbench.config import load_suite

    os.environ["SHIFTBENCH_HOME"] = tempfile.mkdtemp(prefix="pack_speed_home_")
    return load_suite("quickstart").trials()


class PeakRSS:
    """Samples the process's resident memory every 10 ms; ``peak`` is the largest seen."""

    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def final_accs(out: Path, specs) -> dict[str, float]:
    accs = {}
    for s in specs:
        rec = json.loads((out / s.short_hash / "final.json").read_text())["record"]
        accs.update({f"{s.short_hash}/{k}": v for k, v in rec.items() if k.endswith("_acc")})
    return accs


def far_apart(root: Path, specs, a: dict[str, float], b: dict[str, float], points: float = 1.0) -> list[str]:
    """The trials whose final accuracies differ by more than ``points`` between the two sides, each with its
    method and its final training loss on both sides: a two-class trial whose loss sits at ln 2 = 0.693 has
    collapsed to chance, and which side of 0 its near-zero logit differences fall is rounding noise."""
    out = []
    for s in specs:
        diffs = [abs(a[x] - b[x]) * 100 for x in a if x.startswith(s.short_hash + "/")]
        if max(diffs, default=0.0) > points:
            loss = [json.loads((root / side / s.short_hash / "final.json").read_text())["record"].get("loss")
                    for side in ("off", "pack")]  # fmt: skip
            out.append(f"{s.short_hash} {s.method} {max(diffs):.1f} points, final loss off {loss[0]:.4f} / "
                       f"packed {loss[1]:.4f}")
    return out


def bench(device: str, specs, k: int | None, name: str = "") -> dict:
    opts = RunOptions(device=device, checkpoint_interval=1e9)
    for s in specs:  # data built before either side is timed (both reuse the process's cache)
        load_dataset(s.dataset, s.dataset_options)
    root = Path(tempfile.mkdtemp(prefix="pack_speed_"))
    try:
        run_trial(specs[0], root / "warmup", opts)  # first-call costs (imports, kernels) paid by neither side
        t = time.perf_counter()
        for s in specs:
            run_trial(s, root / "off" / s.short_hash, opts)
        t_off = time.perf_counter() - t
        groups = packs_of(specs, k or "auto", device)  # what `sweep --pack auto|K` trains
        k = max(len(g) for g in groups)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRSS() as mem:
            t = time.perf_counter()
            for g in groups:
                run_pack(g, [root / "pack" / s.short_hash for s in g], opts)
            t_pack = time.perf_counter() - t
        grown = (torch.cuda.max_memory_allocated() - base) if device.startswith("cuda") else mem.peak - mem.base
        a, b = final_accs(root / "off", specs), final_accs(root / "pack", specs)
        worst = max(abs(a[x] - b[x]) for x in a) * 100
        far = far_apart(root, specs, a, b)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params, _ = trial_cost(specs[0])
    return {"sweep": name, "device": device, "trials": len(specs), "k": k, "packs": len(groups), "off_s": t_off, "pack_s": t_pack,
            "mem_per_trial_mb": grown / k / 2**20, "state_mb": 16 * params / 2**20,
            "acc_diff_pts": worst, "far_apart": far}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| sweep | device | trials | mode | K | packs | wall s | trials/hour | × off | memory / packed trial (MB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        off, pack = 3600 * r["trials"] / r["off_s"], 3600 * r["trials"] / r["pack_s"]
        lines.append(f"| {r['sweep']} | {r['device']} | {r['trials']} | off | 1 | | {r['off_s']:.1f} | {off:.0f} | "
                     "1.00 | |")
        lines.append(f"| {r['sweep']} | {r['device']} | {r['trials']} | auto | {r['k']} | {r['packs']} | "
                     f"{r['pack_s']:.1f} | {pack:.0f} | "
                     f"{pack / off:.2f} | {r['mem_per_trial_mb']:.1f} peak growth / K "
                     f"({r['state_mb']:.1f} params+grads+Adam) |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny sweep (8 trials, 21 steps, small data)")
    ap.add_argument("--sweeps", default="shared64,shared256,domainbed,quickstart",
                    help="comma-separated: shared64, shared256, domainbed, quickstart (default: all)")
    ap.add_argument("--draws", type=int, default=6, help="random-search draws per method (default: 6)")
    ap.add_argument("--seeds", type=int, default=3, help="trial seeds (default: 3)")
    ap.add_argument("--steps", type=int, default=501, help="training steps per trial (default: 501)")
    ap.add_argument("--eval-every", type=int, default=100, help="evaluation period (default: 100)")
    ap.add_argument("--k", type=int, default=None, help="pack size (default: each bucket's choose_k, as --pack auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sweeps = {"quick": sweep(1, 2, 21, 10, {"env_size": 400, "resolution": 8},
                                 {**FIXED, "mlp_width": 32, "batch_size": 16})}  # fmt: skip
    else:
        make = {
            "shared64": lambda: sweep(args.draws, args.seeds, args.steps, args.eval_every, {}, {**FIXED, "mlp_width": 64}),
            "shared256": lambda: sweep(args.draws, args.seeds, args.steps, args.eval_every, {}, FIXED),
            "domainbed": lambda: sweep(args.draws, args.seeds, args.steps, args.eval_every, {}, {}),
            "quickstart": quickstart,
        }  # fmt: skip
        names = [n.strip() for n in args.sweeps.split(",") if n.strip()]
        unknown = [n for n in names if n not in make]
        if unknown:
            ap.error(f"unknown sweep {unknown[0]!r}; choose from {', '.join(make)}")
        sweeps = {n: make[n]() for n in names}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    rows = []
    for d in devices:
        for name, specs in sweeps.items():
            rows.append(bench(d, specs, args.k, name))
            print(table(rows[-1:]), flush=True)
    print(table(rows))
    for r in rows:
        print(f"{r['sweep']} on {r['device']}: auto made {r['packs']} packs, the largest of K={r['k']}; largest "
              f"final-accuracy difference packed vs off: {r['acc_diff_pts']:.3f} points; torch threads "
              f"{torch.get_num_threads()}")
        for line in r["far_apart"]:
            print(f"  more than 1 point apart: {line}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
