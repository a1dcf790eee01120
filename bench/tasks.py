"""Task types: they decide the per-example loss and prediction, so methods stay generic.

Every loss takes a ``scale`` multiplying the scores; IRMv1's penalty is the gradient of the risk with respect to
that scale at 1.0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from .registry import TASKS


class Task:
    """Turns a model and a batch into scores, losses and per-example outputs."""

    input_keys: ClassVar[tuple[str, ...]] = ("x",)
    """Batch keys holding continuous model inputs (what an input-space attack may perturb)."""
    batch_keys: ClassVar[tuple[str, ...]] = ("x", "y")
    """Keys a training batch needs; methods add theirs with ``Algorithm.BATCH_KEYS``."""

    def n_outputs(self, num_classes: int) -> int:
        return num_classes

    def scores(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def features(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Penultimate features of the batch's inputs (for feature-space penalties and drift)."""
        return model.featurizer(batch[self.input_keys[0]])

    def loss(self, scores: torch.Tensor, batch: dict, scale: torch.Tensor | float = 1.0, reduction: str = "mean"):
        raise NotImplementedError

    def outputs(self, scores: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example ``loss``, ``correct``, ``pred`` and ``score`` for evaluation records."""
        raise NotImplementedError


TASKS.base = Task


def _scaled(scores: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Scores in float32, times the scale (skipped when it is the plain number 1, to keep the graph short)."""
    scores = scores.float()
    return scores if isinstance(scale, (int, float)) and scale == 1 else scores * scale


@TASKS.register("classification")
class Classification(Task):
    """Cross-entropy on logits; the prediction is the argmax."""

    def scores(self, model, batch):
        return model(batch["x"])

    def loss(self, scores, batch, scale=1.0, reduction="mean"):
        return F.cross_entropy(_scaled(scores, scale), batch["y"], reduction=reduction)

    def outputs(self, scores, batch):
        scores = scores.float()
        pred = scores.argmax(1)
        return {
            "loss": F.cross_entropy(scores, batch["y"], reduction="none"),
            "correct": (pred == batch["y"]).float(),
            "pred": pred,
            "score": scores.softmax(1).gather(1, pred[:, None])[:, 0],
        }


@TASKS.register("preference")
class Preference(Task):
    """Bradley–Terry on reward differences: p(chosen ≻ rejected) = σ(r_c − r_r), loss −log σ(r_c − r_r)."""

    input_keys = ("chosen", "rejected")
    batch_keys = ("chosen", "rejected", "margin")

    def n_outputs(self, num_classes: int) -> int:
        return 1

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch["chosen"])
        r = model(torch.cat([batch["chosen"], batch["rejected"]])).squeeze(-1)
        return r[:n], r[n:]

    def scores(self, model, batch):
        r_c, r_r = self.rewards(model, batch)
        return r_c - r_r

    def features(self, model, batch):
        return model.featurizer(batch["chosen"])

    def loss(self, scores, batch, scale=1.0, reduction="mean"):
        margin = batch.get("margin")
        s = _scaled(scores, scale)
        per = -F.logsigmoid(s - margin if margin is not None else s)
        return per.mean() if reduction == "mean" else per

    def outputs(self, scores, batch):
        scores = scores.float()
        return {
            "loss": -F.logsigmoid(scores),
            "correct": (scores > 0).float(),
            "pred": (scores > 0).long(),
            "score": scores,
        }
