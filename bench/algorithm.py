"""The method plug-in interface (DomainBed's ``update(minibatches) -> dict``, made task-generic).

A method sees a model, a task and one batch per training environment per step. It never sees the dataset:
anything else it needs (a frozen reference model, a second data stream) comes through ``setup(context)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from .data import Batch, Split
from .hparams import NON_NEGATIVE, POSITIVE, HParam, collect, log_uniform, log_uniform_int
from .registry import METHODS
from .tasks import Task


@dataclass
class MethodContext:
    """What the trainer offers a method before training starts.

    Attributes:
        train_env_names: names of the training environments, in the order of ``update``'s minibatches.
        splits: every named split of the dataset (``env{i}_in``...), for methods that need a second stream;
            a method must only draw from training environments.
        stream: ``stream(split_name, batch_size)`` -> a function ``k -> the k-th batch`` of that split, on the
            device: seeded and pure in ``k``, so a resumed trial draws the same batches.
        train_reference: trains a model with another registered method on the training streams and returns it
            (e.g. CBFT's cue-trained reference), cached in ``workdir``.
        device: where the model lives.
        workdir: the trial folder, for the method's own files.
        seed: the trial seed.
        input_range: the valid range of input values, ``(lo, hi)``: the dataset's ``INPUT_RANGE`` where it declares
            one, else the smallest box holding the training splits' in-memory inputs; None when unknown (lazily
            loaded or normalised inputs), i.e. unbounded. Attacks clip to it.
    """

    train_env_names: list[str]
    splits: dict[str, Split]
    stream: Callable[[str, int], Callable[[int], Batch]]
    device: torch.device
    workdir: Path
    seed: int
    train_reference: Callable[..., nn.Module] | None = None
    input_range: tuple[float, float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    train_envs: tuple[int, ...] = ()
    """The dataset indices of the training environments, in the order of ``update``'s minibatches: their ``in``
    and ``out`` splits are ``splits[f"env{i}_in"]`` and ``splits[f"env{i}_out"]``."""


def concat_batches(batches: list[Batch]) -> Batch:
    """One batch from several (same keys), for a single forward pass over all environments."""
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


class Algorithm(nn.Module):
    """Base class of every method.

    Args:
        model: featurizer + head, already on the device.
        task: decides scores and losses.
        n_envs: number of training environments (the length of ``update``'s list).
        hparams: the resolved hyperparameters (every key of ``hparam_space``).
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {
        # DomainBed's ranges for small images: lr 10^U(-4.5,-2.5), batch 2^U(3,9), weight decay 10^U(-6,-2).
        "lr": HParam(1e-3, log_uniform(-4.5, -2.5), POSITIVE),
        "weight_decay": HParam(0.0, log_uniform(-6, -2), NON_NEGATIVE),
        "batch_size": HParam(64, log_uniform_int(3, 9, base=2), POSITIVE),
    }

    TASKS: ClassVar[tuple[str, ...] | None] = None
    """Task types the method trains on; None: every type whose Task does not set ``dedicated_methods`` (i.e. all
    but coordination, which is scored by playing a game rather than by a loss). Checked by ``TrialSpec.resolve``."""

    BATCH_KEYS: ClassVar[tuple[str, ...]] = ()
    """Batch entries this method needs beyond the task's own (e.g. a group id); metadata not named here is not
    gathered into training batches."""

    PACKABLE: ClassVar[bool] = False
    """Whether ``shiftbench.pack`` may train several trials of this method as one vectorised program. Read from the
    class's own body only (``is_packable``), never inherited: a subclass that overrides ``update`` would otherwise be
    packed with its parent's ``objective``. A packable method's ``update`` is ``objective`` plus one Adam step over
    ``model.parameters()`` (see docs/packing.md)."""

    PACK_HPARAMS: ClassVar[tuple[str, ...]] = ()
    """The hyperparameters ``objective`` reads from ``hp``: numbers in one trial, one ``(K,)`` tensor each in a pack."""

    def __init__(self, model: nn.Module, task: Task, n_envs: int, hparams: dict):
        super().__init__()
        self.model = model
        self.task = task
        self.n_envs = n_envs
        self.hparams = dict(hparams)
        self.optimizer = self.make_optimizer()

    @classmethod
    def hparam_space(cls, dataset_hparams: dict[str, HParam] | None = None) -> dict[str, HParam]:
        """Every hyperparameter along the class hierarchy, base first, then the dataset's overrides of them
        (and the dataset's model hyperparameters)."""
        spaces = [k.__dict__["HPARAMS"] for k in reversed(cls.__mro__) if "HPARAMS" in k.__dict__]
        return collect(*spaces, dataset_hparams or {})

    def make_optimizer(self, params=None) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.model.parameters() if params is None else params,
            lr=self.hparams["lr"],
            weight_decay=self.hparams["weight_decay"],
        )

    @classmethod
    def validate(cls, dataset_cls: type, options: Mapping[str, Any]) -> None:
        """Refuses (``UserError``, one line) a dataset this method cannot train on, e.g. one without the per-example
        groups it needs; called by ``TrialSpec.resolve`` with the dataset class and its resolved options."""

    def setup(self, context: MethodContext) -> None:
        """Called once before the first step (and again on resume, before the checkpoint is loaded)."""

    def update(self, minibatches: list[Batch], step: int) -> dict[str, torch.Tensor]:
        """One optimisation step; returns detached scalars (``loss`` at least) for the records."""
        raise NotImplementedError

    # -- the pure step loss that packing vectorises (see docs/packing.md) -----------------------------------------
    def objective(self, scores_fn: Callable[[Batch], torch.Tensor], minibatches: list[Batch], step: int,
                  hp: Mapping[str, Any], state: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One step's loss as a pure function: ``(loss, stats, new_state)``.

        Args:
            scores_fn: batch -> scores of the model being trained (``task.scores`` of this trial's model alone, or
                of one slice of stacked parameters inside ``torch.func.vmap``).
            minibatches: one batch per training environment.
            step: the 0-based update index.
            hp: the hyperparameters named in ``PACK_HPARAMS`` (numbers alone; 0-dim tensors inside a pack).
            state: the method's evolving tensors (``method_state``), never modified in place.

        Only ``torch.func``-compatible operations: no in-place updates of ``state``, no ``.item()``, no Python
        branching on tensor values, gradients of inner quantities through ``torch.func.grad``.
        """
        raise NotImplementedError

    def method_state(self) -> dict[str, torch.Tensor]:
        """The tensors ``objective`` carries from step to step (e.g. GroupDRO's weights); none by default."""
        return {}

    def load_method_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Takes back what ``objective`` returned as its new state."""

    def optimizer_reset(self, step: int, hp: Mapping[str, Any]) -> bool | torch.Tensor:
        """Whether the optimizer's state is cleared just before this step's update (a bool, or a bool tensor in a
        pack); never by default."""
        return False

    def pack_hparams(self) -> dict[str, Any]:
        """This trial's values of ``PACK_HPARAMS``."""
        return {k: self.hparams[k] for k in self.PACK_HPARAMS}

    def model_scores(self, batch: Batch) -> torch.Tensor:
        """The ``scores_fn`` of the single-trial path: the task's scores of this trial's model."""
        return self.task.scores(self.model, batch)

    def scores(self, batch: Batch) -> torch.Tensor:
        """Scores used for evaluation (logits, reward differences)."""
        return self.task.scores(self.model, batch)

    def env_scores(self, minibatches: list[Batch]) -> list[torch.Tensor]:
        """Scores of every environment's batch from one forward pass."""
        scores = self.task.scores(self.model, concat_batches(minibatches))
        sizes = [len(b[self.task.input_keys[0]]) for b in minibatches]
        return list(torch.split(scores, sizes))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers whose state goes into checkpoints."""
        return {"optimizer": self.optimizer}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"module": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        for k, o in self.optimizers().items():
            o.load_state_dict(state["optimizers"][k])


def is_packable(method_cls: type) -> bool:
    """Whether a method class declares ``PACKABLE = True`` in its own body (see ``Algorithm.PACKABLE``)."""
    return bool(method_cls.__dict__.get("PACKABLE", False))


def split_scores(scores_fn: Callable[[Batch], torch.Tensor], minibatches: list[Batch], task: Task
                 ) -> list[torch.Tensor]:
    """Every environment's scores from one forward pass of ``scores_fn`` over the concatenated batches."""
    sizes = [len(b[task.input_keys[0]]) for b in minibatches]
    return list(torch.split(scores_fn(concat_batches(minibatches)), sizes))


METHODS.base = Algorithm
