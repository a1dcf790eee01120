"""Group distributionally robust optimisation (online, over training environments)."""

from __future__ import annotations

import torch

from shiftbench.algorithm import split_scores
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def groupdro_weights(q: torch.Tensor, risks: torch.Tensor, eta: float) -> torch.Tensor:
    """One exponentiated-gradient ascent step on the environment weights: ``q_e ∝ q_e * exp(eta * risk_e)``.

    Computed as ``softmax(log q + eta * risk)``, which is the same quantity without overflow of ``exp``.
    """
    return torch.softmax(q.log() + eta * risks.detach().to(q.dtype), dim=0)


@METHODS.register("groupdro")
class GroupDRO(ERM):
    """Group DRO (Sagawa, Koh, Hashimoto & Liang, "Distributionally Robust Neural Networks for Group Shifts",
    ICLR 2020), Algorithm 1 with the training environments as groups.

    Weights ``q`` over environments start uniform; every step they move to ``q_e ∝ q_e * exp(eta * risk_e)``
    (``eta`` = ``groupdro_eta``) and the model descends ``sum_e q_e * risk_e`` with ``q`` held fixed. ``q`` is a
    buffer, so it is saved in checkpoints; ``objective`` returns the moved ``q`` as its new state (packable).
    Defaults and ranges are DomainBed's.
    """

    HPARAMS = {"groupdro_eta": HParam(1e-2, log_uniform(-3, -1))}

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        device = next(model.parameters()).device
        self.register_buffer("q", torch.full((n_envs,), 1.0 / n_envs, device=device))

    PACKABLE = True
    PACK_HPARAMS = ("groupdro_eta",)

    def method_state(self):
        return {"q": self.q}

    def load_method_state(self, state):
        with torch.no_grad():
            self.q.copy_(state["q"])

    def objective(self, scores_fn, minibatches, step, hp, state):
        scores = split_scores(scores_fn, minibatches, self.task)
        risks = torch.stack([self.task.loss(s, b) for s, b in zip(scores, minibatches)])
        eta = hp["groupdro_eta"]
        q = groupdro_weights(state["q"], risks, eta if torch.is_tensor(eta) else float(eta))
        loss = torch.dot(q.to(risks.dtype), risks)
        return loss, {"loss": loss, "nll": risks.mean()}, {"q": q}
