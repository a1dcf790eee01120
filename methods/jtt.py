"""Just Train Twice: up-weight the errors of an ERM identification model."""

from __future__ import annotations

import torch

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.hparams import POSITIVE, HParam, log_uniform, log_uniform_int
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


@METHODS.register("jtt")
class JTT(ERM):
    """Just Train Twice (Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang & Finn, "Just Train Twice: Improving
    Group Robustness without Training Group Information", ICML 2021). No groups needed.

    1. Identification: ``jtt_first_stage_steps`` steps of ERM on the trial's training streams with the trial's
       lr, weight decay and batch size (``MethodContext.train_reference``, cached in the trial folder as
       ``reference_erm_<steps>.pt``); its error set is every training (``in``) example it misclassifies, found once
       by an evaluation pass (no augmentation), per environment by example ``idx``.
    2. The trial's own freshly initialised model trains with each example's loss weighted ``jtt_lambda`` if it is
       in the error set and 1 otherwise: the paper's upsampling by λ_up, as an importance weight (SubpopBench's
       form). The weights are rebuilt from the cached model by ``setup``, so checkpoints need not carry them.

    Defaults and ranges: λ_up = 10, ``10^U(0, 2.5)`` (SubpopBench). SubpopBench sets the first stage as a fraction
    of the run (0.5, U(0.2, 0.8)); a method does not see the trial's length, so here it is a step count, 500 by
    default, from ``10^U(2, 3.3)`` (100 to 2,000 steps).
    """

    BATCH_KEYS = ("idx",)
    HPARAMS = {
        "jtt_lambda": HParam(10.0, log_uniform(0, 2.5), POSITIVE),
        "jtt_first_stage_steps": HParam(500, log_uniform_int(2, 3.3), POSITIVE),
    }

    def setup(self, context: MethodContext) -> None:
        reference = context.train_reference("erm", steps=int(self.hparams["jtt_first_stage_steps"]))
        self.errors = [self.error_set(reference, context.splits[f"env{i}_in"]) for i in context.train_envs]

    @torch.no_grad()
    def error_set(self, reference: torch.nn.Module, split) -> torch.Tensor:
        """A boolean lookup over example ids: True where ``reference`` misclassifies the example."""
        ids, wrong = [], []
        for b in split.eval_batches(512):
            out = self.task.outputs(self.task.scores(reference, b), b)
            ids.append(b["idx"].long())
            wrong.append(out["correct"] < 0.5)
        ids_t = torch.cat(ids)
        table = torch.zeros(int(ids_t.max()) + 1, dtype=torch.bool, device=ids_t.device)
        table[ids_t] = torch.cat(wrong)
        return table

    def example_weights(self, minibatches) -> torch.Tensor:
        """Per example of the pooled batch: ``jtt_lambda`` for the identification model's errors, else 1."""
        lam = float(self.hparams["jtt_lambda"])
        flags = torch.cat([table[b["idx"].long()] for table, b in zip(self.errors, minibatches)])
        return 1.0 + (lam - 1.0) * flags.float()

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        losses = self.task.loss(self.task.scores(self.model, batch), batch, reduction="none")
        w = self.example_weights(minibatches).to(losses.dtype)
        loss = (w * losses).mean()
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": losses.mean().detach(), "upweighted": (w > 1).float().mean()}
