"""Risk Distribution Matching (RDM): match the worst domain's distribution of per-example losses to the pooled one."""

from __future__ import annotations

import torch

from shiftbench.hparams import HParam, uniform
from shiftbench.methods.erm import ERM
from shiftbench.methods.mmd import gaussian_mmd
from shiftbench.registry import METHODS

GAMMAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
"""RDM's kernel bandwidths (DomainBed's), one decade wider than MMD's: losses are scalars of varying scale."""


def rdm_penalties(losses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(matching, variance, worst) from each environment's per-example losses.

    ``worst`` is the environment of highest mean loss; ``matching`` the Gaussian-kernel MMD between its losses and
    all environments' losses pooled (worst included, as in DomainBed); ``variance`` the unbiased variance of the
    pooled losses plus that of the worst environment's.
    """
    worst = int(torch.stack([per.mean() for per in losses]).argmax())
    pooled, w = torch.cat(losses), losses[worst]
    matching = gaussian_mmd(w[:, None], pooled[:, None], GAMMAS)
    return matching, pooled.var() + w.var(), worst


@METHODS.register("rdm")
class RDM(ERM):
    """RDM (Nguyen, Do, Duong & Nguyen, "Domain Generalisation via Risk Distribution Matching", WACV 2024,
    arXiv:2310.18598), as in DomainBed.

    Loss: mean environment risk + w_m · matching + w_v · variance (``rdm_penalties``), with both weights 0 before
    ``rdm_penalty_anneal_iters`` and ``rdm_lambda``, ``rdm_variance_weight`` from then on. At the switch Adam's
    state is cleared and its learning rate set to ``rdm_lr`` (DomainBed rebuilds Adam with it; the rate lives in
    the optimizer's state, so checkpoints carry it). Defaults and ranges are DomainBed's for datasets other than
    DomainNet, PACS, TerraIncognita and OfficeHome (which a dataset may override); DomainBed's
    ``variance_weight`` is ``rdm_variance_weight`` here.
    """

    HPARAMS = {
        "rdm_lambda": HParam(5.0, uniform(0.1, 10.0)),
        "rdm_penalty_anneal_iters": HParam(1500, lambda r: int(r.uniform(800, 2700))),
        "rdm_variance_weight": HParam(0.004, uniform(0.001, 0.007)),
        "rdm_lr": HParam(1.5e-5, uniform(8e-6, 2e-5)),
    }

    def update(self, minibatches, step):
        losses = [self.task.loss(s, b, reduction="none") for s, b in zip(self.env_scores(minibatches), minibatches)]
        nll = torch.stack([per.mean() for per in losses]).mean()
        matching, variance, _ = rdm_penalties(losses)
        on = step >= self.hparams["rdm_penalty_anneal_iters"]
        w_m, w_v = (float(self.hparams["rdm_lambda"]), float(self.hparams["rdm_variance_weight"])) if on else (0, 0)
        loss = nll + w_m * matching + w_v * variance
        if step == self.hparams["rdm_penalty_anneal_iters"]:
            self.optimizer.state.clear()
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.hparams["rdm_lr"])
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "matching": matching.detach(),
                "variance": variance.detach()}  # fmt: skip
