"""Aggregation: the selection rules applied to every (dataset, method, seed, test env), cells and their statistics.

Tables follow DomainBed (Gulrajani & Lopez-Paz, ICLR 2021): one per (dataset, selection rule), rows = methods,
columns = test environments and "Avg"; a cell is the test accuracy of the selected checkpoint in percent, mean ±
standard error over trial seeds, with a t-based 95% interval (the statistics are in :mod:`shiftbench.report`'s
docstring).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..records import env_key, held_out_envs, parse_env_key
from ..selection import RULES, Record, rule_title
from .scan import Trial, trial_row, trial_seed

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
    from ..errors import UserError

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


def cell(values: Sequence[float], n_trials: int, ddof: int = SE_DDOF) -> Cell:
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
    return dataclasses.replace(cell(per_seed, n_trials, ddof), mean=mean)


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



def _protocol(trial: Trial) -> int:
    """The trial's :data:`shiftbench.config.PROTOCOL` version (1 for specs written before versions existed)."""
    return int(trial["spec"].get("protocol", 1))


def _groups(trials: Sequence[Trial]) -> dict[str, dict[str, dict[Any, list[Trial]]]]:
    """dataset -> row (method) -> seed -> trials. Where one row's trials come from more than one protocol version,
    the older ones get their own row, ``method (protocol 1)``: a rule never selects among trials whose data seeds
    mean different things."""
    protocols: dict[tuple[str, str], set[int]] = defaultdict(set)
    for t in trials:
        protocols[(str(t["spec"].get("dataset", "?")), trial_row(t))].add(_protocol(t))
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for t in trials:
        ds, row = str(t["spec"].get("dataset", "?")), trial_row(t)
        if _protocol(t) != max(protocols[(ds, row)]):
            row = f"{row} (protocol {_protocol(t)})"
        out[ds][row][trial_seed(t)].append(t)
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
            cells[(method, env)] = cell(per_env[env], per_env_trials[env], se_ddof)
        full = [s for s in seed_accs if len(seed_accs[s]) == len(envs)]
        cells[(method, AVG)] = _avg_cell(
            [cells[(method, e)] for e in envs], [{s for s in seed_accs if e in seed_accs[s]} for e in envs],
            [float(np.mean([seed_accs[s][e] for e in envs])) for s in full],
            len(set().union(*seed_pools.values())) if seed_pools else 0, se_ddof)
    return Table(dataset, rule_name, envs, names, sorted(by_method), cells, selections, metric, se_ddof)

