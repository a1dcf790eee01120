"""Inter-environmental gradient alignment (IGA)."""

from __future__ import annotations

import torch

from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def gradient_spread(grads: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """``Σ_e ‖g_e − ḡ‖²`` over every parameter: the trace of the environments' gradient covariance times their
    number, where ``g_e`` is environment e's risk gradient and ``ḡ`` their mean."""
    total = 0.0
    for per_param in zip(*grads):
        stacked = torch.stack(per_param)
        total = total + (stacked - stacked.mean(0)).pow(2).sum()
    return total


@METHODS.register("iga")
class IGA(ERM):
    """IGA (Koyama & Yamaguchi, "When is invariance useful in an Out-of-Distribution Generalization problem?",
    arXiv:2008.01883v2): the mean environment risk plus ``iga_penalty`` times ``gradient_spread`` of the
    per-environment risk gradients over all model parameters, differentiated through (second order), as in
    DomainBed. The penalty is zero exactly when every environment's gradient equals the mean one. Defaults and
    ranges are DomainBed's (its hyperparameter ``penalty``).
    """

    HPARAMS = {"iga_penalty": HParam(1000.0, log_uniform(1, 5))}

    def update(self, minibatches, step):
        params = [p for p in self.model.parameters() if p.requires_grad]
        risks = self.risks(minibatches)
        grads = [torch.autograd.grad(r, params, create_graph=True, allow_unused=True) for r in risks]
        grads = [tuple(torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)) for gs in grads]
        nll = torch.stack(risks).mean()
        penalty = gradient_spread(grads)
        loss = nll + self.hparams["iga_penalty"] * penalty
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
