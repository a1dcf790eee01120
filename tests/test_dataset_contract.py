"""The dataset contract, over every registered dataset (timm-style: a dataset added to the registry is covered with no
edit here).

Each dataset is built tiny: the generated ones with the options in :data:`TINY` (only ever options that make it
small; a dataset not listed gets none), the real-data loaders on tiny files in their exact on-disk format, written by
the builders that their own test modules already hold (test_datasets.py: MNIST IDX files; test_image_folder.py:
``<domain>/<class>/<image>`` folders; test_wilds.py: WILDS releases; test_prefs.py: preference rows). Then:

1. it builds, and ``check`` keeps the base signature and accepts the data it was built from;
2. its environments are named as the spec names them before any build, each has ``in`` and ``out`` splits, and
   ``eval_splits`` keys them ``env{i}_{in|out}``; ``DEFAULT_TEST_ENVS`` index real environments and leave one to
   train on;
3. ``evaluate`` on fake outputs of its task type (made by the task itself from scores chosen here) gives the
   accuracy and loss worked out by hand from those scores, 1 for every accuracy when every example is right and 0
   when none is;
4. ``describe`` is JSON and names the environments;
5. ``version`` is a sha256 (hex), the same for two builds with the same options, and another one when the data
   seed (or, without one, a size option) changes.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import math
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import pytest
import torch

from shiftbench.config import env_names_of
from shiftbench.data import ShiftDataset
from shiftbench.errors import UserError
from shiftbench.registry import DATASETS, TASKS

TESTS = Path(__file__).resolve().parent

TINY: dict[str, dict[str, Any]] = {
    "colored_digits": {"env_size": 60, "resolution": 8},
    "rotated_digits": {"env_size": 30, "resolution": 8},
    "subpop_digits": {"env_size": 60, "resolution": 8},
    "cue_digits": {"env_size": 60, "nc_size": 10, "test_size": 20, "resolution": 8},
    "colored_mnist": {"resolution": 8},
    "rotated_mnist": {"resolution": 8},
    "spurious_prefs": {"n_pairs": 40, "bon_prompts": 1},
    "lever_game": {"agents": 2, "partner_steps": 5},
    "rendezvous": {"populations": 2, "agents": 2, "partner_steps": 2, "eval_episodes": 2, "size": 3, "horizon": 2},
}
"""Options that make a dataset small, nothing else; a dataset not listed is built with none (``{}``)."""

FAST = {"resolution": 8, "encoder": "hashing:64,32,0"}
"""Smallest inputs for the real-data loaders (image side, text hashing buckets), where they take these options."""

SIZE_OPTIONS = ("env_size", "n_pairs", "n_examples", "max_rows", "agents")
"""Options that change how many examples there are; the version test changes one where a dataset has no seed."""


@functools.lru_cache(maxsize=None)
def sibling(name: str) -> ModuleType:
    """Another test module of this folder, loaded by path (pytest's importlib mode puts none on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location(f"_contract_{name}", TESTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- tiny data on disk


def _mnist(cls: type, tmp: Path) -> tuple[str, dict]:
    sibling("test_datasets").write_fake_mnist(tmp / "mnist", gz=False)
    return str(tmp / "mnist"), {}


def _image_folder(cls: type, tmp: Path) -> tuple[str, dict]:
    make_folder = sibling("test_image_folder").make_folder
    n = len(cls.ENVIRONMENTS) or 3
    domains = [f"domain{i}" for i in range(n)]
    if cls.ENVIRONMENTS:  # a preset: its DomainBed folder under the data root
        make_folder(tmp / "data" / cls.FOLDER, domains=domains, per_class=2)
        return str(tmp / "data"), {"resolution": FAST["resolution"]}
    make_folder(tmp / "folder", domains=domains, per_class=2)
    return None, {"path": str(tmp / "folder"), "resolution": FAST["resolution"]}


def _wilds(cls: type, tmp: Path) -> tuple[str, dict]:
    builders = sibling("test_wilds").BUILDERS
    name = cls.registry_name.partition(":")[2]
    if name not in builders:
        pytest.fail(f"no tiny on-disk {name} in tests/test_wilds.py: add a builder to its BUILDERS")
    builders[name](tmp / "data")
    return str(tmp / "data"), dict(FAST) if cls.SPEC.modality == "text" else {"resolution": FAST["resolution"]}


def _preference_files(cls: type, tmp: Path) -> tuple[str, dict]:
    rows = [{"prompt": f"question {i}", "chosen": f"a good answer {'really ' * (i % 3)}{i}",
             "rejected": f"a bad answer {i}", "domain": ["chat", "code"][i % 2]} for i in range(16)]  # fmt: skip
    path = sibling("test_prefs")._write(tmp / "pairs.jsonl", rows)
    return None, {"files": str(path), "encoder": "hashing:64,32,16"}


def _on_disk() -> list[tuple[type, Callable[[type, Path], tuple[str | None, dict]]]]:
    from shiftbench.datasets.image_folder import ImageFolderDataset
    from shiftbench.datasets.mnist import _MNISTDataset  # the base of every MNIST-file loader
    from shiftbench.datasets.prefs import PreferenceFiles
    from shiftbench.datasets.wilds_data import WildsDataset

    return [(_MNISTDataset, _mnist), (ImageFolderDataset, _image_folder), (WildsDataset, _wilds),
            (PreferenceFiles, _preference_files)]  # fmt: skip


def tiny_args(name: str, tmp: Path) -> tuple[str | None, dict[str, Any]]:
    """(root, options) of the tiny build of dataset ``name``: its tiny files written under ``tmp`` if it reads
    files, the options that make it small."""
    cls = DATASETS.get(name)
    root, options = None, dict(TINY.get(name, {}))
    for base, make in _on_disk():
        if issubclass(cls, base):
            root, located = make(cls, tmp)
            options.update(located)
    return root, options


class Built:
    """Each dataset built once (tiny) and shared by the tests of this module."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, name: str) -> tuple[ShiftDataset, str | None, dict]:
        if name not in self.done:
            tmp = self.root / re.sub(r"\W", "_", name)
            tmp.mkdir(exist_ok=True)
            root, options = tiny_args(name, tmp)
            try:
                ds = DATASETS.get(name)(root, options, False)
            except UserError as e:
                pytest.fail(f"{name} does not build from root={root}, options={options}: {e}. If it needs files or "
                            "options to be small, add them to tests/test_dataset_contract.py (TINY, or a tiny "
                            "on-disk builder)")
            self.done[name] = (ds, root, options)
        return self.done[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("datasets"))


def defect(test: str, name: str) -> str | None:
    """Why a contract case of a registered dataset is known to fail (a real defect, left to the dataset's owner), or
    None. Marked ``xfail(strict=True)``: fixing the dataset makes the case pass, and then this entry must go."""
    return None


def cases(test: str) -> list:
    """Every registered dataset, its known defects for ``test`` marked."""
    return [pytest.param(n, id=n, marks=[pytest.mark.xfail(strict=True, reason=r)] if (r := defect(test, n)) else [])
            for n in DATASETS.names()]  # fmt: skip


NAMES = DATASETS.names()


# ----------------------------------------------------------------------------------------------------- the tests


def params(f: Callable) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults of a function's parameters: what a caller relies on (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_check_keeps_the_base_signature(name, built):
    cls = DATASETS.get(name)
    assert params(cls.check) == params(ShiftDataset.check), inspect.signature(cls.check)
    ds, root, options = built.get(name)
    assert isinstance(ds, cls) and ds.TASK in TASKS
    cls.check(root, options, False)  # the data it was just built from is there


@pytest.mark.parametrize("name", NAMES)
def test_environments_splits_and_default_test_envs(name, built):
    ds, root, options = built.get(name)
    names = ds.env_names
    assert len(names) >= 2 and len(set(names)) == len(names), names
    assert env_names_of(name, ds.options) == names  # what the spec range-checks test environments against
    if ds.ENVIRONMENTS:
        assert list(ds.ENVIRONMENTS) == names
    for env in ds.environments:  # a dataset may add splits (cue_digits' nc), never drop DomainBed's two
        assert {"in", "out"} <= set(env.splits), (env.name, sorted(env.splits))
        assert all(len(s) > 0 for s in env.splits.values()), env.name
    evaluated = ds.eval_splits()
    for key, split in evaluated.items():
        if key.startswith("env"):  # env{i}_{part}: environment i's split of that name
            i, part = re.fullmatch(r"env(\d+)_(\w+)", key).groups()
            assert split is ds.environments[int(i)].splits[part], key
    test = ds.DEFAULT_TEST_ENVS
    assert test and len(set(test)) == len(test) < len(names) and all(0 <= i < len(names) for i in test), test
    for i in range(len(names)):  # training-domain validation reads every out split, the score every test in split
        assert f"env{i}_out" in evaluated, sorted(evaluated)
    assert all(f"env{i}_in" in evaluated for i in test), sorted(evaluated)


# --- fake outputs: scores chosen here, turned into outputs by the task, with the metrics they must give


def _classification(ds, batch: dict, right: np.ndarray) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Logits 2·onehot(pred), pred = the label where ``right`` else the next class; softmax puts e²/(e² + K − 1) on
    the prediction and 1/(e² + K − 1) on every other class."""
    k, y = ds.num_classes, batch["y"].numpy()
    pred = np.where(right, y, (y + 1) % k)
    scores = 2.0 * torch.nn.functional.one_hot(torch.as_tensor(pred), k).float()
    z = math.exp(2) + k - 1
    loss = np.where(right, -math.log(math.exp(2) / z), math.log(z))
    return scores, {"acc": right.astype(float), "loss": loss}


def _preference(ds, batch: dict, right: np.ndarray) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Reward differences d = ±(1 + i/n) (positive where ``right``) and sums t = 0.1·i, i.e. rewards r_c = (t + d)/2,
    r_r = (t − d)/2; loss −log σ(d) = log(1 + e^−d); the margin is the mean d."""
    n = len(right)
    d = np.where(right, 1.0, -1.0) * (1 + np.arange(n) / n)
    total = 0.1 * np.arange(n)
    scores = torch.as_tensor(np.stack([d, total], 1), dtype=torch.float32)
    want = {"acc": right.astype(float), "loss": np.log1p(np.exp(-d)), "margin": d,
            "reward_chosen": (total + d) / 2, "reward_rejected": (total - d) / 2}  # fmt: skip
    return scores, want


def _coordination(ds, batch: dict, right: np.ndarray) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Normalised returns 1 where ``right``, else 0, returns 10× those plus 1, outcome 0: acc = the mean normalised
    return, loss = 1 − it, return = the mean return."""
    norm = np.where(right, 1.0, 0.0)
    scores = torch.as_tensor(np.stack([10 * norm + 1, norm, np.zeros_like(norm)], 1), dtype=torch.float32)
    return scores, {"acc": norm, "loss": 1 - norm, "return": 10 * norm + 1}


FAKE = {"classification": _classification, "preference": _preference, "coordination": _coordination}
"""Per task type: (dataset, eval batch, which examples are right) -> (scores, the per-example values whose means are
the metrics every dataset of that type reports)."""


def fake_evaluate(ds: ShiftDataset, split_name: str, rule: Callable[[np.ndarray], np.ndarray]):
    """The dataset's metrics of one split on fake outputs, assembled as the trainer assembles them; with the expected
    per-example values and the split's examples (both concatenated over its evaluation batches). ``rule(positions)``
    says which examples are right."""
    if ds.TASK not in FAKE:
        pytest.fail(f"task type {ds.TASK!r} has no fake outputs in tests/test_dataset_contract.py: add it to FAKE")
    task = TASKS.get(ds.TASK)()
    parts: dict[str, list] = {}
    want: dict[str, list] = {}
    rows: dict[str, list] = {}
    seen = 0
    for b in ds.eval_splits()[split_name].eval_batches(64):
        n = len(b["idx"])
        scores, expected = FAKE[ds.TASK](ds, b, rule(np.arange(seen, seen + n)))
        out = task.outputs(scores, b)
        out["idx"] = b["idx"]
        if "y" in b:
            out["label"] = b["y"]
        for into, d in ((parts, out), (want, expected), (rows, b)):
            for k, v in d.items():
                into.setdefault(k, []).append(v)
        seen += n
    outputs = {k: torch.cat(v).float().numpy() if k in ("loss", "correct", "score") else torch.cat(v).numpy()
               for k, v in parts.items()}  # fmt: skip
    cat = {k: np.concatenate(v) for k, v in want.items()}
    return ds.evaluate(split_name, outputs), cat, {k: torch.cat(v).numpy() for k, v in rows.items()}


METRICS = {"classification": ("acc", "loss"), "preference": ("acc", "loss", "margin"),
           "coordination": ("acc", "loss", "return")}  # fmt: skip
"""The metrics every dataset of a task type reports: the means of the per-example values of the same names."""


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_fake_outputs_by_hand(name, built):
    ds, _, _ = built.get(name)
    for split_name in ds.eval_splits():
        got, want, rows = fake_evaluate(ds, split_name, lambda pos: pos % 3 != 0)
        for k in METRICS[ds.TASK]:
            assert got[k] == pytest.approx(float(np.mean(want[k])), rel=1e-5, abs=1e-6), (split_name, k)
        assert all(isinstance(v, float) for v in got.values()), got
        for meta, key in (("len", "length_corr"), ("gold", "gold_corr")):  # preference: corr(reward, length | gold)
            if f"chosen_{meta}" in rows:
                rewards = np.concatenate([want["reward_chosen"], want["reward_rejected"]])
                other = np.concatenate([rows[f"chosen_{meta}"], rows[f"rejected_{meta}"]]).astype(float)
                assert got[key] == pytest.approx(np.corrcoef(rewards, other)[0, 1], rel=1e-5), (split_name, key)


@pytest.mark.parametrize("name", cases("accuracies"))
def test_every_accuracy_is_one_when_all_are_right_and_zero_when_none_is(name, built):
    ds, _, _ = built.get(name)
    for split_name in ds.eval_splits():
        for value in (1.0, 0.0):
            got, _, _ = fake_evaluate(ds, split_name, lambda pos: np.full(len(pos), bool(value)))
            accs = {k: v for k, v in got.items() if "acc" in k}
            wrong = {k: v for k, v in accs.items() if v != pytest.approx(value)}
            assert "acc" in accs and not wrong, (split_name, value, wrong)


@pytest.mark.parametrize("name", NAMES)
def test_describe_is_json_and_names_the_environments(name, built):
    ds, _, _ = built.get(name)
    d = json.loads(json.dumps(ds.describe()))
    assert d["task"] == ds.TASK and d["environments"] == ds.env_names


def _changed(ds: ShiftDataset) -> dict[str, Any] | None:
    """An option change that changes the data: the data seed, else a size option (None: the dataset has neither)."""
    o = ds.options
    if "seed" in o:
        return {"seed": int(o["seed"]) + 1}
    size = next((k for k in SIZE_OPTIONS if k in o and int(o[k]) > 0), None)
    return None if size is None else {size: int(o[size]) - 1}


@pytest.mark.parametrize("name", cases("version"))
def test_version_is_stable_and_follows_the_data(name, built):
    ds, root, options = built.get(name)
    v = ds.version()
    assert re.fullmatch(r"[0-9a-f]{64}(\+dvc:[0-9a-f]{32})?", v), v  # DVC's md5 joins it where DVC tracks the data
    cls = DATASETS.get(name)
    assert cls(root, options, False).version() == v
    change = _changed(ds)
    if change is None:
        pytest.skip(f"{name} has no seed or size option: its version follows its files only")
    assert cls(root, {**options, **change}, False).version() != v, change
