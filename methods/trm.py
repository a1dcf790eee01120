"""Transfer Risk Minimization (TRM): representations whose per-domain optimal heads transfer to the other domains."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from shiftbench.featurewise import env_features, scores_from_features
from shiftbench.hparams import HParam, log_uniform, log_uniform_int
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS

HEAD_STEPS, HEAD_LR = 30, 0.1
"""SGD steps and rate that fit each domain's own head on this step's features (DomainBed's fixed values)."""


def neumann_inverse_hvp(loss_fn: Callable[[], torch.Tensor], weight: torch.Tensor, v: torch.Tensor,
                        n_terms: int = 10, bound: float = 10.0) -> torch.Tensor:
    """``H⁻¹ v`` approximated by the Neumann series ``Σ_{k=0}^{n_terms} (I − H)^k v``, H the Hessian of
    ``loss_fn()`` in ``weight`` (flattened), from Hessian-vector products; valid when H's eigenvalues lie in
    (0, 2). Stops after the term that takes a coordinate of the sum past ``bound`` (divergence), as DomainBed."""
    v = v.detach()
    h = v
    for _ in range(n_terms):
        g = torch.autograd.grad(loss_fn(), weight, create_graph=True)[0].reshape(-1)
        hv = torch.autograd.grad(g @ v, weight)[0].reshape(-1)
        v = (v - hv).detach()
        h = (h + v).detach()
        if bool(h.abs().max() > bound):
            break
    return h


@METHODS.register("trm")
class TRM(ERM):
    """TRM (Xu & Jaakkola, "Learning Representations that Support Robust Transfer of Predictors",
    arXiv:2110.09940, 2021), as in DomainBed.

    ERM for the first ``trm_iters`` steps. Then, every step: each domain Q's own head h_Q (a copy of the head's
    shape) is fitted by 30 SGD steps on Q's detached features; the transfer risk of h_Q to the other domains,
    ``Σ_{i≠Q} α_Qi R_i(h_Q)``, is added to the loss together with ``−trm_cos_lambda · vᵀ ∇R_Q(h_Q)``, where
    ``v = H_Q⁻¹ ∇ Σ_i α_Qi R_i(h_Q)`` (``neumann_inverse_hvp``, weights only) accounts, to first order, for h_Q
    being re-fitted as the features move. The weights α (a buffer, rows renormalised each step) follow GroupDRO's
    exponentiated update ``α_Qi ← α_Qi exp(trm_groupdro_eta · α_Qi R_i(h_Q))``, focusing on the domains h_Q
    transfers to worst. Loss: pooled risk + the mean over Q of those terms. DomainBed's ``cos_lambda``, ``iters``
    and ``groupdro_eta`` are the ``trm_`` names here, with its defaults and ranges. With one training environment
    there is nothing to transfer to and TRM is ERM.
    """

    HPARAMS = {
        "trm_cos_lambda": HParam(1e-4, log_uniform(-5, 0)),
        "trm_iters": HParam(200, log_uniform_int(0, 4)),
        "trm_groupdro_eta": HParam(1e-2, log_uniform(-3, -1)),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        heads = [copy.deepcopy(model.head) for _ in range(n_envs)]
        for h in heads:  # fresh heads, as DomainBed builds new ones
            for m in h.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.env_heads = nn.ModuleList(heads)
        self.head_optimizer = torch.optim.SGD(self.env_heads.parameters(), lr=HEAD_LR)
        device = next(model.parameters()).device
        self.register_buffer("alpha", torch.ones(n_envs, n_envs, device=device) - torch.eye(n_envs, device=device))

    def optimizers(self):
        return {"optimizer": self.optimizer, "head_optimizer": self.head_optimizer}

    def risk(self, head, batch, features) -> torch.Tensor:
        return self.task.loss(scores_from_features(head, self.task, batch, features), batch)

    def fit_env_heads(self, features, minibatches) -> None:
        for _ in range(HEAD_STEPS):
            loss = sum(self.risk(h, b, f.detach()) for h, b, f in zip(self.env_heads, minibatches, features))
            self.head_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.head_optimizer.step()

    def transfer_terms(self, features, minibatches) -> torch.Tensor:
        """Mean over domains Q of the transfer risk minus the cosine term; updates α."""
        lam, eta = float(self.hparams["trm_cos_lambda"]), float(self.hparams["trm_groupdro_eta"])
        with torch.no_grad():
            self.alpha.div_(self.alpha.sum(1, keepdim=True))
        terms = []
        for q, head in enumerate(self.env_heads):
            w = head.weight
            grad_q = torch.autograd.grad(self.risk(head, minibatches[q], features[q]), w, create_graph=True)[0]
            others = [i for i in range(self.n_envs) if i != q]
            weights = self.alpha[q].clone()  # a copy: the in-place update below must not touch the graph's factors
            transfer = [weights[i] * self.risk(head, minibatches[i], features[i]) for i in others]
            total = torch.stack(transfer).sum()
            grad_p = torch.autograd.grad(total, w, retain_graph=True)[0].reshape(-1)
            v = neumann_inverse_hvp(lambda: self.risk(head, minibatches[q], features[q].detach()), w, grad_p)
            terms.append(total - lam * (v @ grad_q.reshape(-1)))
            with torch.no_grad():
                for i, t in zip(others, transfer):
                    self.alpha[q, i] *= torch.exp(eta * t.detach())
        return torch.stack(terms).mean()

    def update(self, minibatches, step):
        features = env_features(self.model, self.task, minibatches)
        nll = torch.cat([self.task.loss(scores_from_features(self.model.head, self.task, b, f), b, reduction="none")
                         for b, f in zip(minibatches, features)]).mean()  # fmt: skip
        trm = nll.new_zeros(())
        if step >= self.hparams["trm_iters"] and self.n_envs > 1:
            self.fit_env_heads(features, minibatches)
            trm = self.transfer_terms(features, minibatches)
        loss = nll + trm
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "trm": trm.detach()}
