"""Leaderboards from trial records: load done trials, apply every selection rule, write tables, plots and metrics.

The report reads only the trial folders (docs/records.md) and knows nothing of training: it imports no trainer,
and the extra sections other plug-ins contribute come from the registry (:data:`shiftbench.registry.SECTIONS`).

Tables follow DomainBed (Gulrajani & Lopez-Paz, ICLR 2021): one per (dataset, selection rule), rows = methods, columns
= test environments and "Avg"; a cell is the test accuracy of the selected checkpoint in percent, mean ± standard
error over trial seeds.

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

The package, one job per module:

- :mod:`.scan`: runs folders -> done / failed / incomplete trials (:func:`scan_runs`, :func:`scan_sweeps`)
- :mod:`.tables`: selection and aggregation into :class:`Table` s of :class:`Cell` s, the statistics
- :mod:`.render`: Markdown, HTML, LaTeX and CSV text (:func:`md_table`, :func:`html_table`, :func:`csv_text`)
- :mod:`.plots`: the PNG figures (:func:`new_figure`, :func:`safe_name`)
- :mod:`.sections`: :class:`Section`, :class:`ReportSection` and :func:`report_section`, the registry glue
- :mod:`.writing`: :func:`write_report`, :func:`build_report`: every file, report.json and metrics.json
"""

from ..registry import SECTIONS
from .plots import new_figure, plot_env_bars, plot_over_steps, safe_name, series_style
from .render import (INTRO, caption, csv_text, format_html, format_markdown, format_tex, html_table, intro,
                     leaderboard_text, md_table, table_notes, tex_escape)
from .scan import Scan, Trial, load_failed, load_trials, scan_runs, scan_sweeps, sweep_labels, sweep_name
from .sections import ReportSection, Section, build_sections, report_section
from .tables import (AVG, CI_LEVEL, DASH, INCOMPLETE, PLOT_RULE, SE_DDOF, Cell, Table, all_tables, cell,
                     check_se_ddof, compute_tables, extra_metrics, headline, standard_error, t_interval)
from .writing import METRICS_SCHEMA, Written, build_report, numbers_only, write_files, write_report

__all__ = ["AVG", "CI_LEVEL", "DASH", "INCOMPLETE", "INTRO", "METRICS_SCHEMA", "PLOT_RULE", "SECTIONS", "SE_DDOF",
           "Cell", "ReportSection", "Scan", "Section", "Table", "Trial", "Written", "all_tables", "build_report",
           "build_sections", "caption", "cell", "check_se_ddof", "compute_tables", "csv_text", "extra_metrics",
           "format_html", "format_markdown", "format_tex", "headline", "html_table", "intro", "leaderboard_text",
           "load_failed", "load_trials", "md_table", "new_figure", "numbers_only", "plot_env_bars", "plot_over_steps",
           "report_section", "safe_name", "scan_runs", "scan_sweeps", "series_style", "standard_error",
           "sweep_labels", "sweep_name", "t_interval", "table_notes", "tex_escape", "write_files", "write_report"]
