"""The callback contract, over every registered callback (timm-style: a callback added to the registry is covered with
no edit here).

For each callback name (a family such as ``robust_eval:`` is tested under its family name, i.e. with no settings):

1. ``validate`` accepts the bare name, and a spec naming ``<callback>:nonsense=1`` is refused with one UserError line,
   whether the callback takes settings (its ``validate`` refuses the unknown key) or not (no such callback);
2. on a tiny trial (the first of :data:`TINY` whose dataset the callback accepts) the trial ends done, the callback
   leaves something to see (final-record keys, ``final.json`` entries or files that the same trial without it
   lacks), and what training recorded (losses, accuracies: every key of the bare trial's records) is identical to
   the bare trial's: a callback observes training, it never changes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shiftbench.config import TrialSpec, supports_task
from shiftbench.errors import UserError
from shiftbench.registry import CALLBACKS, DATASETS, METHODS
from shiftbench.trainer import RunOptions, run_trial

TINY: list[tuple[str, dict]] = [
    ("colored_digits", {"env_size": 120, "resolution": 8}),
    ("spurious_prefs", {"n_pairs": 40, "bon_prompts": 1}),
    ("lever_game", {}),
]
"""Tiny datasets, one per task type; a callback runs on the first it accepts."""

STEPS, EVAL_EVERY = 4, 2
TIMING = {"elapsed", "step_time"}
"""Record keys that are wall-clock times, which differ between any two runs."""

NEEDS_SETTINGS: dict[str, tuple[str, str]] = {}
"""Callbacks that cannot run under their bare name: name -> (a name with settings that runs, why)."""

SLOW: set[str] = set()
"""Callbacks whose tiny trial takes over ~5 s, marked ``slow`` (none: the slowest, best_of_n with its bare
spurious_prefs trial, took 2.2 s here)."""


def runnable(name: str) -> str:
    """The callback name a trial runs with: the bare name, or the one :data:`NEEDS_SETTINGS` gives."""
    return NEEDS_SETTINGS.get(name, (name, ""))[0]


def method_for(task: str) -> str:
    """ERM where it trains on the task type, else the first registered method that does."""
    names = ["erm", *METHODS.names()]
    return next(m for m in names if supports_task(METHODS.get(m), task))


def spec_for(callbacks: tuple[str, ...], dataset: str | None = None) -> TrialSpec:
    """The tiny trial with ``callbacks`` on ``dataset`` (default: the first of TINY that accepts them)."""
    refusals = []
    for name, options in TINY:
        if dataset is not None and name != dataset:
            continue
        try:
            return TrialSpec.resolve(name, method_for(DATASETS.get(name).TASK), steps=STEPS, eval_every=EVAL_EVERY,
                                     dataset_options=options, callbacks=callbacks)  # fmt: skip
        except UserError as e:
            refusals.append(f"{name}: {e}")
    raise UserError("; ".join(refusals))


def cases() -> list:
    out = []
    for name in CALLBACKS.names():
        marks = [pytest.mark.slow] if name in SLOW else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


@pytest.mark.parametrize("name", CALLBACKS.names())
def test_validate_accepts_the_bare_name_and_refuses_nonsense_settings(name):
    cls = CALLBACKS.get(name)
    if name in NEEDS_SETTINGS:
        with pytest.raises(UserError):
            cls.validate(name, None)
    else:
        cls.validate(name, None)  # no dataset class: the name alone is checked
    bad = f"{name.rstrip(':')}:nonsense=1"
    dataset = spec_for((runnable(name),)).dataset
    with pytest.raises(UserError) as err:
        spec_for((bad,), dataset)
    message = str(err.value)
    assert "\n" not in message and bad.partition(":")[0] in message, message


class Trials:
    """The bare trial of each tiny dataset, run once and shared."""

    def __init__(self, root: Path):
        self.root, self.bare = root, {}

    def run(self, spec: TrialSpec, label: str) -> tuple[dict, Path]:
        trial = self.root / label / "trials" / spec.short_hash  # a sweep's layout: an attestation log beside it
        return run_trial(spec, trial, RunOptions(device="cpu", checkpoint_interval=0)), trial

    def bare_of(self, dataset: str) -> tuple[dict, Path]:
        if dataset not in self.bare:
            self.bare[dataset] = self.run(spec_for((), dataset), f"bare-{dataset}")
        return self.bare[dataset]


@pytest.fixture(scope="module")
def trials(tmp_path_factory) -> Trials:
    home = tmp_path_factory.mktemp("home")  # the signer's and the log operator's keys, away from the user's
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIFTBENCH_HOME", str(home))
        yield Trials(tmp_path_factory.mktemp("callbacks"))


def records(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "results.jsonl").read_text().splitlines() if line.strip()]


def files(trial: Path) -> set[str]:
    return {str(p.relative_to(trial)) for p in trial.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", cases())
def test_on_a_tiny_trial_it_adds_and_changes_no_training_number(name, trials):
    spec = spec_for((runnable(name),))
    final, trial = trials.run(spec, name.replace(":", "_"))
    bare, bare_trial = trials.bare_of(spec.dataset)
    assert final["status"] == "done", final
    # what it leaves: record keys, final.json entries or files the bare trial lacks
    added = (set(final["record"]) - set(bare["record"])) | (set(final) - set(bare)) | (files(trial) - files(bare_trial))
    assert added, f"{name} left nothing in the record, final.json or the trial folder"
    for key in set(final) - set(bare):  # a callback that caught its own failure says so (drift's "error")
        assert not (isinstance(final[key], dict) and "error" in final[key]), (key, final[key])
    # training is untouched: every number of the bare trial's records, the same
    got, want = records(trial), records(bare_trial)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 3]
    for a, b in zip(got, want):
        keys = set(b) - TIMING
        assert {k: a.get(k) for k in keys} == {k: b[k] for k in keys}, a["step"]
    keys = set(bare["record"]) - TIMING
    assert {k: final["record"].get(k) for k in keys} == {k: bare["record"][k] for k in keys}
