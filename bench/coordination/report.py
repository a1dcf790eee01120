"""The coordination part of the report: self-play and cross-play returns per method, and cross-play matrices.

For each coordination dataset, one agent per (method, seed): the trial with the lowest hyperparameter draw (then
the first held-out set). Its final record gives the self-play return (``self_return``), the return with held-out
partners (``env{i}_in_return`` of its test environments) and with training partners (the other environments'
``in`` splits). Cross-play between learners is played here: every pair of those agents (weights from
``model.pt``, at most :data:`MAX_SEEDS` seeds per method) meets in the dataset's game with its evaluation protocol;
a method's cross-play is, per seed, the mean return with the same method's other seeds, then mean ± SE over
seeds. All numbers are returns (each game's optimum is 1.0), mean ± standard error over seeds (ddof = 1; one seed
shows its value alone).

Files: ``plots/crossplay_<dataset>.png`` (the learner matrix, and the partner population's own matrix from
spec.json) and ``coordination/crossplay_<dataset>.csv``.
"""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shiftbench.records import WEIGHTS, env_key, held_out_envs
from shiftbench.report import Section, cell, html_table, md_table, new_figure, report_section, safe_name

MAX_SEEDS = 5
"""Seeds per method in the learner cross-play matrix (each pair is played, so it grows quadratically)."""
COLUMNS = (("self", "self-play"), ("heldout", "held-out partners"), ("train", "training partners"),
           ("crossplay", "cross-play (other seeds)"))  # fmt: skip


def _mean_se(values: Sequence[float]) -> dict[str, Any]:
    c = cell([v for v in values if v is not None and math.isfinite(v)], 0)
    return {"mean": c.mean, "se": c.se, "n": c.n_seeds}


def _text(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "–"
    return f"{entry['mean']:.3f}" if entry["se"] is None else f"{entry['mean']:.3f} ± {entry['se']:.3f}"


def _agents(trials: Sequence[dict]) -> list[dict]:
    """One trial per (method, seed), sorted by method then seed."""
    best: dict[tuple[str, Any], tuple[tuple, dict]] = {}
    for t in trials:
        s = t["spec"]
        key = (str(s.get("method")), s.get("seed", 0))
        rank = (int(s.get("hparams_seed", 0)), list(s.get("test_envs", [])), str(t["hash"]))
        if key not in best or rank < best[key][0]:
            best[key] = (rank, t)
    return [best[k][1] for k in sorted(best, key=lambda k: (k[0], str(k[1])))]


def _returns(trial: dict) -> dict[str, float | None]:
    rec = (trial.get("records") or [trial["final"].get("record", {})])[-1]
    test = held_out_envs(trial)
    n_envs = len(trial.get("env_names") or [])
    train = [i for i in range(n_envs) if i not in test]
    mean = lambda keys: (float(np.mean([rec[k] for k in keys])) if keys and all(k in rec for k in keys)  # noqa: E731
                         else None)
    return {"self": rec.get("self_return"), "heldout": mean([env_key(i, "in", "return") for i in test]),
            "train": mean([env_key(i, "in", "return") for i in train])}  # fmt: skip


def learner_crossplay(agents: Sequence[dict]) -> np.ndarray | None:
    """Returns of every ordered pair of the agents' final networks (None when weights or the game are missing)."""
    from shiftbench.models import build_model
    from shiftbench.registry import DATASETS

    from .world import crossplay

    if not agents:
        return None
    spec = agents[0]["spec"]
    try:
        dcls = DATASETS.get(str(spec["dataset"]))
        options = dcls.resolve_options(spec.get("dataset_options") or {})
        game = dcls.make_game(options)
        loaded = []
        for t in agents:
            s, meta = t["spec"], t.get("dataset") or {}
            model = build_model(s["model"], meta["input_shape"], meta["num_classes"], s["hparams"])
            model.load_state_dict(torch.load(Path(t["dir"]) / WEIGHTS, map_location="cpu", weights_only=True))
            loaded.append((model.eval(), s["hparams"]["learner"]))
    except (OSError, KeyError, RuntimeError, ValueError, NotImplementedError):
        return None
    return crossplay(game, loaded, int(options["eval_episodes"]), bool(options["greedy_eval"])).numpy()


def _label(t: dict) -> str:
    return f"{t['spec'].get('method')}:s{t['spec'].get('seed', 0)}"


def _heatmap(ax: Any, matrix: np.ndarray, labels: Sequence[str] | None, title: str) -> None:
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    if labels is not None and len(labels) <= 40:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
    else:
        ticks = range(0, len(matrix), max(1, len(matrix) // 10))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    if len(matrix) <= 12:
        for i in range(len(matrix)):
            for j in range(len(matrix)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] < 0.5 else "black")  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("partner (seat alternates)", fontsize=8)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_crossplay(dataset: str, matrix: np.ndarray | None, labels: Sequence[str], population: Any) -> bytes:
    """PNG: the learners' cross-play matrix and, when known, the partner population's."""
    panels = [(matrix, labels, f"{dataset}: learners (row with column), return")] if matrix is not None else []
    if population:
        pop = np.asarray(population, dtype=float)
        panels.append((pop, None, f"{dataset}: partner population ({len(pop)} self-play agents)"))
    fig = new_figure(5.5 * max(1, len(panels)), 5.0)
    for k, (m, lab, title) in enumerate(panels):
        _heatmap(fig.add_subplot(1, len(panels), k + 1), m, lab, title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def method_crossplay(matrix: np.ndarray, methods: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """The learner matrix by method: entry (a, b) is the mean return of a's agents with b's over ordered pairs of
    distinct agents (None for a method with one agent against itself). ``methods[i]`` is agent i's method."""
    names = sorted(set(methods))
    out: dict[str, dict[str, float | None]] = {}
    for a in names:
        out[a] = {}
        for b in names:
            vals = [matrix[i, j] for i, ma in enumerate(methods) for j, mb in enumerate(methods)
                    if ma == a and mb == b and i != j]  # fmt: skip
            out[a][b] = float(np.mean(vals)) if vals else None
    return out


def dataset_summary(trials: Sequence[dict]) -> dict[str, Any]:
    """Per-method cells, the learner matrix and its labels for one dataset's trials."""
    agents = _agents(trials)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for t in agents:
        by_method[str(t["spec"].get("method"))].append(t)
    played = [t for m in sorted(by_method) for t in by_method[m][:MAX_SEEDS]]
    matrix = learner_crossplay(played)
    index = {t["hash"]: i for i, t in enumerate(played)}
    methods = {}
    for m, group in sorted(by_method.items()):
        rets = [_returns(t) for t in group]
        cells = {k: _mean_se([r[k] for r in rets]) for k in ("self", "heldout", "train")}
        per_seed = []
        if matrix is not None:
            ids = [index[t["hash"]] for t in group if t["hash"] in index]
            per_seed = [float(np.mean([matrix[i, j] for j in ids if j != i])) for i in ids if len(ids) > 1]
        cells["crossplay"] = _mean_se(per_seed)
        learners = sorted({str(t["spec"].get("hparams", {}).get("learner")) for t in group})
        methods[m] = {**cells, "learner": ",".join(learners), "seeds": len(group)}
    population = next((t.get("dataset", {}).get("population_crossplay") for t in trials
                       if (t.get("dataset") or {}).get("population_crossplay")), None)  # fmt: skip
    pop_stats = None
    if population:
        p = np.asarray(population, dtype=float)
        off = p[~np.eye(len(p), dtype=bool)]
        pop_stats = {"self": float(np.diag(p).mean()), "cross": float(off.mean()) if off.size else None,
                     "agents": len(p)}  # fmt: skip
    baseline = next((t["dataset"]["heldout_baseline"] for t in trials
                     if (t.get("dataset") or {}).get("heldout_baseline") is not None), None)  # fmt: skip
    by_method_matrix = None if matrix is None else method_crossplay(matrix, [str(t["spec"].get("method"))
                                                                                for t in played])  # fmt: skip
    return {"methods": methods, "labels": [_label(t) for t in played],
            "crossplay": None if matrix is None else matrix.round(6).tolist(), "method_crossplay": by_method_matrix,
            "heldout_baseline": baseline, "population": pop_stats, "population_matrix": population}  # fmt: skip


@report_section("coordination", order=40)
def coordination_section(trials: Sequence[dict]) -> Section | None:
    """The coordination table and cross-play plots of every coordination dataset among ``trials``."""
    coord = [t for t in trials if t.get("task") == "coordination"]
    if not coord:
        return None
    by_ds: dict[str, list[dict]] = defaultdict(list)
    for t in coord:
        by_ds[str(t["spec"].get("dataset"))].append(t)
    md, body, metrics, files = [], [], {}, {}
    intro = ("Returns (optimum 1.0), final checkpoint, mean ± SE over seeds; one agent per (method, seed). Self-play: "
             "with a copy of itself. Held-out partners: the test populations' agents, never met in training. "
             "Training partners: the other populations' agents. Cross-play: with the same method's other seeds.")
    md.append(intro)
    body.append(f'<p class="note">{html.escape(intro)}</p>')
    for ds, group in sorted(by_ds.items()):
        s = dataset_summary(group)
        metrics[ds] = {k: v for k, v in s.items() if k != "population_matrix"}
        header = ["Method", "learner"] + [name for _, name in COLUMNS] + ["seeds"]
        rows = [[m, c["learner"]] + [_text(c[k]) for k, _ in COLUMNS] + [str(c["seeds"])]
                for m, c in s["methods"].items()]
        md += ["", f"### {ds}", "", md_table(header, rows)]
        body.append(f"<h3>{html.escape(ds)}</h3>" + html_table(header, rows))
        if s["heldout_baseline"] is not None:
            line = (f"Held-out baseline: a best response to independently seeded self-play partners earns "
                    f"{s['heldout_baseline']:.3f} in expectation (exact, from the game alone), whatever partners it "
                    "trained with.")  # fmt: skip
            md += ["", line]
            body.append(f"<p>{html.escape(line)}</p>")
        if s["method_crossplay"]:
            names = list(s["method_crossplay"])
            cp_header = ["row with column"] + names
            cp_rows = [[a] + ["–" if s["method_crossplay"][a][b] is None else f"{s['method_crossplay'][a][b]:.3f}"
                              for b in names] for a in names]  # fmt: skip
            note = "Cross-play by method: mean return of the row's agents with the column's (distinct agents)."
            md += ["", note, "", md_table(cp_header, cp_rows)]
            body.append(f"<p>{html.escape(note)}</p>" + html_table(cp_header, cp_rows))
        if s["population"]:
            p = s["population"]
            line = (f"Partner population ({p['agents']} self-play agents): self-play {p['self']:.3f}, cross-play "
                    f"{p['cross']:.3f}.")  # fmt: skip
            md += ["", line]
            body.append(f"<p>{html.escape(line)}</p>")
        safe = safe_name(ds)
        matrix = None if s["crossplay"] is None else np.asarray(s["crossplay"])
        if matrix is not None or s["population_matrix"]:
            files[f"plots/crossplay_{safe}.png"] = plot_crossplay(ds, matrix, s["labels"], s["population_matrix"])
            md += ["", f"Cross-play matrix: plots/crossplay_{safe}.png"]
            body.append(f'<p><img src="plots/crossplay_{html.escape(safe)}.png" alt="cross-play matrix of '
                        f'{html.escape(ds)}" style="max-width:100%"></p>')  # fmt: skip
        if matrix is not None:
            lines = ["agent," + ",".join(s["labels"])]
            lines += [f"{lab}," + ",".join(f"{v:.6f}" for v in row) for lab, row in zip(s["labels"], matrix)]
            files[f"coordination/crossplay_{safe}.csv"] = "\n".join(lines) + "\n"
    return Section("coordination", "Coordination: self-play and cross-play", "\n".join(md), "\n".join(body),
                   metrics, files)  # fmt: skip
