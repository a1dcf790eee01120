"""Writing: every report file into the output folder (through :func:`shiftbench.io.write_file`, the one atomic
writer), report.json and metrics.json, and :func:`build_report`, scan and write in one call."""

from __future__ import annotations

import io
import json
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..io import write_file
from .plots import plot_env_bars, plot_over_steps, safe_name
from .render import (format_html, format_markdown, format_tex, leaderboard_csv, plot_methods_csv, selections_csv,
                     summary_counts)
from .scan import Trial, scan_runs, scan_sweeps
from .sections import Section, build_sections
from .tables import AVG, CI_LEVEL, PLOT_RULE, SE_DDOF, Table, all_tables

METRICS_SCHEMA = "shiftbench.metrics/1"


def _report_dict(tables: Sequence[Table], counts: Mapping[str, int], failed: Sequence[Mapping[str, Any]]) -> dict:
    """What report.json holds (before the sections): every number with its names and titles."""
    datasets: dict[str, Any] = {}
    for t in tables:
        ds = datasets.setdefault(t.dataset, {"envs": {f"env{i}": n for i, n in zip(t.envs, t.env_names)},
                                             "rules": {}})
        methods = {}
        for m in t.methods:
            entry = {}
            for k, name in t.columns():
                c = t.cells[(m, k)]
                entry[AVG if k == AVG else f"env{k}"] = {
                    "name": name, "mean": c.mean, "se": c.se, "ci95_low": c.ci_low, "ci95_high": c.ci_high,
                    "n_seeds": c.n_seeds, "n_trials": c.n_trials, "mark": c.mark,
                    **({"complete": int(c.complete)} if k == AVG else {})}
            methods[m] = entry
        if t.metric == "acc":
            ds["rules"][t.rule] = {"title": t.title, "methods": methods}
        else:  # extra metrics (robust_acc, ...) at the accuracy-selected checkpoint, keyed by metric then rule
            ds.setdefault("extra_metrics", {}).setdefault(t.metric, {})[t.rule] = {"title": t.title,
                                                                                    "methods": methods}
    ddof = tables[0].se_ddof if tables else SE_DDOF
    return {"schema": METRICS_SCHEMA, "unit": "percent", "counts": dict(counts),
            "statistics": {"se_ddof": ddof, "ci_level": CI_LEVEL},
            "failures": [{"hash": str(f.get("hash", "")), "reason": str(f.get("reason", "")), "step": f.get("step")}
                         for f in failed],
            "datasets": datasets}


def numbers_only(obj: Any) -> Any:
    """The numeric leaves of nested dicts, as ``dvc metrics`` compares them: strings, None, booleans, lists and
    non-finite numbers are dropped, and so are keys that are absolute paths (they differ between clones, so
    ``dvc metrics diff`` could never line them up); dicts left empty disappear. None when nothing is left."""
    if isinstance(obj, bool):
        return None
    if isinstance(obj, (int, float)):
        return obj if math.isfinite(obj) else None
    if not isinstance(obj, Mapping):
        return None
    out = {}
    for k, v in obj.items():
        kept = numbers_only(v)
        if kept is not None and not os.path.isabs(str(k)):
            out[str(k)] = kept
    return out or None


def _metrics(report: Mapping[str, Any], sections: Sequence[Section]) -> dict:
    """metrics.json: report.json's counts and cells (same key paths, numbers only), and each section's numbers."""
    out = {"counts": numbers_only(report["counts"]) or {}, "statistics": numbers_only(report["statistics"]) or {},
           "datasets": numbers_only(report["datasets"]) or {}}
    nums = {sec.key: numbers_only(sec.numbers if sec.numbers is not None else sec.metrics) for sec in sections}
    if any(v is not None for v in nums.values()):
        out["sections"] = {k: v for k, v in nums.items() if v is not None}
    return out


def _plot_atomic(plot: Any, target: Path, *args: Any) -> None:
    buf = io.BytesIO()
    plot(*args, buf)
    write_file(target, buf.getvalue())


def _links(trials: Sequence[Trial], out: Path) -> dict[str, str]:
    """Trial hash -> its folder relative to ``out`` (URL-quoted, ending in ``/``), for the HTML cells."""
    base = out.resolve()
    links = {}
    for t in trials:
        if t.get("dir"):
            rel = Path(os.path.relpath(Path(t["dir"]).resolve(), base)).as_posix()
            links[str(t["hash"])] = urllib.parse.quote(rel) + "/"
    return links


@dataclass(frozen=True)
class Written:
    """What :func:`write_files` wrote: report.json's content and the two Markdown forms."""

    report: dict
    markdown: str
    terminal: str


def write_files(trials: Sequence[Trial], out_dir: str | os.PathLike, failed: Sequence[Mapping[str, Any]] = (),
                incomplete: int = 0, plots: bool = True, sweeps: Sequence[Mapping[str, Any]] = (),
                duplicates: int = 0, se_ddof: int = SE_DDOF, ci: bool = False) -> Written:
    """:func:`write_report`, also returning the Markdown (as in leaderboard.md) and its terminal form."""
    tables = all_tables(trials, se_ddof)  # checks se_ddof before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = summary_counts(trials, failed, incomplete)
    if len(sweeps) > 1:
        counts.update(sweeps=len(sweeps), duplicates=int(duplicates))
    sections = build_sections(trials)
    report = _report_dict(tables, counts, failed)
    if len(sweeps) > 1:
        report["sweeps"] = [dict(s) for s in sweeps]
    if sections:
        report["sections"] = {sec.key: sec.metrics for sec in sections}
    for sec in sections:
        for rel, data in sec.files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            write_file(out / rel, data)
    kw = {"sweeps": sweeps, "duplicates": duplicates, "ci": ci}
    markdown = format_markdown(tables, counts, failed, sections, **kw)
    terminal = format_markdown(tables, counts, failed, sections, terminal=True, details=str(out / "leaderboard.md"),
                               **kw)
    write_file(out / "leaderboard.md", markdown)
    write_file(out / "leaderboard.html", format_html(tables, counts, failed, sections, _links(trials, out), **kw))
    write_file(out / "leaderboard.tex", format_tex(tables, ci))
    write_file(out / "leaderboard.csv", leaderboard_csv(tables))
    write_file(out / "leaderboard_extra.csv", leaderboard_csv(tables, extra=True))
    write_file(out / "plot_methods.csv", plot_methods_csv(tables))
    write_file(out / "selections.csv", selections_csv(tables))
    write_file(out / "report.json", json.dumps(report, indent=2, sort_keys=False) + "\n")
    write_file(out / "metrics.json", json.dumps(_metrics(report, sections), indent=2, sort_keys=False) + "\n")
    if plots:
        for t in tables:
            if t.rule == PLOT_RULE and t.metric == "acc":
                _plot_atomic(plot_env_bars, out / "plots" / f"accuracy_by_env_{safe_name(t.dataset)}.png", t)
        _plot_atomic(lambda tr, buf: plot_over_steps(tr, buf, se_ddof), out / "plots" / "accuracy_over_steps.png",
                     trials)
    return Written(report, markdown, terminal)


def write_report(trials: Sequence[Trial], out_dir: str | os.PathLike, failed: Sequence[Mapping[str, Any]] = (),
                 incomplete: int = 0, plots: bool = True, se_ddof: int = SE_DDOF, ci: bool = False) -> dict:
    """Writes every leaderboard file, report.json, metrics.json and the plots into ``out_dir`` (see the module
    docstring).

    Args:
        trials: done trials, as :func:`load_trials` returns them.
        out_dir: output folder (created).
        failed: failed-trial dicts (:func:`load_failed`), counted and listed by reason.
        incomplete: number of trials without a done or failed marker (counted only).
        plots: also draw ``plots/*.png``.
        se_ddof: 1 (the sample SE, default) or 0 (DomainBed's printed tables, for side-by-side comparison).
        ci: show each cell's 95% t-interval in the tables (report.json, metrics.json and the CSV always carry it).

    Returns:
        The report dict, as written to report.json (metrics.json holds its numbers).
    """
    return write_files(trials, out_dir, failed, incomplete, plots, se_ddof=se_ddof, ci=ci).report


def build_report(runs_dir: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 plots: bool = True, terminal: bool = False, se_ddof: int = SE_DDOF,
                 ci: bool = False) -> tuple[dict, str]:
    """Scans ``runs_dir`` (one folder, or several: :func:`scan_sweeps`) and writes the report into ``out_dir``.

    Args:
        runs_dir: see :func:`scan_runs`; a list or tuple of folders makes one report over all of them.
        out_dir: see :func:`write_report`.
        plots: also draw ``plots/*.png``.
        terminal: return the terminal form of the leaderboard (long sections as one line each) instead of
            leaderboard.md's text.
        se_ddof, ci: as for :func:`write_report`.

    Returns:
        (report dict as in report.json, Markdown leaderboard text).
    """
    dirs = list(runs_dir) if isinstance(runs_dir, (list, tuple)) else [runs_dir]
    scan = scan_sweeps(dirs) if len(dirs) > 1 else scan_runs(dirs[0])
    # A done trial whose files cannot be parsed is unusable; it is listed with the failures so nobody misses it.
    failed = scan.failed + [{"hash": Path(u["dir"]).name, "dir": u["dir"], "reason": f"unreadable: {u['reason']}",
                             "step": None} for u in scan.unreadable]
    w = write_files(scan.done, out_dir, failed=failed, incomplete=len(scan.incomplete), plots=plots,
                    sweeps=scan.sweeps, duplicates=scan.duplicates, se_ddof=se_ddof, ci=ci)
    return w.report, w.terminal if terminal else w.markdown
