"""The ``best_of_n`` trial callback (reward-model over-optimisation) and the report sections of preference workloads.

**Best-of-n** (Gao, Schulman & Hilton, "Scaling Laws for Reward Model Overoptimization", ICML 2023): a policy samples
n responses and keeps the one the learned reward model scores highest; how good is that response by the gold reward,
as n grows? With a reward model that has learnt a spurious cue, the gold reward of the pick can fall with n. The
``best_of_n`` trial callback (``callbacks: [best_of_n]`` in a suite) scores each domain's candidate pool of a dataset
that has one (``spurious_prefs``: 32 candidates per prompt, with gold rewards): at every evaluation it adds the
checkpoint's curves to its record (:func:`curve_key`), so the report shows those of the checkpoint a selection rule
picked; at the end it writes the final model's as ``best_of_n.json`` (also under ``final.json``'s ``best_of_n``).
For n ≤ 32 the expected gold reward of the pick is computed exactly over all n-subsets of a prompt's 32 candidates
(:func:`best_of_n_curve`), the unbiased estimator of Nakano et al., 2021 (WebGPT, appendix), instead of drawing
subsets.

**Report sections** (registered with :func:`shiftbench.report.report_section`, here beside the callback; built only from
trial records and files): for each preference dataset, the checkpoints that training-domain, worst-domain and oracle
selection pick for every (method, seed, test environment), side by side, give per-domain pairwise accuracy (the test
domain's ``in`` split, the training domains' ``out`` splits: nothing evaluated on training data), worst-domain accuracy,
corr(reward, length) on the test domain and on the training domains, the mean margin and corr(reward, gold); then the
best-of-n curves of the training-domain-validation checkpoints per method (that checkpoint's, not the trial's last
step's), as a table and ``plots/best_of_n_<dataset>.png``.
"""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch

from shiftbench.callbacks import Callback
from shiftbench.errors import UserError
from shiftbench.io import write_json
from shiftbench.registry import CALLBACKS
from shiftbench.report import (DASH, Section, compute_tables, html_table, md_table, new_figure, report_section,
                               safe_name, standard_error)

NS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
"""The n of best-of-n."""


def best_of_n_curve(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int] = NS) -> list[float]:
    """Expected gold reward of the candidate with the highest proxy reward among n drawn without replacement from
    each row's M candidates, averaged over rows.

    The candidate of proxy rank i (1 = lowest) is the best of a uniform n-subset with probability
    C(i − 1, n − 1) / C(M, n), so the expectation is exact, not sampled.

    Args:
        proxy: (prompts, M) learned rewards.
        gold: (prompts, M) gold rewards of the same candidates.
        ns: subset sizes, each at most M.

    Returns:
        One mean gold reward per n.
    """
    proxy, gold = np.atleast_2d(proxy), np.atleast_2d(gold)
    m = proxy.shape[1]
    order = np.argsort(proxy, axis=1, kind="stable")
    ranked = np.take_along_axis(gold, order, axis=1).astype(np.float64)
    out = []
    for n in ns:
        if not 1 <= n <= m:
            raise ValueError(f"best-of-{n} needs 1 <= n <= {m} candidates")
        w = np.array([math.comb(i - 1, n - 1) for i in range(1, m + 1)], dtype=np.float64) / math.comb(m, n)
        out.append(float((ranked @ w).mean()))
    return out


@CALLBACKS.register("best_of_n")
class BestOfN(Callback):
    """Trial callback: best-of-n gold-reward curves of the final model on the dataset's candidate pools."""

    @classmethod
    def validate(cls, name: str, dataset_cls: type | None = None) -> None:
        super().validate(name, dataset_cls)
        if dataset_cls is not None and not callable(getattr(dataset_cls, "best_of_n_pools", None)):
            raise UserError(f"callback best_of_n needs a dataset with gold-reward candidate pools (spurious_prefs); "
                            f"{getattr(dataset_cls, 'registry_name', dataset_cls.__name__)} has none")  # fmt: skip

    def curves(self, run) -> dict[str, dict[str, list[float]]]:
        """Per domain: the gold reward, the gold reward's own (oracle) and the length of the current model's picks."""
        model, pools = run.model, run.dataset.best_of_n_pools()
        was_training = model.training
        model.eval()
        domains = {}
        with torch.inference_mode():
            for name, pool in pools.items():
                x = pool["x"]
                flat = x.reshape(-1, *x.shape[2:]).to(run.device)
                chunks = [model(flat[i : i + 4096]).float().squeeze(-1).cpu() for i in range(0, len(flat), 4096)]
                proxy = torch.cat(chunks).numpy().reshape(x.shape[0], x.shape[1])
                gold = np.asarray(pool["gold"])
                domains[name] = {"gold": best_of_n_curve(proxy, gold), "oracle": best_of_n_curve(gold, gold),
                                 "length": best_of_n_curve(proxy, np.asarray(pool["length"]))}  # fmt: skip
        model.train(was_training)
        return domains

    def on_eval(self, run, record) -> None:
        # every checkpoint's curves, so that the report shows those of the checkpoint a selection rule picks
        for name, c in self.curves(run).items():
            for kind in ("gold", "length"):
                record.update({curve_key(name, kind, n): v for n, v in zip(NS, c[kind])})

    def on_end(self, run, final) -> None:
        domains = self.curves(run)
        result = {"n": list(NS), "domains": domains, "env_names": list(domains)}
        write_json(run.dir / "best_of_n.json", result)
        final["best_of_n"] = result


def curve_key(domain: str, kind: str, n: int) -> str:
    """Record key of one point of a checkpoint's best-of-n curve: ``best_of_n_<domain>_<gold|length>_<n>``."""
    return f"best_of_n_{domain}_{kind}_{n}"


# ----------------------------------------------------------------------------------------------------- the report

RULES_SHOWN: dict[str, str] = {"training_domain": "training-domain", "worst_group": "worst-domain",
                               "oracle": "oracle"}  # fmt: skip
"""The selection rules the preference sections show side by side (registry name -> column label). ``worst_group``
scores a checkpoint by its worst training domain's ``out`` accuracy where the records hold no groups: worst-domain
validation, which needs no test data."""


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, standard error (the report's :func:`shiftbench.report.standard_error`: ddof = 1 by default; NaN for one
    value) and count of the finite values."""
    a = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not a:
        return float("nan"), float("nan"), 0
    se = standard_error(a)
    return float(np.mean(a)), float("nan") if se is None else se, len(a)


def _fmt(mean: float, se: float, scale: float = 1.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return DASH
    if not math.isfinite(se):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}"


def _selected(trials: Sequence[dict], rule: str = "training_domain") -> list[tuple[str, str, int, Any, dict, dict]]:
    """(dataset, method, test env, seed, trial, record) of every selection ``rule`` makes: the checkpoint (trial
    and step) the accuracy tables report."""
    by_hash = {str(t["hash"]): t for t in trials}
    out = []
    for table in compute_tables(trials, rules=[rule]):
        for (method, seed, env), sel in sorted(table.selections.items(), key=lambda kv: (kv[0][0], str(kv[0][1]),
                                                                                          kv[0][2])):  # fmt: skip
            trial = by_hash.get(sel.hash)
            record = next((r for r in trial.get("records", []) if r.get("step") == sel.step), None) if trial else None
            if record is not None:
                out.append((table.dataset, method, env, seed, trial, record))
    return out


def preference_rows(trials: Sequence[dict], rule: str = "training_domain") -> dict[str, dict]:
    """Per dataset: env names and, per (method, test env), the mean ± SE over seeds of every preference metric at
    the checkpoints ``rule`` selects."""
    pref = [t for t in trials if t.get("task") == "preference"]
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    names: dict[str, list[str]] = {}
    for dataset, method, env, _seed, trial, rec in _selected(pref, rule):
        env_names = list(trial.get("env_names") or [])
        names.setdefault(dataset, env_names)
        cell = per[dataset][(method, env)]
        keys = {i: f"env{i}_{'in' if i == env else 'out'}" for i in range(len(env_names))}
        accs = [rec.get(f"{k}_acc") for k in keys.values()]
        for i, a in zip(keys, accs):
            cell[f"acc_{i}"].append(a)
        if all(isinstance(a, (int, float)) for a in accs):
            cell["worst"].append(min(accs))
        cell["corr_test"].append(rec.get(f"env{env}_in_length_corr", float("nan")))
        train = [rec.get(f"{keys[i]}_length_corr") for i in keys if i != env]
        cell["corr_train"].append(float(np.mean(train)) if train and None not in train else float("nan"))
        cell["margin_test"].append(rec.get(f"env{env}_in_margin", float("nan")))
        cell["gold_corr_test"].append(rec.get(f"env{env}_in_gold_corr", float("nan")))
    return {ds: {"env_names": names[ds], "cells": {k: {m: _mean_se(v) for m, v in c.items()} for k, c in cells.items()}}
            for ds, cells in per.items()}  # fmt: skip


def _nan3(c: dict, key: str) -> tuple[float, float, int]:
    return c.get(key, (float("nan"), float("nan"), 0))


@report_section("preference", order=20)
def preference_section(trials: Sequence[dict]) -> Section | None:
    """Per-domain and worst-domain pairwise accuracy and the length-bias probe of preference datasets, under the
    training-domain, worst-domain and oracle selection rules side by side."""
    by_rule = {r: preference_rows(trials, r) for r in RULES_SHOWN}
    datasets = sorted({ds for d in by_rule.values() for ds in d})
    if not datasets:
        return None
    md, hl, metrics = [], [], {}
    for ds in datasets:
        envs = next(d[ds]["env_names"] for d in by_rule.values() if ds in d)
        keys = sorted({k for d in by_rule.values() if ds in d for k in d[ds]["cells"]})
        header = ["Method", "Test env"] + [f"acc ({lab})" for lab in RULES_SHOWN.values()] + \
            [f"corr(r,len) ({lab})" for lab in RULES_SHOWN.values()] + ["seeds"]
        rows = []
        for method, env in keys:
            cells = [by_rule[r].get(ds, {}).get("cells", {}).get((method, env), {}) for r in RULES_SHOWN]
            row = [method, envs[env] if env < len(envs) else str(env)]
            row += [_fmt(*_nan3(c, f"acc_{env}")[:2], 100) for c in cells]
            row += [_fmt(*_nan3(c, "corr_test")[:2], digits=2) for c in cells]
            row.append("/".join(str(_nan3(c, f"acc_{env}")[2]) for c in cells))
            rows.append(row)
        note = (f"**{ds}** — held-out domain accuracy (%, its `in` split) and corr(r,len) there, at the checkpoint "
                f"each rule selects: training-domain validation (mean `out` accuracy of the training domains), "
                f"worst-domain validation (their lowest `out` accuracy) and the test-domain oracle; mean ± SE over "
                f"seeds (seeds per rule in the last column).")
        md += [note, "", md_table(header, rows), ""]
        hl += [f"<p>{html.escape(note.replace('**', '').replace('`', ''))}</p>", html_table(header, rows)]
        metrics[ds] = {}
        header = ["Method", "Test env"] + [f"acc {n}" for n in envs] + ["worst acc", "corr(r,len) test",
                                                                       "corr(r,len) train", "margin test",
                                                                       "corr(r,gold) test", "seeds"]  # fmt: skip
        for rule, label in RULES_SHOWN.items():
            d = by_rule[rule].get(ds)
            if not d:
                continue
            rows, mrows = [], {}
            for (method, env), c in sorted(d["cells"].items()):
                row = [method, envs[env] if env < len(envs) else str(env)]
                row += [_fmt(*_nan3(c, f"acc_{i}")[:2], 100) for i in range(len(envs))]
                row += [_fmt(*_nan3(c, "worst")[:2], 100)]
                row += [_fmt(*_nan3(c, k)[:2], digits=2) for k in ("corr_test", "corr_train", "margin_test",
                                                                   "gold_corr_test")]  # fmt: skip
                row.append(str(_nan3(c, "corr_test")[2]))
                rows.append(row)
                mrows[f"{method}/env{env}"] = {k: {"mean": v[0], "se": v[1], "n": v[2]} for k, v in c.items()}
            note = (f"**{ds}**, {label} selection — accuracy (%) on the test domain's `in` split and the training "
                    f"domains' `out` splits, mean ± SE over seeds; corr(r,len) = Pearson correlation of the reward "
                    f"with response length (ODIN, Chen et al. 2024, reports 0.45 for a plain reward model).")
            md += [note, "", md_table(header, rows), ""]
            hl += [f"<p>{html.escape(note.replace('**', '').replace('`', ''))}</p>", html_table(header, rows)]
            metrics[ds][rule] = mrows
    return Section("preference", "Preference workloads: per-domain accuracy and length bias", "\n".join(md),
                   "\n".join(hl), metrics)  # fmt: skip


def record_curves(record: dict, domain: str, kind: str = "gold", ns: Sequence[int] = NS) -> list[float] | None:
    """A domain's best-of-n curve as the ``best_of_n`` callback stored it in an eval record (None when absent)."""
    vals = [record.get(curve_key(domain, kind, n)) for n in ns]
    return [float(v) for v in vals] if all(isinstance(v, (int, float)) for v in vals) else None


def best_of_n_data(trials: Sequence[dict], rule: str = "training_domain") -> dict[str, dict]:
    """Per dataset and test env: per method, per domain, mean ± SE over seeds of the best-of-n gold curve of the
    checkpoint ``rule`` selects (the one the accuracy tables report). A selection whose record holds no curves (a
    trial from before they were recorded at every eval) counts only when it is the final checkpoint, whose curves
    ``final.json`` holds; the others are left out and counted in ``skipped``."""
    out: dict = {}
    for dataset, method, env, _seed, trial, rec in _selected(trials, rule):
        bon = (trial.get("final") or {}).get("best_of_n")
        if not bon:
            continue
        d = out.setdefault(dataset, {"n": bon["n"], "env_names": bon.get("env_names", []), "test_envs": {},
                                     "skipped": 0})  # fmt: skip
        last = max(int(r.get("step", 0)) for r in trial.get("records", [rec]))
        curves_at = {dom: record_curves(rec, dom, ns=bon["n"]) for dom in bon["domains"]}
        if any(c is None for c in curves_at.values()):
            if int(rec.get("step", 0)) != last:
                d["skipped"] += 1
                continue
            curves_at = {dom: c["gold"] for dom, c in bon["domains"].items()}
        per = d["test_envs"].setdefault(env, {"methods": defaultdict(lambda: defaultdict(list)), "oracle": {}})
        for dom, curves in bon["domains"].items():
            per["methods"][method][dom].append(curves_at[dom])
            per["oracle"][dom] = curves["oracle"]
    for d in out.values():
        for per in d["test_envs"].values():
            per["methods"] = {m: {dom: {"mean": np.mean(v, axis=0).tolist(),
                                        "se": [_mean_se(col)[1] for col in np.asarray(v).T], "n_seeds": len(v)}
                                  for dom, v in doms.items()}
                              for m, doms in per["methods"].items()}  # fmt: skip
    return out


def plot_best_of_n(dataset: str, data: dict, buf: io.BytesIO) -> None:
    """One panel per domain: gold reward of the best-of-n pick against n (log2), one line per method (mean ± SE over
    seeds), the gold reward's own best-of-n dashed; the test domain's panel title says so."""
    envs, ns = data["env_names"], np.asarray(data["n"])
    panels = [(env, i, dom) for env in sorted(data["test_envs"]) for i, dom in enumerate(envs)]
    fig = new_figure(3.3 * len(envs), 3.2 * len(data["test_envs"]))
    for k, (env, i, dom) in enumerate(panels):
        per = data["test_envs"][env]
        ax = fig.add_subplot(len(data["test_envs"]), len(envs), k + 1)
        for method, doms in sorted(per["methods"].items()):
            if dom in doms:
                mean, se = np.asarray(doms[dom]["mean"]), np.asarray(doms[dom]["se"])
                (line,) = ax.plot(ns, mean, marker="o", markersize=3, label=method)
                ax.fill_between(ns, mean - se, mean + se, alpha=0.2, color=line.get_color())
        if dom in per["oracle"]:
            ax.plot(ns, per["oracle"][dom], "k--", linewidth=1, label="gold RM")
        ax.set_title(f"{dataset}: {dom}{' (held out)' if i == env else ''}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n")
        ax.set_ylabel("gold reward of pick")
        ax.grid(alpha=0.3)
        if k == 0:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(buf, format="png")


@report_section("best_of_n", order=30)
def best_of_n_section(trials: Sequence[dict]) -> Section | None:
    """Best-of-n gold-reward curves per method, a table per dataset and test env and a PNG per dataset."""
    data = best_of_n_data(trials)
    if not data:
        return None
    md, hl, files = [], [], {}
    for ds, d in sorted(data.items()):
        envs, ns = d["env_names"], d["n"]
        for env, per in sorted(d["test_envs"].items()):
            dom = envs[env] if env < len(envs) else str(env)
            header = ["Method"] + [f"n={n}" for n in ns]
            rows = [[m] + [_fmt(mu, se, digits=2) for mu, se in zip(c[dom]["mean"], c[dom]["se"])]
                    for m, c in sorted(per["methods"].items()) if dom in c]  # fmt: skip
            others = [o for o in envs if o != dom]
            for m, c in sorted(per["methods"].items()):
                if all(o in c for o in others) and others:
                    avg = np.mean([c[o]["mean"] for o in others], axis=0)
                    rows.append([f"{m} (training domains, mean)"] + [f"{v:.2f}" for v in avg])
            if dom in per["oracle"]:
                rows.append(["gold RM (oracle)"] + [f"{v:.2f}" for v in per["oracle"][dom]])
            note = (f"**{ds}**, held-out domain **{dom}**: gold reward of the response the learned reward model picks "
                    f"among n candidates (exact expectation over n-subsets of 32 per prompt), at the checkpoint "
                    f"training-domain validation selects, mean ± SE over seeds.")
            md += [note, "", md_table(header, rows), ""]
            hl += [f"<p>{html.escape(note.replace('**', ''))}</p>", html_table(header, rows)]
        buf = io.BytesIO()
        plot_best_of_n(ds, d, buf)
        path = f"plots/best_of_n_{safe_name(ds)}.png"
        files[path] = buf.getvalue()
        md.append(f"Plot: `{path}`\n")
        hl.append(f'<p><img src="{html.escape(path)}" alt="best-of-n curves" style="max-width:100%"></p>')
        csv_rows = ["dataset,test_env,method,domain,n,mean,se"]
        for env, per in sorted(d["test_envs"].items()):
            for m, c in sorted(per["methods"].items()):
                for dom, v in c.items():
                    csv_rows += [f"{ds},{env},{m},{dom},{n},{mu:.6f},{se:.6f}"
                                 for n, mu, se in zip(ns, v["mean"], v["se"])]  # fmt: skip
        files[f"best_of_n_{safe_name(ds)}.csv"] = "\n".join(csv_rows) + "\n"
    metrics = {ds: {f"env{env}": per for env, per in d["test_envs"].items()} for ds, d in data.items()}
    return Section("best_of_n", "Reward over-optimisation: best-of-n", "\n".join(md), "\n".join(hl), metrics, files)

