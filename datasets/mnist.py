"""DomainBed's ColoredMNIST and RotatedMNIST on real MNIST, read from IDX files under ``--data-root``.

DomainBed's protocol (``domainbed/datasets.py``, ``MultipleEnvironmentMNIST``): the 60,000 training and 10,000
test images are pooled, shuffled and dealt round-robin into the environments; each environment is then split into
``in`` and ``out`` (``holdout_fraction`` 0.2) by a seeded permutation. ColoredMNIST inputs are (2, 28, 28),
RotatedMNIST inputs (1, 28, 28); pixels are scaled to [0, 1]. The colouring and rotation are the shared helpers of
:mod:`shiftbench.datasets.digits`; no enlargement is needed.

Files (the layout torchvision's ``MNIST`` writes, or the four files directly in the root):
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
each optionally gzipped (``.gz``), in ``<root>/MNIST/raw/`` or ``<root>/``.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a big-endian 32-bit magic ``0x00000800 | ndim``
whose third byte is the element type (0x08: unsigned byte), then ``ndim`` big-endian 32-bit sizes, then the data
in row-major order. Images are ``0x00000803`` (count, rows, columns), labels ``0x00000801`` (count).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from shiftbench.data import HOLDOUT_FRACTION, SEED, holdout_split
from shiftbench.datasets.digits import (
    COLORED_ENVIRONMENTS,
    DIGITS_OPTIONS,
    LABEL_NOISE_OPTION,
    ROTATED_ANGLES,
    ROTATED_ENVIRONMENTS,
    CachedShiftDataset,
    EnvData,
    Tensors,
    colored_environment,
    resize,
    rotate,
    split_environments,
)
from shiftbench.errors import UserError
from shiftbench.hparams import HParam, Rule, seed_hash
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting

MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file (optionally gzipped when its name ends in ``.gz``).

    Args:
        path: the file.
        magic: the expected magic number (``0x00000803`` for images, ``0x00000801`` for labels).

    Returns:
        A uint8 array of the file's dimensions.

    Raises:
        UserError: the file is not an IDX file of that kind, or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read MNIST file {path}: {e}") from None
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = data[:4].hex() if len(data) >= 4 else "a truncated header"
        raise UserError(f"{path} is not an IDX file of the expected kind: magic 0x{magic:08x} expected, found {found}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(dims))
    if len(data) - header != n:
        raise UserError(f"{path}: IDX dimensions {dims} need {n} bytes of data, the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_mnist_files(root: str | os.PathLike) -> dict[str, Path] | None:
    """The four MNIST files (plain or ``.gz``) in the first of ``root/MNIST/raw`` and ``root`` that has them all."""
    for folder in search_folders(root):
        found = {}
        for key, name in MNIST_FILES.items():
            for candidate in (folder / name, folder / (name + ".gz")):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(MNIST_FILES):
            return found
    return None


def search_folders(root: str | os.PathLike) -> list[Path]:
    """Where the MNIST files are looked for: torchvision's layout first, then the root itself."""
    root = Path(root).expanduser()
    return [root / "MNIST" / "raw", root]


def default_root() -> Path:
    """Where ``--download`` puts MNIST when no ``--data-root`` is given."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shiftbench" / "data"


def locate_mnist(root: str | None, download: bool) -> dict[str, Path]:
    """The MNIST files under ``root``, downloaded there with torchvision first if allowed and missing.

    Raises:
        UserError: the files are not there and downloading is off (or fails); the message names the files and
            the folders searched.
    """
    if root is None and download:
        root = str(default_root())
    if root is not None:
        found = find_mnist_files(root)
        if found is not None:
            return found
    expected = ", ".join(MNIST_FILES.values())
    if root is None:
        where = "no --data-root was given"
    else:
        where = "searched " + " and ".join(str(p) for p in search_folders(root))
    if download:
        try:
            from torchvision.datasets import MNIST

            for train in (True, False):
                MNIST(str(root), train=train, download=True)
        except Exception as e:  # noqa: BLE001 -- network errors come in many types; the message names it
            raise UserError(f"MNIST download to {root} failed ({type(e).__name__}: {e}); {where}") from None
        found = find_mnist_files(root)
        if found is not None:
            return found
    raise UserError(
        f"MNIST files not found: expected {expected} (each optionally .gz) in <root>/MNIST/raw or <root>; {where}; "
        "pass --data-root with the folder that holds them, or --download to fetch them"
    )


def load_mnist_pool(files: Mapping[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training then test images, pooled as DomainBed does.

    Returns:
        Images (N, 1, rows, cols) uint8 and labels (N,) int64.
    """
    parts = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], IDX_IMAGES_MAGIC)
        labels = read_idx(files[f"{split}_labels"], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(
                f"{files[f'{split}_images']} holds {len(images)} images but {files[f'{split}_labels']} "
                f"{len(labels)} labels"
            )
        parts.append((images, labels))
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))[:, None]
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    return images, labels


def _mnist_environments(
    files: tuple[tuple[str, str, int, int], ...],
    n_envs: int,
    seed: int,
    holdout_fraction: float,
    resolution: int,
    n_examples: int,
    make: Callable[[int, torch.Tensor, torch.Tensor, torch.Generator], Tensors],
) -> list[dict[str, Tensors]]:
    """DomainBed's environments: pool, shuffle, deal round-robin, split in/out, apply the protocol.

    Args:
        files: ``(key, path, size, mtime)`` of the four MNIST files.
        n_envs: number of environments.
        seed: data seed (shuffle, in/out splits, the protocol's draws).
        holdout_fraction: the ``out`` share of each environment.
        resolution: image side (MNIST's 28 keeps the originals; others resize bilinearly, antialiased).
        n_examples: use only this many pooled examples (the first of the shuffle); 0 means all.
        make: ``make(env_index, images in [0, 1] (N, 1, r, r), digits, generator)`` -> ``x``, ``y``, metadata.

    Returns:
        Per environment, the ``in`` and ``out`` tensors, with ``idx`` (position within the environment) and
        ``base`` (row in the pool: training images first, then test images).
    """
    images, labels = load_mnist_pool({k: Path(p) for k, p, *_ in files})
    envs = []
    for i, rows in enumerate(split_environments(len(images), n_envs, seed, n_examples)):
        parts = {}
        for part, pos in zip(("in", "out"), holdout_split(len(rows), holdout_fraction, seed_hash(seed, "holdout", i))):
            if len(pos) == 0:
                raise UserError(
                    f"MNIST environment {i} has no '{part}' examples: {len(rows)} examples with holdout_fraction "
                    f"{holdout_fraction}; raise n_examples (0 means all) or change holdout_fraction"
                )
            base = torch.as_tensor(rows[pos], dtype=torch.int64)
            x = resize(images[base].float().div_(255.0), resolution)
            g = torch.Generator().manual_seed(seed_hash(seed, "protocol", i, part))
            idx = torch.as_tensor(pos, dtype=torch.int64)
            parts[part] = {**make(i, x, labels[base], g), "idx": idx, "base": base}
        envs.append(parts)
    return envs


MNIST_OPTIONS: dict[str, Setting] = {
    "seed": SEED,
    "holdout_fraction": HOLDOUT_FRACTION,
    "resolution": DIGITS_OPTIONS["resolution"].with_default(28).with_help("image side (28 = MNIST's; IRM's code: 14)"),
    "n_examples": Setting(0, "use only this many of the 70,000 pooled images (0: all)",
                          Rule(">= 0 (0 means all)", lambda v: v >= 0)),
}  # fmt: skip


class _MNISTDataset(CachedShiftDataset):
    """Shared loading: the build arguments add the resolved file paths with their sizes and modification times, so
    the in-process cache tells different roots (and rewritten files) apart."""

    TASK = "classification"
    DEFAULT_MODEL = "mnist_cnn"
    N_STEPS = 5001  # DomainBed's default
    EVAL_EVERY = 100  # DomainBed's CHECKPOINT_FREQ for the MNIST datasets
    HPARAMS: ClassVar[dict[str, HParam]] = {}

    @classmethod
    def check(cls, root: str | None, options: Mapping[str, Any], download: bool) -> None:
        if not download:
            locate_mnist(root, False)

    @classmethod
    def data_files(cls, root: str | None, options: Mapping[str, Any]) -> list[Path]:
        """The files this dataset reads under ``root`` (what ``shiftbench prepare`` copies)."""
        return [p for _, p in sorted(locate_mnist(root, False).items())]

    def build_args(self) -> tuple[tuple[str, Any], ...]:
        files = locate_mnist(self.root, self.download)
        stamp = tuple((k, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for k, p in sorted(files.items()))
        return tuple(sorted((*super().build_args(), ("files", stamp))))


@DATASETS.register("colored_mnist")
class ColoredMNIST(_MNISTDataset):
    """DomainBed's ColoredMNIST: binary label ``digit < 5`` with 25% label noise, colour agreeing with the label in
    90%, 80% and 10% of the environments' examples; inputs (2, 28, 28).

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    ENVIRONMENTS = COLORED_ENVIRONMENTS
    DEFAULT_TEST_ENVS = (2,)
    OPTIONS: ClassVar[dict[str, Setting]] = {**MNIST_OPTIONS, "label_noise": LABEL_NOISE_OPTION}
    num_classes = 2
    CHANNELS = 2

    @staticmethod
    def build(  # type: ignore[override]
        files: tuple, holdout_fraction: float, label_noise: float, n_examples: int, resolution: int, seed: int
    ) -> EnvData:
        n_envs = len(COLORED_ENVIRONMENTS)
        args = (int(seed), float(holdout_fraction), int(resolution), int(n_examples), colored_environment(label_noise))
        return tuple(zip(COLORED_ENVIRONMENTS, _mnist_environments(files, n_envs, *args)))


@DATASETS.register("rotated_mnist")
class RotatedMNIST(_MNISTDataset):
    """DomainBed's RotatedMNIST: ten classes, environments rotated counter-clockwise by 0, 15, ..., 75 degrees;
    inputs (1, 28, 28). DomainBed names no default test environment; as for ``rotated_digits`` it is ``0°``.

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    ENVIRONMENTS = ROTATED_ENVIRONMENTS
    DEFAULT_TEST_ENVS = (0,)
    OPTIONS: ClassVar[dict[str, Setting]] = dict(MNIST_OPTIONS)
    num_classes = 10
    CHANNELS = 1

    @staticmethod
    def build(  # type: ignore[override]
        files: tuple, holdout_fraction: float, n_examples: int, resolution: int, seed: int
    ) -> EnvData:
        def make(i: int, x: torch.Tensor, digits: torch.Tensor, g: torch.Generator) -> Tensors:
            return {"x": rotate(x, ROTATED_ANGLES[i]), "y": digits.clone()}

        n_envs = len(ROTATED_ENVIRONMENTS)
        args = (int(seed), float(holdout_fraction), int(resolution), int(n_examples), make)
        return tuple(zip(ROTATED_ENVIRONMENTS, _mnist_environments(files, n_envs, *args)))
