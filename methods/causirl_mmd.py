"""CausIRL with the MMD distance: matching the feature distributions of two random halves of the pooled batch."""

from __future__ import annotations

import torch

from shiftbench.featurewise import env_features_and_scores
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.methods.mmd import gaussian_mmd
from shiftbench.registry import METHODS


def split_halves(features: list[torch.Tensor], cuts: list[int], n_inputs: int = 1) -> tuple[torch.Tensor, ...]:
    """(first, second): per environment its examples before and from its cut, pooled over environments.

    ``features[e]`` holds ``n_inputs`` blocks of the environment's examples, one per input key (a preference pair
    has two, as ``featurewise.env_features`` lays them out), so a cut at ``c`` sends both responses of the first
    ``c`` pairs to the first half and keeps every example's responses together.
    """
    first, second = [], []
    for f, c in zip(features, cuts):
        blocks = f.reshape(n_inputs, -1, f.shape[-1])
        first.append(blocks[:, :c].reshape(-1, f.shape[-1]))
        second.append(blocks[:, c:].reshape(-1, f.shape[-1]))
    return torch.cat(first), torch.cat(second)


@METHODS.register("causirl_mmd")
class CausIRLMMD(ERM):
    """CausIRL-MMD (Chevalley, Bunne, Krause & Bauer, "Invariant Causal Mechanisms through Distribution Matching",
    arXiv:2206.11646, 2022), as in DomainBed.

    Rather than matching every pair of domains (MMD, CORAL), CausIRL matches the feature distributions of two
    halves of the pooled batch whose domain mixtures differ: each environment's batch is cut at a point drawn
    uniformly from ``{0, ..., n − 1}``, its examples before the cut go to the first half and the rest to the
    second. Loss: mean environment risk + ``mmd_gamma`` · ``discrepancy(first, second)`` (0 when a half has
    fewer than two examples). The cuts come from torch's global generator, which the trainer checkpoints, so a
    resumed trial draws the same cuts. Defaults and ranges are DomainBed's.
    """

    HPARAMS = {"mmd_gamma": HParam(1.0, log_uniform(-1, 1))}

    @staticmethod
    def discrepancy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gaussian_mmd(x, y)

    def draw_cuts(self, minibatches) -> list[int]:
        sizes = [len(b[self.task.input_keys[0]]) for b in minibatches]
        return [int(torch.randint(0, n, ())) for n in sizes]

    def penalty(self, features: list[torch.Tensor], cuts: list[int]) -> torch.Tensor:
        first, second = split_halves(features, cuts, len(self.task.input_keys))
        if len(first) < 2 or len(second) < 2:
            return features[0].new_zeros(())
        # nan_to_num as DomainBed: a degenerate half (all features equal) must not end the trial
        return torch.nan_to_num(self.discrepancy(first, second))

    def update(self, minibatches, step):
        features, scores = env_features_and_scores(self.model, self.task, minibatches)
        nll = torch.stack([self.task.loss(s, b) for s, b in zip(scores, minibatches)]).mean()
        penalty = self.penalty(features, self.draw_cuts(minibatches))
        loss = nll + self.hparams["mmd_gamma"] * penalty
        self.step_on(loss)
        return {"loss": loss.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
