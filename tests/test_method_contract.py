"""The method contract, over every registered method and every task type it trains on (timm-style: a method added to
the registry is covered with no edit here).

For each (method, task type), on a tiny dataset of that type, through the real trainer:
1. a few steps of ``run_trial`` end ``done`` with a finite training loss in every record;
2. the checkpoint a killed trial leaves loads into a freshly built method and gives back exactly the saved state
   (module tensors and every optimizer's state), and that state is not the fresh one (training moved it);
3. a trial killed after its step-3 checkpoint and resumed ends with the same final record (timings aside) and the
   same weights as the uninterrupted trial.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shiftbench.config import TrialSpec, supports_task
from shiftbench.errors import UserError
from shiftbench.registry import DATASETS, METHODS, TASKS
from shiftbench.records import CHECKPOINT, WEIGHTS
from shiftbench.trainer import Interrupted, RunOptions, Trainer, run_trial

TINY: dict[str, list[tuple[str, dict]]] = {
    "classification": [("colored_digits", {"env_size": 120, "resolution": 8}),
                       ("subpop_digits", {"env_size": 120, "resolution": 8})],
    "preference": [("spurious_prefs", {"n_pairs": 40, "bon_prompts": 1})],
    "coordination": [("lever_game", {})],
}
"""Per task type, tiny datasets of that type with their options; a method trains on the first it accepts (a group
method refuses colored_digits, which has no groups, and takes subpop_digits)."""

STEPS, EVAL_EVERY, CUT = 6, 3, 3
TIMING = {"elapsed", "step_time"}

SLOW: set[tuple[str, str]] = {("cooperative", "coordination"), ("jtt", "preference")}
"""(method, task) cases over ~5 s each (their two trials: 11.7 s and 10.6 s here), marked ``slow``."""


def spec_for(method: str, task: str) -> TrialSpec:
    """The trial of ``method`` on the first tiny dataset of ``task`` it accepts (UserError if it takes none)."""
    refusals = []
    for dataset, options in TINY[task]:
        try:
            return TrialSpec.resolve(dataset, method, steps=STEPS, eval_every=EVAL_EVERY, dataset_options=options)
        except UserError as e:
            refusals.append(str(e))
    raise UserError("; ".join(refusals))


def cases() -> list:
    """(method, task) for every registered method and every registered task type it trains on. A task type that no
    method trains on or that has no tiny dataset here, or a method refusing every one, is skipped with the reason, so
    it shows up in the summary rather than passing silently."""
    out = []
    DATASETS.names()  # the coordination task type registers when its datasets are imported (see the test below)
    for task in TASKS.names():
        takers = [m for m in METHODS.names() if supports_task(METHODS.get(m), task)]
        if not takers:
            out.append(pytest.param(None, task, id=f"{task}-none",
                                    marks=pytest.mark.skip(reason=f"no registered method trains on {task}")))
        for method in takers:
            marks = [pytest.mark.slow] if (method, task) in SLOW else []
            if task not in TINY:
                marks.append(pytest.mark.skip(reason=f"no tiny {task} dataset in the contract test"))
            else:
                try:
                    spec_for(method, task)
                except UserError as e:
                    marks.append(pytest.mark.skip(reason=f"{method} takes no tiny {task} dataset: {e}"))
            out.append(pytest.param(method, task, id=f"{task}-{method}", marks=marks))
    return out


def test_every_declared_task_type_is_registered_and_every_tiny_dataset_is_of_its_type():
    # a method naming a task type the registry lacks would silently get no case above
    unknown = {m: [t for t in METHODS.get(m).TASKS if t not in TASKS] for m in METHODS.names()
               if METHODS.get(m).TASKS is not None}  # fmt: skip
    assert not {m: t for m, t in unknown.items() if t}
    assert {(task, DATASETS.get(d).TASK) for task, entries in TINY.items() for d, _ in entries} == \
        {(task, task) for task in TINY}  # fmt: skip


def test_the_task_registry_lists_every_task_type_in_a_fresh_process():
    code = ("from shiftbench.registry import TASKS, DATASETS; before = TASKS.names(); "
            "print(before == sorted({DATASETS.get(d).TASK for d in DATASETS.names()} | set(TASKS.names())), before)")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True"), out.stdout


class Trials:
    """The uninterrupted and the killed run of each case, made once and shared by the three tests."""

    def __init__(self, root: Path):
        self.root, self.done = root, {}

    def get(self, method: str, task: str) -> tuple[TrialSpec, Path, dict, Path]:
        key = (method, task)
        if key not in self.done:
            spec = spec_for(method, task)
            base = self.root / f"{task}-{method}"
            whole = run_trial(spec, base / "whole", RunOptions(device="cpu"))
            with pytest.raises(Interrupted):
                run_trial(spec, base / "cut", RunOptions(device="cpu", stop_after=CUT))
            self.done[key] = (spec, base / "whole", whole, base / "cut")
        return self.done[key]


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> Trials:
    return Trials(tmp_path_factory.mktemp("contract"))


def flat(state, prefix="") -> dict[str, object]:
    """Nested checkpoint state as {dotted path: leaf}."""
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, v in enumerate(state):
            out.update(flat(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): state}


def same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("method, task", cases())
def test_runs_with_finite_loss(method, task, trials):
    spec, whole_dir, whole, _ = trials.get(method, task)
    assert whole["status"] == "done", whole
    records = [json.loads(r) for r in (whole_dir / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 5]
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses), losses


@pytest.mark.parametrize("method, task", cases())
def test_checkpoint_round_trip(method, task, trials):
    spec, _, _, cut_dir = trials.get(method, task)
    saved = torch.load(cut_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["step"] == CUT + 1
    algorithm = Trainer(spec, cut_dir, RunOptions(device="cpu"))._build().algorithm
    fresh = flat(algorithm.checkpoint_state())
    want = flat(saved["algorithm"])
    assert not all(k in fresh and same(fresh[k], v) for k, v in want.items()), "training left the state unchanged"
    algorithm.load_checkpoint_state(saved["algorithm"])
    got = flat(algorithm.checkpoint_state())
    assert set(got) == set(want)
    differ = [k for k in want if not same(got[k], want[k])]
    assert not differ, differ[:5]


@pytest.mark.parametrize("method, task", cases())
def test_resume_equality(method, task, trials):
    spec, whole_dir, whole, cut = trials.get(method, task)
    cut_dir = cut.parent / "resumed"  # a copy, so the killed trial's checkpoint stays for the round-trip test
    shutil.copytree(cut, cut_dir)
    resumed = run_trial(spec, cut_dir, RunOptions(device="cpu"))
    assert resumed["status"] == "done", resumed
    a = {k: v for k, v in whole["record"].items() if k not in TIMING}
    b = {k: v for k, v in resumed["record"].items() if k not in TIMING}
    assert a == b
    wa = torch.load(whole_dir / WEIGHTS, weights_only=True)
    wb = torch.load(cut_dir / WEIGHTS, weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
