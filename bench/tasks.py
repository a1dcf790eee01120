"""Task types: they decide the per-example loss and prediction, so methods stay generic.

Every loss takes a ``scale`` multiplying the scores; IRMv1's penalty is the gradient of the risk with respect to
that scale at 1.0.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
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

    def split_outputs(self, scored, n: int) -> dict[str, np.ndarray]:
        """One split's per-example outputs from its ``(batch, scores)`` pairs, in batch order: :meth:`outputs` plus
        ``idx`` and ``label`` (when the batch has ``y``), as NumPy arrays (``loss``, ``correct``, ``score`` in
        float32) -- what ``ShiftDataset.evaluate`` reads and predictions.npz keeps. ``n``: the split's size (see
        :meth:`collect`)."""
        return self.collect(((b, self.outputs(scores, b)) for b, scores in scored), n)

    @staticmethod
    def collect(pairs, n: int) -> dict[str, np.ndarray]:
        """:meth:`split_outputs` from ``(batch, outputs of the batch)`` pairs whose outputs are already computed.

        Each batch's outputs are copied into arrays of ``n`` rows made at the first batch (and cut to the rows the
        batches held), so nothing of a batch outlives it. Keeping every batch's small tensors for one concatenation
        at the end interleaved them with later batches' freed activation buffers: over one pass of 70,000 MNIST-CNN
        images at batch 64 the C heap's peak grew 180-600 MB above a loop that keeps nothing (measured in-process
        with /proc's VmHWM; the same loop under ``MALLOC_ARENA_MAX=1`` did not grow), while preallocated arrays
        stayed within 30 MB of it."""
        arrays: dict[str, np.ndarray] = {}
        rows = 0
        for b, out in pairs:
            out = dict(out)
            out["idx"] = b["idx"]
            if "y" in b:
                out["label"] = b["y"]
            got = Task.to_numpy(out)
            if not arrays:
                arrays = {k: np.empty((n, *v.shape[1:]), v.dtype) for k, v in got.items()}
            m = len(got["idx"])
            if rows + m > n:
                raise ValueError(f"a split's batches hold more rows than the {n} announced")
            if got.keys() != arrays.keys():
                raise ValueError(f"a batch's outputs {sorted(got)} are not the first batch's {sorted(arrays)}")
            for k, v in got.items():
                arrays[k][rows:rows + m] = v
            rows += m
        return {k: v[:rows] for k, v in arrays.items()}

    @staticmethod
    def to_numpy(outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """A split's output tensors as NumPy arrays, ``loss``, ``correct`` and ``score`` in float32."""
        return {k: v.float().cpu().numpy() if k in ("loss", "correct", "score") else v.cpu().numpy()
                for k, v in outputs.items()}  # fmt: skip


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
    """Bradley–Terry reward modelling: p(chosen ≻ rejected) = σ(r_c − r_r) (Bradley & Terry, 1952; the reward-model
    loss of Ouyang et al., 2022).

    Scores are ``(n, 2)``: column 0 is the reward difference ``d = r_c − r_r`` (what Bradley–Terry scores, what
    ``outputs`` calls ``score``), column 1 the reward sum ``r_c + r_r`` (what the centring term needs, since the
    loss sees scores and batch but not the model). A 1-D tensor is accepted as differences alone.

    Per-pair training loss, with ``s`` the scale IRM differentiates (it multiplies both rewards):

        −log σ(s·d − m) + c · (s·(r_c + r_r))²

    ``m`` is the optional per-pair margin (batch key ``margin``; Touvron et al., 2023, Llama 2, Eq. 2) and ``c`` the
    optional centre-rewards coefficient (batch key ``center_rewards_coefficient``, one value per pair, normally a
    constant a dataset option fills in), TRL's ``RewardConfig.center_rewards_coefficient``, after Eisenstein et al.,
    2023 ("Helping or Herding?"): its mean over a batch is ``c · mean((r_c + r_r)²)``, which pins the reward's
    free offset near zero. The coefficient travels in the batch because a task is built with no arguments and only
    datasets and methods see options; a dataset declares it as an option, so it enters the trial hash.

    Evaluation outputs per pair: ``loss`` (−log σ(d), no margin or centring: the model's own likelihood),
    ``correct`` (d > 0), ``pred``, ``score`` (= d) and, with two-column scores, ``reward_chosen`` and
    ``reward_rejected`` for a dataset's ``evaluate`` (mean margin, corr(reward, length), ...).
    """

    input_keys = ("chosen", "rejected")
    batch_keys = ("chosen", "rejected", "margin", "center_rewards_coefficient")

    def n_outputs(self, num_classes: int) -> int:
        return 1

    def rewards(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch["chosen"])
        r = model(torch.cat([batch["chosen"], batch["rejected"]])).squeeze(-1)
        return r[:n], r[n:]

    def scores(self, model, batch):
        r_c, r_r = self.rewards(model, batch)
        return torch.stack([r_c - r_r, r_c + r_r], dim=1)

    def features(self, model, batch):
        return model.featurizer(batch["chosen"])

    @staticmethod
    def split_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reward differences, reward sums or None) from 1-D or two-column scores."""
        return (scores, None) if scores.dim() == 1 else (scores[:, 0], scores[:, 1])

    def loss(self, scores, batch, scale=1.0, reduction="mean"):
        d, total = self.split_scores(_scaled(scores, scale))
        margin = batch.get("margin")
        per = -F.logsigmoid(d - margin if margin is not None else d)
        coef = batch.get("center_rewards_coefficient")
        if coef is not None:
            if total is None:
                raise ValueError("the centre-rewards term needs two-column scores (r_c - r_r, r_c + r_r)")
            per = per + coef * total**2
        return per.mean() if reduction == "mean" else per

    def outputs(self, scores, batch):
        d, total = self.split_scores(scores.float())
        out = {"loss": -F.logsigmoid(d), "correct": (d > 0).float(), "pred": (d > 0).long(), "score": d}
        if total is not None:
            out["reward_chosen"], out["reward_rejected"] = (total + d) / 2, (total - d) / 2
        return out
