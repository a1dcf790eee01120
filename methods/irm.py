"""Invariant Risk Minimization (IRMv1), and the annealed-penalty schedule it shares with V-REx."""

from __future__ import annotations

from typing import ClassVar

import torch

from shiftbench.algorithm import split_scores
from shiftbench.data import Batch
from shiftbench.hparams import HParam, log_uniform, log_uniform_int
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS
from shiftbench.tasks import Task


def annealed_weight(step: int, anneal, lam) -> float | torch.Tensor:
    """1.0 while ``step < anneal``, ``lam`` from then on: a float for numbers, a tensor when ``anneal`` and ``lam``
    are (one slice of) a pack's per-trial tensors."""
    if torch.is_tensor(anneal) or torch.is_tensor(lam):
        return torch.where(step >= torch.as_tensor(anneal), torch.as_tensor(lam), torch.ones_like(torch.as_tensor(lam)))
    return float(lam) if step >= anneal else 1.0


class AnnealedPenalty(ERM):
    """ERM plus a per-step penalty whose weight jumps from 1 to λ at a fixed step (DomainBed's schedule).

    The loss is ``mean_e risk_e + w * penalty`` with ``w = 1`` while ``step < hparams[ANNEAL_KEY]`` and
    ``w = hparams[LAMBDA_KEY]`` from then on. ``step`` is the 0-based index of the update (the number of updates
    made before it, DomainBed's ``update_count``). At ``step == hparams[ANNEAL_KEY]`` the optimizer's state (Adam's
    moment estimates and step counts) is cleared before that step's update, because Adam's running second moments
    are tuned to the old gradient scale and the jump to λ changes that scale abruptly. DomainBed rebuilds the Adam
    object; clearing its state in place has the same effect on the parameters and keeps the optimizer object (and
    anything holding a reference to it, such as a learning-rate scheduler) valid.

    The loss is not divided by λ (the IRM paper's ColoredMNIST script does ``loss /= penalty_weight`` when the
    weight exceeds 1; DomainBed does not). We follow DomainBed because the λ ranges are DomainBed's and because
    under Adam a constant rescaling of the loss is nearly a no-op except that it changes the relative strength of
    ``weight_decay`` (Adam's L2 term is added to the gradient), which would couple two searched hyperparameters.

    Subclasses set ``LAMBDA_KEY`` and ``ANNEAL_KEY`` and implement ``penalty``; ``objective`` is the loss above as
    a pure function (``update`` is ERM's: objective, reset at the anneal step, Adam step).
    """

    LAMBDA_KEY: ClassVar[str]
    ANNEAL_KEY: ClassVar[str]

    def penalty_weight(self, step: int) -> float:
        """1.0 before the anneal step, λ from it on."""
        return annealed_weight(step, self.hparams[self.ANNEAL_KEY], self.hparams[self.LAMBDA_KEY])

    def reset_optimizer(self) -> None:
        """Forgets every optimizer's per-parameter state (Adam's moments and step counts)."""
        for opt in self.optimizers().values():
            opt.state.clear()

    def penalty(self, scores: list[torch.Tensor], minibatches: list[Batch], risks: list[torch.Tensor]) -> torch.Tensor:
        """The penalty of one step from every environment's scores, batch and risk."""
        raise NotImplementedError

    def pack_hparams(self):
        return {k: self.hparams[k] for k in (self.LAMBDA_KEY, self.ANNEAL_KEY)}

    def optimizer_reset(self, step, hp):
        return step == hp[self.ANNEAL_KEY]

    def objective(self, scores_fn, minibatches, step, hp, state):
        scores = split_scores(scores_fn, minibatches, self.task)
        risks = [self.task.loss(s, b) for s, b in zip(scores, minibatches)]
        nll = torch.stack(risks).mean()
        penalty = self.penalty(scores, minibatches, risks)
        loss = nll + annealed_weight(step, hp[self.ANNEAL_KEY], hp[self.LAMBDA_KEY]) * penalty
        return loss, {"loss": loss, "nll": nll, "penalty": penalty}, state


def _rows(batch: Batch, sl: slice, n: int) -> Batch:
    """The rows ``sl`` of every per-example entry of ``batch`` (entries whose first dimension is ``n``)."""
    return {k: v[sl] if torch.is_tensor(v) and v.dim() > 0 and len(v) == n else v for k, v in batch.items()}


def irm_penalty(task: Task, scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    """IRMv1's unbiased penalty for one environment: the product of the gradients, with respect to a scalar
    scale ``s`` at 1.0, of the task's risk on the even and on the odd examples of the batch.

    ``E[g1 * g2] = E[g1] * E[g2] = (d risk / ds)^2`` because the two halves are independent samples, whereas
    the squared gradient of the full batch is biased upwards by its variance (Arjovsky et al., 2019, Sec. 3.2).
    The inner gradients come from ``torch.func.grad``, which keeps them differentiable in the model parameters
    (like ``autograd.grad(create_graph=True)``) and also composes with ``vmap`` for packed trials.

    Args:
        task: supplies the loss (``task.loss(scores, batch, scale)``).
        scores: the environment's scores, shape ``(n, ...)``.
        batch: the environment's batch; every per-example entry is split the same way as ``scores``.

    Raises:
        ValueError: fewer than two examples (no two halves to pair).
    """
    n = len(scores)
    if n < 2:
        raise ValueError(f"the IRM penalty needs at least 2 examples per environment, got {n}")
    grads = []
    for sl in (slice(0, None, 2), slice(1, None, 2)):
        half, rows = scores[sl], _rows(batch, sl, n)
        # torch.func.grad, not autograd.grad: the same value and graph alone, and it also works inside vmap (packs)
        grads.append(torch.func.grad(lambda s: task.loss(half, rows, s))(torch.ones((), device=scores.device)))
    return grads[0] * grads[1]


@METHODS.register("irm")
class IRM(AnnealedPenalty):
    """IRMv1 (Arjovsky, Bottou, Gulrajani & Lopez-Paz, "Invariant Risk Minimization", arXiv:1907.02893, 2019).

    Loss: mean environment risk + w * mean over environments of ``irm_penalty``, with w = 1 before
    ``irm_penalty_anneal_iters`` and ``irm_lambda`` after (see ``AnnealedPenalty`` for the schedule, the
    optimizer reset and why the loss is not divided by λ). Defaults and ranges are DomainBed's.
    """

    HPARAMS = {
        "irm_lambda": HParam(1e2, log_uniform(-1, 5)),
        "irm_penalty_anneal_iters": HParam(500, log_uniform_int(0, 4)),
    }
    LAMBDA_KEY = "irm_lambda"
    ANNEAL_KEY = "irm_penalty_anneal_iters"
    PACKABLE = True

    def penalty(self, scores, minibatches, risks):
        return torch.stack([irm_penalty(self.task, s, b) for s, b in zip(scores, minibatches)]).mean()
