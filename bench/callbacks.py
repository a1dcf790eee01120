"""What a trial's hooks see: ``Callback``, the running ``TrialRun``, and the ``RunOptions`` that say where it runs.

Callbacks (hooks/, progress, best-of-n) import this module, never the trainer; it imports no torch at module level
beyond what a device needs, so a callback file that also registers a report section stays cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import UserError
from .registry import CALLBACKS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .algorithm import Algorithm
    from .config import TrialSpec
    from .data import ShiftDataset


@dataclass
class RunOptions:
    """Where and how a trial runs; none of it enters the trial's hash."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda[:i]'."""
    amp: bool = False
    """bfloat16 autocast on CUDA."""
    data_root: str | None = None
    """Folder with real datasets."""
    download: bool = False
    """Allow loaders to download missing files."""
    eval_batch_size: int | None = None
    """Batch size of evaluation passes; None: chosen from the model and device (``models.eval_batch_for``:
    2,048 for the digits MLPs on a CPU, 64 for the MNIST CNN)."""
    retry_failed: bool = False
    """Run a trial again even if it failed before."""
    checkpoint_interval: float = 30.0
    """Seconds of training between checkpoints (taken at evaluation steps); 0 checkpoints at every evaluation."""
    stop_after: int | None = None
    """Stop (as if killed) right after the checkpoint at this step; for resume tests."""


class Interrupted(Exception):
    """Raised by ``stop_after``: the trial stopped after a checkpoint, as if its process had been killed."""


class Callback:
    """Trial hooks. Register with ``@CALLBACKS.register(name)`` and name it in the spec's ``callbacks``.

    Args:
        name: the spec's name of this callback, settings included (``robust_eval:eps=0.3``); the trainer passes it.
    """

    def __init__(self, name: str | None = None):
        self.name = name

    ORDER: ClassVar[int] = 0
    """Callbacks run in ascending ``ORDER``, then in the spec's order. Ones that seal the result (attestation) run
    last, so that what every other callback adds to the final record is inside what they sign."""

    SETTINGS: ClassVar[dict[str, Any]] = {}
    """Settings given in the name (``name:k=v,...``): name -> :class:`shiftbench.settings.Setting`. A callback
    with settings registers its family name too (``@CALLBACKS.register("name:")``)."""

    @classmethod
    def settings_of(cls, name: str) -> dict[str, Any]:
        """The settings of a spec's callback name ``name[:k=v,...]``: every declared one, validated, defaults
        filled in; raises UserError (an unknown key with the nearest one, a value of the wrong type or range)."""
        from .settings import parse_pairs, resolve

        where = f"callback {name!r}"
        return resolve(cls.SETTINGS, parse_pairs(name.partition(":")[2], where, cls.SETTINGS), where, "setting")

    @classmethod
    def validate(cls, name: str, dataset_cls: type | None = None) -> None:
        """Checks a spec's callback name (with any ``:settings``) and that it fits the dataset class, before
        anything of a trial is written; raises UserError. The base class checks the settings."""
        cls.settings_of(name)

    def on_start(self, run: "TrialRun") -> None:
        pass

    def on_eval(self, run: "TrialRun", record: dict[str, Any]) -> None:
        """May add keys to ``record`` (e.g. robust accuracies)."""

    def on_end(self, run: "TrialRun", final: dict[str, Any]) -> None:
        """After predictions and weights are written, before the done marker; may add keys to ``final``."""


CALLBACKS.base = Callback


def resolve_device(name: str) -> "torch.device":
    """The torch device a ``--device`` value names; raises UserError for an unknown or unavailable one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but torch sees no CUDA device; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu or cuda[:index]") from None


@dataclass
class TrialRun:
    """A trial while it runs: what callbacks see."""

    spec: TrialSpec
    dir: Path
    dataset: ShiftDataset
    algorithm: Algorithm
    device: torch.device
    options: RunOptions
    records: list[dict] = field(default_factory=list)
    final_outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    step: int | None = None
    """The training step in progress (None before the first)."""
    eval_batch_size: int = 2048
    """The batch size of this trial's evaluation passes (``RunOptions.eval_batch_size`` or the one chosen for its
    model and device); callbacks that evaluate use it too."""

    @property
    def task(self):
        return self.algorithm.task

    @property
    def model(self) -> torch.nn.Module:
        return self.algorithm.model
