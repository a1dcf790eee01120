"""The dataset plug-in interface: named environments of examples, split into ``in`` and ``out``.

A batch is a dict of tensors. Every task needs ``idx`` (a stable example id); classification adds ``x`` and
``y``; preference adds ``chosen`` and ``rejected``; any other key is metadata (group, colour, ...).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import numpy as np
import torch

from .hparams import HParam, Rule, seed_hash
from .registry import DATASETS
from .settings import Setting

Batch = dict[str, torch.Tensor]


class Split:
    """A finite set of examples that can be sampled for training and walked once for evaluation."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch_at(self, k: int, batch_size: int, seed: int, keys: tuple[str, ...] | None = None) -> Batch:
        """The k-th training batch of the infinite stream for ``seed``: a pure function of (k, seed), so a
        resumed trial sees exactly the batches an uninterrupted one would. ``keys`` limits which entries are
        gathered (None: all)."""
        raise NotImplementedError

    def batches_at(self, steps: range, batch_size: int, seed: int, keys: tuple[str, ...] | None = None,
                   out: Batch | None = None) -> Batch:  # fmt: skip
        """``batch_at`` for every step of ``steps``, stacked: each entry has a leading dimension of ``len(steps)``
        (what a pack gathers for many steps at once); with ``out``, written into its tensors of that shape."""
        per = [self.batch_at(k, batch_size, seed, keys) for k in steps]
        stacked = {key: torch.stack([b[key] for b in per]) for key in per[0]}
        return stacked if out is None else {key: out[key].copy_(v) for key, v in stacked.items()}

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Split":
        return self


class TensorSplit(Split):
    """Examples held as tensors (all of them fit in memory); batches are index gathers, no DataLoader."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        n = {len(t) for t in tensors.values()}
        if len(n) != 1:
            raise ValueError(f"tensors of unequal length: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = dict(tensors)
        self.n = n.pop()
        self._perm_cache: tuple[int, int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.n

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit({k: v.to(device) for k, v in self.tensors.items()})

    def _perm(self, seed: int, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[:2] != (seed, epoch):
            g = torch.Generator().manual_seed(seed_hash(seed, epoch))
            self._perm_cache = (seed, epoch, torch.randperm(self.n, generator=g).to(self.device))
        return self._perm_cache[2]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def _batch_index(self, k: int, batch_size: int, seed: int) -> torch.Tensor:
        """The rows of the k-th batch: the k-th ``batch_size`` slice of the seeded permutation of its epoch."""
        if batch_size <= 0 or self.n == 0:
            # hyperparameters are validated when the spec is resolved; this guards direct callers
            raise ValueError(f"batch_size must be positive and the split non-empty (got {batch_size}, n={self.n})")
        bs = min(batch_size, self.n)
        epoch, pos = divmod(k, self.n // bs)
        return self._perm(seed, epoch)[pos * bs : (pos + 1) * bs]

    def _gather(self, idx: torch.Tensor, keys: tuple[str, ...] | None) -> Batch:
        keys = tuple(self.tensors) if keys is None else keys
        return {key: torch.index_select(self.tensors[key], 0, idx) for key in keys if key in self.tensors}

    def batch_at(self, k: int, batch_size: int, seed: int, keys: tuple[str, ...] | None = None) -> Batch:
        return self._gather(self._batch_index(k, batch_size, seed), keys)

    def batches_at(self, steps: range, batch_size: int, seed: int, keys: tuple[str, ...] | None = None,
                   out: Batch | None = None) -> Batch:  # fmt: skip
        """One gather per entry for all the steps (the same rows as ``batch_at`` step by step), straight into
        ``out`` when given."""
        idx = torch.cat([self._batch_index(k, batch_size, seed) for k in steps])
        if out is None:
            return {key: t.view(len(steps), -1, *t.shape[1:]) for key, t in self._gather(idx, keys).items()}
        for key, t in out.items():
            torch.index_select(self.tensors[key], 0, idx, out=t.view(-1, *t.shape[2:]))
        return out

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, self.n, batch_size):
            yield {key: t[i : i + batch_size] for key, t in self.tensors.items()}


@dataclass
class Environment:
    """One domain or group, with DomainBed's ``in`` (train / test) and ``out`` (validation) parts."""

    name: str
    splits: dict[str, Split]


def holdout_split(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's in/out split: a seeded permutation, the first ``holdout_fraction`` of it is ``out``."""
    perm = np.random.RandomState(seed).permutation(n)
    n_out = int(round(n * holdout_fraction))
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


SEED = Setting(0, "data seed (every random draw of the data); a trial uses its trial seed unless this is set (pin it, "
                   "e.g. seed=0, for the same data in every trial)")
"""The ``seed`` option every generated or split dataset declares (``TrialSpec.resolve`` fills in the trial seed)."""
HOLDOUT_FRACTION = Setting(0.2, "the 'out' (validation) share of each environment",
                           Rule("strictly between 0 and 1", lambda v: 0 < v < 1))
"""DomainBed's ``holdout_fraction`` option (:func:`holdout_split`)."""


def tensor_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over named arrays in a fixed order: the content version of generated data."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = np.ascontiguousarray(torch.as_tensor(tensors[k]).cpu().numpy())
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class ShiftDataset:
    """Base class of every dataset plug-in.

    A subclass sets the class attributes and fills ``self.environments`` in ``__init__``. It owns its
    evaluation: ``evaluate`` turns one split's outputs into metrics (WILDS datasets call WILDS' evaluator).

    Args:
        root: folder with real data (None for generated datasets).
        options: dataset options, resolved against ``OPTIONS``.
        download: whether the loader may fetch missing files.
    """

    TASK: ClassVar[str] = "classification"
    ENVIRONMENTS: ClassVar[tuple[str, ...]] = ()
    DEFAULT_TEST_ENVS: ClassVar[tuple[int, ...]] = (0,)
    DEFAULT_MODEL: ClassVar[str] = "mlp"
    N_STEPS: ClassVar[int] = 5001
    EVAL_EVERY: ClassVar[int] = 100
    OPTIONS: ClassVar[dict[str, Any]] = {}
    """The dataset's options: name -> :class:`shiftbench.settings.Setting` (default, help, checks); a plain value
    stands for a Setting with that default and no help."""
    HPARAMS: ClassVar[dict[str, HParam]] = {}
    """Overrides of method hyperparameters for this dataset (e.g. a learning-rate range)."""

    input_shape: tuple[int, ...]
    num_classes: int
    environments: list[Environment]

    def __init__(self, root: str | None = None, options: Mapping[str, Any] | None = None, download: bool = False):
        self.root = root
        self.download = download
        self.options = self.resolve_options(options or {})

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Every option's value (plain values, defaults filled in), validated against ``OPTIONS`` by
        :func:`shiftbench.settings.resolve`, then by :meth:`check_options`.

        Raises:
            UserError: an unknown option, a value of the wrong type or one its declaration refuses.
        """
        from .settings import resolve

        o = resolve(cls.OPTIONS, options, f"dataset {getattr(cls, 'registry_name', cls.__name__)}")
        cls.check_options(o)
        return o

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Checks that involve several options at once (each option alone is checked by its declaration);
        raises UserError. Nothing by default."""

    @classmethod
    def check(cls, root: str | None, options: Mapping[str, Any], download: bool) -> None:
        """Cheap up-front check that the data can be had (files present), run by the sweep driver before any
        worker starts; raises UserError naming what is missing. Generated datasets need nothing."""

    @property
    def env_names(self) -> list[str]:
        return [e.name for e in self.environments]

    def train_splits(self, test_envs: tuple[int, ...]) -> list[tuple[str, Split]]:
        """The training streams: the ``in`` part of every environment not held out."""
        return [(e.name, e.splits["in"]) for i, e in enumerate(self.environments) if i not in test_envs]

    def eval_splits(self) -> dict[str, Split]:
        """Every split that gets evaluated, keyed ``env{i}_{in|out}`` as in DomainBed's records."""
        return {f"env{i}_{s}": split for i, e in enumerate(self.environments) for s, split in e.splits.items()}

    def version(self) -> str:
        """Content hash of the data (sha256); changes whenever any example does."""
        raise NotImplementedError

    def evaluate(self, split_name: str, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics of one split from the task's per-example outputs (``correct``, ``loss``, ...)."""
        return {"acc": float(np.mean(outputs["correct"])), "loss": float(np.mean(outputs["loss"]))}

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.TASK,
            "environments": self.env_names,
            "sizes": {k: len(v) for k, v in self.eval_splits().items()},
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "options": self.options,
        }


DATASETS.base = ShiftDataset


@functools.lru_cache(maxsize=4)
def _load_dataset(name: str, options_json: str, root: str | None, download: bool) -> ShiftDataset:
    return DATASETS.get(name)(root=root, options=json.loads(options_json), download=download)


def load_dataset(name: str, options: dict, root: str | None = None, download: bool = False) -> ShiftDataset:
    """Builds (or reuses, within a process) a dataset."""
    from .config import canonical_json

    return _load_dataset(name, canonical_json(options), root, download)


def input_range(dataset: ShiftDataset, splits: list[Split], keys) -> tuple[float, float] | None:
    """The dataset's declared ``INPUT_RANGE``, else the range of ``splits``' in-memory inputs (None: unknown)."""
    declared = getattr(dataset, "INPUT_RANGE", None)
    if declared is not None:
        return (float(declared[0]), float(declared[1]))
    from .attacks import data_bounds

    return data_bounds([s.tensors[k] for s in splits if hasattr(s, "tensors") for k in keys if k in s.tensors])
