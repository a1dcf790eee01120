"""``shiftbench drift``: a two-sample drift gate between two dataset environments or two files.

Sources (``--ref`` and ``--test``) are either

- a file: ``.csv`` (header row, numeric columns), ``.parquet`` / ``.pq`` (numeric columns) or ``.npy`` (one example
  per row; higher-rank arrays are flattened per example); or
- dataset environments: ``DATASET:ENVS[:SPLIT]`` where ENVS is a comma-separated list of environment indices or
  names and SPLIT is ``in``, ``out`` or ``all`` (default), e.g. ``colored_digits:2``, ``colored_digits:0,1:out``,
  ``rotated_digits:15°``. Dataset options go in ``--option k=v``. When both sides name the same environment and
  split, its examples are divided at random between them, so ``--ref colored_digits:0 --test colored_digits:0``
  compares two disjoint samples of one environment.

Each side is cut to a seeded random sample of at most ``--n`` examples. Inputs are reduced (``--reduction``; by
default principal components fitted on the pooled sample, which keeps the tests exact) or, with ``--trial DIR`` (a
finished trial folder), passed through its model: ``outputs`` (softmax) for BBSD, ``features`` (penultimate).

Exit status: 0 no drift, 1 drift, 2 bad input. With several detectors each is held to α / k (Bonferroni), so the
gate's false-positive rate stays at most α.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shiftbench.cliargs import parse_kv
from shiftbench.errors import UserError
from shiftbench.records import SPEC, WEIGHTS, env_split

FILE_SUFFIXES = (".csv", ".parquet", ".pq", ".npy")
SPLITS = ("in", "out", "all")
DEFAULT_N = 5000
DETECTOR_NAMES = ("mmd", "ks", "classifier", "bbsd")
"""The detectors of shiftbench.drift (kept here so that building the parser imports neither it nor torch; a test
checks the two agree)."""
ALPHA = 0.05
"""shiftbench.drift.ALPHA, for the same reason."""


@dataclass
class Source:
    """One side of the comparison.

    Attributes:
        text: the source as given.
        x: examples (n × d, float64), flattened.
        columns: feature names (files with a header), else None.
        input_shape: per-example shape for a model (datasets), else None.
        parts: for datasets, ``(env index, split name, row indices)`` of every part, to divide shared parts.
    """

    text: str
    x: np.ndarray
    columns: list[str] | None = None
    input_shape: tuple[int, ...] | None = None
    parts: list[tuple[int, str, np.ndarray]] = field(default_factory=list)
    dataset_key: tuple | None = None
    """(dataset name, options) for datasets: sources with equal keys may share parts."""
    splits: dict[str, Any] = field(default_factory=dict)
    """The dataset's evaluation splits, ``env{i}_{in|out}`` -> Split."""
    keys: tuple[str, ...] = ()
    """Batch keys holding the task's inputs."""
    n_available: int = 0
    """Examples the source holds (before sampling)."""


def is_file_source(text: str) -> bool:
    return Path(text).suffix.lower() in FILE_SUFFIXES or Path(text).is_file()


def load_file(text: str, side: str) -> Source:
    """Reads a CSV, Parquet or NPY file into a Source; raises UserError naming the problem."""
    from shiftbench import drift

    path = Path(text)
    if not path.is_file():
        raise UserError(f"--{side} file {text} does not exist")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"--{side} file {text}: unsupported type {suffix or '(none)'}; use .csv, .parquet or .npy")
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim == 0 or not np.issubdtype(arr.dtype, np.number):
                raise UserError(f"--{side} file {text}: expected a numeric array of examples, got dtype {arr.dtype} "
                                f"and shape {arr.shape}")  # fmt: skip
            return Source(text, drift.as_matrix(arr))
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except UserError:
        raise
    except Exception as e:  # parsers raise many types; the message is what the user needs
        raise UserError(f"--{side} file {text} could not be read: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]}") from None
    bad = [str(c) for c in frame.columns if not np.issubdtype(frame[c].dtype, np.number)]
    if bad:
        raise UserError(f"--{side} file {text} has non-numeric columns {bad[:5]}; drop or encode them first")
    if frame.empty:
        raise UserError(f"--{side} file {text} holds no rows")
    return Source(text, frame.to_numpy(dtype=np.float64), columns=[str(c) for c in frame.columns])


def parse_dataset_source(text: str) -> tuple[str, str, str]:
    """``DATASET:ENVS[:SPLIT]`` -> (dataset, envs, split), split defaulting to ``all``."""
    tokens = text.split(":")
    split = "all"
    if len(tokens) >= 3 and tokens[-1] in SPLITS:
        split = tokens.pop()
    if len(tokens) < 2 or not tokens[-1] or not tokens[0]:
        raise UserError(f"cannot read source {text!r}: give a .csv/.parquet/.npy file or DATASET:ENVS[:SPLIT], "
                        "e.g. colored_digits:2 or colored_digits:0,1:out")  # fmt: skip
    return ":".join(tokens[:-1]), tokens[-1], split


def _env_index(token: str, names: list[str], dataset: str) -> int:
    if token.lstrip("-").isdigit():
        i = int(token)
        if 0 <= i < len(names):
            return i
    elif token in names:
        return names.index(token)
    raise UserError(f"{dataset} has no environment {token!r}: use 0..{len(names) - 1} or a name "
                    f"({', '.join(names)})")  # fmt: skip


def load_dataset_source(text: str, options: dict[str, str], data_root: str | None) -> Source:
    """The inputs of the named environments' splits, flattened, with the parts they came from."""
    from shiftbench.registry import TASKS
    from shiftbench.data import load_dataset

    name, envs, split = parse_dataset_source(text)
    ds = load_dataset(name, options, data_root, False)
    keys = TASKS.get(ds.TASK)().input_keys
    envs_idx = list(dict.fromkeys(_env_index(t.strip(), ds.env_names, name) for t in envs.split(",") if t.strip()))
    splits = ds.eval_splits()
    parts = []
    for i in envs_idx:
        for s in ("in", "out") if split == "all" else (split,):
            key = env_split(i, s)
            if key not in splits:
                raise UserError(f"{name} environment {i} has no {s!r} split (it has: "
                                f"{', '.join(k for k in splits if k.startswith(f'env{i}_'))})")  # fmt: skip
            parts.append((i, s, np.arange(len(splits[key]))))
    return Source(text, np.empty((0, 0)), input_shape=tuple(ds.input_shape), parts=parts,
                  dataset_key=(name, json.dumps(ds.options, sort_keys=True)), splits=splits, keys=tuple(keys))


def _cut_parts(src: Source, n: int, rng: np.random.Generator) -> None:
    """Keeps a uniform random sample of at most n rows over all of a source's parts."""
    sizes = [len(idx) for _, _, idx in src.parts]
    if sum(sizes) <= n:
        return
    pick = np.sort(rng.choice(sum(sizes), n, replace=False))
    offsets = np.cumsum([0] + sizes)
    src.parts = [(i, s, idx[pick[(pick >= lo) & (pick < hi)] - lo])
                 for (i, s, idx), lo, hi in zip(src.parts, offsets[:-1], offsets[1:])]  # fmt: skip


def _materialise(src: Source) -> None:
    from shiftbench.hooks.drift import _inputs, gather

    rows = []
    for i, s, idx in src.parts:
        if len(idx):
            rows.append(_inputs(gather(src.splits[env_split(i, s)], np.sort(idx)), src.keys))
    src.x = np.concatenate(rows) if rows else np.empty((0, 0))


def divide_shared(ref: Source, test: Source, rng: np.random.Generator) -> int:
    """Splits the parts both sources name at random between them (half each); returns how many were shared."""
    if ref.dataset_key is None or ref.dataset_key != test.dataset_key:
        return 0
    shared = {(i, s) for i, s, _ in ref.parts} & {(i, s) for i, s, _ in test.parts}
    for i, s in sorted(shared):  # sorted: set order varies between processes, and the draws must not
        idx = next(p[2] for p in ref.parts if p[:2] == (i, s))
        perm = rng.permutation(idx)
        half = len(perm) // 2
        ref.parts = [(a, b, perm[:half] if (a, b) == (i, s) else c) for a, b, c in ref.parts]
        test.parts = [(a, b, perm[half:] if (a, b) == (i, s) else c) for a, b, c in test.parts]
    return len(shared)


def load_sources(a: argparse.Namespace, rng: np.random.Generator) -> tuple[Source, Source, int]:
    options = parse_kv(a.option, "--option")
    sources = []
    for side in ("ref", "test"):
        text = getattr(a, side)
        if is_file_source(text):
            sources.append(load_file(text, side))
        else:
            sources.append(load_dataset_source(text, options, a.data_root))
    ref, test = sources
    shared = divide_shared(ref, test, rng)
    for src in (ref, test):
        if src.parts:
            src.n_available = sum(len(idx) for _, _, idx in src.parts)
            _cut_parts(src, a.n, rng)  # only the sampled rows are ever gathered
            _materialise(src)
        else:
            src.n_available = len(src.x)
    if ref.columns and test.columns and ref.columns != test.columns:
        only = sorted(set(ref.columns) ^ set(test.columns))
        raise UserError(f"reference and test columns differ ({only[:5] if only else 'order'}); "
                        "give both files the same columns")  # fmt: skip
    if ref.x.shape[1] != test.x.shape[1]:
        raise UserError(f"reference and test have different feature counts ({ref.x.shape[1]} vs {test.x.shape[1]}); "
                        "compare data with the same columns")  # fmt: skip
    return ref, test, shared


def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return x if len(x) <= n else x[np.sort(rng.choice(len(x), n, replace=False))]


# ---------------------------------------------------------------------------------------------------------- model


class TrialModel:
    """A finished trial's model (spec.json + model.pt) applied to flattened inputs."""

    def __init__(self, trial_dir: Path):
        from shiftbench.records import load_described_model
        from shiftbench.registry import TASKS

        try:
            self.model, meta = load_described_model(trial_dir)
        except OSError:
            raise UserError(f"--trial {trial_dir} is not a finished trial folder (needs {SPEC} and {WEIGHTS})") \
                from None
        except ValueError as e:
            raise UserError(f"--trial {trial_dir}: {e}") from None
        self.task_name = meta.get("task", "classification")
        self.task = TASKS.get(self.task_name)()
        self.input_shape = tuple(meta["dataset"]["input_shape"])

    def apply(self, x: np.ndarray, what: str) -> np.ndarray:
        """``outputs`` (softmax for classification) or ``features`` (penultimate) of flattened inputs."""
        import torch

        from shiftbench import drift

        if self.task_name != "classification":
            raise UserError("--trial models are supported for classification tasks only")
        width = int(np.prod(self.input_shape))
        if x.shape[1] != width:
            raise UserError(f"the trial's model takes {width} input features ({'x'.join(map(str, self.input_shape))})"
                            f", the data has {x.shape[1]}")  # fmt: skip
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), 2048):
                xb = torch.as_tensor(x[s : s + 2048], dtype=torch.float32).reshape(-1, *self.input_shape)
                if what == "features":
                    out.append(self.model.featurizer(xb).reshape(len(xb), -1).double().numpy())
                else:
                    out.append(drift.softmax_outputs(self.model(xb), self.task_name))
        return np.concatenate(out)


# -------------------------------------------------------------------------------------------------------- command


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "drift", help="two-sample drift test between two environments or files (exit 0 no drift, 1 drift)",
        description="Two-sample drift test between two dataset environments or two files. "
                    "Exit status 0: no drift; 1: drift; 2: bad input.",
        epilog="sources: DATASET:ENVS[:in|out|all] (ENVS: indices or names, comma-separated; e.g. colored_digits:2, "
               "colored_digits:0,1:out, rotated_digits:15°) or a .csv (header row), .parquet or .npy file. The same "
               "environment on both sides is divided at random between them. Several detectors: each at alpha/k.",
    )  # fmt: skip
    p.add_argument("--ref", required=True, help="reference: DATASET:ENVS[:in|out|all] or a .csv/.parquet/.npy file")
    p.add_argument("--test", required=True, help="test sample, same forms as --ref")
    p.add_argument("--detector", default=None,
                   help=f"comma-separated {', '.join(DETECTOR_NAMES)} or all (default: bbsd with --trial, else mmd)")
    p.add_argument("--reduction", default=None,
                   help="auto | none | pca:K | rp:K | outputs | features (default: outputs for bbsd, else auto = "
                        "pca:32 above 32 features, fitted on the pooled sample)")  # fmt: skip
    p.add_argument("--trial", type=Path,
                   help="finished trial folder whose model gives outputs/features (default: none: inputs only)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level of the gate (default 0.05)")
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"at most this many examples per side ({DEFAULT_N})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--permutations", type=int, default=500, help="MMD and classifier-test permutations (default 500)")
    p.add_argument("--correction", choices=["bonferroni", "fdr"], default="bonferroni", help="KS/BBSD correction")
    p.add_argument("--classifier", choices=["logistic", "mlp", "gbm"], default="logistic",
                   help="classifier test model (default logistic)")
    p.add_argument("--option", nargs="*", metavar="K=V",
                   help="dataset options for DATASET sources (default: none, the datasets' own)")
    p.add_argument("--data-root", default=None,
                   help="folder with real datasets (default: none: embedded datasets only)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def _detectors(a: argparse.Namespace, model: TrialModel | None, probabilities: bool) -> list[str]:
    from shiftbench import drift

    if a.detector is None:
        return ["bbsd"] if model is not None else ["mmd"]
    names = [d.strip() for d in a.detector.split(",") if d.strip()]
    if names == ["all"]:
        names = ["mmd", "ks", "classifier"] + (["bbsd"] if model is not None or probabilities else [])
    for d in names:
        drift.check_detector(d)
    return list(dict.fromkeys(names))


def _reduce(name: str, reduction: str | None, ref: np.ndarray, test: np.ndarray, model: TrialModel | None,
            seed: int) -> tuple[np.ndarray, np.ndarray, str]:  # fmt: skip
    from shiftbench import drift

    red = reduction or ("outputs" if name == "bbsd" else "auto")
    if red in ("outputs", "features"):
        if model is None:
            if red == "outputs" and drift.looks_like_probabilities(ref) and drift.looks_like_probabilities(test):
                return ref, test, "given"
            raise UserError(f"--reduction {red} needs a model: pass --trial DIR (a finished trial folder), or give "
                            "files whose rows are already class probabilities")  # fmt: skip
        return model.apply(ref, red), model.apply(test, red), red
    if name == "bbsd" and red != "none":
        raise UserError(f"bbsd tests model outputs: use --reduction outputs (with --trial), not {red}")
    r = drift.make_reduction(red, ref.shape[1], seed=seed)
    r.fit(np.concatenate([ref, test]))  # pooled: symmetric in the two samples, so the tests stay exact
    return r.transform(ref), r.transform(test), r.name


def run(a: argparse.Namespace) -> int:
    from shiftbench import drift

    if not 0.0 < a.alpha < 1.0:
        raise UserError(f"--alpha must be strictly between 0 and 1 (got {a.alpha})")
    if a.n < 2:
        raise UserError(f"--n must be at least 2 (got {a.n})")
    rng = np.random.default_rng(a.seed)
    model = TrialModel(a.trial) if a.trial is not None else None
    ref, test, shared = load_sources(a, rng)
    x, y = subsample(ref.x, a.n, rng), subsample(test.x, a.n, rng)
    names = _detectors(a, model, drift.looks_like_probabilities(x) and drift.looks_like_probabilities(y))
    level = a.alpha / len(names)
    results = []
    for name in names:
        xr, yr, red = _reduce(name, a.reduction, x, y, model, a.seed)
        res = drift.run_detector(name, xr, yr, level, n_permutations=a.permutations, seed=a.seed,
                                 correction=a.correction, classifier=a.classifier)  # fmt: skip
        results.append((res, red))
    verdict = any(r.drift for r, _ in results)
    if a.json:
        print(json.dumps({
            "ref": {"source": a.ref, "n": len(x), "n_available": ref.n_available, "features": ref.x.shape[1]},
            "test": {"source": a.test, "n": len(y), "n_available": test.n_available},
            "shared_parts_divided": shared, "alpha": a.alpha, "drift": verdict,
            "results": [{**r.to_dict(), "reduction": red} for r, red in results],
        }, indent=1, default=float))  # fmt: skip
    else:
        print(f"ref:  {a.ref}  ({len(x)} of {ref.n_available} examples, {ref.x.shape[1]} features)")
        print(f"test: {a.test}  ({len(y)} of {test.n_available} examples)"
              + (f"  [{shared} shared part(s) divided at random]" if shared else ""))  # fmt: skip
        header = ["detector", "reduction", "statistic", "p-value", "level", "drift"]
        rows = [[r.detector, red, f"{r.statistic:.4g}", f"{r.p_value:.4g}", f"{r.alpha:.4g}",
                 "yes" if r.drift else "no"] for r, red in results]  # fmt: skip
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        flagged = sum(r.drift for r, _ in results)
        print(f"verdict: {'DRIFT' if verdict else 'no drift'} ({flagged} of {len(results)} detector(s) at level "
              f"alpha/{len(results)} = {level:.4g})")  # fmt: skip
    sys.stdout.flush()
    return 1 if verdict else 0
