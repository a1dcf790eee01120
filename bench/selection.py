"""Model-selection rules: which hyperparameter draw and checkpoint of a sweep a reported number comes from.

The rules and their semantics are DomainBed's (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021, section 3 and its ``model_selection.py``):

- **training-domain validation**: within a run, the checkpoint with the best mean accuracy on the held-out ("out")
  splits of the training environments; across hyperparameter draws, the run whose chosen checkpoint scores best.
- **leave-one-domain-out**: for test environment t, extra runs hold out t and one more environment j; the mean
  accuracy over j of those runs on j, at a step, is the validation score of the same step of the run that holds out
  only t. Best step within a draw, then best draw.
- **test-domain validation (oracle)**: no early stopping; the last checkpoint of each run is scored on the test
  environment's "out" split, and the best draw reports its "in" split. An upper bound, not a fair selection.

A trial is a dict ``{"hash": str, "spec": {...}, "records": [record, ...]}`` as :func:`shiftbench.report.load_trials`
returns it (spec = spec.json's ``"spec"``, records = results.jsonl). Every rule has the signature
``rule(trials, test_env) -> Selection | None`` where ``trials`` are the done trials of one (dataset, method, seed)
across hyperparameter draws and test-environment sets, and returns None when nothing can be selected.

Ties are broken deterministically: the earliest step within a run, then the lowest ``hparams_seed`` (then the lowest
hash) across runs.

Adding a rule is one decorated function::

    @selection_rule("best_last_step", "last checkpoint by training-domain validation")
    def best_last_step(trials, test_env): ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .records import env_key, held_out_envs, metric_key, parse_env_key

Record = Mapping[str, Any]
Trial = Mapping[str, Any]
RuleFn = Callable[[Sequence[Trial], int], Optional["Selection"]]
PoolFn = Callable[[Sequence[Trial], int], list]

@dataclass(frozen=True)
class Selection:
    """What a rule picked for one test environment.

    Attributes:
        val_acc: the validation score the rule maximised (a fraction, as in the records).
        test_acc: the selected checkpoint's accuracy on the test environment's "in" split (a fraction).
        hash: the hash of the trial whose checkpoint was selected (for leave-one-domain-out, the trial that holds
            out only the test environment).
        hparams_seed: the selected hyperparameter draw.
        step: the selected checkpoint's training step.
    """

    val_acc: float
    test_acc: float
    hash: str
    hparams_seed: int
    step: int


RULES: dict[str, RuleFn] = {}
"""The one registry of selection rules: name -> rule function, in registration (= display) order.

Each function carries ``rule_name``, ``title`` (the display name) and ``pool`` (a function
``pool(trials, test_env) -> list[trial]`` returning the trials the rule looks at, used to count the trials behind a
number)."""


def single_test_env_pool(trials: Sequence[Trial], test_env: int) -> list:
    """The trials that hold out exactly ``test_env``: the default candidates of a rule."""
    return [t for t in trials if held_out_envs(t) == [test_env]]


def selection_rule(name: str, title: str, pool: PoolFn = single_test_env_pool) -> Callable[[RuleFn], RuleFn]:
    """Decorator: registers a selection rule in :data:`RULES`.

    Args:
        name: registry key (lowercase, stable: it names metrics and report sections).
        title: display name, e.g. "training-domain validation".
        pool: which trials the rule considers for a test environment (counted in reports as "trials behind").

    Returns:
        The decorator; it returns the function unchanged apart from the attributes it sets.
    """

    def deco(fn: RuleFn) -> RuleFn:
        if name != name.lower():
            raise ValueError(f"selection rule names are lowercase: {name!r}")
        if name in RULES and RULES[name] is not fn:
            raise ValueError(f"selection rule {name!r} is already registered by {RULES[name].__module__}")
        fn.rule_name = name  # type: ignore[attr-defined]
        fn.title = title  # type: ignore[attr-defined]
        fn.pool = pool  # type: ignore[attr-defined]
        RULES[name] = fn
        return fn

    return deco


def rule_title(name: str) -> str:
    """The display name of a registered rule (KeyError for an unknown one)."""
    return RULES[name].title  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------- helpers


def hparams_seed(trial: Trial) -> int:
    """The trial's hyperparameter draw (0 = defaults when the spec does not say)."""
    return int(trial["spec"].get("hparams_seed", 0))


def _order(trial: Trial) -> tuple[int, str]:
    return hparams_seed(trial), str(trial["hash"])


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _records(trial: Trial) -> list[Record]:
    """The trial's records sorted by step (stable: equal steps keep file order)."""
    return sorted(trial.get("records", []), key=lambda r: r.get("step", 0))


def _best(candidates: Iterable[Selection]) -> Selection | None:
    """The first candidate with the highest val_acc (callers pass candidates in tie-break order)."""
    best: Selection | None = None
    for c in candidates:
        if best is None or c.val_acc > best.val_acc:
            best = c
    return best


def _out_envs(record: Record) -> list[int]:
    return sorted(m[0] for k in record if (m := parse_env_key(k)) and m[1:] == ("out", "acc"))


# ------------------------------------------------------------------------------------------------------------- rules


@selection_rule("training_domain", "training-domain validation")
def training_domain(trials: Sequence[Trial], test_env: int) -> Selection | None:
    """Training-domain validation: best checkpoint by mean training-env "out" accuracy, then best draw.

    Args:
        trials: done trials of one (dataset, method, seed).
        test_env: the held-out environment to report.

    Returns:
        The selection, or None when no trial holds out exactly ``test_env`` with usable records.
    """
    def score(trial: Trial, r: Record) -> tuple[float | None, Any]:
        vals = [r[env_key(i, "out", "acc")] for i in _out_envs(r) if i != test_env]
        test = r.get(env_key(test_env, "in", "acc"))
        return (sum(vals) / len(vals), test) if vals and _finite(*vals, test) else (None, None)

    return _best_checkpoint_then_draw(trials, test_env, score)


def _best_checkpoint_then_draw(trials: Sequence[Trial], test_env: int,
                               score: Callable[[Trial, Record], tuple[float | None, Any]]) -> Selection | None:
    """Per trial the checkpoint with the best validation value, then the trial (draw) with the best of those.

    ``score(trial, record)`` gives (validation value, test value) of a checkpoint, or (None, _) to skip it.
    """
    per_trial = []
    for trial in sorted(single_test_env_pool(trials, test_env), key=_order):
        steps = []
        for r in _records(trial):
            val, test = score(trial, r)
            if val is None or not _finite(test):
                continue
            steps.append(Selection(float(val), float(test), str(trial["hash"]), hparams_seed(trial),
                                   int(r.get("step", 0))))
        per_trial.append(_best(steps))
    return _best(s for s in per_trial if s is not None)


@selection_rule("oracle", "test-domain validation (oracle)")
def oracle(trials: Sequence[Trial], test_env: int) -> Selection | None:
    """Test-domain validation (oracle): each run's last checkpoint, scored on the test env's "out" split.

    Args:
        trials: done trials of one (dataset, method, seed).
        test_env: the held-out environment to report.

    Returns:
        The selection, or None when no trial holds out exactly ``test_env`` with usable records.
    """
    per_trial = []
    val_key, test_key = env_key(test_env, "out", "acc"), env_key(test_env, "in", "acc")
    for trial in sorted(single_test_env_pool(trials, test_env), key=_order):
        usable = [r for r in _records(trial) if _finite(r.get(val_key), r.get(test_key))]
        if usable:
            last = usable[-1]
            per_trial.append(Selection(float(last[val_key]), float(last[test_key]),
                                       str(trial["hash"]), hparams_seed(trial), int(last.get("step", 0))))
    return _best(per_trial)


def leave_one_out_pool(trials: Sequence[Trial], test_env: int) -> list:
    """The trials leave-one-domain-out looks at: those holding out ``test_env`` alone, and those holding out
    ``test_env`` and one more environment in a draw (hparams_seed) that has a trial holding out ``test_env`` alone."""
    singles = single_test_env_pool(trials, test_env)
    draws = {hparams_seed(t) for t in singles}
    pairs = [t for t in trials if hparams_seed(t) in draws and len(set(held_out_envs(t))) == 2
             and len(held_out_envs(t)) == 2 and test_env in held_out_envs(t)]
    return singles + pairs


@selection_rule("leave_one_domain_out", "leave-one-domain-out", pool=leave_one_out_pool)
def leave_one_domain_out(trials: Sequence[Trial], test_env: int) -> Selection | None:
    """Leave-one-domain-out: validation = mean accuracy on env j of the runs holding out (test_env, j).

    For each hyperparameter draw and step, every other environment j needs a pair trial with a record at that step;
    steps (or draws) where one is missing are skipped. Where several trials fit one role (same draw, same
    held-out set), the one with the lowest hash is used.

    Args:
        trials: done trials of one (dataset, method, seed).
        test_env: the held-out environment to report.

    Returns:
        The selection, or None when no draw has a single-env trial and all its pairs at a common step.
    """
    single: dict[int, Trial] = {}
    pairs: dict[tuple[int, int], Trial] = {}
    for trial in sorted(leave_one_out_pool(trials, test_env), key=_order):
        envs = held_out_envs(trial)
        hp = hparams_seed(trial)
        if len(envs) == 1:
            single.setdefault(hp, trial)
        else:
            j = envs[0] if envs[1] == test_env else envs[1]
            pairs.setdefault((hp, j), trial)

    per_draw = []
    for hp in sorted(single):
        trial = single[hp]
        recs = _records(trial)
        if not recs:
            continue
        others = [i for i in _out_envs(recs[0]) if i != test_env]  # the dataset's envs, as DomainBed counts them
        if not others or any((hp, j) not in pairs for j in others):
            continue
        pair_acc = {j: {int(r.get("step", 0)): r.get(env_key(j, "in", "acc")) for r in _records(pairs[(hp, j)])}
                    for j in others}
        steps = []
        for r in recs:
            step = int(r.get("step", 0))
            vals = [pair_acc[j].get(step) for j in others]
            test = r.get(env_key(test_env, "in", "acc"))
            if not _finite(*vals, test):
                continue
            steps.append(Selection(sum(vals) / len(vals), float(test), str(trial["hash"]), hp, step))
        per_draw.append(_best(steps))
    return _best(s for s in per_draw if s is not None)


def _worst_group_val(trial: Trial, record: Record, test_env: int) -> float | None:
    """A record's worst-group validation accuracy: the dataset's validation split's ``worst_group_acc`` when the
    dataset names one (``validation_split`` in spec.json's ``dataset``, e.g. WILDS' ``val`` as ``env0_out``), else
    the lowest accuracy over the training environments' "out" splits (each environment a group, or its own worst
    group where it records one)."""
    named = (trial.get("dataset") or {}).get("validation_split") if isinstance(trial.get("dataset"), Mapping) else None
    if named:
        v = record.get(metric_key(named, "worst_group_acc"))
        return float(v) if _finite(v) else None
    vals = [record.get(env_key(i, "out", "worst_group_acc"), record.get(env_key(i, "out", "acc")))
            for i in _out_envs(record) if i != test_env]
    return float(min(vals)) if vals and _finite(*vals) else None


@selection_rule("worst_group", "worst-group validation")
def worst_group(trials: Sequence[Trial], test_env: int) -> Selection | None:
    """Worst-group validation: best checkpoint and draw by validation worst-group accuracy; test worst-group accuracy.

    The reported number is the test split's worst-group accuracy, or its plain accuracy where it records no groups.

    As in Sagawa et al. ("Distributionally Robust Neural Networks", ICLR 2020) and WILDS, where early stopping and
    hyperparameters are chosen on the validation split's worst-group accuracy.

    Args:
        trials: done trials of one (dataset, method, seed).
        test_env: the held-out environment to report.

    Returns:
        The selection, or None when no trial holds out exactly ``test_env`` with usable records.
    """
    def score(trial: Trial, r: Record) -> tuple[float | None, Any]:
        return (_worst_group_val(trial, r, test_env),
                r.get(env_key(test_env, "in", "worst_group_acc"), r.get(env_key(test_env, "in", "acc"))))

    return _best_checkpoint_then_draw(trials, test_env, score)
