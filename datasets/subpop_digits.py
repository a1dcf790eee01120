"""Digits with a spurious colour: a subpopulation-shift workload on scikit-learn's 8x8 digits (no network).

The shape of Waterbirds (Sagawa et al., ICLR 2020) and of SubpopBench's spurious-correlation datasets (Yang et al.,
"Change is Hard: A Closer Look at Subpopulation Shift", ICML 2023): a binary label ``y = (digit < 5)`` and a binary
attribute ``a`` (the colour: the channel the digit is drawn in, as in ColoredMNIST's two-channel images) make four
groups ``g = 2·y + a``. In training the colour agrees with the label in ``spurious_corr`` of each class's copies
(exactly ``round(p · n_y)`` of them), so the two minority groups (a ≠ y) hold ``1 − p`` of the data between them;
at test every class is split exactly in half between the colours, so the groups are balanced. A model that reads
the colour scores well on average and badly on the minority groups: worst-group accuracy is the headline.

Environments (base digits split disjointly between them, then between ``in`` and ``out``, before the affine copies
are made, as :mod:`shiftbench.datasets.digits` does, so no digit image reaches two splits):

* ``test`` (env 0, held out by default): ``in`` is the balanced test set, ``out`` a balanced validation set of
  the test distribution (what the test-domain oracle reads).
* ``train`` (env 1): ``in`` the imbalanced training set, ``out`` its validation set, drawn from the same
  imbalanced distribution (as CelebA's and CivilComments' validation sets are); worst-group validation reads its
  ``worst_group_acc``, DFR retrains its head on a group-balanced subsample of it.

Groups as a batch key, not as environments (default ``group_envs=false``): the harness draws one batch of equal size
from every training environment each step, so groups as environments would make every method, ERM included, sample
groups uniformly (SubpopBench's ReSample) and hide the imbalance the dataset exists to show. ``group_envs=true``
splits ``train`` into its four groups (the same examples) for environment-level methods such as GroupDRO, which is
then GroupDRO over group-balanced batches, the WILDS adapter's layout (:mod:`shiftbench.datasets.wilds_data`).

Every split carries ``x`` (N x 2 x H x W in [0, 1]), ``y``, ``idx``, ``base`` (the source digit's row),
``digit``, ``attribute`` (the colour) and ``group``. Evaluation adds per-group accuracies ``acc_y{y}_a{a}`` and
``worst_group_acc`` (their minimum) to ``acc`` and ``loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from shiftbench.data import Environment, TensorSplit
from shiftbench.datasets.digits import DIGITS_OPTIONS, ENV_SIZE, MLP_HPARAMS, CachedShiftDataset, EnvData, Tensors
from shiftbench.datasets.digits import _enlarged_environments
from shiftbench.hparams import HParam, between
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting

N_ATTRIBUTES = 2
N_GROUPS = 2 * N_ATTRIBUTES
GROUP_NAMES: tuple[str, ...] = tuple(f"y{g // N_ATTRIBUTES}_a{g % N_ATTRIBUTES}" for g in range(N_GROUPS))


def assign_colours(y: torch.Tensor, agree: float, generator: torch.Generator) -> torch.Tensor:
    """The colour of every copy: in each class, exactly ``round(agree · n_y)`` copies (a seeded choice) get the
    colour equal to the label, the rest the other one."""
    a = 1 - y.clone()
    for c in range(2):
        rows = torch.nonzero(y == c)[:, 0]
        keep = rows[torch.randperm(len(rows), generator=generator)[: round(agree * len(rows))]]
        a[keep] = c
    return a


def paint(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Grey (N, 1, H, W) images to two channels with the digit in channel ``a`` (ColoredMNIST's colouring)."""
    out = x.repeat(1, 2, 1, 1)
    out[torch.arange(len(x)), 1 - a] = 0.0
    return out


@DATASETS.register("subpop_digits")
class SubpopDigits(CachedShiftDataset):
    """Binary digits (``digit < 5``) with a colour that is spurious in training and balanced at test.

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    TASK = "classification"
    ENVIRONMENTS = ("test", "train")
    DEFAULT_TEST_ENVS = (0,)
    DEFAULT_MODEL = "mlp"
    N_STEPS = 2001
    EVAL_EVERY = 100
    OPTIONS: ClassVar[dict[str, Setting]] = {
        **DIGITS_OPTIONS,
        "env_size": ENV_SIZE.with_default(5000),
        "spurious_corr": Setting(0.95, "share of each class's training copies whose colour equals the label "
                                 "(Waterbirds: 0.95)", between(0.5, 1)),
        "group_envs": Setting(False, "the four training groups as environments (1..4) instead of one 'train' one"),
    }  # fmt: skip
    HPARAMS: ClassVar[dict[str, HParam]] = MLP_HPARAMS
    METADATA_KEYS: ClassVar[tuple[str, ...]] = ("group", "attribute")
    """Per-example metadata every split carries (methods that need groups check for ``group``)."""
    num_classes = 2

    @classmethod
    def environment_names(cls, options: Mapping[str, Any]) -> list[str]:
        if cls.resolve_options(options)["group_envs"]:
            return ["test", *(f"train:{g}" for g in GROUP_NAMES)]
        return list(cls.ENVIRONMENTS)

    CHANNELS = 2

    def __init__(self, root: str | None = None, options: Mapping[str, Any] | None = None, download: bool = False):
        super().__init__(root, options, download)
        if self.options["group_envs"]:
            test, train = self.environments
            self.environments = [test] + [Environment(f"train:{name}", {
                part: TensorSplit({k: v[split.tensors["group"] == g] for k, v in split.tensors.items()})
                for part, split in train.splits.items()}) for g, name in enumerate(GROUP_NAMES)]  # fmt: skip
        # idx -> group per split, for evaluate (outputs carry idx, not metadata)
        self.groups = {f"env{i}_{part}": (s.tensors["idx"].numpy(), s.tensors["group"].numpy())
                       for i, e in enumerate(self.environments) for part, s in e.splits.items()}  # fmt: skip

    def build_args(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted((k, v) for k, v in self.options.items() if k != "group_envs"))

    @staticmethod
    def build(  # type: ignore[override]
        env_size: int, holdout_fraction: float, noise: float, resolution: int, seed: int, spurious_corr: float
    ) -> EnvData:
        def make(i: int, x: torch.Tensor, digits: torch.Tensor, g: torch.Generator) -> Tensors:
            y = (digits < 5).long()
            a = assign_colours(y, 0.5 if i == 0 else float(spurious_corr), g)
            return {"x": paint(x, a), "y": y, "digit": digits, "attribute": a, "group": N_ATTRIBUTES * y + a}

        return _enlarged_environments(SubpopDigits.ENVIRONMENTS, int(seed), int(env_size), float(holdout_fraction),
                                      int(resolution), float(noise), make)  # fmt: skip

    def evaluate(self, split_name: str, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        metrics = super().evaluate(split_name, outputs)
        if split_name not in self.groups:
            return metrics
        idx, group = self.groups[split_name]
        of = dict(zip(idx.tolist(), group.tolist()))
        g = np.array([of[int(i)] for i in outputs["idx"]])
        correct = np.asarray(outputs["correct"], dtype=np.float64)
        accs = {name: float(correct[g == k].mean()) for k, name in enumerate(GROUP_NAMES) if (g == k).any()}
        metrics.update({f"acc_{name}": v for name, v in accs.items()})
        metrics["worst_group_acc"] = min(accs.values())
        return metrics
