"""Reward-model over-optimisation (best-of-n) and the report sections of preference workloads.

**Best-of-n** (Gao, Schulman & Hilton, "Scaling Laws for Reward Model Overoptimization", ICML 2023): a policy samples
n responses and keeps the one the learned reward model scores highest; how good is that response by the gold reward,
as n grows? With a reward model that has learnt a spurious cue, the gold reward of the pick can fall with n. The
``best_of_n`` trial callback (``callbacks: [best_of_n]`` in a suite) scores each domain's candidate pool of a dataset
that has one (``spurious_prefs``: 32 candidates per prompt, with gold rewards) with the trial's final model and writes
``best_of_n.json`` (also under ``final.json``'s ``best_of_n``). For n ≤ 32 the expected gold reward of the pick is
computed exactly over all n-subsets of a prompt's 32 candidates (:func:`best_of_n_curve`), the unbiased estimator
of Nakano et al., 2021 (WebGPT, appendix), instead of drawing subsets.

**Report sections** (registered with :func:`shiftbench.report.report_section`; built only from trial records and
files): for each preference dataset, the training-domain-validation checkpoint of every (method, seed, test
environment) gives per-domain pairwise accuracy (the test domain's ``in`` split, the training domains' ``out``
splits: nothing evaluated on training data), worst-domain accuracy, corr(reward, length) on the test domain and on
the training domains, the mean margin and corr(reward, gold); then the best-of-n curves of the selected trials per
method, as a table and ``plots/best_of_n_<dataset>.png``.
"""

from __future__ import annotations

import html
import io
import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch

from .errors import UserError
from .io import write_json
from .registry import CALLBACKS
from .report import DASH, Section, _new_figure, _safe, compute_tables, html_table, md_table, report_section
from .trainer import Callback

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
        if dataset_cls is not None and not callable(getattr(dataset_cls, "best_of_n_pools", None)):
            raise UserError(f"callback best_of_n needs a dataset with gold-reward candidate pools (spurious_prefs); "
                            f"{getattr(dataset_cls, 'registry_name', dataset_cls.__name__)} has none")  # fmt: skip

    def on_end(self, run, final) -> None:
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
        result = {"n": list(NS), "domains": domains, "env_names": list(pools)}
        write_json(run.dir / "best_of_n.json", result)
        final["best_of_n"] = result


# ----------------------------------------------------------------------------------------------------- the report


def _mean_se(values: Sequence[float]) -> tuple[float, float, int]:
    a = np.asarray([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=float)
    if not len(a):
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std() / math.sqrt(len(a))), len(a)


def _fmt(mean: float, se: float, scale: float = 1.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return DASH
    return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}"


def _selected(trials: Sequence[dict]) -> list[tuple[str, str, int, Any, dict, dict]]:
    """(dataset, method, test env, seed, trial, record) of every training-domain-validation selection."""
    by_hash = {str(t["hash"]): t for t in trials}
    out = []
    for table in compute_tables(trials, rules=["training_domain"]):
        for (method, seed, env), sel in sorted(table.selections.items(), key=lambda kv: (kv[0][0], str(kv[0][1]),
                                                                                          kv[0][2])):  # fmt: skip
            trial = by_hash.get(sel.hash)
            record = next((r for r in trial.get("records", []) if r.get("step") == sel.step), None) if trial else None
            if record is not None:
                out.append((table.dataset, method, env, seed, trial, record))
    return out


def preference_rows(trials: Sequence[dict]) -> dict[str, dict]:
    """Per dataset: env names and, per (method, test env), the mean ± SE over seeds of every preference metric."""
    pref = [t for t in trials if t.get("task") == "preference"]
    per: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    names: dict[str, list[str]] = {}
    for dataset, method, env, _seed, trial, rec in _selected(pref):
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


@report_section("preference")
def preference_section(trials: Sequence[dict]) -> Section | None:
    """Per-domain and worst-domain pairwise accuracy and the length-bias probe of preference datasets."""
    data = preference_rows(trials)
    if not data:
        return None
    md, hl, metrics = [], [], {}
    for ds, d in sorted(data.items()):
        envs = d["env_names"]
        header = ["Method", "Test env"] + [f"acc {n}" for n in envs] + ["worst acc", "corr(r,len) test",
                                                                       "corr(r,len) train", "margin test",
                                                                       "corr(r,gold) test", "seeds"]  # fmt: skip
        rows, mrows = [], {}
        for (method, env), c in sorted(d["cells"].items()):
            row = [method, envs[env] if env < len(envs) else str(env)]
            row += [_fmt(*c.get(f"acc_{i}", (float("nan"),) * 3)[:2], 100) for i in range(len(envs))]
            row += [_fmt(*c["worst"][:2], 100)]
            row += [_fmt(*c[k][:2], digits=2) for k in ("corr_test", "corr_train", "margin_test", "gold_corr_test")]
            row.append(str(c["corr_test"][2]))
            rows.append(row)
            mrows[f"{method}/env{env}"] = {k: {"mean": v[0], "se": v[1], "n": v[2]} for k, v in c.items()}
        note = (f"**{ds}** — training-domain validation checkpoints; accuracy (%) on the test domain's `in` split "
                f"and the training domains' `out` splits, mean ± SE over seeds; corr(r,len) = Pearson correlation of "
                f"the reward with response length (ODIN, Chen et al. 2024, reports 0.45 for a plain reward model).")
        md += [note, "", md_table(header, rows), ""]
        hl += [f"<p>{html.escape(note.replace('**', '').replace('`', ''))}</p>", html_table(header, rows)]
        metrics[ds] = mrows
    return Section("preference", "Preference workloads: per-domain accuracy and length bias", "\n".join(md),
                   "\n".join(hl), metrics)  # fmt: skip


def best_of_n_data(trials: Sequence[dict]) -> dict[str, dict]:
    """Per dataset and test env: per method, per domain, mean ± SE over seeds of the best-of-n gold curve."""
    out: dict = {}
    for dataset, method, env, _seed, trial, _rec in _selected(trials):
        bon = (trial.get("final") or {}).get("best_of_n")
        if not bon:
            continue
        d = out.setdefault(dataset, {"n": bon["n"], "env_names": bon.get("env_names", []), "test_envs": {}})
        per = d["test_envs"].setdefault(env, {"methods": defaultdict(lambda: defaultdict(list)), "oracle": {}})
        for dom, curves in bon["domains"].items():
            per["methods"][method][dom].append(curves["gold"])
            per["oracle"][dom] = curves["oracle"]
    for d in out.values():
        for per in d["test_envs"].values():
            per["methods"] = {m: {dom: {"mean": np.mean(v, axis=0).tolist(), "se": (np.std(v, axis=0)
                                        / math.sqrt(len(v))).tolist(), "n_seeds": len(v)} for dom, v in doms.items()}
                              for m, doms in per["methods"].items()}  # fmt: skip
    return out


def plot_best_of_n(dataset: str, data: dict, buf: io.BytesIO) -> None:
    """One panel per domain: gold reward of the best-of-n pick against n (log2), one line per method (mean ± SE over
    seeds), the gold reward's own best-of-n dashed; the test domain's panel title says so."""
    envs, ns = data["env_names"], np.asarray(data["n"])
    panels = [(env, i, dom) for env in sorted(data["test_envs"]) for i, dom in enumerate(envs)]
    fig = _new_figure(3.3 * len(envs), 3.2 * len(data["test_envs"]))
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


@report_section("best_of_n")
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
                    f"among n candidates (exact expectation over n-subsets of 32 per prompt), final model of the "
                    f"training-domain-validation draw, mean ± SE over seeds.")
            md += [note, "", md_table(header, rows), ""]
            hl += [f"<p>{html.escape(note.replace('**', ''))}</p>", html_table(header, rows)]
        buf = io.BytesIO()
        plot_best_of_n(ds, d, buf)
        path = f"plots/best_of_n_{_safe(ds)}.png"
        files[path] = buf.getvalue()
        md.append(f"Plot: `{path}`\n")
        hl.append(f'<p><img src="{html.escape(path)}" alt="best-of-n curves" style="max-width:100%"></p>')
        csv_rows = ["dataset,test_env,method,domain,n,mean,se"]
        for env, per in sorted(d["test_envs"].items()):
            for m, c in sorted(per["methods"].items()):
                for dom, v in c.items():
                    csv_rows += [f"{ds},{env},{m},{dom},{n},{mu:.6f},{se:.6f}"
                                 for n, mu, se in zip(ns, v["mean"], v["se"])]  # fmt: skip
        files[f"best_of_n_{_safe(ds)}.csv"] = "\n".join(csv_rows) + "\n"
    metrics = {ds: {f"env{env}": per for env, per in d["test_envs"].items()} for ds, d in data.items()}
    return Section("best_of_n", "Reward over-optimisation: best-of-n", "\n".join(md), "\n".join(hl), metrics, files)

