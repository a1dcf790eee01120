"""LISA: selective mixup within labels across domains, or within domains across labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import POSITIVE, HParam, between, log_uniform, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def lisa_partners(y: torch.Tensor, d: torch.Tensor, same_label: bool) -> torch.Tensor:
    """For each example ``i`` a uniformly drawn partner ``j``: same label and another domain (intra-label LISA) or
    same domain and another label (intra-domain); ``i`` itself when the batch holds none. Draws from torch's global
    generator, which the trainer seeds and checkpoints."""
    same_y, same_d = y[:, None] == y[None, :], d[:, None] == d[None, :]
    ok = (same_y & ~same_d) if same_label else (same_d & ~same_y)
    u = torch.rand(ok.shape, device=y.device) * ok  # argmax of uniform draws over the allowed j: a uniform choice
    j = u.argmax(1)
    return torch.where(ok.any(1), j, torch.arange(len(y), device=y.device))


def mix(x: torch.Tensor, y: torch.Tensor, j: torch.Tensor, lam: torch.Tensor, k: int):
    """``x̃ = λ x + (1 − λ) x_j`` and soft labels ``λ e_y + (1 − λ) e_{y_j}``, one λ per example."""
    lx = lam.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
    onehot = F.one_hot(y, k).float()
    return lx * x + (1 - lx) * x[j], lam[:, None] * onehot + (1 - lam[:, None]) * onehot[j]


@METHODS.register("lisa")
class LISA(ERM):
    """LISA (Yao, Wang, Li, Zhang, Liang, Zou & Finn, "Improving Out-of-Distribution Robustness via Selective
    Augmentation", ICML 2022), with mixup (the cutmix variant is not implemented).

    Each step, with probability ``lisa_p_sel`` intra-label LISA (mix examples of one label from different domains),
    otherwise intra-domain LISA (one domain, different labels); λ ~ Beta(α, α) per pair; the loss is cross-entropy
    on the mixed inputs against the mixed labels. The domain is the spurious ``attribute`` where the dataset has one
    (``subpop_digits``), else the training environment (DomainBed datasets; the WILDS adapters, whose environments
    are groups, i.e. label x attribute cells: there intra-label pairs are exactly different attributes, and
    intra-domain pairs do not exist, so those steps are plain ERM). Defaults and ranges are SubpopBench's
    (α = 2, 10^U(−1, 1); p_sel = 0.5, U(0, 1)).
    """

    TASKS = ("classification",)
    BATCH_KEYS = ("attribute",)
    HPARAMS = {
        "lisa_alpha": HParam(2.0, log_uniform(-1, 1), POSITIVE),
        "lisa_p_sel": HParam(0.5, uniform(0, 1), between(0.0, 1.0)),
    }

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        if "attribute" in batch:
            d = batch["attribute"].long()
        else:
            d = torch.cat([torch.full((len(b["y"]),), e, device=b["y"].device) for e, b in enumerate(minibatches)])
        same_label = bool(torch.rand(()) < float(self.hparams["lisa_p_sel"]))
        j = lisa_partners(batch["y"], d, same_label)
        a = torch.tensor(float(self.hparams["lisa_alpha"]))
        lam = torch.distributions.Beta(a, a).sample((len(j),)).to(batch["x"].device)
        x, soft = mix(batch["x"], batch["y"], j, lam, int(self.model.head.out_features))
        loss = F.cross_entropy(self.model(x).float(), soft)
        self.step_on(loss)
        return {"loss": loss.detach(), "intra_label": torch.tensor(float(same_label))}
