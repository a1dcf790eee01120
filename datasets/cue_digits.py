"""Digits with a box cue: the synthetic-cue protocol of Lubana et al., "Mechanistic Mode Connectivity" (ICML 2023),
on scikit-learn's 8x8 digits (no network).

A small white box at a label-dependent position is pasted into ``cue_fraction`` of the training images (exactly
``round(p · n_c)`` of the n_c copies of each class c, as the paper fixes the cued subset per class). The box is
3/32 of the side (3 pixels of CIFAR's 32, as in the paper; 2 of 16 by default) and its ten positions run along the
border, away from the digit's centre: four along the top, four along the bottom, one at each side's middle.

Environments:

* ``cue`` (env 0, trained on): ``in`` with the cue in ``cue_fraction`` of the images; ``nc``: D_NC, ``nc_size``
  cue-free copies of the ``in`` digits, the small clean set that CBFT and naive fine-tuning train on
  (``shiftbench.methods.finetune`` finds splits named ``env{i}_nc`` of training environments); and ``out``, the
  validation split that training-domain validation scores. By default (``validation=nc``) ``out`` is cue-free: the
  held-out part of the cue-free data, copies of the ``out`` digits, which no method trains on. A cued ``out``
  (``validation=cued``, the cue in ``cue_fraction`` of it, as in ``in``) rewards the checkpoints that lean on the cue
  most (ERM's cued ``out`` accuracy rises as its randomised-cue accuracy falls), so it would pick against what the
  benchmark measures; the paper sidesteps selection by reporting the last step, which the oracle rule's last
  checkpoint matches.
* ``counterfactual`` (env 1, held out): held-out digits rendered four ways, the paper's counterfactual test sets,
  each example tagged with its ``variant``: **NC** no cue; **C** the label's cue; **RC** a randomised cue (the
  position of a uniformly drawn class); **RI** a randomised image (a uniformly drawn copy of the same part) with
  the label's cue, labelled by the cue. Every test image carries its cue (the paper's cued test sets use the
  training proportion), so each counterfactual is clean. Chance is 10% in every variant; a model that reads only
  the digit scores about its NC accuracy on C and RC and 10% on RI, one that reads only the cue 100% on C and RI
  and 10% on RC.

The four variants are groups of one environment, not four environments: as separate environments they would either
be trained on and count as training-domain validation, or be held out together, which leaves DomainBed's rules
(one held-out environment per run) nothing to select. The dataset owns their evaluation, as WILDS datasets own
theirs: every split of ``counterfactual`` reports ``nc_acc``, ``c_acc``, ``rc_acc`` and ``ri_acc`` next to ``acc``
(all four pooled), and the report shows each at the checkpoint a rule selects by accuracy.

Sizes and the no-leakage rule are the digits protocol's (:mod:`shiftbench.datasets.digits`): base digits are split
disjointly between the two environments and then between ``in`` and ``out``, and only then enlarged by random affine
copies; D_NC copies only ``in`` digits of ``cue``. Every split carries ``x`` (N x 1 x H x W in [0, 1]), ``y``,
``idx``, ``base`` and ``cue`` (the class whose box is drawn, -1 for none); ``counterfactual`` adds ``variant``
(0..3 = NC, C, RC, RI).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from shiftbench.data import SEED, holdout_split
from shiftbench.datasets.digits import (DIGITS_OPTIONS, ENV_SIZE, MLP_HPARAMS, CachedShiftDataset, EnvData, Tensors,
                                        enlarge, load_base_digits, split_environments)
from shiftbench.errors import UserError
from shiftbench.hparams import POSITIVE, HParam, Rule, between, seed_hash
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting

ENVIRONMENTS: tuple[str, ...] = ("cue", "counterfactual")
VARIANTS: tuple[str, ...] = ("NC", "C", "RC", "RI")
NUM_CLASSES = 10
VALIDATION: tuple[str, ...] = ("nc", "cued")
"""Values of the ``validation`` option: what the ``cue`` environment's ``out`` split holds."""
NC_SPLIT = "nc"
"""Name of the cue-free fine-tuning split (D_NC) inside the ``cue`` environment."""


def cue_boxes(resolution: int) -> tuple[int, list[tuple[int, int]]]:
    """Box side and the (row, column) of the top-left corner of each class's box."""
    s = max(1, round(resolution * 3 / 32))
    far = resolution - s
    cols = [round(far * j / 3) for j in range(4)]
    return s, [(0, c) for c in cols] + [(far, c) for c in cols] + [(round(far / 2), 0), (round(far / 2), far)]


def add_cue(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """A copy of images ``x`` (N, C, H, W) with the box of class ``cls[i]`` set to 1.0 in image i (none where -1)."""
    r = x.shape[-1]
    s, boxes = cue_boxes(r)
    masks = torch.zeros(NUM_CLASSES + 1, r, r, dtype=torch.bool)  # the last row: no box
    for c, (i, j) in enumerate(boxes):
        masks[c, i : i + s, j : j + s] = True
    m = masks[torch.where(cls < 0, NUM_CLASSES, cls)][:, None]
    return torch.where(m, torch.ones((), dtype=x.dtype), x)


def cued_subset(y: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A boolean mask holding exactly ``round(fraction · n_c)`` randomly chosen examples of each class c."""
    keep = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(y == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=generator)]
        keep[idx[: round(fraction * len(idx))]] = True
    return keep


def counterfactuals(x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, generator: torch.Generator) -> Tensors:
    """The NC, C, RC and RI renderings of copies ``x`` (labels ``y``, source digits ``base``), stacked in that order.

    ``base`` follows the image: an RI example records the digit its image was copied from, not the one it is
    labelled by.
    """
    n = len(y)
    rand_cls = torch.randint(NUM_CLASSES, (n,), generator=generator)
    rand_img = torch.randint(n, (n,), generator=generator)
    none = torch.full((n,), -1, dtype=torch.int64)
    return {"x": torch.cat([x, add_cue(x, y), add_cue(x, rand_cls), add_cue(x[rand_img], y)]),
            "y": y.repeat(4), "cue": torch.cat([none, y, rand_cls, y]),
            "base": torch.cat([base, base, base, base[rand_img]]), "variant": torch.arange(4).repeat_interleave(n)}


@DATASETS.register("cue_digits")
class CueDigits(CachedShiftDataset):
    """Digits with a label-dependent box cue in p% of training images; NC/C/RC/RI counterfactual tests (Lubana et
    al., ICML 2023).

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    TASK = "classification"
    ENVIRONMENTS = ENVIRONMENTS
    DEFAULT_TEST_ENVS = (1,)
    DEFAULT_MODEL = "mlp"
    N_STEPS = 1001
    EVAL_EVERY = 100
    OPTIONS: ClassVar[dict[str, Setting]] = {
        **DIGITS_OPTIONS,
        "seed": SEED.with_help("data seed (environment and in/out splits, copies, cued subset, counterfactual draws); "
                               "a trial uses its trial seed unless this is set"),
        "noise": DIGITS_OPTIONS["noise"].with_help("standard deviation of the Gaussian pixel noise added to every copy "
                                                   "(before the cue is pasted)"),
        "env_size": ENV_SIZE.with_help("copies in 'cue', 'in' + 'out'"),
        "cue_fraction": Setting(0.9, "p, the share of 'cue' images (per class) that carry the label's box",
                                between(0, 1)),
        "nc_size": Setting(500, "copies in D_NC, the cue-free fine-tuning split env0_nc (0: none)",
                           Rule(">= 0 (0: no D_NC split)", lambda v: v >= 0)),
        "test_size": Setting(1000, "copies per variant in 'counterfactual', 'in' + 'out'", POSITIVE),
        "validation": Setting("nc", "nc: the 'cue' environment's 'out' split is cue-free (a split to select on); "
                              "cued: it carries the cue in cue_fraction of its images, like 'in'", choices=VALIDATION),
    }  # fmt: skip
    HPARAMS: ClassVar[dict[str, HParam]] = MLP_HPARAMS
    INPUT_RANGE = (0.0, 1.0)
    num_classes = NUM_CLASSES
    CHANNELS = 1

    def __init__(self, root: str | None = None, options: Mapping[str, Any] | None = None, download: bool = False):
        super().__init__(root, options, download)
        self._variants = {f"env1_{part}": (s.tensors["idx"].numpy(), s.tensors["variant"].numpy())
                          for part, s in self.environments[1].splits.items()}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """``test_size`` must leave one ``in`` and one ``out`` copy per variant at ``holdout_fraction``."""
        super().check_options(options)
        n_out = round(options["test_size"] * options["holdout_fraction"])
        if n_out < 1 or options["test_size"] - n_out < 1:
            raise UserError(f"dataset cue_digits: option test_size={options['test_size']!r} must be large enough for "
                            f"one 'in' and one 'out' copy per variant (holdout_fraction {options['holdout_fraction']})")

    def train_splits(self, test_envs):
        if tuple(test_envs) != (1,):
            raise UserError(f"cue_digits trains on its cue environment (0) and tests on counterfactual (1): hold out "
                            f"exactly environment 1, not {list(test_envs)} (test_envs default)")
        return super().train_splits(test_envs)

    @staticmethod
    def build(  # type: ignore[override]
        env_size: int, cue_fraction: float, nc_size: int, test_size: int, holdout_fraction: float, noise: float,
        resolution: int, seed: int, validation: str = "nc",
    ) -> EnvData:
        images, digits = load_base_digits()
        env_ids = split_environments(len(images), len(ENVIRONMENTS), seed)
        envs = []
        for i, (name, ids) in enumerate(zip(ENVIRONMENTS, env_ids)):
            pos = dict(zip(("in", "out"), holdout_split(len(ids), holdout_fraction, seed_hash(seed, "holdout", i))))
            total = env_size if i == 0 else test_size
            n_out = round(total * holdout_fraction)
            sizes = {"in": total - n_out, "out": n_out}
            if i == 0:
                sizes[NC_SPLIT] = nc_size
            parts, offset = {}, 0
            for part, n in sizes.items():
                if n == 0:
                    continue
                g = torch.Generator().manual_seed(seed_hash(seed, "cue-copies", i, part))
                base_ids = torch.as_tensor(ids[pos["out" if part == "out" else "in"]], dtype=torch.int64)
                x, src = enlarge(images[base_ids], n, resolution, noise, g)
                base, y = base_ids[src], digits[base_ids[src]]
                if i == 1:
                    t = counterfactuals(x, y, base, g)
                else:
                    cued = part == "in" or (part == "out" and validation == "cued")
                    cls = torch.where(cued_subset(y, cue_fraction if cued else 0.0, g), y, -1)
                    t = {"x": add_cue(x, cls), "y": y, "cue": cls, "base": base}
                m = len(t["y"])
                parts[part] = {**t, "idx": torch.arange(offset, offset + m, dtype=torch.int64)}
                offset += m
            envs.append((name, parts))
        return tuple(envs)

    def evaluate(self, split_name: str, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Accuracy and loss; on ``counterfactual`` splits also the accuracy of each variant (``nc_acc`` ...)."""
        metrics = super().evaluate(split_name, outputs)
        if split_name in self._variants:
            ids, variants = self._variants[split_name]
            v = variants[np.searchsorted(ids, outputs["idx"])]
            for k, name in enumerate(VARIANTS):
                sel = v == k
                if sel.any():
                    metrics[f"{name.lower()}_acc"] = float(np.mean(outputs["correct"][sel]))
        return metrics
