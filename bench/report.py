"""Leaderboards from trial records: load done trials, apply every selection rule, write tables, plots and metrics.

The report reads only the trial folders (docs/records.md) and knows nothing of training. Tables follow DomainBed
(Gulrajani & Lopez-Paz, ICLR 2021): one per (dataset, selection rule), rows = methods, columns = test environments
and "Avg"; a cell is the test accuracy of the selected checkpoint in percent, mean ± standard error over trial seeds
with SE = 100 · std / √n (numpy's default ddof=0, as DomainBed's ``collect_results``). "Avg" averages the
environments per seed, over the seeds that have a selection for every environment, then takes mean ± SE.

Files written by :func:`write_report` into ``out_dir``:

- ``leaderboard.md``, ``leaderboard.html`` (standalone), ``leaderboard.tex`` (booktabs tabulars)
- ``leaderboard.csv`` (long form: dataset, rule, method, env, mean, se, n_seeds, n_trials)
- ``selections.csv`` (which trial, draw and step each rule picked per seed and test environment)
- ``leaderboard_extra.csv`` (the extra-metric tables below, long form with a ``metric`` column)
- ``metrics.json`` (the same numbers, machine-readable, stable keys)
- ``plots/accuracy_by_env_<dataset>.png`` and ``plots/accuracy_over_steps.png``
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .selection import RULES, Record, held_out_envs, rule_title

Trial = dict[str, Any]
AVG = "avg"
"""Key of the average column in metrics.json and :class:`Table` cells."""
PLOT_RULE = "training_domain"
"""The selection rule behind the per-environment bar charts."""
DASH = "–"


@dataclass(frozen=True)
class Section:
    """An extra part of the report contributed by another module (drift statistics, attestations, ...).

    Attributes:
        key: stable key of the section in metrics.json.
        title: heading.
        markdown: body in Markdown (also printed to the terminal).
        html: body in HTML (escaped by the contributor).
        metrics: machine-readable content for metrics.json.
        files: extra files to write, relative path -> text or bytes.
    """

    key: str
    title: str
    markdown: str
    html: str
    metrics: Any = None
    files: Mapping[str, str | bytes] = field(default_factory=dict)


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
    """

    done: list[Trial] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)


def _trial_dirs(runs_dir: Path) -> list[Path]:
    if (runs_dir / "spec.json").is_file():
        return [runs_dir]
    base = runs_dir / "trials" if (runs_dir / "trials").is_dir() else runs_dir
    return sorted(p for p in base.iterdir() if p.is_dir() and (p / "spec.json").is_file())


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path.name} line {n}: {e.msg}") from None
    return out


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
            meta = _read_json(d / "spec.json")
        except (OSError, ValueError) as e:
            scan.unreadable.append({"dir": str(d), "reason": f"spec.json: {e}"})
            continue
        trial_hash = str(meta.get("hash") or d.name)
        if (d / "final.json").is_file():
            try:
                final = _read_json(d / "final.json")
                records = _read_jsonl(d / "results.jsonl")
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
        elif (d / "failed.json").is_file():
            try:
                info = _read_json(d / "failed.json")
            except (OSError, ValueError) as e:
                info = {"reason": f"failed.json unreadable: {e}"}
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


# ------------------------------------------------------------------------------------------------------- computation


@dataclass(frozen=True)
class Cell:
    """One leaderboard cell.

    Attributes:
        mean: mean test accuracy in percent over seeds, None when no seed has a selection.
        se: standard error in percent (100 · std / √n, ddof=0), None with mean.
        n_seeds: seeds behind the number.
        n_trials: done trials the rule considered for those seeds (all hyperparameter draws).
    """

    mean: float | None
    se: float | None
    n_seeds: int
    n_trials: int

    def text(self) -> str:
        """``"72.3 ± 1.2"`` or the dash for an empty cell."""
        return DASH if self.mean is None else f"{self.mean:.1f} ± {self.se:.1f}"


@dataclass
class Table:
    """One (dataset, rule) leaderboard.

    Attributes:
        dataset: dataset name.
        rule: selection-rule name (a key of RULES).
        envs: test-environment indices, the columns before "Avg".
        env_names: display names of ``envs``.
        methods: row names, sorted.
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

    @property
    def title(self) -> str:
        return rule_title(self.rule) if self.metric == "acc" else f"{rule_title(self.rule)}: {self.metric}"

    def columns(self) -> list[tuple[Any, str]]:
        """(key, display name) of every column after "Method"."""
        return list(zip(self.envs, self.env_names)) + [(AVG, "Avg")]


def _cell(values: Sequence[float], n_trials: int) -> Cell:
    if not values:
        return Cell(None, None, 0, 0)
    a = np.asarray(values, dtype=float)
    return Cell(float(a.mean()), float(a.std() / math.sqrt(len(a))), len(a), n_trials)


def _env_names(trials: Sequence[Trial], envs: Sequence[int]) -> list[str]:
    names: list = next((t["env_names"] for t in trials if isinstance(t.get("env_names"), list)), [])
    return [str(names[i]) if i < len(names) else f"env{i}" for i in envs]


def _seed(trial: Trial) -> Any:
    return trial["spec"].get("seed", 0)


def _groups(trials: Sequence[Trial]) -> dict[str, dict[str, dict[Any, list[Trial]]]]:
    """dataset -> method -> seed -> trials."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for t in trials:
        out[str(t["spec"].get("dataset", "?"))][str(t["spec"].get("method", "?"))][_seed(t)].append(t)
    return out


def _metric_value(records: Mapping[tuple[str, Any], Record], sel: Any, env: int, metric: str) -> float | None:
    """``env{env}_in_<metric>`` of the record the selection points at (trial hash and step), in percent."""
    if metric == "acc":
        return 100.0 * sel.test_acc
    v = records.get((sel.hash, sel.step), {}).get(f"env{env}_in_{metric}")
    return 100.0 * float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


_EXTRA_METRIC = re.compile(r"^env\d+_in_(\w+_acc)$")


def extra_metrics(trials: Sequence[Trial]) -> list[str]:
    """Accuracy-like metrics besides ``acc`` in the trials' records (``robust_acc``, ``worst_group_acc``, ...):
    every ``<m>`` of a key ``env{i}_in_<m>`` ending in ``_acc``, sorted."""
    return sorted({m.group(1) for t in trials for r in t.get("records", []) for k in r
                   if (m := _EXTRA_METRIC.match(k))})


def compute_tables(trials: Sequence[Trial], rules: Sequence[str] | None = None, metric: str = "acc") -> list[Table]:
    """Applies every selection rule to every (dataset, method, seed, test env) and aggregates over seeds.

    Args:
        trials: done trials, as :func:`load_trials` returns them.
        rules: rule names to use (default: all of RULES, in registration order).
        metric: what the cells report: ``acc`` (the rule's own test accuracy) or another record metric, read as
            ``env{i}_in_<metric>`` at the checkpoint the rule selected by accuracy; seeds whose selected record lacks
            it are left out of that cell.

    Returns:
        Tables sorted by dataset, then rule order.
    """
    return _tables(trials, rules, [metric])[metric]


def all_tables(trials: Sequence[Trial]) -> list[Table]:
    """The accuracy tables, then one table per (extra metric, dataset, rule) that has at least one number; every
    rule selects once, for all metrics."""
    extra = extra_metrics(trials)
    by_metric = _tables(trials, None, ["acc", *extra])
    return by_metric["acc"] + [t for m in extra for t in by_metric[m]
                               if any(c.mean is not None for c in t.cells.values())]


def _tables(trials: Sequence[Trial], rules: Sequence[str] | None, metrics: Sequence[str]) -> dict[str, list[Table]]:
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
                out[metric].append(_table(dataset, rule_name, envs, names, by_method, picks, records, metric))
    return out


def _table(dataset: str, rule_name: str, envs: list[int], names: list[str], by_method: Mapping[str, Any],
           picks: Mapping[tuple[str, Any, int], tuple[Any, set[str]]], records: Mapping[tuple[str, Any], Record],
           metric: str) -> Table:
    """One table: the cells of ``metric`` at the rule's picks, mean ± SE over seeds."""
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
            cells[(method, env)] = _cell(per_env[env], per_env_trials[env])
        full = [s for s in seed_accs if len(seed_accs[s]) == len(envs)]
        cells[(method, AVG)] = _cell([float(np.mean([seed_accs[s][e] for e in envs])) for s in full],
                                     len(set().union(*(seed_pools[s] for s in full))) if full else 0)
    return Table(dataset, rule_name, envs, names, sorted(by_method), cells, selections, metric)


# --------------------------------------------------------------------------------------------------------- rendering


def _table_blurb(t: Table) -> str:
    if t.metric == "acc":
        return _rule_blurb(t.rule)
    return (f"{t.metric} (%) of the test environment's in split, at the checkpoint and draw this rule selects (the "
            f"selections of its accuracy table)")


def _rule_blurb(rule_name: str) -> str:
    doc = (RULES[rule_name].__doc__ or "").strip().splitlines()
    return doc[0].strip() if doc else ""


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


INTRO = ("Test accuracy (%) on the held-out environment of each column, for the checkpoint the selection rule picks; "
         "mean ± standard error over trial seeds (SE = 100·std/√n, ddof=0, as in DomainBed). "
         "n = done trials the rule considered (all hyperparameter draws of those seeds). "
         "Avg = per-seed mean over the environments, over seeds with a selection for every environment. "
         f"{DASH} = nothing to select.")


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_cell(c: Cell) -> str:
    return c.text() if c.mean is None else f"{c.text()} (n={c.n_trials})"


def _seed_note(t: Table) -> str:
    counts = sorted({c.n_seeds for c in t.cells.values() if c.mean is not None})
    if not counts:
        return "no selections"
    return f"seeds per cell: {counts[0]}" if len(counts) == 1 else f"seeds per cell: {counts[0]}–{counts[-1]}"


def format_markdown(tables: Sequence[Table], counts: Mapping[str, int],
                    failed: Sequence[Mapping[str, Any]] = (), sections: Sequence[Section] = ()) -> str:
    """The leaderboard as Markdown with padded columns (readable in a terminal too).

    Args:
        tables: from :func:`compute_tables`.
        counts: from the run summary (done, failed, incomplete, ...).
        failed: failed-trial dicts with ``reason`` and ``hash``.

    Returns:
        The Markdown text, ending in a newline.
    """
    out = ["# shiftbench leaderboard", "", INTRO, ""]
    for t in tables:
        if _seed_note(t) == "no selections":
            hint = " (it needs trials holding out pairs of environments: test_envs each+pairs)" if (
                t.rule == "leave_one_domain_out") else ""
            out += [f"## {t.dataset} — {t.title}", "", f"No selections{hint}.", ""]
            continue
        out += [f"## {t.dataset} — {t.title}", "", f"{_table_blurb(t)} ({_seed_note(t)})", ""]
        header = ["Method"] + [_md_escape(n) for _, n in t.columns()]
        rows = [[_md_escape(m)] + [_md_cell(t.cells[(m, k)]) for k, _ in t.columns()] for m in t.methods]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
        out += [fmt(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [fmt(r) for r in rows] + [""]
    if not tables:
        out += ["No done trials.", ""]
    for sec in sections:
        out += [f"## {sec.title}", "", sec.markdown.rstrip(), ""]
    out += ["## Run summary", "",
            f"- done trials: {counts['done']} (datasets: {counts['datasets']}, methods: {counts['methods']}, "
            f"seeds: {counts['seeds']})",
            f"- failed trials: {counts['failed']}"]
    for reason, n, hashes in _failure_lines(failed):
        shown = ", ".join(hashes[:5]) + (", …" if len(hashes) > 5 else "")
        out.append(f"  - {_md_escape(reason)}: {n} ({shown})")
    out += [f"- incomplete trials (no final.json, ignored): {counts['incomplete']}", ""]
    return "\n".join(out)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:72em;
color:#222;padding:0 1em}h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}p.note{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.3em .8em;text-align:right;border-bottom:1px solid #ddd}
th{border-bottom:2px solid #444}td:first-child,th:first-child{text-align:left}tr:hover td{background:#f5f5f5}
sup.n{color:#888;font-size:.7em;margin-left:.2em}td.avg,th.avg{border-left:1px solid #bbb}"""


def format_html(tables: Sequence[Table], counts: Mapping[str, int], failed: Sequence[Mapping[str, Any]] = (),
                sections: Sequence[Section] = ()) -> str:
    """The leaderboard as one standalone HTML page (inline CSS, no external assets)."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>shiftbench leaderboard</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>shiftbench leaderboard</h1>", f'<p class="note">{e(INTRO)}</p>']
    for t in tables:
        out += [f"<h2>{e(t.dataset)} — {e(t.title)}</h2>", f'<p class="note">{e(_table_blurb(t))} '
                f"({e(_seed_note(t))})</p>", "<table>", "<thead><tr><th>Method</th>"
                + "".join(f'<th{" class=avg" if k == AVG else ""}>{e(n)}</th>' for k, n in t.columns())
                + "</tr></thead>", "<tbody>"]
        for m in t.methods:
            tds = []
            for k, _ in t.columns():
                c = t.cells[(m, k)]
                cls = ' class="avg"' if k == AVG else ""
                if c.mean is None:
                    tds.append(f"<td{cls}>{DASH}</td>")
                else:
                    tip = f"{c.n_seeds} seeds, {c.n_trials} trials"
                    tds.append(f'<td{cls}>{e(c.text())}<sup class="n" title="{tip}">n={c.n_trials}</sup></td>')
            out.append(f"<tr><td>{e(m)}</td>{''.join(tds)}</tr>")
        out += ["</tbody></table>"]
    for sec in sections:
        out += [f"<h2>{e(sec.title)}</h2>", sec.html]
    out += ["<h2>Run summary</h2>", "<ul>",
            f"<li>done trials: {counts['done']} (datasets: {counts['datasets']}, methods: {counts['methods']}, "
            f"seeds: {counts['seeds']})</li>", f"<li>failed trials: {counts['failed']}"]
    lines = _failure_lines(failed)
    if lines:
        out.append("<ul>" + "".join(f"<li>{e(r)}: {n} <code>{e(', '.join(h[:5]))}</code></li>" for r, n, h in lines)
                   + "</ul>")
    out += ["</li>", f"<li>incomplete trials (no final.json, ignored): {counts['incomplete']}</li>", "</ul>",
            "</body></html>", ""]
    return "\n".join(out)


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    """Escapes LaTeX's special characters in plain text."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in s)


def format_tex(tables: Sequence[Table]) -> str:
    """The leaderboard as LaTeX ``table`` floats with booktabs tabulars (needs ``\\usepackage{booktabs}``)."""
    out = ["% shiftbench leaderboard: needs \\usepackage{booktabs}",
           "% test accuracy (%), mean $\\pm$ SE over trial seeds; superscript = trials behind the cell", ""]
    for t in tables:
        cols = t.columns()
        out += ["\\begin{table}[ht]", "\\centering",
                f"\\caption{{{tex_escape(t.dataset)}: {tex_escape(t.title)}. Test accuracy (\\%), mean $\\pm$ SE "
                f"over seeds; superscript: trials behind the cell.}}",
                f"\\begin{{tabular}}{{l{'c' * len(cols)}}}", "\\toprule",
                " & ".join(["\\textbf{Method}"] + [tex_escape(n) for _, n in cols]) + " \\\\", "\\midrule"]
        for m in t.methods:
            row = [tex_escape(m)]
            for k, _ in cols:
                c = t.cells[(m, k)]
                row.append("--" if c.mean is None else
                           f"${c.mean:.1f} \\pm {c.se:.1f}$\\textsuperscript{{\\tiny {c.n_trials}}}")
            out.append(" & ".join(row) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def _metrics(tables: Sequence[Table], counts: Mapping[str, int], failed: Sequence[Mapping[str, Any]]) -> dict:
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
                    "name": name, "mean": c.mean, "se": c.se, "n_seeds": c.n_seeds, "n_trials": c.n_trials}
            methods[m] = entry
        if t.metric == "acc":
            ds["rules"][t.rule] = {"title": t.title, "methods": methods}
        else:  # extra metrics (robust_acc, ...) at the accuracy-selected checkpoint, keyed by metric then rule
            ds.setdefault("extra_metrics", {}).setdefault(t.metric, {})[t.rule] = {"title": t.title,
                                                                                    "methods": methods}
    return {"schema": METRICS_SCHEMA, "unit": "percent", "counts": dict(counts),
            "failures": [{"hash": str(f.get("hash", "")), "reason": str(f.get("reason", "")), "step": f.get("step")}
                         for f in failed],
            "datasets": datasets}


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _leaderboard_csv(tables: Sequence[Table], extra: bool = False) -> str:
    """Accuracy tables (or, with ``extra``, the extra-metric tables with a leading ``metric`` column)."""
    head = ["dataset", "rule", "method", "env", "mean", "se", "n_seeds", "n_trials"]
    rows: list[list[Any]] = [["metric"] + head if extra else head]
    for t in tables:
        if (t.metric != "acc") != extra:
            continue
        for m in t.methods:
            for k, name in t.columns():
                c = t.cells[(m, k)]
                rows.append(([t.metric] if extra else []) + [
                    t.dataset, t.rule, m, name, "" if c.mean is None else f"{c.mean:.4f}",
                    "" if c.se is None else f"{c.se:.4f}", c.n_seeds, c.n_trials])
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


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


def _new_figure(width: float, height: float) -> Any:
    # A bare Figure with an Agg canvas: no pyplot state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_env_bars(table: Table, path: Path) -> None:
    """Grouped bar chart: test accuracy per environment (and Avg) per method, error bars = SE over seeds."""
    cols = table.columns()
    n = max(len(table.methods), 1)
    fig = _new_figure(max(5.0, 1.2 * len(cols) * max(1, n / 2)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / n
    x = np.arange(len(cols))
    for i, m in enumerate(table.methods):
        cells = [table.cells[(m, k)] for k, _ in cols]
        means = [np.nan if c.mean is None else c.mean for c in cells]
        errs = [0.0 if c.se is None else c.se for c in cells]
        ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels([name for _, name in cols])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{table.dataset}: {table.title}, mean ± SE over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_over_steps(trials: Sequence[Trial], path: Path) -> None:
    """One panel per dataset: the test environment's "in" accuracy against step, mean ± SE over trials per method.

    Only trials that hold out a single environment are drawn (the leave-one-domain-out pairs are not test runs).
    """
    by_ds: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for t in trials:
        envs = held_out_envs(t)
        if len(envs) != 1:
            continue
        key = f"env{envs[0]}_in_acc"
        for r in t.get("records", []):
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_ds[str(t["spec"].get("dataset", "?"))][str(t["spec"].get("method", "?"))][int(r.get("step", 0))] \
                    .append(100.0 * v)
    names = sorted(by_ds) or ["(no trials)"]
    fig = _new_figure(max(5.0, 4.5 * len(names)), 3.8)
    for i, ds in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for m, by_step in sorted(by_ds.get(ds, {}).items()):
            steps = sorted(by_step)
            vals = [np.asarray(by_step[s]) for s in steps]
            mean = np.array([v.mean() for v in vals])
            se = np.array([v.std() / math.sqrt(len(v)) for v in vals])
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=m)
            ax.fill_between(steps, mean - se, mean + se, alpha=0.2, color=line.get_color())
        ax.set_title(f"{ds}: test-env accuracy vs step, mean ± SE over trials", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("test-env in-split accuracy (%)")
        ax.grid(alpha=0.3)
        if ds in by_ds:
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")


# ------------------------------------------------------------------------------------------------------------ public


def _atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _plot_atomic(plot: Any, target: Path, *args: Any) -> None:
    buf = io.BytesIO()
    plot(*args, buf)
    _atomic_write(target, buf.getvalue())


def leaderboard_text(trials: Sequence[Trial], failed: Sequence[Mapping[str, Any]] = (), incomplete: int = 0) -> str:
    """The Markdown leaderboard (what leaderboard.md holds), for printing to a terminal.

    Args:
        trials: done trials, as :func:`load_trials` returns them.
        failed: failed-trial dicts (:func:`load_failed`), listed by reason in the run summary.
        incomplete: number of trials without a done or failed marker.

    Returns:
        The text.
    """
    return format_markdown(all_tables(trials), _summary_counts(trials, failed, incomplete), failed,
                           build_sections(trials))


def write_report(trials: Sequence[Trial], out_dir: str | os.PathLike, failed: Sequence[Mapping[str, Any]] = (),
                 incomplete: int = 0, plots: bool = True) -> dict:
    """Writes every leaderboard file, the metrics and the plots into ``out_dir`` (see the module docstring).

    Args:
        trials: done trials, as :func:`load_trials` returns them.
        out_dir: output folder (created).
        failed: failed-trial dicts (:func:`load_failed`), counted and listed by reason.
        incomplete: number of trials without a done or failed marker (counted only).
        plots: also draw ``plots/*.png``.

    Returns:
        The metrics dict, as written to metrics.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = all_tables(trials)
    counts = _summary_counts(trials, failed, incomplete)
    sections = build_sections(trials)
    metrics = _metrics(tables, counts, failed)
    if sections:
        metrics["sections"] = {sec.key: sec.metrics for sec in sections}
    for sec in sections:
        for rel, data in sec.files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(out / rel, data)
    _atomic_write(out / "leaderboard.md", format_markdown(tables, counts, failed, sections))
    _atomic_write(out / "leaderboard.html", format_html(tables, counts, failed, sections))
    _atomic_write(out / "leaderboard.tex", format_tex(tables))
    _atomic_write(out / "leaderboard.csv", _leaderboard_csv(tables))
    _atomic_write(out / "leaderboard_extra.csv", _leaderboard_csv(tables, extra=True))
    _atomic_write(out / "selections.csv", _selections_csv(tables))
    _atomic_write(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    if plots:
        for t in tables:
            if t.rule == PLOT_RULE and t.metric == "acc":
                _plot_atomic(plot_env_bars, out / "plots" / f"accuracy_by_env_{_safe(t.dataset)}.png", t)
        _plot_atomic(plot_over_steps, out / "plots" / "accuracy_over_steps.png", trials)
    return metrics


def build_report(runs_dir: str | os.PathLike, out_dir: str | os.PathLike, plots: bool = True) -> tuple[dict, str]:
    """Scans ``runs_dir`` and writes the report into ``out_dir``.

    Args:
        runs_dir: see :func:`scan_runs`.
        out_dir: see :func:`write_report`.
        plots: also draw ``plots/*.png``.

    Returns:
        (metrics dict, Markdown leaderboard text).
    """
    scan = scan_runs(runs_dir)
    # A done trial whose files cannot be parsed is unusable; it is listed with the failures so nobody misses it.
    failed = scan.failed + [{"hash": Path(u["dir"]).name, "dir": u["dir"], "reason": f"unreadable: {u['reason']}",
                             "step": None} for u in scan.unreadable]
    metrics = write_report(scan.done, out_dir, failed=failed, incomplete=len(scan.incomplete), plots=plots)
    return metrics, Path(out_dir, "leaderboard.md").read_text(encoding="utf-8")
