"""DomainBed's ColoredMNIST and RotatedMNIST protocols on scikit-learn's bundled 8x8 digits (no network).

Protocols (Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", 2021; ColoredMNIST from Arjovsky et
al., "Invariant Risk Minimization", 2019), as DomainBed applies them to MNIST:

* ColoredMNIST: binary label ``y = (digit < 5)``, flipped with probability 0.25; colour ``= y XOR Bernoulli(e)``
  with ``e = 0.1, 0.2, 0.9`` for the environments ``+90%``, ``+80%``, ``-90%``; the image has two channels and the
  digit sits in the channel given by the colour (the other channel is zero).
* RotatedMNIST: ten classes (the digit), one channel, environments rotated by 0, 15, ..., 75 degrees
  (counter-clockwise, as ``torchvision.transforms.functional.rotate``).

Sizes on the 1,797 bundled digits: the base digits are split disjointly between the environments (a seeded
permutation dealt round-robin, as DomainBed's ``images[i::n_envs]``), then each environment's base digits are split
disjointly into ``in`` and ``out`` (:func:`shiftbench.data.holdout_split`), and only then is each part enlarged to
``env_size`` examples per environment (split in the ``holdout_fraction`` proportion) by random affine copies of its
own base digits, after bilinear upsampling to ``resolution`` pixels, plus Gaussian pixel noise. No copy of an
``out`` digit can reach ``in``, and no digit appears in two environments. Label noise and colour are drawn afresh
per copy.

Every split carries ``x`` (float32, N x C x H x W, values in [0, 1]), ``y`` (int64), ``idx`` (int64, unique within
the environment: ``in`` first, then ``out``) and ``base`` (int64, the row of the source digit in the pooled source
data, for leakage checks). ColoredMNIST adds ``digit``, ``clean_label`` (the label before noise) and ``color``.

The protocol helpers here (:func:`split_environments`, :func:`rotate`, :func:`color_digits`, ...) are shared with
:mod:`shiftbench.datasets.mnist`; :class:`CachedShiftDataset` keeps built data in-process, since a sweep builds
the same dataset for many trials.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from shiftbench.data import HOLDOUT_FRACTION, SEED, Environment, ShiftDataset, TensorSplit, holdout_split, tensor_digest
from shiftbench.errors import UserError
from shiftbench.hparams import NON_NEGATIVE, POSITIVE, HParam, Rule, between, choice, log_uniform_int, seed_hash
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting

Tensors = dict[str, torch.Tensor]
EnvData = tuple[tuple[str, dict[str, Tensors]], ...]
"""Built environments: ``((name, {"in": tensors, "out": tensors}), ...)``."""

COLORED_ENVIRONMENTS: tuple[str, ...] = ("+90%", "+80%", "-90%")
COLOR_FLIP_PROBS: tuple[float, ...] = (0.1, 0.2, 0.9)
"""DomainBed's ColoredMNIST colour-flip probabilities ``e``: colour agrees with the label in 90%, 80%, 10%."""
LABEL_NOISE: float = 0.25
"""DomainBed's ColoredMNIST label-flip probability."""

ROTATED_ANGLES: tuple[int, ...] = (0, 15, 30, 45, 60, 75)
ROTATED_ENVIRONMENTS: tuple[str, ...] = tuple(f"{a}°" for a in ROTATED_ANGLES)

MLP_HPARAMS: dict[str, HParam] = {
    "mlp_width": HParam(256, log_uniform_int(6, 10, base=2)),
    "mlp_depth": HParam(2, choice([1, 2, 3])),
    "mlp_dropout": HParam(0.0, choice([0.0, 0.1, 0.5])),
}
"""Hyperparameters of the ``mlp`` model (``build_model`` maps ``mlp_width`` to ``MLP(width=...)``)."""


# --------------------------------------------------------------------------------------------- protocol helpers


def split_environments(n: int, n_envs: int, seed: int, limit: int = 0) -> list[np.ndarray]:
    """Deals ``n`` examples into ``n_envs`` disjoint environments: a seeded permutation taken round-robin
    (DomainBed's ``shuffled[i::n_envs]``).

    Args:
        n: number of pooled examples.
        n_envs: number of environments.
        seed: data seed.
        limit: deal only the first ``limit`` of the permutation (0: all).

    Returns:
        One array of pooled row indices per environment.
    """
    perm = np.random.RandomState(seed_hash(seed, "environments")).permutation(n)
    if limit:
        perm = perm[:limit]
    return [perm[i::n_envs] for i in range(n_envs)]


def bernoulli(p: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` seeded Bernoulli(p) draws as int64 zeros and ones."""
    return (torch.rand(n, generator=generator) < p).long()


def color_digits(
    images: torch.Tensor, digits: torch.Tensor, flip_prob: float, label_noise: float, generator: torch.Generator
) -> Tensors:
    """DomainBed's ``ColoredMNIST.color_dataset``.

    The binary label is ``digit < 5``, flipped with probability ``label_noise``; the colour is the label flipped
    with probability ``flip_prob``; the image gets two channels and the one not named by the colour is zeroed.

    Args:
        images: grey images in [0, 1], shape (N, H, W) or (N, 1, H, W).
        digits: the digit classes (N,).
        flip_prob: the environment's colour-flip probability ``e``.
        label_noise: the label-flip probability (0.25 in DomainBed).
        generator: seeded source of the label and colour draws.

    Returns:
        ``x`` (N, 2, H, W) float32, ``y``, ``clean_label`` and ``color`` (int64).
    """
    images = images.reshape(len(images), *images.shape[-2:]).float()
    clean = (digits < 5).long()
    y = clean ^ bernoulli(label_noise, len(clean), generator)
    color = y ^ bernoulli(flip_prob, len(y), generator)
    x = images[:, None].repeat(1, 2, 1, 1)
    x[torch.arange(len(x)), 1 - color] = 0.0
    return {"x": x, "y": y, "clean_label": clean, "color": color}


def colored_environment(label_noise: float) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Generator], Tensors]:
    """Colored MNIST's per-environment maker ``(i, images, digits, generator) -> tensors``: environment ``i``
    coloured with ``COLOR_FLIP_PROBS[i]`` (:func:`color_digits`), its digits kept as ``digit``."""

    def make(i: int, x: torch.Tensor, digits: torch.Tensor, g: torch.Generator) -> Tensors:
        return {**color_digits(x, digits, COLOR_FLIP_PROBS[i], float(label_noise), g), "digit": digits}

    return make


def warp(images: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Resamples images through per-image affine maps (bilinear, zero outside), vectorised.

    Args:
        images: (N, C, H, W).
        theta: (N, 2, 3) maps from output to input coordinates, normalised to [-1, 1] (``F.affine_grid``).
        size: output height and width (default: the input's).

    Returns:
        (N, C, size, size) float32.
    """
    n, c, h, w = images.shape
    out = (n, c, size or h, size or w)
    grid = F.affine_grid(theta.float(), list(out), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation_theta(angles_deg: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) ``affine_grid`` maps rotating images counter-clockwise by ``angles_deg`` about their centre,
    the direction of ``torchvision.transforms.functional.rotate`` that DomainBed's RotatedMNIST uses."""
    a = torch.deg2rad(angles_deg.double())
    c, s, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1)], 1).float()


def rotate(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotates every image (N, C, H, W) counter-clockwise by ``angle`` degrees, bilinear, zero fill."""
    if angle == 0:
        return images.float().clone()
    return warp(images, rotation_theta(torch.full((len(images),), float(angle))))


def random_affine_theta(
    n: int,
    generator: torch.Generator,
    max_rotation: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_shift: float = 0.25,
) -> torch.Tensor:
    """(n, 2, 3) random ``affine_grid`` maps: rotation U(-max_rotation, max_rotation) degrees, zoom U(scale) and
    shift U(-max_shift, max_shift) per axis in normalised units (0.25 is one pixel of an 8x8 image)."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * max_rotation)
    zoom = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    shift = (2 * u[:, 2:] - 1) * max_shift
    c, s = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    rows = [torch.stack([c, -s, shift[:, 0]], -1), torch.stack([s, c, shift[:, 1]], -1)]
    return torch.stack(rows, 1).float()


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The ``affine_grid`` map of applying transform ``inner`` to an image, then ``outer`` (both (N, 2, 3)).

    An ``affine_grid`` map sends output to input coordinates, so the composite samples at ``inner(outer(p))``.
    """
    bottom = torch.tensor([0.0, 0.0, 1.0]).expand(len(outer), 1, 3)
    return (torch.cat([inner, bottom], 1) @ torch.cat([outer, bottom], 1))[:, :2]


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images to ``resolution`` x ``resolution`` (antialiased when shrinking)."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images.float()
    shrink = resolution < images.shape[-1]
    return F.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                         antialias=shrink)  # fmt: skip


def enlarge(
    images: torch.Tensor,
    n: int,
    resolution: int,
    noise: float,
    generator: torch.Generator,
    then: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` augmented copies of a set of base images: upsample, random affine (then ``then``), Gaussian noise.

    Copies cycle through seeded permutations of the base images, so every base image is used
    ``floor(n / len(images))`` or one more times, and ``n < len(images)`` takes a random subset.

    Args:
        images: base images (B, C, h, w) in [0, 1].
        n: number of copies.
        resolution: output height and width; the base images are upsampled to it before the affine map.
        noise: standard deviation of the additive pixel noise (the result is clipped to [0, 1]).
        generator: seeded source of every draw.
        then: an optional (2, 3) ``affine_grid`` map applied after the random one (e.g. an environment's rotation),
            composed with it so the image is resampled once.

    Returns:
        The copies (n, C, resolution, resolution) float32 and the row of each copy's base image (n,) int64.
    """
    b = len(images)
    reps = -(-n // b)
    src = torch.cat([torch.randperm(b, generator=generator) for _ in range(reps)])[:n]
    # one base pixel is 2 / h normalised units: shift by up to one base pixel
    theta = random_affine_theta(n, generator, max_shift=2.0 / images.shape[-1])
    if then is not None:
        theta = compose(then.expand(n, 2, 3), theta)
    x = warp(resize(images, resolution)[src], theta)
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator)
    return x.clamp_(0.0, 1.0), src.long()


@functools.lru_cache(maxsize=1)
def load_base_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 0..16 grey levels), scaled to [0, 1].

    Reads scikit-learn's ``datasets/data/digits.csv.gz`` (one row per image: 64 pixel values, then the digit)
    without importing scikit-learn, which saves most of a second; falls back to ``load_digits()``.

    Returns:
        Images (1797, 1, 8, 8) float32 and digit labels (1797,) int64.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    table = np.loadtxt(path, delimiter=",", dtype=np.float32) if path is not None and path.is_file() else None
    if table is not None and table.shape == (1797, 65):
        pixels, target = table[:, :64], table[:, 64]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.data, d.target
    images = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).reshape(-1, 1, 8, 8) / 16.0
    return images, torch.as_tensor(np.asarray(target), dtype=torch.int64)


# --------------------------------------------------------------------------------------------- cached datasets


@functools.lru_cache(maxsize=4)
def _build_cached(builder: Callable[..., EnvData], key: tuple[tuple[str, Any], ...]) -> tuple[EnvData, str]:
    """Builds (once per process and key) and digests a dataset's environments."""
    envs = builder(**dict(key))
    h = hashlib.sha256()
    for name, parts in envs:
        for part in sorted(parts):
            h.update(f"{name}/{part}:{tensor_digest(parts[part])};".encode())
    return envs, h.hexdigest()


class CachedShiftDataset(ShiftDataset):
    """A dataset whose tensors come from a pure build function, cached in-process by its arguments.

    Subclasses implement the static :meth:`build` (keyword arguments: by default the resolved options) and, if it
    needs more than the options, :meth:`build_args`. Instances built with equal arguments share their tensors
    (treat them as read-only); each gets its own :class:`TensorSplit` objects.
    """

    CHANNELS: ClassVar[int | None] = None
    """Image datasets: the channel count; ``input_shape`` is then ``(CHANNELS, resolution, resolution)``."""

    def __init__(self, root: str | None = None, options: Mapping[str, Any] | None = None, download: bool = False):
        super().__init__(root, options, download)
        envs, self._version = _build_cached(type(self).build, self.build_args())
        self.environments = [Environment(name, {k: TensorSplit(t) for k, t in parts.items()}) for name, parts in envs]
        if self.CHANNELS is not None:
            r = int(self.options["resolution"])
            self.input_shape = (self.CHANNELS, r, r)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """``env_size`` must leave one ``in`` and one ``out`` example at its ``holdout_fraction``."""
        super().check_options(options)
        if "env_size" in options:
            size, frac = options["env_size"], options.get("holdout_fraction", 0.2)
            n_out = round(size * frac)
            if n_out < 1 or size - n_out < 1:
                raise UserError(f"dataset {getattr(cls, 'registry_name', cls.__name__)}: option env_size={size!r} "
                                f"must be large enough for one 'in' and one 'out' example (holdout_fraction {frac})")

    def build_args(self) -> tuple[tuple[str, Any], ...]:
        """The keyword arguments of :meth:`build` (everything its output depends on) as sorted, hashable pairs."""
        return tuple(sorted(self.options.items()))

    @staticmethod
    def build(**kwargs: Any) -> EnvData:
        raise NotImplementedError

    def version(self) -> str:
        """sha256 over the digests (:func:`shiftbench.data.tensor_digest`) of every environment's splits."""
        return self._version


def _enlarged_environments(
    names: Sequence[str],
    seed: int,
    env_size: int,
    holdout_fraction: float,
    resolution: int,
    noise: float,
    make: Callable[[int, torch.Tensor, torch.Tensor, torch.Generator], Tensors],
    then: Sequence[torch.Tensor | None] | None = None,
) -> EnvData:
    """The digits size protocol: split base digits between environments, then in/out, then enlarge each part.

    Args:
        names: environment names.
        seed: data seed.
        env_size: examples per environment after enlargement (``in`` + ``out``).
        holdout_fraction: the ``out`` share, of the base digits and of ``env_size``.
        resolution: image side after upsampling.
        noise: pixel noise standard deviation.
        make: ``make(env_index, images, digits, generator)`` -> the protocol's tensors (``x``, ``y``, metadata).
        then: per environment, an optional (2, 3) ``affine_grid`` map applied after the random copy's.

    Returns:
        The environments with ``in`` and ``out`` tensors, including ``idx`` and ``base``.
    """
    images, digits = load_base_digits()
    n_out_total = round(env_size * holdout_fraction)
    sizes = {"in": env_size - n_out_total, "out": n_out_total}
    envs = []
    for i, (name, ids) in enumerate(zip(names, split_environments(len(images), len(names), seed))):
        pos = dict(zip(("in", "out"), holdout_split(len(ids), holdout_fraction, seed_hash(seed, "holdout", i))))
        parts, offset = {}, 0
        for part in ("in", "out"):
            g = torch.Generator().manual_seed(seed_hash(seed, "copies", i, part))
            base_ids = torch.as_tensor(ids[pos[part]], dtype=torch.int64)
            x, src = enlarge(images[base_ids], sizes[part], resolution, noise, g, None if then is None else then[i])
            base = base_ids[src]
            t = make(i, x, digits[base], g)
            n = len(base)
            parts[part] = {**t, "idx": torch.arange(offset, offset + n, dtype=torch.int64), "base": base}
            offset += n
        envs.append((name, parts))
    return tuple(envs)


DIGITS_OPTIONS: dict[str, Setting] = {
    "seed": SEED,
    "holdout_fraction": HOLDOUT_FRACTION,
    "resolution": Setting(16, "image side; the 8x8 digits are upsampled to it",
                          Rule("an integer from 4 to 256", lambda v: 4 <= v <= 256)),
    "noise": Setting(0.05, "standard deviation of the Gaussian pixel noise added to every copy", NON_NEGATIVE),
}
"""Options of every dataset built from the bundled digits (each adds its ``env_size``)."""
ENV_SIZE = Setting(4000, "examples per environment, 'in' + 'out' (split in the holdout_fraction proportion)", POSITIVE)
LABEL_NOISE_OPTION = Setting(LABEL_NOISE, "label-flip probability (DomainBed: 0.25)", between(0, 1))


@DATASETS.register("colored_digits")
class ColoredDigits(CachedShiftDataset):
    """DomainBed's ColoredMNIST on scikit-learn's 8x8 digits, enlarged by random affine copies.

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    TASK = "classification"
    ENVIRONMENTS = COLORED_ENVIRONMENTS
    DEFAULT_TEST_ENVS = (2,)
    DEFAULT_MODEL = "mlp"
    N_STEPS = 2001
    EVAL_EVERY = 100
    OPTIONS: ClassVar[dict[str, Setting]] = {**DIGITS_OPTIONS, "env_size": ENV_SIZE, "label_noise": LABEL_NOISE_OPTION}
    HPARAMS: ClassVar[dict[str, HParam]] = MLP_HPARAMS
    num_classes = 2
    CHANNELS = 2

    @staticmethod
    def build(  # type: ignore[override]
        env_size: int, holdout_fraction: float, label_noise: float, noise: float, resolution: int, seed: int
    ) -> EnvData:
        return _enlarged_environments(
            COLORED_ENVIRONMENTS, int(seed), int(env_size), float(holdout_fraction), int(resolution), float(noise),
            colored_environment(label_noise),
        )  # fmt: skip


@DATASETS.register("rotated_digits")
class RotatedDigits(CachedShiftDataset):
    """DomainBed's RotatedMNIST on scikit-learn's 8x8 digits, enlarged by random affine copies.

    Each copy is upsampled, randomly jittered (small affine map) and rotated counter-clockwise by its
    environment's angle in one resampling, then noised. DomainBed names no default test environment for
    RotatedMNIST; the default here holds out ``0°`` (env 0), the extreme of the angle range whose training
    environments then lie all on one side of it.

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    TASK = "classification"
    ENVIRONMENTS = ROTATED_ENVIRONMENTS
    DEFAULT_TEST_ENVS = (0,)
    DEFAULT_MODEL = "mlp"
    N_STEPS = 2001
    EVAL_EVERY = 100
    OPTIONS: ClassVar[dict[str, Setting]] = {**DIGITS_OPTIONS, "env_size": ENV_SIZE.with_default(2000)}
    HPARAMS: ClassVar[dict[str, HParam]] = MLP_HPARAMS
    num_classes = 10
    CHANNELS = 1

    @staticmethod
    def build(  # type: ignore[override]
        env_size: int, holdout_fraction: float, noise: float, resolution: int, seed: int
    ) -> EnvData:
        def make(i: int, x: torch.Tensor, digits: torch.Tensor, g: torch.Generator) -> Tensors:
            return {"x": x, "y": digits.clone()}

        rotations = [rotation_theta(torch.tensor([float(a)]))[0] for a in ROTATED_ANGLES]
        return _enlarged_environments(
            ROTATED_ENVIRONMENTS, int(seed), int(env_size), float(holdout_fraction), int(resolution), float(noise),
            make, rotations,
        )  # fmt: skip
