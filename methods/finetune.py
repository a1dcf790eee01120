"""Naive fine-tuning of a cue-trained ERM model on a small cue-free set: the baseline CBFT is measured against."""

from __future__ import annotations

import torch

from shiftbench.algorithm import MethodContext, concat_batches
from shiftbench.hparams import HParam, fixed, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS

NC_SUFFIX = "_nc"
"""Splits named ``env{i}_nc`` are a training environment's cue-free fine-tuning set (D_NC)."""


def nc_splits(splits, train_envs) -> list[str]:
    """The cue-free splits a method may train on: ``env{i}_nc`` of the training environments ``i`` only (a held-out
    environment's cue-free copies are test data), in environment order."""
    return [f"env{i}{NC_SUFFIX}" for i in sorted(train_envs) if f"env{i}{NC_SUFFIX}" in splits]


@METHODS.register("finetune")
class FineTune(ERM):
    """Naive fine-tuning, the baseline of Lubana et al., "Mechanistic Mode Connectivity" (ICML 2023): θ starts at
    θ_C and minimises cross-entropy on D_NC with SGD (their lr 0.01, momentum 0.9, weight decay 1e-4).

    θ_C, the cue-trained model, is an ERM phase inside the trial: ``ft_reference_steps`` steps of ERM with its
    default Adam settings on the trial's training streams (``MethodContext.train_reference``, cached in the trial
    folder as ``reference_erm_<steps>.pt``, so a resumed trial reuses it and trials of finetune and cbft with the
    same seed, steps, batch size and model start from the same θ_C). θ is initialised with a copy of θ_C's weights.

    D_NC is the first split named ``env{i}_nc`` of a training environment i (:func:`nc_splits`; ``cue_digits``:
    ``nc_size`` cue-free copies of its training digits); a held-out environment's is never read. A dataset without
    one (e.g. ``colored_digits``) falls back to the training batches themselves, so the method still runs everywhere;
    it is only meaningful where a cue-free set exists.

    The default of 100 reference steps is a short phase that leaves the smoke test on every small dataset something
    to learn; the cue-dataset experiments set ``ft_reference_steps`` so that θ_C has learned the cue (e.g. 1000).
    """

    HPARAMS = {
        "lr": HParam(0.01, log_uniform(-3, -1.5)),
        "weight_decay": HParam(1e-4, log_uniform(-6, -3)),
        "ft_momentum": HParam(0.9, fixed(0.9)),
        "ft_reference_steps": HParam(100, fixed(100)),
    }

    def make_optimizer(self, params=None) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters() if params is None else params, lr=self.hparams["lr"],
                               momentum=self.hparams["ft_momentum"], weight_decay=self.hparams["weight_decay"])

    def setup(self, context: MethodContext) -> None:
        erm = METHODS.get("erm").hparam_space()
        reference = context.train_reference("erm", steps=int(self.hparams["ft_reference_steps"]),
                                             hparams={k: erm[k].default for k in ("lr", "weight_decay")})
        with torch.no_grad():
            self.model.load_state_dict(reference.state_dict())
        # a plain dict, not a submodule: θ_C is rebuilt from its cache by setup, so checkpoints need not carry it
        self.theta_c = {n: p.detach() for n, p in reference.named_parameters()}
        names = nc_splits(context.splits, context.train_envs)
        self.nc_split = names[0] if names else None
        self.nc_stream = context.stream(names[0], int(self.hparams["batch_size"])) if names else None

    def nc_batch(self, minibatches, step):
        """The step's D_NC batch (the pooled training batch when the dataset has no cue-free split)."""
        return self.nc_stream(step) if self.nc_stream is not None else concat_batches(minibatches)

    def update(self, minibatches, step):
        batch = self.nc_batch(minibatches, step)
        loss = self.task.loss(self.task.scores(self.model, batch), batch)
        self.step_on(loss)
        return {"loss": loss.detach()}
