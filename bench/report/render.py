"""Rendering: the leaderboard as Markdown, HTML, LaTeX and CSV text, and the small table helpers sections use."""

from __future__ import annotations

import csv
import html
import io
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from ..records import FINAL
from ..selection import RULES
from .scan import Trial, trial_seed
from .sections import Section, build_sections
from .tables import AVG, DASH, INCOMPLETE, PLOT_RULE, SE_DDOF, Cell, Table, all_tables, headline


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


def summary_counts(trials: Sequence[Trial], failed: Sequence[Mapping[str, Any]], incomplete: int) -> dict[str, int]:
    return {"done": len(trials), "failed": len(failed), "incomplete": int(incomplete),
            "datasets": len({t["spec"].get("dataset") for t in trials}),
            "methods": len({t["spec"].get("method") for t in trials}),
            "seeds": len({str(trial_seed(t)) for t in trials})}


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
    out += [f"- incomplete trials (no {FINAL}, ignored): {counts['incomplete']}"]
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
    out += ["</li>", f"<li>incomplete trials (no {FINAL}, ignored): {counts['incomplete']}</li>"]
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


def csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def leaderboard_csv(tables: Sequence[Table], extra: bool = False) -> str:
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
    return csv_text(rows)


def plot_methods_csv(tables: Sequence[Table]) -> str:
    """One row per method for ``dvc plots``: the mean over datasets of its training-domain-validation headline
    (blank unless every dataset has one, as DomainBed's Avg column), then each dataset's headline."""
    main = [t for t in tables if t.rule == PLOT_RULE and t.metric == "acc"]
    rows: list[list[Any]] = [["method", "accuracy", *[t.dataset for t in main]]]
    for m in sorted({m for t in main for m in t.methods}):
        values = [headline(t, m).mean if m in t.methods and headline(t, m).complete else None for t in main]
        full = values and all(v is not None for v in values)
        rows.append([m, f"{float(np.mean(values)):.4f}" if full else ""]
                    + ["" if v is None else f"{v:.4f}" for v in values])
    return csv_text(rows)


def selections_csv(tables: Sequence[Table]) -> str:
    rows: list[list[Any]] = [["dataset", "rule", "method", "seed", "test_env", "env", "hash", "hparams_seed", "step",
                              "val_acc", "test_acc"]]
    for t in (t for t in tables if t.metric == "acc"):  # extra-metric tables repeat the same selections
        names = dict(zip(t.envs, t.env_names))
        for (m, seed, env), s in sorted(t.selections.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])):
            rows.append([t.dataset, t.rule, m, seed, env, names[env], s.hash, s.hparams_seed, s.step,
                         f"{s.val_acc:.6f}", f"{s.test_acc:.6f}"])
    return csv_text(rows)



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
    return format_markdown(all_tables(trials, se_ddof), summary_counts(trials, failed, incomplete), failed,
                           build_sections(trials), terminal=terminal, ci=ci)


