"""Models are a featurizer plus a head; datasets pick a default, users may override it by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import MODELS


class Model(nn.Module):
    """featurizer -> head. ``featurizer.n_outputs`` is the feature width."""

    def __init__(self, featurizer: nn.Module, n_outputs: int):
        super().__init__()
        self.featurizer = featurizer
        self.head = nn.Linear(featurizer.n_outputs, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.featurizer(x))


@MODELS.register("mlp")
class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU -> Dropout] x depth (the ColoredMNIST MLP of IRM's and DomainBed's code)."""

    def __init__(self, input_shape, width: int = 256, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = width
        self.net = nn.Sequential(*layers)
        self.n_outputs = d

    def forward(self, x):
        return self.net(x)


@MODELS.register("mnist_cnn")
class MNISTCNN(nn.Module):
    """DomainBed's small MNIST CNN: four 3x3 convolutions (64, 128, 128, 128; the second with stride 2), each
    followed by ReLU and GroupNorm(8), then global average pooling to 128 features."""

    n_outputs = 128

    def __init__(self, input_shape, **_):
        super().__init__()
        c = input_shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(c, 64, 3, 1, padding=1), nn.ReLU(), nn.GroupNorm(8, 64),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(), nn.GroupNorm(8, 128),
            nn.Conv2d(128, 128, 3, 1, padding=1), nn.ReLU(), nn.GroupNorm(8, 128),
            nn.Conv2d(128, 128, 3, 1, padding=1), nn.ReLU(), nn.GroupNorm(8, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def build_model(name: str, input_shape, n_outputs: int, hparams: dict) -> Model:
    """Builds ``MODELS[name]`` with the hyperparameters it accepts (``mlp_width`` -> ``width``, ...)."""
    import inspect

    cls = MODELS.get(name)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k[len(name) + 1 :]: v for k, v in hparams.items() if k.startswith(name + "_") and k[len(name) + 1 :] in params}
    return Model(cls(tuple(input_shape), **kwargs), n_outputs)
