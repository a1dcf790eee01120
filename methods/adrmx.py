"""ADRMX: label features minus domain features classify; remixed latents (one example's invariant part plus another
domain's domain part) must keep their class."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, choice, fixed
from shiftbench.methods.erm import ERM
from shiftbench.models import MLP, feature_width, output_width
from shiftbench.registry import METHODS

SUPCON_LAMBDA, SUPCON_TEMPERATURE = 0.5, 0.07
"""Weight of same-domain pairs (other-domain pairs get 1 − λ) and temperature of the contrastive loss (DomainBed's)."""


def supcon_lambda(z: torch.Tensor, y: torch.Tensor, d: torch.Tensor, lam: float = SUPCON_LAMBDA,
                  temperature: float = SUPCON_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., NeurIPS 2020) with domain-weighted pairs, ADRMX's Eq. for
    L_cnt as DomainBed computes it. With ``s_ij = cos(z_i, z_j) / temperature`` and ``w_ij = lam`` when examples i
    and j share a domain, ``1 − lam`` otherwise, an anchor i with positives P_i (same class, j ≠ i) scores
    ``ℓ_i = (1 / |P_i|) Σ_{p∈P_i} log(w_ip e^{s_ip} / (Σ_{j≠i} w_ij e^{s_ij} + 1e-5) + 1e-5)``; anchors without a
    positive are skipped and the loss is ``−Σ ℓ_i / (number of anchors kept + 1)`` (DomainBed's denominator)."""
    n = len(z)
    zn = F.normalize(z, dim=1)
    s = zn @ zn.T / temperature
    same_domain = (d[:, None] == d[None, :]).to(z.dtype)
    w = lam * same_domain + (1 - lam) * (1 - same_domain)
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    scaled = w * s.exp() * not_self
    denom = scaled.sum(1, keepdim=True) + 1e-5
    pos = (y[:, None] == y[None, :]) & not_self
    log_frac = torch.log(scaled / denom + 1e-5)
    n_pos = pos.sum(1)
    kept = n_pos > 0
    per_anchor = (log_frac * pos).sum(1)[kept] / n_pos[kept]
    return -per_anchor.sum() / (int(kept.sum()) + 1)


def remix_pairs(y: torch.Tensor, d: torch.Tensor, n_classes: int) -> torch.Tensor:
    """One pair (a, b) per class with two or more examples: a random example a and a random other example b of its
    class, from another domain whenever the class has one there; shape ``(pairs, 2)`` (torch's generator)."""
    pairs = []
    for c in range(n_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        a = idx[torch.randint(len(idx), (1,), device=y.device)]
        others = idx[d[idx] != d[a]]
        others = others if len(others) else idx[idx != a]
        pairs.append(torch.cat([a, others[torch.randint(len(others), (1,), device=y.device)]]))
    return torch.stack(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long, device=y.device)


def nonlinear_classifier(d: int, k: int) -> nn.Module:
    """DomainBed's nonlinear classifier: d -> d/2 -> d/4 -> k with ReLUs (widths at least 1)."""
    h1, h2 = max(1, d // 2), max(1, d // 4)
    return nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, k))


def fresh_copy(featurizer: nn.Module) -> nn.Module:
    """A second featurizer of the same architecture: re-initialised, unless the featurizer says it was loaded from
    weights (``loaded_from``, e.g. an ImageNet ResNet), which the copy then keeps (DomainBed builds both from them)."""
    twin = copy.deepcopy(featurizer)
    if not getattr(featurizer, "loaded_from", None):
        for m in twin.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return twin


@METHODS.register("adrmx")
class ADRMX(ERM):
    """ADRMX (Demirel, Aptoula & Ozkan, "ADRMX: Additive Disentanglement of Domain Features with Remix Loss",
    arXiv:2308.06624, 2023), as in DomainBed.

    A domain featurizer f_d (``fresh_copy`` of the model's featurizer f) sits beside f; the domain-invariant
    features are ``z = f(x) − f_d(x)``. Steps alternate as DANN's (step k is a discriminator step when
    ``(k + 1) mod (1 + adrmx_d_steps_per_g_step) < adrmx_d_steps_per_g_step``): a discriminator (MLP of
    ``adrmx_mlp_depth`` linear layers) learns the environment from detached z; otherwise one step of everything
    else on ``CE(head(f(x)), y) + CE(c2(z), y) + dclf·CE(c_d(f_d(x)), e) + rmxd·L_remix
    + cnt·(L_cnt(f(x)) + L_cnt(z)) − disc·CE(D(z), e)``: z classifies while hiding its domain, f_d carries the
    domain, and ``L_remix`` (``remix_pairs``: per class, ``head(z_a + f_d(x_b))`` against y_a, summed and divided by
    the number of classes) asks one example's invariant part plus another domain's domain part to keep the class.
    ``L_cnt`` is ``supcon_lambda``. Two Adams with β = (``adrmx_beta1``, 0.9).

    Departures: the first label classifier is the model's (linear) head, so the trained model alone predicts,
    where DomainBed's is nonlinear (c2 and c_d are DomainBed's nonlinear ones); remix partners are indices into the
    batch from another domain, as the paper states (DomainBed's code draws positions within the class and indexes
    the batch with them). Classification only (class and domain labels). Defaults and ranges are DomainBed's for
    small images (mostly single choices; ``lr`` from four values).
    """

    TASKS = ("classification",)
    HPARAMS = {
        "lr": HParam(3e-3, choice([5e-4, 1e-3, 2e-3, 3e-3])),
        "adrmx_cnt_lambda": HParam(1.0, fixed(1.0)),
        "adrmx_dclf_lambda": HParam(1.0, fixed(1.0)),
        "adrmx_disc_lambda": HParam(0.75, fixed(0.75)),
        "adrmx_rmxd_lambda": HParam(1.0, fixed(1.0)),
        "adrmx_d_steps_per_g_step": HParam(2, fixed(2)),
        "adrmx_beta1": HParam(0.5, fixed(0.5)),
        "adrmx_mlp_width": HParam(256, fixed(256)),
        "adrmx_mlp_depth": HParam(9, choice([8, 9, 10])),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        h, d, k = self.hparams, feature_width(model), output_width(model)
        self.domain_featurizer = fresh_copy(model.featurizer)
        self.invariant_classifier = nonlinear_classifier(d, k)
        self.domain_classifier = nonlinear_classifier(d, n_envs)
        width = int(h["adrmx_mlp_width"])
        self.discriminator = nn.Sequential(MLP((d,), width=width, depth=int(h["adrmx_mlp_depth"]) - 1),
                                           nn.Linear(width, n_envs))  # fmt: skip
        betas = (float(h["adrmx_beta1"]), 0.9)
        params = [p for m in (model, self.domain_featurizer, self.invariant_classifier, self.domain_classifier)
                  for p in m.parameters()]  # fmt: skip
        self.optimizer = torch.optim.Adam(params, lr=h["lr"], weight_decay=h["weight_decay"], betas=betas)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=h["lr"], betas=betas)

    def optimizers(self):
        return {"optimizer": self.optimizer, "disc_optimizer": self.disc_optimizer}

    def is_discriminator_step(self, step: int) -> bool:
        d = int(self.hparams["adrmx_d_steps_per_g_step"])
        return (step + 1) % (1 + d) < d

    def generator_losses(self, x, y, e, f_label, f_domain) -> dict[str, torch.Tensor]:
        """Every term of the generator's objective and their weighted sum (``gen_loss``)."""
        h, z = self.hparams, f_label - f_domain
        terms = {
            "ce_label": F.cross_entropy(self.model.head(f_label), y),
            "ce_invariant": F.cross_entropy(self.invariant_classifier(z), y),
            "ce_domain": F.cross_entropy(self.domain_classifier(f_domain), e),
            "cnt": supcon_lambda(f_label, y, e) + supcon_lambda(z, y, e),
            "disc": F.cross_entropy(self.discriminator(z), e),
        }
        pairs = remix_pairs(y, e, output_width(self.model))
        remixed = z[pairs[:, 0]] + f_domain[pairs[:, 1]]
        terms["remix"] = F.cross_entropy(self.model.head(remixed), y[pairs[:, 0]], reduction="sum") / output_width(
            self.model)
        terms["gen_loss"] = (terms["ce_label"] + terms["ce_invariant"] + h["adrmx_dclf_lambda"] * terms["ce_domain"]
                             + h["adrmx_rmxd_lambda"] * terms["remix"] + h["adrmx_cnt_lambda"] * terms["cnt"]
                             - h["adrmx_disc_lambda"] * terms["disc"])  # fmt: skip
        return terms

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        x, y = batch["x"], batch["y"]
        e = torch.cat([torch.full((len(b["x"]),), i, dtype=torch.long, device=x.device)
                       for i, b in enumerate(minibatches)])  # fmt: skip
        f_label, f_domain = self.model.featurizer(x), self.domain_featurizer(x)
        if self.is_discriminator_step(step):
            disc_loss = F.cross_entropy(self.discriminator((f_label - f_domain).detach()), e)
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_optimizer.step()
            risk = F.cross_entropy(self.model.head(f_label.detach()), y)
            return {"loss": risk.detach(), "disc_loss": disc_loss.detach()}
        terms = self.generator_losses(x, y, e, f_label, f_domain)
        self.optimizer.zero_grad(set_to_none=True)
        terms["gen_loss"].backward()
        self.optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)  # the generator's gradient is not the discriminator's
        return {"loss": terms["ce_label"].detach(), "disc_loss": terms["disc"].detach()}
