"""Information-bottleneck IRM (IB-IRM): IRMv1 plus a penalty on the variance of the features."""

from __future__ import annotations

import torch

from shiftbench.featurewise import env_features_and_scores
from shiftbench.hparams import HParam, log_uniform, log_uniform_int
from shiftbench.methods.ib_erm import ib_penalty
from shiftbench.methods.irm import IRM, irm_penalty
from shiftbench.registry import METHODS


@METHODS.register("ib_irm")
class IBIRM(IRM):
    """IB-IRM (Ahuja et al., "Invariance Principle Meets Information Bottleneck for Out-of-Distribution
    Generalization", NeurIPS 2021, Eq. 5).

    Loss: mean environment risk + w_irm · mean ``irm_penalty`` + w_ib · ``ib_penalty`` of the features, with w_irm
    = 1 before ``irm_penalty_anneal_iters`` and ``irm_lambda`` after (IRM's schedule), w_ib = 0 before
    ``ib_penalty_anneal_iters`` and ``ib_lambda`` after (IB-ERM's). Adam's state is cleared at either switch, as
    DomainBed resets Adam at either. Defaults and ranges are DomainBed's.
    """

    HPARAMS = {
        "ib_lambda": HParam(1e2, log_uniform(-1, 5)),
        "ib_penalty_anneal_iters": HParam(500, log_uniform_int(0, 4)),
    }

    def ib_weight(self, step: int) -> float:
        return float(self.hparams["ib_lambda"]) if step >= self.hparams["ib_penalty_anneal_iters"] else 0.0

    def update(self, minibatches, step):
        features, scores = env_features_and_scores(self.model, self.task, minibatches)
        nll = torch.stack([self.task.loss(s, b) for s, b in zip(scores, minibatches)]).mean()
        irm = torch.stack([irm_penalty(self.task, s, b) for s, b in zip(scores, minibatches)]).mean()
        ib = ib_penalty(features)
        loss = nll + self.penalty_weight(step) * irm + self.ib_weight(step) * ib
        if step in (self.hparams[self.ANNEAL_KEY], self.hparams["ib_penalty_anneal_iters"]):
            self.reset_optimizer()
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": irm.detach(), "ib_penalty": ib.detach()}
