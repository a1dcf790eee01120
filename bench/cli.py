"""The ``shiftbench`` command line. Bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cliargs import Parser, callbacks, csv, csv_ints, pack_size, parse_kv
from .errors import UserError

__all__ = ["build_parser", "main", "parse_kv"]




def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] (default: auto)")
    p.add_argument("--amp", action="store_true", help="bfloat16 mixed precision on CUDA")
    p.add_argument("--data-root", default=os.environ.get("SHIFTBENCH_DATA"),
                   help="folder with real datasets (default: $SHIFTBENCH_DATA; unset: only embedded datasets load)")
    p.add_argument("--download", action="store_true", help="let loaders download missing datasets")
    p.add_argument("--checkpoint-interval", type=float, default=30.0,
                   help="seconds of training between checkpoints, taken at evaluations (default: 30; 0: every one)")


def _run_options(a: argparse.Namespace):
    from .callbacks import RunOptions, resolve_device

    if getattr(a, "launcher", "local") == "local":  # ray and slurm workers resolve --device where they run
        resolve_device(a.device)
    if a.checkpoint_interval < 0:
        raise UserError(f"--checkpoint-interval must be >= 0 (got {a.checkpoint_interval})")
    return RunOptions(device=a.device, amp=a.amp, data_root=a.data_root, download=a.download,
                      retry_failed=getattr(a, "retry_failed", False),
                      checkpoint_interval=a.checkpoint_interval)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="shiftbench",
        description="Benchmark training methods under distribution shift: sweeps, model selection, leaderboards.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ls = sub.add_parser("list", help="list registered methods, datasets, suites, models, callbacks")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "methods", "datasets", "suites", "models", "callbacks"],
                    help="which group to list (default: all)")

    tr = sub.add_parser("train", help="run one trial")
    tr.add_argument("--dataset", required=True, help="registered dataset (shiftbench list datasets)")
    tr.add_argument("--method", required=True, help="registered method (shiftbench list methods)")
    tr.add_argument("--test-envs", type=csv_ints, default=None,
                    help="held-out environments, e.g. 2 or 0,1 (default: the dataset's default test environments)")
    tr.add_argument("--seed", type=int, default=0, help="trial seed")
    tr.add_argument("--hparams-seed", type=int, default=0, help="random-search draw (0: the declared defaults)")
    tr.add_argument("--steps", type=int, default=None, help="training steps (default: the dataset's, e.g. 5001)")
    tr.add_argument("--eval-every", type=int, default=None,
                    help="evaluate and checkpoint every this many steps (default: the dataset's, e.g. 100)")
    tr.add_argument("--hparams", nargs="*", metavar="K=V",
                    help="fixed hyperparameters, e.g. lr=1e-3 (default: none; the draw decides the rest)")
    tr.add_argument("--option", nargs="*", metavar="K=V",
                    help="dataset options, e.g. env_size=2000 (default: none; see docs/data.md)")
    tr.add_argument("--model", default=None, help="registered model (default: the dataset's default model)")
    tr.add_argument("--callbacks", type=callbacks, default=(), metavar="NAME[,NAME]",
                    help="trial callbacks, e.g. drift,attest or robust_eval:steps=20 (see shiftbench list callbacks; "
                         "default: none)")
    tr.add_argument("--out", required=True, type=Path,
                    help="trial folder (new, or one holding this same trial to resume it)")
    tr.add_argument("--no-mlflow", action="store_true",
                    help="do not mirror the trial to MLflow (by default it goes to OUT/mlflow.db, or "
                         "$MLFLOW_TRACKING_URI)")
    tr.add_argument("--quiet", action="store_true", help="no progress line per evaluation on stderr")
    _add_run_options(tr)

    sw = sub.add_parser("sweep", help="run a sweep (skips finished trials, resumes unfinished ones)")
    src = sw.add_mutually_exclusive_group(required=True)
    src.add_argument("--suite",
                     help="suite name (shiftbench list suites) or YAML file (one of --suite and --datasets is "
                          "required)")
    src.add_argument("--datasets", type=csv,
                     help="comma-separated datasets, instead of --suite (needs --methods; default: none, use --suite)")
    sw.add_argument("--methods", type=csv, help="comma-separated methods (default: the suite's)")
    sw.add_argument("--test-envs", help="default | each | each+pairs | 0;1,2 (sets separated by ';'; default: the "
                                        "suite's, else each dataset's default test environments)")
    sw.add_argument("--n-hparams", type=int,
                    help="random-search draws per method; draw 0 is the defaults (default: the suite's, else 1)")
    sw.add_argument("--n-seeds", type=int, help="trial seeds per draw (default: the suite's, else 1)")
    sw.add_argument("--steps", type=int, help="training steps per trial (default: the suite's, else 5001)")
    sw.add_argument("--eval-every", type=int, help="evaluation interval in steps (default: the suite's, else 100)")
    sw.add_argument("--name", help="sweep name, used for the MLflow experiment (default: the suite's, else 'sweep')")
    sw.add_argument("--callbacks", type=callbacks, metavar="NAME[,NAME]",
                    help="trial callbacks, replacing the suite's (default: the suite's, else none)")
    sw.add_argument("--option", nargs="*", metavar="K=V",
                    help="dataset options for every dataset of the sweep, over the suite's, e.g. env_size=2000 "
                         "(default: none; see docs/data.md)")
    sw.add_argument("--out", required=True, type=Path,
                    help="sweep folder (new, or one holding this same sweep to resume it)")
    sw.add_argument("--workers", type=int, default=1,
                    help="trials run at once, one process each, with the local launcher (ray and slurm ignore it: "
                         "see --cpus-per-trial, --slurm-array-parallelism)")
    sw.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    sw.add_argument("--pack", type=pack_size, default="off", metavar="auto|K|off",
                    help="train trials that share a dataset, model shape, method, steps and batch size as one "
                         "vectorised program, K at a time (auto: K from the device and model size); each trial's "
                         "folder, records and MLflow run are as alone, its numbers equal up to float rounding, which "
                         "long or unstable runs can amplify (see docs/packing.md)")
    sw.add_argument("--no-mlflow", action="store_true",
                    help="do not mirror trials to MLflow (by default: OUT/mlflow.db, or $MLFLOW_TRACKING_URI)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_run_options(sw)
    from .launchers import add_arguments as add_launcher_arguments  # light: no torch, ray, submitit or mlflow

    add_launcher_arguments(sw)

    rp = sub.add_parser("report", help="write leaderboards, metrics.json and plots from a runs folder")
    rp.add_argument("runs", type=Path, nargs="+", metavar="RUNS",
                    help="sweep folder(s); several make one leaderboard (a trial in two folders counts once; a method "
                         "run in several sweeps gets a row per sweep, 'erm (name)')")
    rp.add_argument("--out", type=Path, default=Path("reports"), help="output folder (default: reports)")
    rp.add_argument("--se-ddof", type=int, choices=(0, 1), default=1,
                    help="degrees of freedom of the standard error: 1, the sample SE, or 0, DomainBed's printing "
                         "convention, for side-by-side comparison with its published tables")
    rp.add_argument("--ci", action="store_true",
                    help="also print each cell's t-based 95%% interval over trial seeds (always in report.json, "
                         "metrics.json and the CSV)")

    dm = sub.add_parser("demo", help="run the quickstart suite and print its leaderboard")
    dm.add_argument("--out", type=Path, default=Path("runs/demo"), help="sweep folder")
    dm.add_argument("--reports", type=Path, default=Path("reports"), help="where the leaderboards and plots go")
    dm.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                    help="trials run at once (default: the number of CPUs)")
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
    return [list(csv_ints(part)) for part in s.split(";")]


def cmd_list(a) -> int:
    from .catalog import load, settings_lines

    catalog = load()  # from a cache keyed on the package's sources: no plug-in (and no torch) is imported
    show = {  # (name, description, catalog entry: its options or settings are printed under it)
        "methods": lambda: [(m["name"], m["doc"], m) for m in catalog["methods"]],
        "datasets": lambda: [(d["name"], f"[{d['task']}] {d['doc']}", d) for d in catalog["datasets"]],
        "suites": lambda: [(n, _suite_summary(n), {}) for n in sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))],
        "models": lambda: [(m["name"], m["doc"], m) for m in catalog["models"]],
        "callbacks": lambda: [(c["name"] + ("k=v,..." if c["name"].endswith(":") else ""), c["doc"], c)
                              for c in catalog["callbacks"]],  # fmt: skip
    }
    for g in show if a.what == "all" else [a.what]:
        print(f"{g}:")
        for name, doc, entry in show[g]():
            print(f"  {name:22s} {doc}")
            for line in settings_lines(entry):
                print(line)
    return 0


SUITES_DIR = Path(__file__).parent / "suites"


def _suite_summary(name: str) -> str:
    """A suite file's opening comment, whole, on one line."""
    import itertools

    lines = (SUITES_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
    return " ".join(line.lstrip("#").strip() for line in itertools.takewhile(lambda x: x.startswith("#"), lines))


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
    extra = []
    if not a.quiet:
        from .progress import ProgressLine

        extra.append(ProgressLine())
    final = run_trial(spec, a.out, options, callbacks=extra)
    if final["status"] != "done":
        print(f"trial failed: {final.get('reason')}", file=sys.stderr)
        return 1
    rec = final["record"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, indent=1))
    if not a.no_mlflow:
        from .tracking import Tracker, ui_command

        run_id = Tracker(a.out, "shiftbench-trials").mirror_trial(a.out)
        print(f"MLflow run {run_id}; dashboard: {ui_command(a.out)}", file=sys.stderr)
    return 0


def cmd_sweep(a) -> int:
    from .config import SweepSpec, add_dataset_options, load_suite

    overrides = {
        "methods": a.methods, "test_envs": _parse_test_envs(a.test_envs), "n_hparams": a.n_hparams,
        "n_seeds": a.n_seeds, "steps": a.steps, "eval_every": a.eval_every, "name": a.name,
        "callbacks": a.callbacks,
    }  # fmt: skip
    extra = parse_kv(a.option, "--option")  # laid over every dataset's options; the sweep is resolved once
    if a.suite:
        sweep = load_suite(a.suite, options=extra, **overrides)
    else:
        if not a.methods:
            raise UserError("--datasets needs --methods (or use --suite)")
        raw = {k: v for k, v in overrides.items() if v is not None}
        raw["datasets"] = a.datasets
        sweep = SweepSpec.from_mapping(add_dataset_options(raw, extra, "command line"), where="command line")
    if a.workers <= 0:
        raise UserError(f"--workers must be positive (got {a.workers})")
    from .launchers import from_args

    launcher = from_args(a)  # also exports --tracking-uri as MLFLOW_TRACKING_URI
    return _sweep_and_print(sweep, a.out, a.workers, _run_options(a), not a.no_mlflow, not a.no_progress, launcher,
                            pack=a.pack)


def _sweep_and_print(sweep, out: Path, workers: int, options, track: bool, progress: bool, launcher=None,
                     pack: str | int = "off") -> int:
    from .sweep import run_sweep

    def announce(n: int) -> None:
        print(f"sweep {sweep.name}: {n} trials -> {out}  (hash {sweep.hash[:12]})", file=sys.stderr)

    counts = run_sweep(sweep, out, workers=workers, options=options, progress=progress, track=track,
                       launcher=launcher, announce=announce, pack=pack)
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
    _report(a.runs, a.out, se_ddof=a.se_ddof, ci=a.ci)
    print(f"reports written to {a.out} (leaderboard.md/.html/.tex, report.json, metrics.json, plots/)",
          file=sys.stderr)
    return 0


def _report(runs: Path | list[Path], out: Path, se_ddof: int = 1, ci: bool = False) -> None:
    from .records import FINAL, TRIALS, scan_runs
    from .report import build_report

    folders = runs if isinstance(runs, list) else [runs]
    if not any(scan_runs(r).done for r in folders):
        raise UserError(f"{', '.join(map(str, folders))} hold{'s' if len(folders) == 1 else ''} no finished trial "
                        f"(looked for {FINAL} in {TRIALS}/*/)")
    # the tables and sections are computed once, for the files and the terminal; long sections print one line here
    _, text = build_report(folders, out, terminal=True, se_ddof=se_ddof, ci=ci)
    print(text)


def cmd_demo(a) -> int:
    from .config import load_suite

    sweep = load_suite("quickstart")
    _sweep_and_print(sweep, a.out, a.workers, _run_options(a), True, True)
    _report(a.out, a.reports)
    print(f"reports: {a.reports}/leaderboard.md (also .html, .tex, metrics.json, plots/)")
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
