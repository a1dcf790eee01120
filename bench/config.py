"""Specs: frozen, validated once at the edge (CLI or suite YAML), content-hashed.

``SweepSpec`` -> ``TrialSpec`` x N. A trial's hash is the sha256 of its canonical JSON; its folder is named by
the first 16 hex digits, which makes relaunching a sweep idempotent.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import UserError
from .hparams import resolve, seed_hash
from .registry import DATASETS, METHODS, MODELS

SUITES_DIR = Path(__file__).parent / "suites"


PROTOCOL = 2
"""What a trial's fields mean, beyond the fields themselves; it enters every trial's hash, so a trial recorded under
another version is never taken for a new one on rerun.

- 1: a dataset's ``seed`` option (its data seed) stayed at its default whatever the trial seed.
- 2: the data seed follows the trial seed unless the dataset option ``seed`` is given (:meth:`TrialSpec.resolve`), so
  trial seeds re-draw the in/out splits, label noise, colours, copies, pairs and partners, as DomainBed re-draws
  its in/out split per trial seed.
"""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def dataset_class(name: str):
    return DATASETS.get(name)


def env_names_of(dataset: str, options: Mapping[str, Any]) -> list[str]:
    cls = DATASETS.get(dataset)
    names = getattr(cls, "environment_names", None)
    return list(names(options) if callable(names) else cls.ENVIRONMENTS)


def supports_task(method_cls, task: str) -> bool:
    """Whether a method trains on a task type: the types its ``TASKS`` names, or, when that is None, every type
    whose Task class does not set ``dedicated_methods``."""
    if method_cls.TASKS is not None:
        return task in method_cls.TASKS
    from .registry import TASKS

    return not getattr(TASKS.get(task), "dedicated_methods", False)


@dataclass(frozen=True)
class TrialSpec:
    """One training run. Everything that changes its numbers is here (and in its hash); where it runs is not."""

    dataset: str
    """Registered dataset name."""
    method: str
    """Registered method name."""
    test_envs: tuple[int, ...]
    """Held-out environment indices (never trained on)."""
    seed: int = 0
    """Trial seed: initialisation, batch order, hyperparameter draws and, unless the dataset option ``seed`` is pinned,
    the data (see :data:`PROTOCOL`)."""
    hparams_seed: int = 0
    """Index of the random-search draw; 0 means the declared defaults."""
    hparams: dict = field(default_factory=dict)
    """Every resolved hyperparameter of the method, model and dataset."""
    steps: int = 5001
    """Training steps (one batch per training environment each)."""
    eval_every: int = 100
    """Evaluate (and checkpoint) every this many steps, and after the last."""
    model: str = "mlp"
    """Registered model name."""
    dataset_options: dict = field(default_factory=dict)
    """Resolved dataset options."""
    callbacks: tuple[str, ...] = ()
    """Registered trial callbacks (extra evaluations, drift, attestation)."""
    protocol: int = PROTOCOL
    """The :data:`PROTOCOL` version the trial was specified under."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["test_envs"] = list(self.test_envs)
        d["callbacks"] = list(self.callbacks)
        return d

    @property
    def hash(self) -> str:
        return sha256_json(self.to_dict())

    @property
    def short_hash(self) -> str:
        return self.hash[:16]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialSpec":
        d = dict(d)
        d["test_envs"] = tuple(d["test_envs"])
        d["callbacks"] = tuple(d.get("callbacks", ()))
        d.setdefault("protocol", 1)  # a spec written before versions existed: the data seed did not follow the seed
        return cls(**d)

    @classmethod
    def resolve(
        cls,
        dataset: str,
        method: str,
        test_envs: tuple[int, ...] | None = None,
        seed: int = 0,
        hparams_seed: int = 0,
        steps: int | None = None,
        eval_every: int | None = None,
        hparams: Mapping[str, Any] | None = None,
        dataset_options: Mapping[str, Any] | None = None,
        model: str | None = None,
        callbacks: tuple[str, ...] = (),
    ) -> "TrialSpec":
        """Validates names and values, draws the hyperparameters and sets the data seed.

        A dataset with a ``seed`` option gets the trial seed as its data seed unless ``dataset_options`` names
        ``seed`` (pinned: the same data for every trial seed).

        Raises:
            UserError: unknown names, out-of-range environments, non-positive steps.
        """
        dcls = DATASETS.get(dataset)
        mcls = METHODS.get(method)
        if not supports_task(mcls, dcls.TASK):
            fits = [m for m in METHODS.names() if supports_task(METHODS.get(m), dcls.TASK)]
            raise UserError(f"method {method!r} does not train on {dcls.TASK} datasets such as {dataset!r}; "
                            f"methods that do: {', '.join(fits) or 'none'}")
        options = dict(dataset_options or {})
        if "seed" in dcls.OPTIONS and "seed" not in options:
            options["seed"] = seed  # DomainBed re-draws the data per trial seed; datasets salt their own draws
        options = dcls.resolve_options(options)
        mcls.validate(dcls, options)  # e.g. a group method refuses a dataset without groups
        names = env_names_of(dataset, options)
        test_envs = tuple(dcls.DEFAULT_TEST_ENVS if test_envs is None else test_envs)
        for i in test_envs:
            if not 0 <= i < len(names):
                raise UserError(
                    f"test environment {i} is out of range for {dataset}: it has {len(names)} environments "
                    f"(0..{len(names) - 1}: {', '.join(names)})"
                )
        if len(set(test_envs)) != len(test_envs) or len(test_envs) >= len(names):
            raise UserError(f"test environments {list(test_envs)} must be distinct and leave one to train on: "
                            f"{dataset} has {len(names)} ({', '.join(names)})")  # fmt: skip
        steps = dcls.N_STEPS if steps is None else steps
        eval_every = dcls.EVAL_EVERY if eval_every is None else eval_every
        if steps <= 0 or eval_every <= 0:
            raise UserError(f"steps and eval_every must be positive (got steps={steps}, eval_every={eval_every})")
        model = model or dcls.DEFAULT_MODEL
        MODELS.get(model)
        for cb in callbacks:
            from .registry import CALLBACKS

            CALLBACKS.get(cb).validate(cb, dcls)
        space = mcls.hparam_space(dcls.HPARAMS)
        # DomainBed draws a fresh search per trial seed: each seed replicates the whole random search.
        draw_seed = 0 if hparams_seed == 0 else seed_hash(hparams_seed, seed)
        hp = resolve(space, draw_seed, hparams)
        return cls(
            dataset=dataset,
            method=method,
            test_envs=tuple(sorted(test_envs)),
            seed=seed,
            hparams_seed=hparams_seed,
            hparams=hp,
            steps=steps,
            eval_every=eval_every,
            model=model,
            dataset_options=options,
            callbacks=tuple(callbacks),
        )


TEST_ENV_MODES = ("default", "each", "each+pairs")

SWEEP_KEYS = {
    "name": "a label for the sweep",
    "datasets": "dataset names",
    "methods": "method names",
    "test_envs": "'default', 'each' (every single environment), 'each+pairs' (adds pairs, for leave-one-domain-out) "
    "or a list of lists of indices",
    "n_hparams": "random-search draws per (dataset, method, test envs); draw 0 is the defaults",
    "n_seeds": "trial seeds",
    "steps": "training steps (default: the dataset's)",
    "eval_every": "evaluation period (default: the dataset's)",
    "hparams": "fixed hyperparameters for every trial, or {method: {...}} per method",
    "dataset_options": "{dataset: {option: value}}",
    "model": "model name (default: the dataset's)",
    "callbacks": "trial callbacks for every trial",
}


@dataclass(frozen=True)
class SweepSpec:
    """A grid of trials: datasets x methods x test environments x hyperparameter draws x seeds."""

    datasets: tuple[str, ...]
    """Dataset names."""
    methods: tuple[str, ...]
    """Method names."""
    name: str = "sweep"
    """A label (experiment name in MLflow)."""
    test_envs: Any = "each"
    """'default', 'each', 'each+pairs' or a tuple of tuples."""
    n_hparams: int = 1
    """Random-search draws; draw 0 is the defaults."""
    n_seeds: int = 1
    """Trial seeds 0..n_seeds-1."""
    steps: int | None = None
    """Training steps (None: each dataset's default)."""
    eval_every: int | None = None
    """Evaluation period (None: each dataset's default)."""
    hparams: dict = field(default_factory=dict)
    """Fixed hyperparameters: {name: value} for all methods, or {method: {name: value}}."""
    dataset_options: dict = field(default_factory=dict)
    """{dataset: {option: value}}."""
    model: str | None = None
    """Model name (None: each dataset's default)."""
    callbacks: tuple[str, ...] = ()
    """Trial callbacks for every trial."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("datasets", "methods", "callbacks"):
            d[k] = list(d[k])
        if not isinstance(self.test_envs, str):
            d["test_envs"] = [list(t) for t in self.test_envs]
        return d

    @property
    def hash(self) -> str:
        return sha256_json(self.to_dict())

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "sweep") -> "SweepSpec":
        """Builds a spec from YAML/CLI values; unknown keys and bad values raise a one-line UserError."""
        if not isinstance(raw, Mapping):
            raise UserError(f"{where}: expected a mapping of sweep keys, got {type(raw).__name__}")
        for k in raw:
            if k not in SWEEP_KEYS:
                near = difflib.get_close_matches(str(k), SWEEP_KEYS, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise UserError(f"{where}: unknown key {k!r}{hint}; known: {', '.join(SWEEP_KEYS)}")
        d = dict(raw)
        for k in ("datasets", "methods"):
            d[k] = _names(d.get(k), k, where)
            if not d[k]:
                raise UserError(f"{where}: '{k}' must name at least one")
        d["callbacks"] = _callback_names(d.get("callbacks"), where)
        te = d.get("test_envs", "each")
        if isinstance(te, str):
            if te not in TEST_ENV_MODES:
                raise UserError(f"{where}: test_envs {te!r} must be one of {TEST_ENV_MODES} or a list of lists")
        else:
            try:
                if isinstance(te, Mapping) or not all(_is_int(i) for t in te for i in ([t] if _is_int(t) else t)):
                    raise TypeError
                te = tuple(tuple(int(i) for i in ([t] if _is_int(t) else t)) for t in te)
            except TypeError:
                raise UserError(f"{where}: test_envs must be a mode name or a list of lists of integers "
                                f"(got {te!r})") from None  # fmt: skip
        d["test_envs"] = te
        for k in ("n_hparams", "n_seeds", "steps", "eval_every"):
            if d.get(k) is not None and (not _is_int(d[k]) or d[k] <= 0):
                raise UserError(f"{where}: {k} must be a positive integer (got {d[k]!r})")
        for k in ("name", "model"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise UserError(f"{where}: {k} must be text (got {d[k]!r})")
        for k in ("hparams", "dataset_options"):
            if d.get(k) is None:
                d[k] = {}
            elif not isinstance(d[k], Mapping):
                raise UserError(f"{where}: {k} must be a mapping (got {d[k]!r})")
        _check_per_name(d["dataset_options"], DATASETS, "dataset_options", where)
        if any(isinstance(v, Mapping) for v in d["hparams"].values()):
            if not all(isinstance(v, Mapping) for v in d["hparams"].values()):
                raise UserError(f"{where}: hparams mixes fixed values and per-method tables; use one form: "
                                f"{{name: value}} for every method or {{method: {{name: value}}}}")  # fmt: skip
            _check_per_name(d["hparams"], METHODS, "hparams", where)
        spec = cls(**d)
        spec.trials()  # validates every name and value now, before anything runs
        return spec

    def _test_env_sets(self, dataset: str) -> list[tuple[int, ...]]:
        if not isinstance(self.test_envs, str):
            return [tuple(t) for t in self.test_envs]
        if self.test_envs == "default":
            return [tuple(DATASETS.get(dataset).DEFAULT_TEST_ENVS)]
        n = len(env_names_of(dataset, self.dataset_options.get(dataset, {})))
        sets = [(i,) for i in range(n)]
        if self.test_envs == "each+pairs":
            sets += list(itertools.combinations(range(n), 2))
        return sets

    def _hparams_for(self, method: str) -> dict:
        if any(isinstance(v, Mapping) for v in self.hparams.values()):
            return dict(self.hparams.get(method, {}))
        return dict(self.hparams)

    def trials(self) -> list[TrialSpec]:
        """Every trial, a dataset's seeds outermost: trials sharing a data seed (:data:`PROTOCOL`) come together, so
        a worker's in-process dataset cache holds one build per seed at a time.

        Resolved once per spec (``from_mapping`` resolves it to validate; the driver, the status command and the
        launchers then reuse that list): a new list each call, of the same frozen TrialSpecs."""
        cached = self.__dict__.get("_trials")
        if cached is None:
            cached = tuple(self._resolve_trials())
            object.__setattr__(self, "_trials", cached)  # frozen dataclass: a cache, not a field
        return list(cached)

    def _resolve_trials(self) -> list[TrialSpec]:
        out = []
        for dataset, s in ((d, s) for d in self.datasets for s in range(self.n_seeds)):
            for method in self.methods:
                for te, h in itertools.product(self._test_env_sets(dataset), range(self.n_hparams)):
                    out.append(
                        TrialSpec.resolve(
                            dataset,
                            method,
                            te,
                            seed=s,
                            hparams_seed=h,
                            steps=self.steps,
                            eval_every=self.eval_every,
                            hparams=self._hparams_for(method),
                            dataset_options=self.dataset_options.get(dataset, {}),
                            model=self.model,
                            callbacks=self.callbacks,
                        )
                    )
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's true is an int to Python; never a count


def _names(v: Any, key: str, where: str) -> tuple[str, ...]:
    """A list of names, or one comma-separated string of them (names never hold commas); nothing else."""
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]
    if v is None:
        return ()
    if isinstance(v, Mapping) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{where}: '{key}' must be a list of names or a comma-separated string (got {v!r})")
    return tuple(v)


def _callback_names(v: Any, where: str) -> tuple[str, ...]:
    """A list of callback names; one string is one callback (``robust_eval:eps=0.3,steps=20`` holds commas of its
    own), so a string with a comma before any ``:`` (``drift,attest``) is refused as ambiguous."""
    if v is None:
        return ()
    if isinstance(v, str):
        if "," in v.split(":", 1)[0]:
            raise UserError(f"{where}: callbacks {v!r} is one string; write a list, e.g. [{', '.join(v.split(','))}]")
        return (v,)
    if isinstance(v, Mapping) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{where}: callbacks must be a list of callback names (got {v!r})")
    return tuple(v)


def _check_per_name(table: Mapping, registry, key: str, where: str) -> None:
    """``{name: {...}}`` tables: every key a registered name (a misspelt one would be silently ignored), every
    value a mapping. Names outside the sweep are fine: a CLI override may narrow a suite's list."""
    for k, v in table.items():
        if str(k) not in registry.names():
            near = difflib.get_close_matches(str(k), registry.names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"{where}: {key} names {k!r}{hint}, which is no registered {registry.kind}")
        if not isinstance(v, Mapping):
            raise UserError(f"{where}: {key}[{k!r}] must be a mapping of name: value (got {v!r})")


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def add_dataset_options(raw: Mapping[str, Any], extra: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """``raw`` with ``extra`` options laid over every one of its datasets' options (``sweep --option``)."""
    raw = dict(raw)
    if extra:
        given = raw.get("dataset_options") or {}
        if not isinstance(given, Mapping):
            raise UserError(f"{where}: dataset_options must be a mapping (got {given!r})")
        raw["dataset_options"] = {**given, **{ds: {**(given.get(ds) or {}), **extra}
                                              for ds in _names(raw.get("datasets"), "datasets", where)}}
    return raw


def load_suite(name_or_path: str, options: Mapping[str, Any] | None = None, **overrides: Any) -> SweepSpec:
    """A named suite (``shiftbench list suites``) or a YAML file; CLI overrides replace its keys and ``options``
    are laid over every dataset's options."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SUITES_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            near = difflib.get_close_matches(name_or_path, suite_names(), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise UserError(f"unknown suite {name_or_path!r}: {hint}known: {', '.join(suite_names())}, or a YAML path")
    if not path.exists():
        raise UserError(f"suite file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    raw = dict(raw or {}) if isinstance(raw, Mapping) else raw
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
        raw.update({k: v for k, v in overrides.items() if v is not None})
        raw = add_dataset_options(raw, options, str(path))
    return SweepSpec.from_mapping(raw, where=str(path))
