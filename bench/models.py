"""Models are a featurizer plus a head; datasets pick a default, users may override it by name."""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from .errors import UserError
from .hparams import HParam, choice, fixed
from .registry import MODELS


class Model(nn.Module):
    """featurizer -> head. ``featurizer.n_outputs`` is the feature width (also ``n_features``); ``build_model``
    also records the per-example ``input_shape``."""

    input_shape: tuple[int, ...] | None = None

    def __init__(self, featurizer: nn.Module, n_outputs: int):
        super().__init__()
        self.featurizer = featurizer
        self.head = nn.Linear(featurizer.n_outputs, n_outputs)

    @property
    def n_features(self) -> int:
        """Width of the featurizer's output, the head's input: what a method sizes its own extra networks by
        (a domain discriminator, a style head, a projection)."""
        return int(self.featurizer.n_outputs)

    @property
    def n_outputs(self) -> int:
        """Width of the head's output (classes, or 1 for a reward model)."""
        return int(self.head.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.featurizer(x))


def feature_width(model: nn.Module) -> int:
    """The feature width of any featurizer + head model: ``n_features`` where it declares one, else the
    featurizer's ``n_outputs``, else the (linear) head's ``in_features``."""
    for get in (lambda: model.n_features, lambda: model.featurizer.n_outputs, lambda: model.head.in_features):
        try:
            return int(get())
        except AttributeError:
            continue
    raise TypeError(f"{type(model).__name__} has no featurizer width (n_features, featurizer.n_outputs or "
                    "head.in_features)")


def output_width(model: nn.Module) -> int:
    """The head's output width of any featurizer + head model (``n_outputs``, else a linear head's
    ``out_features``)."""
    width = getattr(model, "n_outputs", None)
    return int(width if width is not None else model.head.out_features)


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


EVAL_MEMORY = {"cpu": 40 << 20, "cuda": 1 << 30}
"""Bytes of live activations an evaluation batch may take (``eval_batch_for``): on a CPU little enough to stay in
the allocator's reuse and near the caches (batches of 2,048 MNIST-CNN images, about 400 MB per activation,
page-faulted their buffers in each pass; on this project's 2-core machine the MNIST CNN evaluated 609 images/s at
batch 64 and 440-458 at 160, 2026-12-03, before ``eval_layout``; docs/packing.md has later figures), on a GPU
enough rows to keep it busy."""
EVAL_BATCH_RANGE = {"cpu": (32, 2048), "cuda": (256, 8192)}
"""The smallest and largest evaluation batch ``eval_batch_for`` picks, per device type."""


def eval_batch_for(model: nn.Module, example: torch.Tensor | None, device: torch.device | str = "cpu") -> int:
    """An evaluation batch size for ``model`` on ``device``, from its activations rather than one constant.

    One forward pass on ``example`` (one input row, any batch of it: its first dimension is the batch) measures the
    largest activation any module outputs, per example; a batch is the number of rows whose three largest-sized
    buffers (an input, an output and a workspace) fit in ``EVAL_MEMORY``, clamped to ``EVAL_BATCH_RANGE`` and
    rounded down to a multiple of 32. A model the probe cannot run, or no ``example``, gets the range's largest.
    """
    kind = torch.device(device).type
    kind = kind if kind in EVAL_MEMORY else "cuda"
    lo, hi = EVAL_BATCH_RANGE[kind]
    if example is None:
        return hi
    rows = len(example)
    largest = [example[0].numel() * example.element_size()]

    def hook(_module, _inputs, output):
        if torch.is_tensor(output) and output.dim() > 0 and len(output) == rows:
            largest.append(output[0].numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example)
    except Exception:  # noqa: BLE001 -- a model that needs more than one tensor: fall back to the range's top
        return hi
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_example = 3 * max(largest)
    return max(lo, min(hi, EVAL_MEMORY[kind] // max(per_example, 1) // 32 * 32))


def eval_layout(model: nn.Module, device: torch.device | str, keys: tuple[str, ...]):
    """What evaluation does to each batch before the model sees it: on a CPU, a model with 2-D convolutions gets its
    4-D image inputs (``keys``) in channels-last memory order, the layout oneDNN's convolutions run fastest on
    (the values and their logical NCHW shape are unchanged; outputs differ from an NCHW pass by float rounding, about
    4e-7 for the MNIST CNN). Measured on this project's 2-core CPU, MNIST CNN at batch 64, alternated rounds: 1.09-1.18x
    the images/s of NCHW inputs, whose first convolution (2 -> 64 channels) ran erratically at 3-6x the time of its
    channels-last form. Training batches keep their layout, so training is unchanged. Elsewhere batches pass as they
    are."""
    if torch.device(device).type != "cpu" or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return lambda batch: batch

    def channels_last(batch):
        return {k: v.contiguous(memory_format=torch.channels_last) if k in keys and v.dim() == 4 else v
                for k, v in batch.items()}  # fmt: skip

    return channels_last


def build_model(name: str, input_shape, n_outputs: int, hparams: dict) -> Model:
    """Builds ``MODELS[name]`` with the hyperparameters it accepts (``mlp_width`` -> ``width``, ...)."""
    import inspect

    cls = MODELS.get(name)
    params = inspect.signature(cls.__init__).parameters
    prefix = name + "_"
    kwargs = {k[len(prefix):]: v for k, v in hparams.items() if k.startswith(prefix) and k[len(prefix):] in params}
    model = Model(cls(tuple(input_shape), **kwargs), n_outputs)
    model.input_shape = tuple(int(d) for d in input_shape)  # for methods that build input-space networks (ARM)
    return model


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its classifier; the harness adds the head (DomainBed's ``networks.ResNet``).

    Weights never come from the network: ``weights="imagenet"`` loads torchvision's ImageNet checkpoint
    (IMAGENET1K_V1, what DomainBed and WILDS start from) only if it is already in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``), otherwise the network starts from random initialisation with a warning;
    a file path loads that state_dict; ``"none"`` is random initialisation without a warning. With loaded weights
    BatchNorm statistics stay frozen (``freeze_bn``), as in DomainBed; a randomly initialised network trains them.

    Args:
        input_shape: (channels, height, width); other than 3 channels, the first convolution is rebuilt (with
            loaded weights, its filters cycle over the RGB ones, as DomainBed does).
        weights: ``"imagenet"``, ``"none"`` or a path to a state_dict file.
        dropout: dropout on the pooled features.
        freeze_bn: keep BatchNorm layers in eval mode during training when weights were loaded.
    """

    ARCH = "resnet50"

    def __init__(self, input_shape, weights: str = "imagenet", dropout: float = 0.0, freeze_bn: bool = True):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, self.ARCH)(weights=None)
        self.loaded_from = _load_resnet_weights(net, self.ARCH, str(weights))
        channels = int(input_shape[0])
        if channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            if self.loaded_from:
                with torch.no_grad():
                    for i in range(channels):
                        net.conv1.weight[:, i] = old.weight[:, i % 3]
        self.n_outputs = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.dropout = nn.Dropout(float(dropout))
        self.freeze_bn = bool(freeze_bn) and self.loaded_from is not None

    def forward(self, x):
        return self.dropout(self.net(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def _load_resnet_weights(net: nn.Module, arch: str, weights: str) -> str | None:
    """Loads ``weights`` into ``net``; returns where they came from (None: random initialisation)."""
    import torchvision

    if weights in ("none", ""):
        return None
    if weights == "imagenet":
        enum = getattr(torchvision.models, {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}[arch])
        url = enum.IMAGENET1K_V1.url
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.isfile(path):
            warnings.warn(
                f"{arch}: ImageNet weights not found at {path} (nothing is downloaded); starting from random "
                f"initialisation. Put {os.path.basename(url)} there or pass --hparams {arch}_weights=FILE",
                stacklevel=3,
            )
            return None
    else:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise UserError(f"{arch}_weights={weights!r}: no such file; give a state_dict file, 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file: say which
        raise UserError(f"cannot load {arch} weights from {path}: {type(e).__name__}: {e}") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise UserError(f"{path} is not a {arch} state_dict ({len(missing)} missing, {len(unexpected)} unexpected "
                        "keys)")
    return path


@MODELS.register("resnet18")
class ResNet18(TorchvisionResNet):
    """torchvision ResNet-18 (512 features); ImageNet weights only from a local file or the hub cache."""

    ARCH = "resnet18"


@MODELS.register("resnet50")
class ResNet50(TorchvisionResNet):
    """torchvision ResNet-50 (2048 features), DomainBed's default; ImageNet weights only from a local file or cache."""

    ARCH = "resnet50"


def resnet_hparams() -> dict:
    """The ResNet models' hyperparameters (DomainBed's: dropout 0 or U{0, 0.1, 0.5}), for datasets to declare."""
    out = {}
    for arch in ("resnet18", "resnet50"):
        out[f"{arch}_weights"] = HParam("imagenet", fixed("imagenet"))
        out[f"{arch}_dropout"] = HParam(0.0, choice([0.0, 0.1, 0.5]))
        out[f"{arch}_freeze_bn"] = HParam(True, fixed(True))
    return out
