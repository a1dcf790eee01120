"""Empirical risk minimisation."""

from __future__ import annotations

import torch

from shiftbench.algorithm import Algorithm, concat_batches
from shiftbench.registry import METHODS


@METHODS.register("erm")
class ERM(Algorithm):
    """Empirical risk minimisation (Vapnik, 1998): the mean loss over the pooled training batches.

    With equal batch sizes per environment this equals the mean of the per-environment risks.
    """

    def risks(self, minibatches) -> list[torch.Tensor]:
        """Per-environment mean losses from one forward pass."""
        return [self.task.loss(s, b) for s, b in zip(self.env_scores(minibatches), minibatches)]

    def step_on(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        loss = self.task.loss(self.task.scores(self.model, batch), batch)
        self.step_on(loss)
        return {"loss": loss.detach()}
