"""Start-up time of the command line: ``shiftbench --help``, ``shiftbench list`` and ``shiftbench drift`` on two
small ``.npy`` files, each run as a fresh process (median and min of several runs), and whether torch was imported.

    .venv/bin/python bench_scripts/startup_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Runs the CLI in-process after recording what was imported, so the same process says whether torch was loaded.
_PROBE = (
    "import sys, contextlib, io\n"
    "from shiftbench.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        code = main(sys.argv[1:])\n"
    "    except SystemExit as e:\n"
    "        code = e.code\n"
    "sys.stderr.write('TORCH=%d\\n' % ('torch' in sys.modules))\n"
    "sys.exit(code or 0)\n"
)


def _time(args: list[str], repeats: int) -> tuple[float, float, bool]:
    times, torch_loaded = [], False
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"{args}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
        torch_loaded = "TORCH=1" in proc.stderr
    return statistics.median(times), min(times), torch_loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        ref, test = Path(tmp) / "ref.npy", Path(tmp) / "test.npy"
        np.save(ref, rng.normal(size=(200, 8)).astype(np.float32))
        np.save(test, rng.normal(0.5, 1.0, size=(200, 8)).astype(np.float32))
        commands = {
            "shiftbench --help": ["--help"],
            "shiftbench list": ["list"],
            "shiftbench drift (2 x 200x8 .npy, mmd+ks)": ["drift", "--ref", str(ref), "--test", str(test),
                                                         "--detector", "mmd,ks"],
        }
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare = time.perf_counter() - t0
        print(f"python -c pass: {bare:.3f} s (interpreter start-up, for scale)")
        print(f"| command | median s | min s | torch imported |\n| --- | --- | --- | --- |")
        for name, argv in commands.items():
            med, best, torch_loaded = _time(argv, args.repeats)
            print(f"| {name} | {med:.3f} | {best:.3f} | {'yes' if torch_loaded else 'no'} |")


if __name__ == "__main__":
    main()
