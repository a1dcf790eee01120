"""Leaderboards from trial records: load done trials, apply every selection rule, write tables, plots and metrics.

The report reads only the trial folders (docs/records.md) and knows nothing of training. Tables follow DomainBed
(Gulrajani & Lopez-Paz, ICLR 2021): one per (dataset, selection rule), rows = methods, columns = test environments
and "Avg"; a cell is the test accuracy of the selected checkpoint in percent, mean ± standard error over trial seeds.

- SE = 100 · s / √n with s the sample standard deviation (ddof = 1, :data:`SE_DDOF`). ``se_ddof=0`` gives numpy's
  default, the convention of DomainBed's printed tables (``collect_results.format_mean``), for side-by-side comparison
  with them; it is √((n − 1) / n) of the ddof = 1 value (0.82 at n = 3).
- The 95% interval (every cell carries it; ``ci=True`` shows it) is t-based: mean ± t(0.975, n − 1) · s / √n with
  s at ddof = 1 whatever ``se_ddof`` says (:func:`t_interval`).
- "Avg" is DomainBed's: the mean of the column means. When every column rests on the same seeds its SE and interval
  come from the per-seed averages; otherwise it is marked incomplete (†): a number without ± when every column has
  one but some rest on fewer seeds, no number when a column is empty.
- Rows are sorted by the headline column (Avg, or the only environment), descending; ties and empty cells keep the
  order of names. In each column the best cell and those within one SE (the best cell's) of it are marked: bold in
  Markdown, HTML and LaTeX, ``mark`` in the CSV.

Files written by :func:`write_report` into ``out_dir``:

- ``leaderboard.md``, ``leaderboard.html`` (standalone; each cell links the trial folders it selected),
  ``leaderboard.tex`` (booktabs tabulars)
- ``leaderboard.csv`` (long form: dataset, rule, method, env, mean, se, n_seeds, n_trials)
- ``selections.csv`` (which trial, draw and step each rule picked per seed and test environment)
- ``leaderboard_extra.csv`` (the extra-metric tables below, long form with a ``metric`` column)
- ``report.json`` (everything above, machine-readable, stable keys: env names, titles, failures, sections)
- ``metrics.json`` (its numbers only, as ``dvc metrics show`` and ``dvc metrics diff`` read them: no strings, no
  lists, no keys built from paths, so two clones' files line up key by key)
- ``plot_methods.csv`` (one row per method: the headline accuracy ``dvc plots`` draws as one bar each)
- ``plots/accuracy_by_env_<dataset>.png`` and ``plots/accuracy_over_steps.png``

Several sweep folders make one report (:func:`scan_sweeps`): a trial found in two folders (same hash) counts once,
and a method whose trials come from more than one sweep gets one row per sweep, labelled ``method (sweep)``.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import math
import os
import re
import textwrap
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .io import write_file
from .records import FAILED, FINAL, RESULTS, SPEC, env_key, held_out_envs, parse_env_key, read_jsonl
from .selection import RULES, Record, rule_title

Trial = dict[str, Any]
AVG = "avg"
"""Key of the average column in metrics.json and :class:`Table` cells."""
PLOT_RULE = "training_domain"
"""The selection rule behind the per-environment bar charts."""
DASH = "–"
INCOMPLETE = "†"
"""Marks an incomplete Avg cell: a column is empty, or rests on other seeds than the rest."""
SE_DDOF = 1
"""Default delta degrees of freedom of the standard error (the sample standard deviation). DomainBed's printed tables
use 0 (numpy's default), which is narrower by √((n − 1) / n); ``se_ddof=0`` reproduces them."""
CI_LEVEL = 0.95
"""Coverage of the t-based interval every cell carries."""


@dataclass(frozen=True)
class Section:
    """An extra part of the report contributed by another module (drift statistics, attestations, ...).

    Attributes:
        key: stable key of the section in report.json and metrics.json.
        title: heading.
        markdown: body in Markdown (leaderboard.md; also printed to the terminal unless ``terminal`` is set).
        html: body in HTML (escaped by the contributor).
        metrics: machine-readable content for report.json.
        files: extra files to write, relative path -> text or bytes.
        terminal: a one-line summary printed to the terminal instead of ``markdown`` (a long table belongs in the
            files, not above the leaderboard); None: the terminal shows ``markdown``.
        numbers: the section's entry in metrics.json (numbers only); None: the numeric leaves of ``metrics``
            (see :func:`numbers_only`).
    """

    key: str
    title: str
    markdown: str
    html: str
    metrics: Any = None
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    terminal: str | None = None
    numbers: Mapping[str, Any] | None = None


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], pad: bool = False) -> str:
    """A Markdown table (``|`` in cells escaped); ``pad`` aligns the columns for reading in a terminal."""
    cells = [[str(v).replace("|", "\\|") for v in r] for r in [header, *rows]]
    widths = [max(len(r[c]) for r in cells) for c in range(len(header))] if pad else [3] * len(header)
    line = lambda r: "| " + " | ".join(v.ljust(w) if pad else v for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in cells[1:]])


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table, every cell escaped."""
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


SECTIONS: dict[str, Any] = {}
"""key -> ``fn(trials) -> Section | None``; modules add theirs with :func:`report_section`."""


def report_section(key: str):
    """Decorator registering a report section builder; it must read only the trials' records and files."""

    def deco(fn):
        if key in SECTIONS and SECTIONS[key] is not fn:
            raise ValueError(f"report section {key!r} is already registered")
        SECTIONS[key] = fn
        return fn

    return deco


def build_sections(trials: Sequence[Trial]) -> list[Section]:
    """Every registered section that has something to say about these trials."""
    import importlib

    for mod in SECTION_MODULES:
        importlib.import_module(mod)
    # a fixed order whatever was imported first: SECTION_MODULES' order, then other modules' in registration order
    rank = {m: i for i, m in enumerate(SECTION_MODULES)}
    builders = sorted(SECTIONS.values(), key=lambda fn: rank.get(fn.__module__, len(rank)))
    return [s for s in (fn(trials) for fn in builders) if s is not None]


SECTION_MODULES: list[str] = ["shiftbench.hooks.drift", "shiftbench.bestofn", "shiftbench.coordination.report",
                              "shiftbench.attest.report"]
"""Modules imported before sections are built (each registers its builders on import), in report order."""
METRICS_SCHEMA = "shiftbench.metrics/1"


# ----------------------------------------------------------------------------------------------------------- loading


@dataclass
class Scan:
    """What a runs folder holds.

    Attributes:
        done: trials with final.json, as dicts: every key of spec.json (at least ``hash``, ``spec``,
            ``env_names``, ``data_version``, ``code_version``, ``task``, None where absent) plus ``records``
            (results.jsonl), ``final`` (final.json) and ``dir`` (the folder).
        failed: trials with failed.json and no final.json: ``{"hash", "dir", "reason", "step", "spec"}``.
        incomplete: folders of trials with neither marker (running or interrupted); ignored by the report.
        unreadable: ``{"dir", "reason"}`` for done trials whose files could not be parsed; ignored by the report.
        sweeps: with several folders (:func:`scan_sweeps`), ``{"label", "dir", "done"}`` per folder, in order.
        duplicates: done trials left out because an earlier folder holds the same trial (same hash).
    """

    done: list[Trial] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    sweeps: list[dict] = field(default_factory=list)
    duplicates: int = 0


def _trial_dirs(runs_dir: Path) -> list[Path]:
    if (runs_dir / SPEC).is_file():
        return [runs_dir]
    base = runs_dir / "trials" if (runs_dir / "trials").is_dir() else runs_dir
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / SPEC).is_file())


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def scan_runs(runs_dir: str | os.PathLike) -> Scan:
    """Sorts the trial folders of a runs folder into done, failed, incomplete and unreadable.

    Args:
        runs_dir: a sweep output folder (with ``trials/``), a folder of trial folders, or one trial folder.

    Returns:
        The scan; done trials are deduplicated by hash (first folder in name order wins).
    """
    scan = Scan()
    root = Path(runs_dir)
    if not root.is_dir():
        return scan
    seen: set[str] = set()
    for d in _trial_dirs(root):
        try:
            meta = _read_json(d / SPEC)
        except (OSError, ValueError) as e:
            scan.unreadable.append({"dir": str(d), "reason": f"{SPEC}: {e}"})
            continue
        trial_hash = str(meta.get("hash") or d.name)
        if (d / FINAL).is_file():
            try:
                final = _read_json(d / FINAL)
                records = read_jsonl(d / RESULTS)
            except (OSError, ValueError) as e:
                scan.unreadable.append({"dir": str(d), "reason": str(e)})
                continue
            if not records and isinstance(final.get("record"), dict):
                records = [final["record"]]
            if trial_hash in seen:
                continue
            seen.add(trial_hash)
            trial: Trial = {k: meta.get(k) for k in ("env_names", "data_version", "code_version", "task")}
            trial.update(meta)  # spec.json in full, whatever else the trainer adds
            trial.update({"hash": trial_hash, "spec": meta.get("spec") or {}, "records": records, "final": final,
                          "dir": str(d)})
            scan.done.append(trial)
        elif (d / FAILED).is_file():
            try:
                info = _read_json(d / FAILED)
            except (OSError, ValueError) as e:
                info = {"reason": f"{FAILED} unreadable: {e}"}
            scan.failed.append({"hash": trial_hash, "dir": str(d), "reason": str(info.get("reason", "unknown")),
                                "step": info.get("step"), "spec": meta.get("spec", {})})
        else:
            scan.incomplete.append(str(d))
    return scan


def load_trials(runs_dir: str | os.PathLike) -> list[Trial]:
    """The done trials (with final.json) of a runs folder; see :func:`scan_runs` for the accepted layouts."""
    return scan_runs(runs_dir).done


def load_failed(runs_dir: str | os.PathLike) -> list[dict]:
    """The failed trials (failed.json, no final.json): ``{"hash", "dir", "reason", "step", "spec"}`` each."""
    return scan_runs(runs_dir).failed


def sweep_name(runs_dir: str | os.PathLike) -> str:
    """The sweep's name from its ``sweep.json`` (``spec.name``), else the folder's name."""
    root = Path(runs_dir)
    try:
        name = _read_json(root / "sweep.json").get("spec", {}).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name) if name else (root.resolve().name or str(root))


def sweep_labels(runs_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """One label per folder: the sweep names, or the folder names where sweep names clash, or the paths as given
    where folder names clash too."""
    for label in (sweep_name, lambda d: Path(d).resolve().name, str):
        labels = [label(d) for d in runs_dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in runs_dirs]  # the same folder given twice: its trials count once anyway


def scan_sweeps(runs_dirs: Sequence[str | os.PathLike]) -> Scan:
    """Scans several runs folders into one :class:`Scan` for one leaderboard over all of them.

    A trial done in two folders (same hash) counts once, from the first folder given; a failed or unfinished trial
    that another folder holds done is not counted as failed or incomplete. Each done trial gets ``sweep`` (its
    folder's label, :func:`sweep_labels`) and ``row`` (its leaderboard row): the method name, or ``method (label)``
    when that method's done trials come from more than one folder.

    Args:
        runs_dirs: sweep output folders (each as :func:`scan_runs` accepts), in order of precedence.

    Returns:
        The merged scan, with ``sweeps`` listing ``{"label", "dir", "done"}`` per folder.
    """
    merged = Scan()
    scans = [scan_runs(d) for d in runs_dirs]
    labels = sweep_labels(runs_dirs)
    done: set[str] = set()
    for d, label, scan in zip(runs_dirs, labels, scans):
        kept = 0
        for t in scan.done:
            if t["hash"] in done:
                merged.duplicates += 1
                continue
            done.add(t["hash"])
            merged.done.append({**t, "sweep": label})
            kept += 1
        merged.sweeps.append({"label": label, "dir": str(d), "done": kept})
    failed: set[str] = set()
    done16 = {h[:16] for h in done}  # an unfinished trial's folder is named by its hash's first 16 digits
    for scan in scans:
        for f in scan.failed:
            if f["hash"] not in done and f["hash"] not in failed:
                failed.add(f["hash"])
                merged.failed.append(f)
        merged.incomplete += [i for i in scan.incomplete if Path(i).name not in done16]
        merged.unreadable += scan.unreadable
    sweeps_of: dict[str, set[str]] = defaultdict(set)
    for t in merged.done:
        sweeps_of[_method(t)].add(t["sweep"])
    for t in merged.done:
        t["row"] = f"{_method(t)} ({t['sweep']})" if len(sweeps_of[_method(t)]) > 1 else _method(t)
    return merged


# ------------------------------------------------------------------------------------------------------- computation


def standard_error(values: Sequence[float], ddof: int = SE_DDOF) -> float | None:
    """std(values, ddof) / √n; None for fewer than two values (one seed gives no estimate of the spread)."""
    a = np.asarray(values, dtype=float)
    return float(a.std(ddof=ddof) / math.sqrt(len(a))) if len(a) >= 2 else None


def t_interval(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float] | None:
    """The t-based interval mean ± t((1 + level) / 2, n − 1) · s / √n, s the sample standard deviation (ddof = 1);
    None for fewer than two values. At n = 3 and 95%, t = 4.303."""
    from scipy import stats

    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return None
    half = float(stats.t.ppf((1 + level) / 2, len(a) - 1)) * float(a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()) - half, float(a.mean()) + half


def check_se_ddof(ddof: Any) -> int:
    """0 or 1; anything else is a UserError."""
    from .errors import UserError

    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise UserError(f"se_ddof must be 0 (DomainBed's printed tables) or 1 (the sample SE, default); got {ddof!r}")
    return int(ddof)


@dataclass(frozen=True)
class Cell:
    """One leaderboard cell.

    Attributes:
        mean: mean test accuracy in percent over seeds, None when no seed has a selection; for an Avg cell, the mean
            of the column means.
        se: standard error in percent (100 · std / √n at the table's ``se_ddof``), None with one seed or none.
        n_seeds: seeds behind the number.
        n_trials: done trials the rule considered for those seeds (all hyperparameter draws).
        ci_low, ci_high: the t-based 95% interval (:func:`t_interval`), None below two seeds.
        complete: False for an Avg cell whose columns are not all there on the same seeds (shown with †).
        mark: ``"best"`` (the best cell of its column), ``"within_1se"`` (within the best cell's SE of it) or ``""``.
    """

    mean: float | None
    se: float | None
    n_seeds: int
    n_trials: int
    ci_low: float | None = None
    ci_high: float | None = None
    complete: bool = True
    mark: str = ""

    def text(self, ci: bool = False) -> str:
        """``"72.3 ± 1.2"`` (with ``ci``: ``"72.3 ± 1.2 [68.9, 75.7]"``); ``"72.3"`` from one seed (an SE over one
        seed is no estimate, not "± 0.0"); the dash for an empty cell; † after an incomplete Avg."""
        if not self.complete:
            return (DASH if self.mean is None else f"{self.mean:.1f}") + INCOMPLETE
        if self.mean is None:
            return DASH
        if self.n_seeds <= 1 or self.se is None:
            return f"{self.mean:.1f}"
        interval = f" [{self.ci_low:.1f}, {self.ci_high:.1f}]" if ci and self.ci_low is not None else ""
        return f"{self.mean:.1f} ± {self.se:.1f}{interval}"


@dataclass
class Table:
    """One (dataset, rule) leaderboard.

    Attributes:
        dataset: dataset name.
        rule: selection-rule name (a key of RULES).
        envs: test-environment indices, the columns before "Avg".
        env_names: display names of ``envs``.
        methods: row names in leaderboard order: by the headline cell (:func:`headline`), descending; ties and
            rows without a number keep name order.
        cells: (method, env index or AVG) -> Cell.
        selections: (method, seed, env index) -> the rule's Selection (missing where it returned None).
    """

    dataset: str
    rule: str
    envs: list[int]
    env_names: list[str]
    methods: list[str]
    cells: dict[tuple[str, Any], Cell]
    selections: dict[tuple[str, Any, int], Any]
    metric: str = "acc"
    """The record metric in the cells (``env{i}_in_<metric>``); the rule always selects by accuracy."""
    se_ddof: int = SE_DDOF
    """The ddof of the cells' SE."""

    @property
    def title(self) -> str:
        return rule_title(self.rule) if self.metric == "acc" else f"{rule_title(self.rule)}: {self.metric}"

    def columns(self) -> list[tuple[Any, str]]:
        """(key, display name) of every column after "Method"; "Avg" only with two or more test environments (the
        average of one would repeat it)."""
        return list(zip(self.envs, self.env_names)) + ([(AVG, "Avg")] if len(self.envs) > 1 else [])

    def trials_of(self, method: str, env: int) -> list[tuple[Any, str]]:
        """(seed, trial hash) of the checkpoints behind cell (method, env), one per seed, in seed order."""
        return sorted(((seed, s.hash) for (m, seed, e), s in self.selections.items() if m == method and e == env),
                      key=lambda x: str(x[0]))


def _cell(values: Sequence[float], n_trials: int, ddof: int = SE_DDOF) -> Cell:
    if not values:
        return Cell(None, None, 0, 0)
    ci = t_interval(values)
    return Cell(float(np.mean(values)), standard_error(values, ddof), len(values), n_trials,
                *(ci if ci is not None else (None, None)))


def _avg_cell(columns: Sequence[Cell], seeds: Sequence[set], per_seed: Sequence[float], n_trials: int,
              ddof: int) -> Cell:
    """DomainBed's Avg: the mean of the column means. Complete when every column rests on the same seeds (then its
    SE and interval come from the per-seed averages ``per_seed``, whose mean is the same number); else marked."""
    if all(c.mean is None for c in columns):
        return Cell(None, None, 0, 0)
    if any(c.mean is None for c in columns):
        return Cell(None, None, 0, 0, complete=False)
    mean = float(np.mean([c.mean for c in columns]))
    if any(s != seeds[0] for s in seeds):
        return Cell(mean, None, min(c.n_seeds for c in columns), n_trials, complete=False)
    return dataclasses.replace(_cell(per_seed, n_trials, ddof), mean=mean)


def headline(t: "Table", method: str) -> Cell:
    """A table's one number per method: its Avg cell, or its only environment's cell."""
    return t.cells[(method, AVG if len(t.envs) > 1 else t.envs[0])] if t.envs else Cell(None, None, 0, 0)


def _order_and_mark(t: "Table") -> "Table":
    """Sorts the rows by the headline cell, descending (a stable sort over names), and marks in every column the
    best cell and the cells within the best cell's SE of it. Incomplete cells are neither best nor marked."""
    def key(m: str) -> tuple[int, float]:
        c = headline(t, m)
        return (0, -c.mean) if c.mean is not None else (1, 0.0)

    t.methods = sorted(sorted(t.methods), key=key)
    for k, _ in t.columns():
        ranked = [m for m in t.methods if t.cells[(m, k)].mean is not None and t.cells[(m, k)].complete]
        if len(ranked) < 2:
            continue
        best = max(t.cells[(m, k)].mean for m in ranked)
        top = next(t.cells[(m, k)] for m in ranked if t.cells[(m, k)].mean == best)
        floor = best - (top.se or 0.0) - 1e-9
        for m in ranked:
            c = t.cells[(m, k)]
            mark = "best" if c.mean >= best - 1e-9 else "within_1se" if c.mean >= floor else ""
            t.cells[(m, k)] = dataclasses.replace(c, mark=mark)
    return t


def _env_names(trials: Sequence[Trial], envs: Sequence[int]) -> list[str]:
    names: list = next((t["env_names"] for t in trials if isinstance(t.get("env_names"), list)), [])
    return [str(names[i]) if i < len(names) else f"env{i}" for i in envs]


def _seed(trial: Trial) -> Any:
    return trial["spec"].get("seed", 0)


def _method(trial: Trial) -> str:
    return str(trial["spec"].get("method", "?"))


def _row(trial: Trial) -> str:
    """The leaderboard row: the method, or ``method (sweep)`` set by :func:`scan_sweeps`."""
    return str(trial.get("row") or _method(trial))


def _protocol(trial: Trial) -> int:
    """The trial's :data:`shiftbench.config.PROTOCOL` version (1 for specs written before versions existed)."""
    return int(trial["spec"].get("protocol", 1))


def _groups(trials: Sequence[Trial]) -> dict[str, dict[str, dict[Any, list[Trial]]]]:
    """dataset -> row (method) -> seed -> trials. Where one row's trials come from more than one protocol version,
    the older ones get their own row, ``method (protocol 1)``: a rule never selects among trials whose data seeds
    mean different things."""
    protocols: dict[tuple[str, str], set[int]] = defaultdict(set)
    for t in trials:
        protocols[(str(t["spec"].get("dataset", "?")), _row(t))].add(_protocol(t))
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for t in trials:
        ds, row = str(t["spec"].get("dataset", "?")), _row(t)
        if _protocol(t) != max(protocols[(ds, row)]):
            row = f"{row} (protocol {_protocol(t)})"
        out[ds][row][_seed(t)].append(t)
    return out


def _metric_value(records: Mapping[tuple[str, Any], Record], sel: Any, env: int, metric: str) -> float | None:
    """``env{env}_in_<metric>`` of the record the selection points at (trial hash and step), in percent."""
    if metric == "acc":
        return 100.0 * sel.test_acc
    v = records.get((sel.hash, sel.step), {}).get(env_key(env, "in", metric))
    return 100.0 * float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def extra_metrics(trials: Sequence[Trial]) -> list[str]:
    """Accuracy-like metrics besides ``acc`` in the trials' records (``robust_acc``, ``worst_group_acc``, ...):
    every ``<m>`` of a key ``env{i}_in_<m>`` ending in ``_acc``, sorted."""
    return sorted({m[2] for t in trials for r in t.get("records", []) for k in r
                   if (m := parse_env_key(k)) and m[1] == "in" and m[2].endswith("_acc") and m[2] != "_acc"})


def compute_tables(trials: Sequence[Trial], rules: Sequence[str] | None = None, metric: str = "acc",
                   se_ddof: int = SE_DDOF) -> list[Table]:
    """Applies every selection rule to every (dataset, method, seed, test env) and aggregates over seeds.

    Args:
        trials: done trials, as :func:`load_trials` returns them.
        rules: rule names to use (default: all of RULES, in registration order).
        metric: what the cells report: ``acc`` (the rule's own test accuracy) or another record metric, read as
            ``env{i}_in_<metric>`` at the checkpoint the rule selected by accuracy; seeds whose selected record lacks
            it are left out of that cell.
        se_ddof: 1 (the sample SE, default) or 0 (DomainBed's printed tables).

    Returns:
        Tables sorted by dataset, then rule order.
    """
    return _tables(trials, rules, [metric], check_se_ddof(se_ddof))[metric]


def all_tables(trials: Sequence[Trial], se_ddof: int = SE_DDOF) -> list[Table]:
    """The accuracy tables, then one table per (extra metric, dataset, rule) that has at least one number; every
    rule selects once, for all metrics."""
    extra = extra_metrics(trials)
    by_metric = _tables(trials, None, ["acc", *extra], check_se_ddof(se_ddof))
    return by_metric["acc"] + [t for m in extra for t in by_metric[m]
                               if any(c.mean is not None for c in t.cells.values())]


def _tables(trials: Sequence[Trial], rules: Sequence[str] | None, metrics: Sequence[str],
            se_ddof: int = SE_DDOF) -> dict[str, list[Table]]:
    """metric -> tables (sorted by dataset, then rule order), from one pass of the selection rules."""
    out: dict[str, list[Table]] = {m: [] for m in metrics}
    for dataset, by_method in sorted(_groups(trials).items()):
        ds_trials = [t for m in by_method.values() for s in m.values() for t in s]
        envs = sorted({e for t in ds_trials for e in held_out_envs(t)})
        names = _env_names(ds_trials, envs)
        records = {(str(t["hash"]), r.get("step")): r for t in ds_trials for r in t.get("records", [])}
        for rule_name in rules or list(RULES):
            rule = RULES[rule_name]
            # (method, seed, env) -> (selection, hashes of the trials it chose among)
            picks: dict[tuple[str, Any, int], tuple[Any, set[str]]] = {}
            for method, by_seed in by_method.items():
                for seed, group in by_seed.items():
                    for env in envs:
                        sel = rule(group, env)
                        if sel is not None:
                            pool = rule.pool(group, env)  # type: ignore[attr-defined]
                            picks[(method, seed, env)] = (sel, {str(t["hash"]) for t in pool})
            for metric in metrics:
                table = _table(dataset, rule_name, envs, names, by_method, picks, records, metric, se_ddof)
                out[metric].append(_order_and_mark(table))
    return out


def _table(dataset: str, rule_name: str, envs: list[int], names: list[str], by_method: Mapping[str, Any],
           picks: Mapping[tuple[str, Any, int], tuple[Any, set[str]]], records: Mapping[tuple[str, Any], Record],
           metric: str, se_ddof: int = SE_DDOF) -> Table:
    """One table: the cells of ``metric`` at the rule's picks, mean ± SE over seeds (rows not yet ordered)."""
    cells: dict = {}
    selections: dict = {}
    for method, by_seed in sorted(by_method.items()):
        per_env: dict[int, list[float]] = defaultdict(list)
        per_env_trials: dict[int, int] = defaultdict(int)
        seed_accs: dict[Any, dict[int, float]] = defaultdict(dict)
        seed_pools: dict[Any, set[str]] = defaultdict(set)
        for seed in sorted(by_seed, key=str):
            for env in envs:
                if (method, seed, env) not in picks:
                    continue
                sel, pool = picks[(method, seed, env)]
                value = _metric_value(records, sel, env, metric)
                if value is None:
                    continue
                selections[(method, seed, env)] = sel
                per_env[env].append(value)
                per_env_trials[env] += len(pool)
                seed_accs[seed][env] = value
                seed_pools[seed].update(pool)
        for env in envs:
            cells[(method, env)] = _cell(per_env[env], per_env_trials[env], se_ddof)
        full = [s for s in seed_accs if len(seed_accs[s]) == len(envs)]
        cells[(method, AVG)] = _avg_cell(
            [cells[(method, e)] for e in envs], [{s for s in seed_accs if e in seed_accs[s]} for e in envs],
            [float(np.mean([seed_accs[s][e] for e in envs])) for s in full],
            len(set().union(*seed_pools.values())) if seed_pools else 0, se_ddof)
    return Table(dataset, rule_name, envs, names, sorted(by_method), cells, selections, metric, se_ddof)


# --------------------------------------------------------------------------------------------------------- rendering


def _table_blurb(t: Table) -> str:
    if t.metric == "acc":
        return _rule_blurb(t.rule)
    return (f"{t.metric} (%) of the test environment's in split, at the checkpoint and draw this rule selects (the "
            f"selections of its accuracy table)")


def _rule_blurb(rule_name: str) -> str:
    doc = (RULES[rule_name].__doc__ or "").strip().splitlines()
    return doc[0].strip() if doc else ""


MINUS_90 = ("-90%", "−90%")
"""ColoredMNIST's test environment, where the colour agrees with the label in 10% of the examples."""
COLOUR_NOTE = ("{env}: training-domain validation picks colour-reliant models. Both training environments reward the "
               "colour (it agrees with the label in 90% and 80% of their examples), so the checkpoints that score best "
               "on their validation splits follow it, and here it agrees in only 10%: accuracy sits near 10%, below "
               "chance (50%), for every method, as DomainBed found (Gulrajani & Lopez-Paz, ICLR 2021).")


def table_notes(t: Table) -> list[str]:
    """One-line notes under a table, each only where its situation occurs.

    The colour note: a training-domain-validation accuracy table of a colored dataset (ColoredMNIST's protocol)
    whose −90% column has a cell below chance (50% on its binary label), i.e. a model that follows the colour.
    """
    if t.rule != "training_domain" or t.metric != "acc" or "colored" not in t.dataset.lower():
        return []
    return [COLOUR_NOTE.format(env=name) for k, name in t.columns() if name in MINUS_90
            and any(t.cells[(m, k)].mean is not None and t.cells[(m, k)].mean < 50.0 for m in t.methods)]


def _failure_lines(failed: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, list[str]]]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for f in failed:
        by_reason[str(f.get("reason", "unknown"))].append(str(f.get("hash", "?"))[:16])
    return sorted(((r, len(h), h) for r, h in by_reason.items()), key=lambda x: (-x[1], x[0]))


def _summary_counts(trials: Sequence[Trial], failed: Sequence[Mapping[str, Any]], incomplete: int) -> dict[str, int]:
    return {"done": len(trials), "failed": len(failed), "incomplete": int(incomplete),
            "datasets": len({t["spec"].get("dataset") for t in trials}),
            "methods": len({t["spec"].get("method") for t in trials}),
            "seeds": len({str(_seed(t)) for t in trials})}


def _sweep_lines(sweeps: Sequence[Mapping[str, Any]], duplicates: int) -> list[str]:
    """The run summary's lines for a report over several sweep folders (none for one)."""
    if len(sweeps) < 2:
        return []
    shown = ", ".join(f"{s['label']} ({s['dir']}: {s['done']} done)" for s in sweeps)
    dup = f"; {duplicates} trial(s) found in more than one folder counted once" if duplicates else ""
    return [f"sweeps: {shown}{dup}"]


def intro(se_ddof: int = SE_DDOF) -> str:
    """The paragraph above the tables: what a cell, n, Avg, the marks and the order mean."""
    se = ("SE = 100·s/√n, s the sample standard deviation (ddof=1)" if se_ddof == 1 else
          "SE = 100·std/√n with ddof=0, the convention of DomainBed's printed tables (√((n−1)/n) of the sample "
          "SE)")
    return ("Test accuracy (%) on the held-out environment of each column, for the checkpoint the selection rule "
            f"picks; mean ± standard error over trial seeds ({se}); a cell from one seed shows its value alone. "
            "n = done trials the rule considered (all hyperparameter draws of those seeds). "
            "Avg = mean of the column means, as in DomainBed; "
            f"{INCOMPLETE} = incomplete: a column is empty ({DASH}{INCOMPLETE}) or rests on other seeds than the rest "
            "(the mean of the column means, no ±). "
            f"{DASH} = nothing to select.")


INTRO = intro()
"""The intro at the default ddof."""


def caption(t: "Table", ci: bool = False) -> str:
    """The one caption line of a table: its statistics, the interval when shown, its order and its marks."""
    se = "SE at ddof=1" if t.se_ddof == 1 else "SE at ddof=0 (DomainBed's printing)"
    interval = ("; [a, b] = 95% t-interval, mean ± t(0.975, n−1)·s/√n (s at ddof=1)" if ci else "")
    return (f"Mean ± {se} over seeds{interval}. Rows sorted by "
            f"{'Avg' if len(t.envs) > 1 else 'the test environment'}, descending; bold: the best cell of each "
            "column and the cells within one SE (the best cell's) of it.")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_cell(c: Cell, ci: bool = False) -> str:
    text = c.text(ci) if c.mean is None else f"{c.text(ci)} (n={c.n_trials})"
    return f"**{text}**" if c.mark else text


def _seed_note(t: Table) -> str:
    counts = sorted({c.n_seeds for c in t.cells.values() if c.mean is not None})
    if not counts:
        return "no selections"
    return f"seeds per cell: {counts[0]}" if len(counts) == 1 else f"seeds per cell: {counts[0]}–{counts[-1]}"


def format_markdown(tables: Sequence[Table], counts: Mapping[str, int],
                    failed: Sequence[Mapping[str, Any]] = (), sections: Sequence[Section] = (),
                    terminal: bool = False, details: str | None = None,
                    sweeps: Sequence[Mapping[str, Any]] = (), duplicates: int = 0, ci: bool = False) -> str:
    """The leaderboard as Markdown with padded columns (readable in a terminal too).

    Args:
        tables: from :func:`compute_tables`.
        counts: from the run summary (done, failed, incomplete, ...).
        failed: failed-trial dicts with ``reason`` and ``hash``.
        sections: extra sections, after the tables.
        terminal: the terminal form: a section with a ``terminal`` line shows only that line, in the run summary.
        details: where the full form is (e.g. ``reports/leaderboard.md``), named after each such line.
        sweeps: ``Scan.sweeps`` of a report over several folders (listed in the run summary).
        duplicates: ``Scan.duplicates``.
        ci: show each cell's 95% interval.

    Returns:
        The Markdown text, ending in a newline.
    """
    out = ["# shiftbench leaderboard", "", intro(tables[0].se_ddof if tables else SE_DDOF), ""]
    for t in tables:
        if _seed_note(t) == "no selections":
            hint = " (it needs trials holding out pairs of environments: test_envs each+pairs)" if (
                t.rule == "leave_one_domain_out") else ""
            out += [f"## {t.dataset} — {t.title}", "", f"No selections{hint}.", ""]
            continue
        out += [f"## {t.dataset} — {t.title}", "", f"{_table_blurb(t)} ({_seed_note(t)})", "", caption(t, ci), ""]
        header = ["Method"] + [_md_escape(n) for _, n in t.columns()]
        rows = [[_md_escape(m)] + [_md_cell(t.cells[(m, k)], ci) for k, _ in t.columns()] for m in t.methods]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
        out += [fmt(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [fmt(r) for r in rows] + [""]
        out += [f"Note: {n}" for n in table_notes(t)] + ([""] if table_notes(t) else [])
    if not tables:
        out += ["No done trials.", ""]
    short = [sec for sec in sections if terminal and sec.terminal]
    for sec in sections:
        if sec not in short:
            out += [f"## {sec.title}", "", sec.markdown.rstrip(), ""]
    out += ["## Run summary", "",
            f"- done trials: {counts['done']} (datasets: {counts['datasets']}, methods: {counts['methods']}, "
            f"seeds: {counts['seeds']})",
            f"- failed trials: {counts['failed']}"]
    for reason, n, hashes in _failure_lines(failed):
        shown = ", ".join(hashes[:5]) + (", …" if len(hashes) > 5 else "")
        out.append(f"  - {_md_escape(reason)}: {n} ({shown})")
    out += [f"- incomplete trials (no final.json, ignored): {counts['incomplete']}"]
    out += [f"- {line}" for line in _sweep_lines(sweeps, duplicates)]
    out += [f"- {sec.terminal}" + (f"; details in {details}" if details else "") for sec in short]
    return "\n".join(out + [""])


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}p.note{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:.5em 0}caption{caption-side:bottom;color:#555;font-size:.85em;text-align:left}
th,td{padding:.3em .8em;text-align:right;border-bottom:1px solid #ddd}
th{border-bottom:2px solid #444}td:first-child,th:first-child{text-align:left}tr:hover td{background:#f5f5f5}
sup.n{color:#888;font-size:.7em;margin-left:.2em}td.avg,th.avg{border-left:1px solid #bbb}
span.trials{font-size:.7em;margin-left:.3em}span.trials a{color:#0072B2;margin-left:.15em}"""


def _trial_links(t: Table, method: str, env: int, links: Mapping[str, str]) -> str:
    """Links to the trial folders behind a cell, one per seed (``s0``, ``s1``, ...), titled by the trial hash."""
    e = html.escape
    tags = [f'<a href="{e(links[h])}" title="{e(h[:16])}">s{e(str(seed))}</a>'
            for seed, h in t.trials_of(method, env) if h in links]
    return f'<span class="trials">{"".join(tags)}</span>' if tags else ""


def format_html(tables: Sequence[Table], counts: Mapping[str, int], failed: Sequence[Mapping[str, Any]] = (),
                sections: Sequence[Section] = (), links: Mapping[str, str] | None = None,
                sweeps: Sequence[Mapping[str, Any]] = (), duplicates: int = 0, ci: bool = False) -> str:
    """The leaderboard as one standalone HTML page (inline CSS, no external assets).

    Args:
        tables, counts, failed, sections, sweeps, duplicates, ci: as for :func:`format_markdown`.
        links: trial hash -> href of its folder (relative to the page); each environment cell then links the
            trials its number rests on, one per seed.
    """
    e = html.escape
    links = links or {}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>shiftbench leaderboard</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>shiftbench leaderboard</h1>",
           f'<p class="note">{e(intro(tables[0].se_ddof if tables else SE_DDOF))}</p>']
    for t in tables:
        out += [f"<h2>{e(t.dataset)} — {e(t.title)}</h2>", f'<p class="note">{e(_table_blurb(t))} '
                f"({e(_seed_note(t))})</p>", f"<table><caption>{e(caption(t, ci))}</caption>",
                "<thead><tr><th>Method</th>"
                + "".join(f'<th{" class=avg" if k == AVG else ""}>{e(n)}</th>' for k, n in t.columns())
                + "</tr></thead>", "<tbody>"]
        for m in t.methods:
            tds = []
            for k, _ in t.columns():
                c = t.cells[(m, k)]
                cls = ' class="avg"' if k == AVG else ""
                if c.mean is None:
                    tds.append(f"<td{cls}>{e(c.text())}</td>")
                else:
                    tip = f"{c.n_seeds} seeds, {c.n_trials} trials"
                    runs = "" if k == AVG else _trial_links(t, m, k, links)
                    value = f"<b>{e(c.text(ci))}</b>" if c.mark else e(c.text(ci))
                    tds.append(f'<td{cls}>{value}<sup class="n" title="{tip}">n={c.n_trials}</sup>{runs}</td>')
            out.append(f"<tr><td>{e(m)}</td>{''.join(tds)}</tr>")
        out += ["</tbody></table>"] + [f'<p class="note"><b>Note:</b> {e(n)}</p>' for n in table_notes(t)]
    for sec in sections:
        out += [f"<h2>{e(sec.title)}</h2>", sec.html]
    out += ["<h2>Run summary</h2>", "<ul>",
            f"<li>done trials: {counts['done']} (datasets: {counts['datasets']}, methods: {counts['methods']}, "
            f"seeds: {counts['seeds']})</li>", f"<li>failed trials: {counts['failed']}"]
    lines = _failure_lines(failed)
    if lines:
        out.append("<ul>" + "".join(f"<li>{e(r)}: {n} <code>{e(', '.join(h[:5]))}</code></li>" for r, n, h in lines)
                   + "</ul>")
    out += ["</li>", f"<li>incomplete trials (no final.json, ignored): {counts['incomplete']}</li>"]
    out += [f"<li>{e(line)}</li>" for line in _sweep_lines(sweeps, duplicates)]
    out += ["</ul>", "</body></html>", ""]
    return "\n".join(out)


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    """Escapes LaTeX's special characters in plain text."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in s)


def _tex_cell(c: Cell, ci: bool = False) -> str:
    if c.mean is None:
        return "--" + ("\\textsuperscript{\\dag}" if not c.complete else "")
    if not c.complete:
        return f"${c.mean:.1f}$\\textsuperscript{{\\dag}}"
    if c.n_seeds <= 1 or c.se is None:
        value = f"{c.mean:.1f}"
    else:
        interval = f"\\;[{c.ci_low:.1f}, {c.ci_high:.1f}]" if ci and c.ci_low is not None else ""
        value = f"{c.mean:.1f} \\pm {c.se:.1f}{interval}"
    if c.mark:
        value = f"\\mathbf{{{value}}}"
    return f"${value}$\\textsuperscript{{\\tiny {c.n_trials}}}"


def _tex_text(text: str) -> str:
    """Plain text with the caption's few math signs, for LaTeX."""
    return tex_escape(text).replace("±", "$\\pm$").replace("√", "$\\surd$").replace("−", "-")


def format_tex(tables: Sequence[Table], ci: bool = False) -> str:
    """The leaderboard as LaTeX ``table`` floats with booktabs tabulars (needs ``\\usepackage{booktabs}``)."""
    out = ["% shiftbench leaderboard: needs \\usepackage{booktabs}",
           "% test accuracy (%), mean $\\pm$ SE over trial seeds; superscript = trials behind the cell", ""]
    for t in tables:
        cols = t.columns()
        dag = "; \\dag: incomplete Avg" if len(t.envs) > 1 else ""
        out += ["\\begin{table}[ht]", "\\centering",
                f"\\caption{{{tex_escape(t.dataset)}: {tex_escape(t.title)}. Test accuracy (\\%). "
                f"{_tex_text(caption(t, ci))} Superscript: trials behind the cell{dag}.}}",
                f"\\begin{{tabular}}{{l{'c' * len(cols)}}}", "\\toprule",
                " & ".join(["\\textbf{Method}"] + [tex_escape(n) for _, n in cols]) + " \\\\", "\\midrule"]
        for m in t.methods:
            out.append(" & ".join([tex_escape(m)] + [_tex_cell(t.cells[(m, k)], ci) for k, _ in cols]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}"]
        out += [f"\\par\\smallskip{{\\footnotesize {tex_escape(n)}}}" for n in table_notes(t)]
        out += ["\\end{table}", ""]
    return "\n".join(out)


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


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _leaderboard_csv(tables: Sequence[Table], extra: bool = False) -> str:
    """Accuracy tables (or, with ``extra``, the extra-metric tables with a leading ``metric`` column)."""
    head = ["dataset", "rule", "method", "env", "mean", "se", "ci95_low", "ci95_high", "n_seeds", "n_trials", "mark"]
    rows: list[list[Any]] = [["metric"] + head if extra else head]
    for t in tables:
        if (t.metric != "acc") != extra:
            continue
        for m in t.methods:
            for k, name in t.columns():
                c = t.cells[(m, k)]
                num = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
                rows.append(([t.metric] if extra else []) + [
                    t.dataset, t.rule, m, name, num(c.mean), num(c.se), num(c.ci_low), num(c.ci_high), c.n_seeds,
                    c.n_trials, c.mark or ("incomplete" if not c.complete else "")])
    return _csv(rows)


def _plot_methods_csv(tables: Sequence[Table]) -> str:
    """One row per method for ``dvc plots``: the mean over datasets of its training-domain-validation headline
    (blank unless every dataset has one, as DomainBed's Avg column), then each dataset's headline."""
    main = [t for t in tables if t.rule == PLOT_RULE and t.metric == "acc"]
    rows: list[list[Any]] = [["method", "accuracy", *[t.dataset for t in main]]]
    for m in sorted({m for t in main for m in t.methods}):
        values = [headline(t, m).mean if m in t.methods and headline(t, m).complete else None for t in main]
        full = values and all(v is not None for v in values)
        rows.append([m, f"{float(np.mean(values)):.4f}" if full else ""]
                    + ["" if v is None else f"{v:.4f}" for v in values])
    return _csv(rows)


def _selections_csv(tables: Sequence[Table]) -> str:
    rows: list[list[Any]] = [["dataset", "rule", "method", "seed", "test_env", "env", "hash", "hparams_seed", "step",
                              "val_acc", "test_acc"]]
    for t in (t for t in tables if t.metric == "acc"):  # extra-metric tables repeat the same selections
        names = dict(zip(t.envs, t.env_names))
        for (m, seed, env), s in sorted(t.selections.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
            rows.append([t.dataset, t.rule, m, seed, env, names[env], s.hash, s.hparams_seed, s.step,
                         f"{s.val_acc:.6f}", f"{s.test_acc:.6f}"])
    return _csv(rows)


# ------------------------------------------------------------------------------------------------------------- plots

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
"""The Okabe–Ito palette (Okabe & Ito, "Color Universal Design", 2008): told apart with every common colour-vision
deficiency. Blue first: the yellow is weak on white, so it comes late."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")


def series_style(i: int) -> dict[str, Any]:
    """Colour, marker, line style and bar hatch of the i-th series: the colour and the marker or hatch both differ
    between neighbours, so a series reads without colour (greyscale print, colour-vision deficiency) too."""
    return {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[i % len(LINESTYLES)], "hatch": HATCHES[i % len(HATCHES)]}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


def _new_figure(width: float, height: float, layout: str | None = None) -> Any:
    # A bare Figure with an Agg canvas: no pyplot state, no backend switch for the caller. layout="constrained"
    # keeps titles, labels and an outside legend inside the canvas.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _wrap(title: str, width_in: float, fontsize: float = 10) -> str:
    """The title wrapped to an axes ``width_in`` inches wide (DejaVu Sans: about 0.6 · fontsize points a character,
    rounded up to be safe)."""
    return textwrap.fill(title, max(20, int(width_in * 72 / (0.6 * fontsize))))


def plot_env_bars(table: Table, path: Path) -> None:
    """Grouped bar chart: test accuracy per environment (and Avg) per method, error bars = SE over seeds."""
    cols = table.columns()
    n = max(len(table.methods), 1)
    width_in = max(5.5, 1.0 * len(cols) * max(1, n / 2) + 2.0)
    fig = _new_figure(width_in, 4.0, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / n
    x = np.arange(len(cols))
    for i, m in enumerate(table.methods):
        cells = [table.cells[(m, k)] for k, _ in cols]
        means = [np.nan if c.mean is None else c.mean for c in cells]
        errs = [0.0 if c.se is None else c.se for c in cells]
        st = series_style(i)
        ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=m, color=st["color"],
               hatch=st["hatch"], edgecolor="white" if not st["hatch"] else "#333333", linewidth=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels([name for _, name in cols])
    ax.set_xlabel("test environment (held out)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(_wrap(f"{table.dataset}: {table.title}, mean ± SE over seeds", width_in - 2.5), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png")


def plot_over_steps(trials: Sequence[Trial], path: Path, se_ddof: int = SE_DDOF) -> None:
    """One panel per dataset: the test environment's "in" accuracy against step, mean ± SE over trials per method.

    Only trials that hold out a single environment are drawn (the leave-one-domain-out pairs are not test runs). A
    method keeps its colour, marker and line style in every panel.
    """
    by_ds: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for t in trials:
        envs = held_out_envs(t)
        if len(envs) != 1:
            continue
        key = env_key(envs[0], "in", "acc")
        for r in t.get("records", []):
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_ds[str(t["spec"].get("dataset", "?"))][_row(t)][int(r.get("step", 0))].append(100.0 * v)
    names = sorted(by_ds) or ["(no trials)"]
    styles = {m: series_style(i) for i, m in enumerate(sorted({m for d in by_ds.values() for m in d}))}
    panel_in = 4.8
    fig = _new_figure(panel_in * len(names), 4.0, layout="constrained")
    for i, ds in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for m, by_step in sorted(by_ds.get(ds, {}).items()):
            steps = sorted(by_step)
            vals = [np.asarray(by_step[s]) for s in steps]
            mean = np.array([v.mean() for v in vals])
            se = np.array([standard_error(v, se_ddof) or 0.0 for v in vals])
            st = styles[m]
            ax.plot(steps, mean, marker=st["marker"], linestyle=st["linestyle"], color=st["color"], markersize=4,
                    label=m)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.15, color=st["color"], linewidth=0)
        ax.set_title(_wrap(f"{ds}: test-environment accuracy by step, mean ± SE over trials", panel_in - 1.0),
                     fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("test-env in-split accuracy (%)")
        ax.grid(alpha=0.3)
        if ds in by_ds:
            ax.legend(fontsize=8, loc="best", title="method", title_fontsize=8)
    fig.savefig(path, format="png")


# ------------------------------------------------------------------------------------------------------------ public


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


def leaderboard_text(trials: Sequence[Trial], failed: Sequence[Mapping[str, Any]] = (), incomplete: int = 0,
                     terminal: bool = False, se_ddof: int = SE_DDOF, ci: bool = False) -> str:
    """The Markdown leaderboard (what leaderboard.md holds), for printing to a terminal.

    Args:
        trials: done trials, as :func:`load_trials` returns them.
        failed: failed-trial dicts (:func:`load_failed`), listed by reason in the run summary.
        incomplete: number of trials without a done or failed marker.
        terminal: the short form: sections with a one-line terminal summary show only that line.
        se_ddof: 1 (the sample SE, default) or 0 (DomainBed's printed tables).
        ci: show each cell's 95% t-interval.

    Returns:
        The text.
    """
    return format_markdown(all_tables(trials, se_ddof), _summary_counts(trials, failed, incomplete), failed,
                           build_sections(trials), terminal=terminal, ci=ci)


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
    counts = _summary_counts(trials, failed, incomplete)
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
    write_file(out / "leaderboard.csv", _leaderboard_csv(tables))
    write_file(out / "leaderboard_extra.csv", _leaderboard_csv(tables, extra=True))
    write_file(out / "plot_methods.csv", _plot_methods_csv(tables))
    write_file(out / "selections.csv", _selections_csv(tables))
    write_file(out / "report.json", json.dumps(report, indent=2, sort_keys=False) + "\n")
    write_file(out / "metrics.json", json.dumps(_metrics(report, sections), indent=2, sort_keys=False) + "\n")
    if plots:
        for t in tables:
            if t.rule == PLOT_RULE and t.metric == "acc":
                _plot_atomic(plot_env_bars, out / "plots" / f"accuracy_by_env_{_safe(t.dataset)}.png", t)
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
