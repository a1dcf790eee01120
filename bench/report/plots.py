"""Plots: the per-environment bar charts and the accuracy-over-steps panels, and the figure helpers sections use.

Figures are bare matplotlib ``Figure`` objects on an Agg canvas (:func:`new_figure`): no pyplot state, no backend
switch for the caller.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..records import env_key, held_out_envs
from .scan import Trial, trial_row
from .tables import SE_DDOF, Table, standard_error

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


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "dataset"


def new_figure(width: float, height: float, layout: str | None = None) -> Any:
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
    fig = new_figure(width_in, 4.0, layout="constrained")
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
                by_ds[str(t["spec"].get("dataset", "?"))][trial_row(t)][int(r.get("step", 0))].append(100.0 * v)
    names = sorted(by_ds) or ["(no trials)"]
    styles = {m: series_style(i) for i, m in enumerate(sorted({m for d in by_ds.values() for m in d}))}
    panel_in = 4.8
    fig = new_figure(panel_in * len(names), 4.0, layout="constrained")
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


