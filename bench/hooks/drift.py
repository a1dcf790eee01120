"""The ``drift`` trial callback and its report section: is each held-out environment a shifted distribution?

After training, every held-out environment's ``in`` split (where test accuracy is measured) is tested against the
training environments' ``out`` splits (held out from training, so the model's outputs on them are those of unseen
data) on three views:

- ``inputs``: flattened inputs, reduced to :data:`PCA_DIM` principal components fitted on the training
  environments' ``in`` splits (disjoint from both samples, so the test stays exact); MMD permutation test.
- ``features``: the model's penultimate features; MMD permutation test.
- ``outputs``: the model's softmax outputs; BBSD (KS per class, Bonferroni). For non-classification tasks the raw
  scores, with KS.

Each side is a seeded random sample of at most :data:`MAX_SAMPLES` examples. For classification, BBSE's estimate
of the held-out label distribution is kept too (next to the true one, which uses the test labels: a diagnostic).

A training environment without an ``out`` split contributes its ``in`` split to the reference: data the model was
trained on. The inputs view is unaffected (its PCA is then fitted on other rows of the same splits, disjoint from
the reference), but the features and outputs of seen examples differ from those of unseen ones wherever the model
overfits, so those views can flag overfitting as drift. Such results are marked: ``reference_seen`` in drift.json
(top level and per view), ``drift_env{i}_reference_seen`` = 1 in the record, and a † in the report section.

Where the numbers go: flat keys ``drift_env{i}_{view}_{statistic,pvalue,drift}``, ``drift_env{i}_n_ref``,
``drift_env{i}_n_test``, ``drift_env{i}_reference_seen`` (and ``drift_env{i}_bbse_tv``) in the final record
(final.json's ``record``, which the MLflow mirror logs as metrics); detector names and details in final.json's
``drift`` and in ``drift.json`` in the trial folder (an MLflow artifact like every trial file).
"""

from __future__ import annotations

import html
import sys
from collections import defaultdict
from statistics import median
from typing import Any, Sequence

import numpy as np
import torch

from shiftbench import drift
from shiftbench.data import Split, TensorSplit
from shiftbench.hparams import seed_hash
from shiftbench.io import write_json
from shiftbench.records import env_key, env_split, held_out_envs, parse_env_key
from shiftbench.registry import CALLBACKS
from shiftbench.report import DASH, Section, cell, csv_text, html_table, md_table, report_section
from shiftbench.callbacks import Callback

MAX_SAMPLES = 1000
"""Examples per side (reference and test)."""
PCA_DIM = 32
"""Principal components of the inputs."""
FIT_SAMPLES = 2000
"""Training examples the PCA is fitted on."""
N_PERMUTATIONS = 500
"""Permutations of the MMD tests (smallest p-value 1/501)."""
ALPHA = drift.ALPHA
VIEWS = ("inputs", "features", "outputs")
MODEL_VIEWS = ("features", "outputs")
"""The views computed by the model: biased when the reference is data it was trained on."""
FILE = "drift.json"


def gather(split: Split, idx: np.ndarray, batch_size: int = 2048) -> dict[str, torch.Tensor]:
    """Rows ``idx`` (sorted) of a split as one CPU batch, without materialising a large split."""
    if isinstance(split, TensorSplit):
        t = torch.as_tensor(idx, dtype=torch.long)
        return {k: v.index_select(0, t.to(v.device)).cpu() for k, v in split.tensors.items()}
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    start = 0
    for b in split.eval_batches(batch_size):
        n = len(next(iter(b.values())))
        local = idx[(idx >= start) & (idx < start + n)] - start
        if len(local):
            for k, v in b.items():
                parts[k].append(v[torch.as_tensor(local)].cpu())
        start += n
    return {k: torch.cat(v) for k, v in parts.items()}


def sample(splits: Sequence[Split], n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """At most ``n`` examples drawn uniformly without replacement from the union of ``splits``."""
    total = sum(len(s) for s in splits)
    return take(splits, np.sort(rng.choice(total, min(n, total), replace=False)))


def disjoint_samples(splits: Sequence[Split], sizes: Sequence[int],
                     rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Disjoint uniform samples without replacement of the given sizes from the union of ``splits``."""
    total = sum(len(s) for s in splits)
    pick = rng.choice(total, min(sum(sizes), total), replace=False)
    return [take(splits, np.sort(part)) for part in np.split(pick, np.cumsum(sizes)[:-1])]


def take(splits: Sequence[Split], pick: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``pick`` (sorted) of the concatenation of ``splits``."""
    sizes = [len(s) for s in splits]
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    offset = 0
    for s, size in zip(splits, sizes):
        local = pick[(pick >= offset) & (pick < offset + size)] - offset
        if len(local):
            for k, v in gather(s, local).items():
                out[k].append(v)
        offset += size
    return {k: torch.cat(v) for k, v in out.items()}


def _inputs(batch: dict[str, torch.Tensor], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([drift.as_matrix(batch[k].float()) for k in keys], axis=1)


@CALLBACKS.register("drift")
class DriftCallback(Callback):
    """Tests each held-out environment against the training environments on inputs, features and outputs."""

    def on_end(self, run, final: dict[str, Any]) -> None:
        try:
            report = self.measure(run)
        except Exception as e:  # a drift failure must not cost the trained model its done marker
            print(f"drift callback failed for {run.dir}: {type(e).__name__}: {e}", file=sys.stderr)
            report = {"error": f"{type(e).__name__}: {e}"}
        write_json(run.dir / FILE, report)
        final["drift"] = {"file": FILE, **{k: v for k, v in report.items() if k != "envs"}}
        rec = final["record"]
        for env, views in report.get("envs", {}).items():
            final["drift"].setdefault("envs", {})[env] = {
                v: {k: r[k] for k in ("detector", "reduction", "statistic", "p_value", "drift", "n_ref", "n_test",
                                      "reference_seen")}
                for v, r in views.items() if v in VIEWS}  # fmt: skip
            for view in VIEWS:
                if view in views:
                    r = views[view]
                    rec[f"drift_{env}_{view}_statistic"] = r["statistic"]
                    rec[f"drift_{env}_{view}_pvalue"] = r["p_value"]
                    rec[f"drift_{env}_{view}_drift"] = int(r["drift"])
                    rec[f"drift_{env}_n_ref"], rec[f"drift_{env}_n_test"] = r["n_ref"], r["n_test"]
            rec[f"drift_{env}_reference_seen"] = int(report.get("reference_seen", False))
            if "bbse" in views:
                rec[f"drift_{env}_bbse_tv"] = views["bbse"]["tv_estimated"]

    def measure(self, run) -> dict[str, Any]:
        """The drift report of a finished trial (what drift.json holds)."""
        spec, ds, task = run.spec, run.dataset, run.task
        splits = ds.eval_splits()
        n_envs = len(ds.environments)
        train = [j for j in range(n_envs) if j not in spec.test_envs]
        ref_names = [env_split(j, "out") if env_split(j, "out") in splits else env_split(j, "in") for j in train]
        seen = any(name.endswith("_in") for name in ref_names)
        keys = task.input_keys
        rng = np.random.default_rng(seed_hash(spec.seed, "drift"))
        if not seen:
            fit_names = [env_split(j, "in") for j in train]
            ref = sample([splits[n] for n in ref_names], MAX_SAMPLES, rng)
            fit = sample([splits[n] for n in fit_names], FIT_SAMPLES, rng)
        else:  # the PCA rows and the reference are disjoint parts of the same splits, so the test stays exact
            fit_names = ref_names
            total = sum(len(splits[n]) for n in ref_names)
            n_fit = min(FIT_SAMPLES, total // 2)
            ref, fit = disjoint_samples([splits[n] for n in ref_names], [min(MAX_SAMPLES, total - n_fit), n_fit], rng)
        pca = drift.PCAReduction(PCA_DIM, seed=seed_hash(spec.seed, "drift-pca") % 2**31)
        pca.fit(_inputs(fit, keys))
        ref_views = self._views(run, ref, pca, keys)
        report: dict[str, Any] = {
            "alpha": ALPHA, "reference": ref_names, "reference_seen": seen, "reduction_fit": fit_names,
            "max_samples": MAX_SAMPLES, "n_permutations": N_PERMUTATIONS, "envs": {},
        }  # fmt: skip
        for i in spec.test_envs:
            test_name = env_split(i, "in")
            test = sample([splits[test_name]], MAX_SAMPLES, np.random.default_rng(seed_hash(spec.seed, "drift", i)))
            test_views = self._views(run, test, pca, keys)
            env: dict[str, Any] = {"test": test_name}
            for view, (x, y) in {v: (ref_views[v], test_views[v]) for v in VIEWS}.items():
                seed = seed_hash(spec.seed, "drift", i, view)
                if view == "outputs":
                    name = "bbsd" if ds.TASK == "classification" else "ks"
                    res = drift.run_detector(name, x, y, ALPHA)
                    reduction = "softmax" if name == "bbsd" else "scores"
                else:
                    res = drift.run_detector("mmd", x, y, ALPHA, n_permutations=N_PERMUTATIONS, seed=seed)
                    reduction = pca.name if view == "inputs" else "penultimate"
                env[view] = {**res.to_dict(), "reduction": reduction, "reference_seen": seen and view in MODEL_VIEWS}
            if ref_views["preds"] is not None and "y" in ref and "y" in test:
                est = drift.bbse(ref["y"].numpy(), ref_views["preds"], test_views["preds"], ds.num_classes)
                q_true = np.bincount(test["y"].numpy(), minlength=ds.num_classes) / len(test["y"])
                p_ref, q_est = np.asarray(est["p_ref"]), np.asarray(est["q_test"])
                env["bbse"] = {**est, "q_test_true": q_true.tolist(),
                               "tv_estimated": float(0.5 * np.abs(q_est - p_ref).sum()),
                               "tv_true": float(0.5 * np.abs(q_true - p_ref).sum())}  # fmt: skip
            report["envs"][f"env{i}"] = env
        return report

    @staticmethod
    def _views(run, batch: dict[str, torch.Tensor], pca: drift.Reduction, keys: Sequence[str]) -> dict[str, Any]:
        """Reduced inputs, penultimate features, outputs and (classification) predictions of one sample."""
        alg, task = run.algorithm, run.task
        classification = run.dataset.TASK == "classification"
        bs = run.eval_batch_size
        n = len(batch["idx"]) if "idx" in batch else len(batch[keys[0]])
        feats, outs = [], []
        was_training = alg.training
        alg.eval()
        try:
            with torch.inference_mode():
                for s in range(0, n, bs):
                    b = {k: v[s : s + bs].to(run.device) for k, v in batch.items()}
                    feats.append(task.features(run.model, b).float().reshape(len(b[keys[0]]), -1).cpu())
                    outs.append(alg.scores(b).float().cpu())
        finally:
            alg.train(was_training)
        scores = torch.cat(outs)
        return {
            "inputs": pca.transform(_inputs(batch, keys)),
            "features": torch.cat(feats).numpy().astype(np.float64),
            "outputs": drift.softmax_outputs(scores, run.dataset.TASK),
            "preds": scores.argmax(1).numpy() if classification else None,
        }


# ------------------------------------------------------------------------------------------------ report section


def _n_envs(trial: dict, record: dict) -> int:
    names = trial.get("env_names") or []
    found = [m[0] for m in map(parse_env_key, record) if m and m[1:] == ("in", "acc")]
    return max(len(names), 1 + max(found, default=-1))


def _env_name(trial: dict, i: int) -> str:
    names = trial.get("env_names") or []
    return str(names[i]) if i < len(names) else f"env{i}"


def acc_drop(record: dict, test_env: int, n_envs: int) -> float | None:
    """Mean training-environment ``in`` accuracy minus the test environment's ``in`` accuracy (fractions)."""
    train = [record.get(env_key(j, "in", "acc")) for j in range(n_envs) if j != test_env]
    test = record.get(env_key(test_env, "in", "acc"))
    if test is None or not train or any(not isinstance(a, (int, float)) for a in train):
        return None
    return float(np.mean(train)) - float(test)


SEEN = "†"
"""Marks drift cells whose reference includes data the model was trained on."""


def _flag_cell(pvalues: list[float], flags: list[int], seen: int = 0) -> str:
    if not pvalues:
        return DASH
    return f"{sum(flags)}/{len(flags)} (p̃ {median(pvalues):.3g})" + (f" {SEEN}" if seen else "")


@report_section("drift", order=10)
def drift_section(trials: Sequence[dict]) -> Section | None:
    """Accuracy drop next to the drift verdicts, per dataset, method and test environment."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    alpha = None
    for t in trials:
        envs = held_out_envs(t)
        rec = (t.get("final") or {}).get("record") or {}
        if len(envs) != 1 or f"drift_env{envs[0]}_inputs_pvalue" not in rec:
            continue
        i = envs[0]
        drop = acc_drop(rec, i, _n_envs(t, rec))
        g = groups[(str(t["spec"].get("dataset")), str(t["spec"].get("method")), i, _env_name(t, i))]
        if drop is not None:
            g["drop"].append(100.0 * drop)
        for view in VIEWS:
            if f"drift_env{i}_{view}_pvalue" in rec:
                g[f"{view}_p"].append(float(rec[f"drift_env{i}_{view}_pvalue"]))
                g[f"{view}_flag"].append(int(rec[f"drift_env{i}_{view}_drift"]))
        g["seen"].append(int(rec.get(f"drift_env{i}_reference_seen", 0)))
        g["n"].append(1)
        alpha = alpha or (t.get("final") or {}).get("drift", {}).get("alpha")
    if not groups:
        return None
    rows, metrics = [], []
    for (dataset, method, i, name), g in sorted(groups.items()):
        drop_cell = cell(g["drop"], len(g["n"]))
        entry: dict[str, Any] = {"dataset": dataset, "method": method, "env": f"env{i}", "env_name": name,
                                 "n_trials": len(g["n"]), "acc_drop_mean": drop_cell.mean,
                                 "acc_drop_se": drop_cell.se}
        for view in VIEWS:
            ps, fl = g[f"{view}_p"], g[f"{view}_flag"]
            entry[f"{view}_flagged"] = sum(fl)
            entry[f"{view}_median_p"] = median(ps) if ps else None
        entry["reference_seen"] = sum(g["seen"])
        metrics.append(entry)
        rows.append([dataset, method, name, drop_cell.text()]
                    + [_flag_cell(g[f"{v}_p"], g[f"{v}_flag"], sum(g["seen"]) if v in MODEL_VIEWS else 0)
                       for v in VIEWS] + [str(len(g["n"]))])  # fmt: skip
    header = ["Dataset", "Method", "Test env", "Acc drop (pp)", "Inputs (MMD)", "Features (MMD)", "Outputs (BBSD)",
              "n"]  # fmt: skip
    a = alpha if alpha is not None else ALPHA
    note = (f"Last checkpoint of every done trial run with the `drift` callback that holds out one environment. "
            f"Acc drop = mean training-environment in-split accuracy minus test-environment in-split accuracy, "
            f"percentage points, mean ± SE over trials (all draws and seeds). Drift cells: trials flagged at "
            f"α = {a} / trials (p̃ = median p-value); reference = training environments' out splits, test = the "
            f"held-out environment's in split, up to {MAX_SAMPLES} examples each.")  # fmt: skip
    if any(m["reference_seen"] for m in metrics):
        note += (f" {SEEN}: in some of these trials a training environment had no out split, so the reference "
                 f"holds in-split examples the model was trained on; features and outputs can then flag "
                 f"overfitting as drift.")  # fmt: skip
    md = "\n".join([note, "", md_table(header, rows, pad=True)])
    htm = f'<p class="note">{html.escape(note)}</p>' + html_table(header, rows)
    table = [["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in m.values()] for m in metrics]
    files = {"drift.csv": csv_text([list(metrics[0])] + table)}
    return Section("drift", "Drift and accuracy drop", md, htm, metrics, files)
