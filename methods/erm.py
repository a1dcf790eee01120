"""Empirical risk minimisation."""

from __future__ import annotations

import torch

from shiftbench.algorithm import Algorithm, concat_batches
from shiftbench.registry import METHODS


@METHODS.register("erm")
class ERM(Algorithm):
    """Empirical risk minimisation (Vapnik, 1998): the mean loss over the pooled training batches.

    With equal batch sizes per environment this equals the mean of the per-environment risks. ``update`` is
    ``objective`` plus one Adam step, so ``shiftbench.pack`` can vectorise the same loss over many trials.
    """

    PACKABLE = True

    def risks(self, minibatches) -> list[torch.Tensor]:
        """Per-environment mean losses from one forward pass."""
        return [self.task.loss(s, b) for s, b in zip(self.env_scores(minibatches), minibatches)]

    def step_on(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def objective(self, scores_fn, minibatches, step, hp, state):
        batch = concat_batches(minibatches)
        loss = self.task.loss(scores_fn(batch), batch)
        return loss, {"loss": loss}, state

    def update(self, minibatches, step):
        """``objective`` on this trial's model, then the optimizer step (and any state and reset it implies)."""
        hp = self.pack_hparams()
        loss, stats, state = self.objective(self.model_scores, minibatches, step, hp, self.method_state())
        if self.optimizer_reset(step, hp):
            for opt in self.optimizers().values():
                opt.state.clear()
        self.load_method_state(state)
        self.step_on(loss)
        return {k: v.detach() for k, v in stats.items()}
