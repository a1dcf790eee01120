"""What the subpopulation-shift methods share: per-example groups, training counts and group-balanced streams.

A *group* is the dataset's per-example ``group`` key (label x spurious attribute: ``subpop_digits``, the WILDS
adapters). Methods that need one declare it (:class:`NeedsGroups`) and are refused while the spec is resolved on a
dataset whose ``METADATA_KEYS`` lack it. Counts are taken over the training environments' ``in`` splits only
(``MethodContext.train_envs``), never over validation or held-out data. No plug-in is registered here.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.data import Batch, Split, TensorSplit
from shiftbench.errors import UserError
from shiftbench.hparams import seed_hash

GROUP = "group"


class NeedsGroups:
    """Mixin (before the Algorithm base) for methods that need every example's group."""

    BATCH_KEYS: ClassVar[tuple[str, ...]] = (GROUP,)

    @classmethod
    def validate(cls, dataset_cls: type, options: Mapping[str, Any]) -> None:
        if GROUP not in getattr(dataset_cls, "METADATA_KEYS", ()):
            name = getattr(cls, "registry_name", cls.__name__)
            data = getattr(dataset_cls, "registry_name", dataset_cls.__name__)
            raise UserError(f"method {name} needs per-example groups, which dataset {data} does not have; use a "
                            "dataset with groups (subpop_digits, wilds:waterbirds, wilds:celeba, wilds:civilcomments)")


def column(split: Split, key: str) -> torch.Tensor:
    """One per-example entry of a whole split, without loading inputs where the split holds it as a tensor."""
    tensors = getattr(split, "tensors", None)
    if isinstance(tensors, Mapping) and key in tensors:
        return tensors[key]
    return torch.cat([b[key] for b in split.eval_batches(4096)])


def training_splits(context: MethodContext, part: str = "in") -> list[tuple[str, Split]]:
    """``(name, split)`` of the training environments' ``part`` splits (``in`` or ``out``) that exist."""
    names = [f"env{i}_{part}" for i in context.train_envs]
    return [(n, context.splits[n]) for n in names if n in context.splits]


def training_counts(context: MethodContext, key: str, minlength: int = 0) -> torch.Tensor:
    """How many training (``in``) examples hold each value of ``key`` (``y`` or ``group``), as float64."""
    values = torch.cat([column(s, key).long().cpu() for _, s in training_splits(context)])
    return torch.bincount(values, minlength=minlength).double()


def subset(split: Split, rows: torch.Tensor) -> Split:
    """The examples ``rows`` (positions) of a split, as a split of the same kind (in-memory or lazily loaded)."""
    from shiftbench.datasets.image_folder import LazySplit

    if isinstance(split, TensorSplit):
        return TensorSplit({k: v[rows.to(v.device)] for k, v in split.tensors.items()})
    if isinstance(split, LazySplit):
        keep = rows.cpu().numpy()
        return LazySplit(lambda r, train: split.load(keep[r], train), {k: v[rows.cpu()] for k, v in
                                                                      split.tensors.items()}, split.device)  # fmt: skip
    raise UserError(f"cannot take group subsets of a {type(split).__name__}; group methods need in-memory or "
                    "lazily loaded splits")


def group_cells(splits: list[tuple[str, Split]]) -> list[tuple[str, int, Split]]:
    """Every non-empty (split, group) cell as ``(split name, group, sub-split)``, in a fixed order."""
    cells = []
    for name, split in splits:
        g = column(split, GROUP).long().cpu()
        for group in torch.unique(g).tolist():
            cells.append((name, int(group), subset(split, torch.nonzero(g == group)[:, 0])))
    return cells


def balanced_stream(cells: list[tuple[str, int, Split]], total: int, seed: int, salt: str) -> Callable[[int], Batch]:
    """``k`` -> the k-th group-balanced batch: ``ceil(total / len(cells))`` examples from each cell's own seeded,
    epoch-wise stream (pure in k, so a resumed trial draws the same batches). Every cell on the shipped datasets is one
    whole group (each group lies in one training environment), so groups are drawn uniformly."""
    per = max(1, -(-total // len(cells)))
    seeds = [seed_hash(seed, salt, name, g) for name, g, _ in cells]

    def draw(s: Split, sd: int, k: int) -> Batch:
        if len(s) >= per:
            return s.batch_at(k, per, sd)
        # a cell smaller than its share: several passes of its stream (a split never returns more than it holds)
        reps = -(-per // len(s))
        parts = concat_batches([s.batch_at(k * reps + t, len(s), sd) for t in range(reps)])
        return {key: v[:per] for key, v in parts.items()}

    return lambda k: concat_batches([draw(s, sd, k) for (_, _, s), sd in zip(cells, seeds)])
