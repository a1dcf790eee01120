"""Start-up time of the command line: ``shiftbench --help``, ``shiftbench list`` and ``shiftbench drift`` on two
small ``.npy`` files, each run as a fresh process (median and min of several runs), and whether torch was imported.

    .venv/bin/python bench_scripts/startup_speed.py [--repeats 5] [--before REV]

``--before REV`` also times the package as it was at git revision REV (its ``bench/``, ``methods/`` and
``datasets/`` assembled into a temporary ``shiftbench`` package put first on ``PYTHONPATH``), the two alternating
run by run so that both see the same load; the table then gives both and their ratio.
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


def _once(args: list[str], path: str | None) -> tuple[float, bool]:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    if path:
        env["PYTHONPATH"] = path
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{args}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return elapsed, "TORCH=1" in proc.stderr


def _old_package(rev: str, into: Path) -> str:
    """The package at ``rev`` as an importable folder; returns the PYTHONPATH entry."""
    import io
    import tarfile

    raw = subprocess.run(["git", "archive", rev, "bench", "methods", "datasets"], capture_output=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout  # fmt: skip
    tarfile.open(fileobj=io.BytesIO(raw)).extractall(into, filter="data")
    pkg = into / "shiftbench"
    (into / "bench").rename(pkg)
    for sub in ("methods", "datasets"):
        (into / sub).rename(pkg / sub)
    return str(into)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    ap.add_argument("--before", metavar="REV", help="also time the package at this git revision, side by side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = _old_package(args.before, Path(tmp) / "old") if args.before else None
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
        sides = {"now": None, **({f"at {args.before}": old} if old else {})}
        head = " | ".join(f"{k} median s | {k} min s | {k} torch" for k in sides)
        print(f"| command | {head} |" + (" now / before (median) |" if old else ""))
        print("| --- " * (1 + 3 * len(sides) + (1 if old else 0)) + "|")
        for name, argv in commands.items():
            runs: dict[str, list[float]] = {k: [] for k in sides}
            torch_seen = {k: False for k in sides}
            for _ in range(args.repeats):  # alternate the two, so that both see the same load
                for k, path in sides.items():
                    t, loaded = _once(argv, path)
                    runs[k].append(t)
                    torch_seen[k] = loaded
            cells = " | ".join(f"{statistics.median(runs[k]):.3f} | {min(runs[k]):.3f} | "
                               f"{'yes' if torch_seen[k] else 'no'}" for k in sides)  # fmt: skip
            ratio = (f" {statistics.median(runs['now']) / statistics.median(runs[f'at {args.before}']):.2f} |"
                     if old else "")  # fmt: skip
            print(f"| {name} | {cells} |{ratio}")


if __name__ == "__main__":
    main()
