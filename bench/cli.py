"""The ``shiftbench`` command line. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _csv_ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _callbacks(s: str) -> list[str]:
    """``drift,robust_eval:eps=0.3,steps=20,attest`` -> three names: a ``k=v`` piece belongs to the callback
    before it (settings of a ``name:k=v,...`` callback are themselves comma-separated)."""
    out: list[str] = []
    for piece in _csv(s):
        if "=" in piece and ":" not in piece.split("=", 1)[0] and out and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what} {item!r} must look like name=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--amp", action="store_true", help="bfloat16 mixed precision on CUDA")
    p.add_argument("--data-root", default=os.environ.get("SHIFTBENCH_DATA"), help="folder with real datasets")
    p.add_argument("--download", action="store_true", help="let loaders download missing datasets")
    p.add_argument("--checkpoint-interval", type=float, default=30.0,
                   help="seconds of training between checkpoints, taken at evaluations (default: 30; 0: every one)")


def _run_options(a: argparse.Namespace):
    from .trainer import RunOptions, resolve_device

    resolve_device(a.device)
    if a.checkpoint_interval < 0:
        raise UserError(f"--checkpoint-interval must be >= 0 (got {a.checkpoint_interval})")
    return RunOptions(device=a.device, amp=a.amp, data_root=a.data_root, download=a.download,
                      retry_failed=getattr(a, "retry_failed", False),
                      checkpoint_interval=a.checkpoint_interval)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shiftbench",
        description="Benchmark training methods under distribution shift: sweeps, model selection, leaderboards.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ls = sub.add_parser("list", help="list registered methods, datasets, suites, models")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "methods", "datasets", "suites", "models", "callbacks"])

    tr = sub.add_parser("train", help="run one trial")
    tr.add_argument("--dataset", required=True)
    tr.add_argument("--method", required=True)
    tr.add_argument("--test-envs", type=_csv_ints, default=None, help="held-out environments, e.g. 2 or 0,1")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--hparams-seed", type=int, default=0, help="random-search draw (0: defaults)")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--eval-every", type=int, default=None)
    tr.add_argument("--hparams", nargs="*", metavar="K=V", help="fixed hyperparameters")
    tr.add_argument("--option", nargs="*", metavar="K=V", help="dataset options, e.g. env_size=2000")
    tr.add_argument("--model", default=None)
    tr.add_argument("--callbacks", type=_callbacks, default=(), metavar="NAME[,NAME]",
                    help="trial callbacks, e.g. drift,attest or robust_eval:steps=20 (see shiftbench list callbacks)")
    tr.add_argument("--out", required=True, type=Path, help="trial folder")
    tr.add_argument("--no-mlflow", action="store_true", help="do not mirror the trial to MLflow")
    _add_run_options(tr)

    sw = sub.add_parser("sweep", help="run a sweep (skips finished trials, resumes unfinished ones)")
    src = sw.add_mutually_exclusive_group(required=True)
    src.add_argument("--suite", help="suite name (shiftbench list suites) or YAML file")
    src.add_argument("--datasets", type=_csv)
    sw.add_argument("--methods", type=_csv)
    sw.add_argument("--test-envs", help="default | each | each+pairs | 0;1,2 (sets separated by ';')")
    sw.add_argument("--n-hparams", type=int)
    sw.add_argument("--n-seeds", type=int)
    sw.add_argument("--steps", type=int)
    sw.add_argument("--eval-every", type=int)
    sw.add_argument("--name")
    sw.add_argument("--callbacks", type=_callbacks, metavar="NAME[,NAME]", help="trial callbacks (replace the suite's)")
    sw.add_argument("--out", required=True, type=Path)
    sw.add_argument("--workers", type=int, default=1)
    sw.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    sw.add_argument("--no-mlflow", action="store_true")
    sw.add_argument("--no-progress", action="store_true")
    _add_run_options(sw)

    rp = sub.add_parser("report", help="write leaderboards, metrics.json and plots from a runs folder")
    rp.add_argument("runs", type=Path, nargs="+", metavar="RUNS",
                    help="sweep folder(s); several make one leaderboard (a trial in two folders counts once; a method "
                         "run in several sweeps gets a row per sweep, 'erm (name)')")
    rp.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")

    dm = sub.add_parser("demo", help="run the quickstart suite and print its leaderboard")
    dm.add_argument("--out", type=Path, default=Path("runs/demo"))
    dm.add_argument("--reports", type=Path, default=Path("reports"))
    dm.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    _add_run_options(dm)
    _add_command_modules(sub)
    return p


def _add_command_modules(sub) -> None:
    """Further commands live one per module in ``shiftbench.commands``: ``register(subparsers)`` adds a parser
    and sets its ``func(args) -> int``; they raise UserError for bad input like the built-in ones."""
    import importlib
    import pkgutil

    import shiftbench.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}").register(sub)


def _parse_test_envs(s: str | None):
    if s is None or s in ("default", "each", "each+pairs"):
        return s
    return [list(_csv_ints(part)) for part in s.split(";")]


def cmd_list(a) -> int:
    from .config import suite_names
    from .registry import CALLBACKS, DATASETS, METHODS, MODELS

    groups = {
        "methods": lambda: [(n, _first_line(METHODS.get(n).__doc__)) for n in METHODS.names()],
        "datasets": lambda: [(n, f"[{DATASETS.get(n).TASK}] " + _first_line(DATASETS.get(n).__doc__))
                             for n in DATASETS.names()],  # fmt: skip
        "suites": lambda: [(n, _suite_summary(n)) for n in suite_names()],
        "models": lambda: [(n, _first_line(MODELS.get(n).__doc__)) for n in MODELS.names()],
        "callbacks": lambda: [(n + ("k=v,..." if n.endswith(":") else ""), _first_line(CALLBACKS.get(n).__doc__))
                              for n in CALLBACKS.names()],  # fmt: skip
    }
    for g in groups if a.what == "all" else [a.what]:
        print(f"{g}:")
        for name, doc in groups[g]():
            print(f"  {name:22s} {doc}")
    return 0


def _suite_summary(name: str) -> str:
    """The first sentence of a suite file's opening comment (at most 100 characters)."""
    import itertools

    from .config import SUITES_DIR

    lines = (SUITES_DIR / f"{name}.yaml").read_text().splitlines()
    comment = " ".join(line.lstrip("# ").strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
    sentence = comment.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 100 else sentence[:99].rstrip() + "…"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""


def cmd_train(a, parser) -> int:
    from .config import TrialSpec
    from .io import check_out_dir
    from .trainer import run_trial

    check_out_dir(a.out)
    spec = TrialSpec.resolve(
        a.dataset, a.method, a.test_envs, seed=a.seed, hparams_seed=a.hparams_seed, steps=a.steps,
        eval_every=a.eval_every, hparams=parse_kv(a.hparams, "--hparams"),
        dataset_options=parse_kv(a.option, "--option"), model=a.model, callbacks=tuple(a.callbacks),
    )  # fmt: skip
    options = _run_options(a)
    final = run_trial(spec, a.out, options)
    if final["status"] != "done":
        print(f"trial failed: {final.get('reason')}", file=sys.stderr)
        return 1
    rec = final["record"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, indent=1))
    if not a.no_mlflow:
        from .tracking import Tracker

        tracker = Tracker(a.out, "shiftbench-trials")
        run_id = tracker.mirror_trial(a.out)
        print(f"MLflow run {run_id}; dashboard: {tracker.ui_command(a.out)}")
    return 0


def cmd_sweep(a) -> int:
    from .config import SweepSpec, load_suite
    from .sweep import run_sweep

    overrides = {
        "methods": a.methods, "test_envs": _parse_test_envs(a.test_envs), "n_hparams": a.n_hparams,
        "n_seeds": a.n_seeds, "steps": a.steps, "eval_every": a.eval_every, "name": a.name,
        "callbacks": a.callbacks,
    }  # fmt: skip
    if a.suite:
        sweep = load_suite(a.suite, **overrides)
    else:
        if not a.methods:
            raise UserError("--datasets needs --methods (or use --suite)")
        raw = {k: v for k, v in overrides.items() if v is not None}
        raw["datasets"] = a.datasets
        sweep = SweepSpec.from_mapping(raw, where="command line")
    if a.workers <= 0:
        raise UserError(f"--workers must be positive (got {a.workers})")
    return _sweep_and_print(sweep, a.out, a.workers, _run_options(a), not a.no_mlflow, not a.no_progress)


def _sweep_and_print(sweep, out: Path, workers: int, options, track: bool, progress: bool) -> int:
    from .sweep import check_data, prepare_out, run_sweep

    check_data(sweep, options)
    prepare_out(out, sweep)
    n = len(sweep.trials())
    print(f"sweep {sweep.name}: {n} trials -> {out}  (hash {sweep.hash[:12]})", file=sys.stderr)
    counts = run_sweep(sweep, out, workers=workers, options=options, progress=progress, track=track)
    print(
        f"trials: {counts['total']} total, {counts['skipped_done']} already done, {counts['done']} finished now, "
        f"{counts['resumed']} resumed, {counts['failed_total']} failed",
        file=sys.stderr,
    )
    if track:
        from .tracking import ui_command

        print(f"MLflow dashboard: {ui_command(out)}", file=sys.stderr)
    return 0


def cmd_report(a) -> int:
    for runs in a.runs:
        if not runs.is_dir():
            raise UserError(f"runs folder {runs} {'is not a folder' if runs.exists() else 'does not exist'}")
    _report(a.runs, a.out)
    print(f"reports written to {a.out} (leaderboard.md/.html/.tex, report.json, metrics.json, plots/)",
          file=sys.stderr)
    return 0


def _report(runs: Path | list[Path], out: Path) -> None:
    from .report import build_report, scan_runs

    folders = runs if isinstance(runs, list) else [runs]
    if not any(scan_runs(r).done for r in folders):
        raise UserError(f"{', '.join(map(str, folders))} hold{'s' if len(folders) == 1 else ''} no finished trial "
                        "(looked for final.json in trials/*/)")
    # the tables and sections are computed once, for the files and the terminal; long sections print one line here
    _, text = build_report(folders, out, terminal=True)
    print(text)


def cmd_demo(a) -> int:
    from .config import load_suite

    sweep = load_suite("quickstart")
    _sweep_and_print(sweep, a.out, a.workers, _run_options(a), True, True)
    _report(a.out, a.reports)
    print(f"reports: {a.reports}/leaderboard.md (also .html, .tex, metrics.json, plots/)")
    from .tracking import ui_command

    print(f"MLflow dashboard: {ui_command(a.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    try:
        if a.command == "list":
            return cmd_list(a)
        if a.command == "train":
            return cmd_train(a, parser)
        if a.command == "sweep":
            return cmd_sweep(a)
        if a.command == "report":
            return cmd_report(a)
        if a.command == "demo":
            return cmd_demo(a)
        return a.func(a)
    except UserError as e:
        print(f"shiftbench {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `shiftbench list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
