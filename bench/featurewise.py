"""Feature-level views of a task's scores, for methods that work on penultimate features (CORAL, MMD, DANN, MTL...).

A method that penalises or transforms features must score what it changed with the model's head, for every task
type. ``task.scores(model, batch)`` calls ``model(...)`` on the batch's input keys (classification: ``x``;
preference: ``chosen`` and ``rejected`` stacked in one pass), so calling it with the head in place of the model
and features in place of the inputs gives the task's scores of those features: the same numbers as
``task.scores(model, batch)`` when the features are the featurizer's, whatever the task type.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .data import Batch
from .tasks import Task


def input_features(model: nn.Module, task: Task, batch: Batch) -> torch.Tensor:
    """Featurizer output of every input of the batch in one pass, keys stacked in ``task.input_keys`` order:
    ``(n, d)`` for classification, ``(2n, d)`` for preference (the chosen rows first)."""
    xs = [batch[k] for k in task.input_keys]
    return model.featurizer(torch.cat(xs) if len(xs) > 1 else xs[0])


def scores_from_features(head: Callable[[torch.Tensor], torch.Tensor], task: Task, batch: Batch,
                         features: torch.Tensor) -> torch.Tensor:
    """The task's scores of ``batch`` with ``head`` applied to ``features`` (laid out as ``input_features``)."""
    keys = task.input_keys
    parts = features.split([len(batch[k]) for k in keys]) if len(keys) > 1 else (features,)
    return task.scores(head, {**batch, **dict(zip(keys, parts))})


def env_features(model: nn.Module, task: Task, minibatches: list[Batch]) -> list[torch.Tensor]:
    """Per environment, the features of all its inputs (laid out as ``input_features``), from one featurizer pass
    over every environment's batch."""
    keys, n_envs = task.input_keys, len(minibatches)
    sizes = [len(b[keys[0]]) for b in minibatches]
    blocks = model.featurizer(torch.cat([b[k] for k in keys for b in minibatches])).split(sizes * len(keys))
    if len(keys) == 1:
        return list(blocks)
    return [torch.cat([blocks[j * n_envs + e] for j in range(len(keys))]) for e in range(n_envs)]


def env_features_and_scores(model: nn.Module, task: Task, minibatches: list[Batch]
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per environment, its features (``env_features``) and the head's scores of them."""
    feats = env_features(model, task, minibatches)
    return feats, [scores_from_features(model.head, task, b, f) for b, f in zip(minibatches, feats)]
