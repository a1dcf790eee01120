"""Transfer: improving transferability among source domains against an adversarial nearby head."""

from __future__ import annotations

import copy

import torch

from shiftbench.algorithm import concat_batches
from shiftbench.featurewise import env_features, scores_from_features
from shiftbench.hparams import HParam, choice, log_uniform, uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


def project_to_ball(adv: torch.nn.Module, centre: torch.nn.Module, radius: float) -> None:
    """Moves ``adv``'s parameters to the nearest point within Euclidean distance ``radius`` of ``centre``'s (the
    distance over all parameters together): along the segment to ``centre`` when it is farther."""
    with torch.no_grad():
        pairs = list(zip(adv.parameters(), centre.parameters()))
        dist = torch.sqrt(sum((a - c).pow(2).sum() for a, c in pairs))
        if dist > radius:
            for a, c in pairs:
                a.copy_(c + (radius / dist) * (a - c))


@METHODS.register("transfer")
class Transfer(ERM):
    """Transfer (Zhang, Zhao, Yu & Poupart, "Quantifying and Improving Transferability in Domain Generalization",
    NeurIPS 2021, Algorithm 1), as DomainBed's default ``update``.

    The gap of a head h is ``max_e R_e(h ∘ f) − min_e R_e(h ∘ f)`` over the training environments. Each step:
    (1) an ERM step on featurizer and head; (2) an Adam step of the featurizer on ``t_lambda`` · gap of the
    adversarial head h' (reducing how differently h' does across domains); (3) h' restarts from the head and takes
    ``transfer_d_steps_per_g`` SGD ascent steps on the gap (lr ``transfer_lr_d``), each followed by projection onto
    the ball of radius ``transfer_delta`` around the head: h' is the worst nearby head, whose gap measures how
    badly a predictor transfers. h' and its optimizer are in checkpoints. DomainBed's ``delta``,
    ``d_steps_per_g`` and ``lr_d`` carry the ``transfer_`` prefix here; its defaults and ranges (its SGD "gda"
    variant and unused ``beta1``/``weight_decay_d`` are left out).
    """

    HPARAMS = {
        "t_lambda": HParam(1.0, log_uniform(-2, 1)),
        "transfer_delta": HParam(2.0, uniform(0.1, 3.0)),
        "transfer_d_steps_per_g": HParam(10, choice([1, 2, 5])),
        "transfer_lr_d": HParam(1e-3, log_uniform(-4.5, -2.5)),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.adv_head = copy.deepcopy(model.head)
        self.adv_optimizer = torch.optim.SGD(self.adv_head.parameters(), lr=self.hparams["transfer_lr_d"])

    def optimizers(self):
        return {"optimizer": self.optimizer, "adv_optimizer": self.adv_optimizer}

    def gap(self, features: list[torch.Tensor], minibatches, head: torch.nn.Module) -> torch.Tensor:
        risks = torch.stack([self.task.loss(scores_from_features(head, self.task, b, f), b)
                             for b, f in zip(minibatches, features)])  # fmt: skip
        return risks.max() - risks.min()

    def update(self, minibatches, step):
        lam = float(self.hparams["t_lambda"])
        batch = concat_batches(minibatches)
        loss = self.task.loss(self.task.scores(self.model, batch), batch)
        self.step_on(loss)
        self.step_on(lam * self.gap(env_features(self.model, self.task, minibatches), minibatches, self.adv_head))
        self.adv_head.load_state_dict(self.model.head.state_dict())
        with torch.no_grad():  # the featurizer stands still while the adversary moves
            features = env_features(self.model, self.task, minibatches)
        for _ in range(int(self.hparams["transfer_d_steps_per_g"])):
            gap = self.gap(features, minibatches, self.adv_head)
            self.adv_optimizer.zero_grad(set_to_none=True)
            (-lam * gap).backward()
            self.adv_optimizer.step()
            project_to_ball(self.adv_head, self.model.head, float(self.hparams["transfer_delta"]))
        return {"loss": loss.detach(), "gap": gap.detach()}
