"""Contrastive adversarial domain bottleneck (CAD): a supervised-contrastive term that makes domains hard to tell
apart from the representation."""

from __future__ import annotations

import torch
from torch import nn

from shiftbench.algorithm import concat_batches
from shiftbench.featurewise import scores_from_features
from shiftbench.hparams import HParam, choice, fixed
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS

BASE_TEMPERATURE = 0.07
"""SupCon's reference temperature (Khosla et al., 2020): the loss is scaled by τ / 0.07, as in DomainBed."""


def cad_bottleneck(z: torch.Tensor, y: torch.Tensor, d: torch.Tensor, temperature: float, conditional: bool,
                   flipped: bool = True) -> torch.Tensor:
    """CAD's domain-bottleneck loss on features ``z`` with labels ``y`` and domains ``d`` (Ruan et al., Eq. 7/8).

    With ``s_ij = z_i · z_j / τ`` over the other examples j ≠ i, the anchor i's softmax is ``p_ij ∝ exp(s_ij)``,
    over all j (unconditional CAD) or over the j of its label (conditional). Flipped (DomainBed's default, "more
    stable"), the per-anchor loss is ``−(τ/0.07) log Σ_{j: d_j ≠ d_i} p_ij`` (make other domains likely);
    otherwise ``(τ/0.07) log Σ_{j: d_j = d_i} p_ij`` (make the own domain unlikely; j ≠ i, where DomainBed's
    unconditional form also counts the anchor itself). In the conditional loss the sums run over the anchor's
    label only. The loss is the mean over anchors that have another example of their label and a non-empty set
    summed over (DomainBed's finite mean), 0 when there are none.
    """
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    same_y, same_d = y[:, None] == y[None], d[:, None] == d[None]
    pool = same_y & ~eye if conditional else ~eye
    target = (~same_d if flipped else same_d & ~eye) & pool
    # anchors with an empty target set would give log 0; DomainBed drops them as non-finite, we never form them
    # (a -inf term also makes a NaN gradient through logsumexp, even when dropped)
    rows = (same_y & ~eye).any(1) & target.any(1)
    if not bool(rows.any()):
        return z.new_zeros(())
    logits = z[rows] @ z.T / temperature
    log_p = logits.masked_fill(~pool[rows], float("-inf")).log_softmax(1)
    term = torch.logsumexp(log_p.masked_fill(~target[rows], float("-inf")), dim=1)
    return (-term if flipped else term).mean() * (temperature / BASE_TEMPERATURE)


@METHODS.register("cad")
class CAD(ERM):
    """CAD (Ruan, Dubois & Maddison, "Optimal Representations for Covariate Shift", ICLR 2022), as in DomainBed:
    the pooled cross-entropy plus ``cad_lambda`` · ``cad_bottleneck`` over the pooled batch's penultimate
    features, domains being the training environments. Unconditional CAD minimises I(D; Z); ``CondCAD``
    minimises I(D; Z | Y).

    Optional (off by default, as in DomainBed's searches): L2-normalising the features before the contrastive
    term (``cad_normalized``) and a projection MLP d → d → 128 in front of it (``cad_project``), trained with the
    model. Classification only: the bottleneck is built from class labels. DomainBed's ``lmbda``,
    ``temperature``, ``is_normalized``, ``is_project`` and ``is_flipped`` are the ``cad_`` names here, with its
    defaults and ranges.
    """

    HPARAMS = {
        "cad_lambda": HParam(1e-1, choice([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2])),
        "cad_temperature": HParam(0.1, choice([0.05, 0.1])),
        "cad_normalized": HParam(False, fixed(False)),
        "cad_project": HParam(False, fixed(False)),
        "cad_flipped": HParam(True, fixed(True)),
    }
    TASKS = ("classification",)
    CONDITIONAL = False

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.project = None
        if self.hparams["cad_project"]:
            width = model.head.in_features
            device = next(model.parameters()).device
            self.project = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 128)).to(device)
            self.optimizer = self.make_optimizer(list(model.parameters()) + list(self.project.parameters()))

    def bottleneck(self, z: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            z = self.project(z)
        if self.hparams["cad_normalized"]:
            z = nn.functional.normalize(z, dim=1)
        return cad_bottleneck(z.float(), y, d, float(self.hparams["cad_temperature"]), self.CONDITIONAL,
                              bool(self.hparams["cad_flipped"]))

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        d = torch.cat([torch.full((len(b["y"]),), e, device=b["y"].device) for e, b in enumerate(minibatches)])
        z = self.model.featurizer(batch["x"])
        nll = self.task.loss(scores_from_features(self.model.head, self.task, batch, z), batch)
        bn = self.bottleneck(z, batch["y"], d)
        loss = nll + self.hparams["cad_lambda"] * bn
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": bn.detach()}
