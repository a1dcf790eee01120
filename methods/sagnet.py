"""Style-agnostic networks (SagNet): a content head trained on style-randomised features, against a style head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shiftbench.algorithm import concat_batches
from shiftbench.hparams import HParam, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.models import feature_width, output_width
from shiftbench.registry import METHODS


def randomize(z: torch.Tensor, what: str, alpha: torch.Tensor, perm: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Swaps style or content between examples. An example's style is the mean and (unbiased) variance of its
    features (over the spatial positions of each channel for 4-D maps, over the feature vector otherwise), its
    content the features normalised by them.

    ``what == "style"``: each example keeps its content under the style ``α·own + (1 − α)·style of perm[i]``;
    ``"content"``: each example takes the (detached) content of ``perm[i]`` under its own style.
    """
    shape = z.shape
    if z.dim() == 4:
        z, alpha = z.reshape(shape[0], shape[1], -1), alpha[:, None]
    mean, var = z.mean(-1, keepdim=True), z.var(-1, keepdim=True)
    content = (z - mean) / (var + eps).sqrt()
    if what == "style":
        mean, var = alpha * mean + (1 - alpha) * mean[perm], alpha * var + (1 - alpha) * var[perm]
    else:
        content = content[perm].detach()
    return (content * (var + eps).sqrt() + mean).reshape(shape)


@METHODS.register("sagnet")
class SagNet(ERM):
    """SagNet (Nam, Lee, Park, Yoon & Yoo, "Reducing Domain Gap by Reducing Style Bias", CVPR 2021, Algorithm 1),
    DomainBed's version on the featurizer's output (its per-example feature statistics are the style).

    Three updates per step, each with its own Adam: (1) featurizer and content head (the model's head) on the
    cross-entropy of style-randomised features; (2) the style head (its own, sized by the model's ``n_features``)
    on content-randomised features; (3) the featurizer alone on ``sag_w_adv`` × the style head's cross-entropy
    against the uniform label, so features stop carrying what the style head could use. α ~ U(0, 1) per example
    and the partner permutation come from torch's generator. Prediction is the plain model, content head on
    features. Needs class logits (the adversary's uniform target), hence classification only. Defaults and ranges
    are DomainBed's.
    """

    TASKS = ("classification",)
    HPARAMS = {"sag_w_adv": HParam(0.1, log_uniform(-2, 1))}

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.style_head = nn.Linear(feature_width(model), output_width(model))
        self.optimizer = self.make_optimizer(model.featurizer.parameters())  # the featurizer's (steps 1 and 3)
        self.content_optimizer = self.make_optimizer(model.head.parameters())
        self.style_optimizer = self.make_optimizer(self.style_head.parameters())

    def optimizers(self):
        return {"optimizer": self.optimizer, "content_optimizer": self.content_optimizer,
                "style_optimizer": self.style_optimizer}  # fmt: skip

    def randomized(self, x: torch.Tensor, what: str) -> torch.Tensor:
        z = self.model.featurizer(x)
        return randomize(z, what, torch.rand(len(z), 1, device=z.device), torch.randperm(len(z), device=z.device))

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        x, y = batch["x"], batch["y"]
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        loss_c = F.cross_entropy(self.model.head(self.randomized(x, "style")), y)
        loss_c.backward()
        self.optimizer.step()
        self.content_optimizer.step()
        self.style_optimizer.zero_grad(set_to_none=True)
        loss_s = F.cross_entropy(self.style_head(self.randomized(x, "content")), y)
        loss_s.backward()
        self.style_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_adv = -self.hparams["sag_w_adv"] * F.log_softmax(self.style_head(self.randomized(x, "content")), 1).mean()
        loss_adv.backward()
        self.optimizer.step()
        return {"loss": loss_c.detach(), "loss_style": loss_s.detach(), "loss_adv": loss_adv.detach()}
