"""Group-balanced resampling."""

from __future__ import annotations

from shiftbench.algorithm import MethodContext
from shiftbench.methods.erm import ERM
from shiftbench.methods.groups import NeedsGroups, balanced_stream, group_cells, training_splits
from shiftbench.registry import METHODS


@METHODS.register("resample")
class ReSample(NeedsGroups, ERM):
    """ReSample: ERM on batches drawn uniformly over groups (the class-balanced sampling of imbalanced learning,
    e.g. Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020, applied to
    groups, as SubpopBench (Yang et al., ICML 2023) runs it with its ``group_balanced`` sampler).

    Every step draws ``ceil(batch_size · n_envs / n_groups)`` examples from each non-empty training group's own stream
    (``groups.balanced_stream``), so the step sees as many examples as ERM's but every group equally often; the
    trainer's natural minibatches are not used. With groups as environments (the WILDS adapters, ``group_envs``)
    the harness's batches are group-balanced already and ReSample equals ERM up to the draws.
    """

    def setup(self, context: MethodContext) -> None:
        total = int(self.hparams["batch_size"]) * self.n_envs
        self.stream = balanced_stream(group_cells(training_splits(context)), total, context.seed, "resample")

    def update(self, minibatches, step):
        return super().update([self.stream(step)], step)
