"""Classifier re-training on a frozen ERM featurizer, with group-balanced sampling."""

from __future__ import annotations

import torch

from shiftbench.algorithm import MethodContext
from shiftbench.hparams import POSITIVE, HParam, fixed, seed_hash
from shiftbench.methods.erm import ERM
from shiftbench.methods.groups import NeedsGroups, balanced_stream, group_cells, training_splits
from shiftbench.registry import METHODS


@METHODS.register("crt")
class CRT(NeedsGroups, ERM):
    """Classifier re-training (cRT; Kang, Xie, Rohrbach, Yan, Gordo, Feng & Kalantidis, "Decoupling Representation
    and Classifier for Long-Tailed Recognition", ICLR 2020), by group as in SubpopBench (Yang et al., ICML 2023).

    The featurizer is the one of ``lastlayer_reference_steps`` steps of ERM on the trial's training streams
    (``MethodContext.train_reference``, cached in the trial folder), frozen and kept in eval mode (no dropout, no
    BatchNorm statistics updates); the head is re-initialised (seeded by the trial seed) and trained alone, with
    Adam and the trial's lr and weight decay, on group-balanced batches of the training ``in`` splits
    (``groups.balanced_stream``). Subclasses change the data (``head_batch``) and the loss (``head_loss``).
    """

    TASKS = ("classification",)
    HPARAMS = {"lastlayer_reference_steps": HParam(1000, fixed(1000), POSITIVE)}

    def make_optimizer(self, params=None) -> torch.optim.Optimizer:
        return super().make_optimizer(self.model.head.parameters() if params is None else params)

    def setup(self, context: MethodContext) -> None:
        reference = context.train_reference("erm", steps=int(self.hparams["lastlayer_reference_steps"]))
        with torch.no_grad():
            self.model.load_state_dict(reference.state_dict())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_hash(context.seed, "lastlayer head"))
            self.model.head.reset_parameters()
        for p in self.model.featurizer.parameters():
            p.requires_grad_(False)
        self.model.featurizer.eval()
        self.setup_data(context)

    def setup_data(self, context: MethodContext) -> None:
        total = int(self.hparams["batch_size"]) * self.n_envs
        self.stream = balanced_stream(group_cells(training_splits(context)), total, context.seed, "crt")

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.featurizer.eval()  # frozen: dropout off, BatchNorm statistics fixed
        return self

    def head_batch(self, minibatches, step) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The step's (features, labels, batch)."""
        batch = self.stream(step)
        with torch.no_grad():
            z = self.task.features(self.model, batch)
        return z, batch["y"], batch

    def head_loss(self, logits: torch.Tensor, y: torch.Tensor, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), y)

    def update(self, minibatches, step):
        z, y, batch = self.head_batch(minibatches, step)
        loss = self.head_loss(self.model.head(z), y, batch)
        self.step_on(loss)
        return {"loss": loss.detach()}
