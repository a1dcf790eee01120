"""Information-bottleneck ERM (IB-ERM): ERM plus a penalty on the variance of the features."""

from __future__ import annotations

from typing import Sequence

import torch

from shiftbench.featurewise import env_features_and_scores
from shiftbench.hparams import HParam, log_uniform, log_uniform_int
from shiftbench.methods.irm import AnnealedPenalty
from shiftbench.registry import METHODS


def ib_penalty(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over environments of the feature variance, ``mean_e mean_j Var_i(z_eij)``: the unbiased (n − 1)
    per-dimension variance over an environment's examples, averaged over dimensions, as in DomainBed. For Gaussian
    features this bounds their entropy, the bottleneck of Ahuja et al. (Sec. 4)."""
    return torch.stack([f.float().var(dim=0).mean() for f in features]).mean()


@METHODS.register("ib_erm")
class IBERM(AnnealedPenalty):
    """IB-ERM (Ahuja, Caballero, Zhang, Gagnon-Audet, Bengio, Mitliagkas & Rish, "Invariance Principle Meets
    Information Bottleneck for Out-of-Distribution Generalization", NeurIPS 2021).

    Loss: mean environment risk + w · ``ib_penalty`` of the penultimate features (both responses of a preference
    pair), with w = 0 before ``ib_penalty_anneal_iters`` and ``ib_lambda`` from then on; Adam's state is cleared at
    the switch (see ``AnnealedPenalty``). Unlike IRM's schedule the warm-up weight is 0, not 1, as in DomainBed,
    whose defaults and ranges these are.
    """

    HPARAMS = {
        "ib_lambda": HParam(1e2, log_uniform(-1, 5)),
        "ib_penalty_anneal_iters": HParam(500, log_uniform_int(0, 4)),
    }
    LAMBDA_KEY = "ib_lambda"
    ANNEAL_KEY = "ib_penalty_anneal_iters"

    def penalty_weight(self, step: int) -> float:
        return float(self.hparams[self.LAMBDA_KEY]) if step >= self.hparams[self.ANNEAL_KEY] else 0.0

    def update(self, minibatches, step):
        features, scores = env_features_and_scores(self.model, self.task, minibatches)
        nll = torch.stack([self.task.loss(s, b) for s, b in zip(scores, minibatches)]).mean()
        penalty = ib_penalty(features)
        loss = nll + self.penalty_weight(step) * penalty
        if step == self.hparams[self.ANNEAL_KEY]:
            self.reset_optimizer()
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
