"""WILDS datasets through the ``wilds`` package (Koh et al., "WILDS: A Benchmark of in-the-Wild Distribution
Shifts", ICML 2021; Sagawa et al., ICLR 2022): ``wilds:waterbirds``, ``wilds:celeba``, ``wilds:camelyon17``,
``wilds:civilcomments``, ``wilds:iwildcam``, ``wilds:fmow``.

How a WILDS dataset maps onto the harness:

- **environment 0, ``test``**: its ``in`` split is the official ``test`` split and its ``out`` split the official
  ``val`` split (OOD validation where WILDS has one). It is the default held-out environment, so DomainBed's rules
  report official test accuracy: training-domain validation picks by the training groups' validation accuracy,
  the oracle by ``val`` accuracy, and ``worst_group`` by ``val`` worst-group accuracy.
- **environments 1..G, the training groups**: WILDS' ``CombinatorialGrouper`` over the ``groupby`` fields (default:
  the ``groupby_fields`` of WILDS' own example configs, e.g. background x label for Waterbirds, hospital for
  Camelyon17); one training stream each, from the ``train`` split. Each group's ``out`` split is its part of
  ``id_val`` where the dataset has one, else of ``val``.
- **extra split ``id_test``** where the dataset has one.

Evaluation of the official splits (``env0_in`` = test, ``env0_out`` = val, ``id_test``) is the dataset's own
``eval()``: its numbers are recorded under WILDS' names (``acc_avg``, ``acc_wg``, ``adj_acc_avg``, per-group
accuracies, ``F1-macro_all`` ...; characters MLflow refuses become ``_``, counts are dropped), plus ``acc``,
``loss`` and ``worst_group_acc`` (WILDS' worst-group accuracy: ``acc_wg``, FMoW's ``acc_worst_region``). Group
splits get ``acc`` and ``loss``; training-split accuracy is evaluated only with ``eval_train=true``.

Files are read from ``<data-root>/<name>_v<version>/`` with ``download=False`` unless ``--download`` is given.
Traps of wilds 2.0.0 on current numpy / pandas / torch that this module handles:

- its groupers' metrics import ``torch_scatter`` (undeclared; no wheel for current torch): when it is missing, a
  pure-torch ``scatter`` (sum / mean over a 1-d index, all WILDS uses) is put into ``sys.modules`` before
  ``wilds`` is imported; a real ``torch_scatter`` wins;
- ``import wilds`` starts a thread that asks PyPI for a newer version (``outdated.check_outdated``), which blocks
  interpreter exit without network: ``outdated`` is hidden during the import, so ``wilds.version`` skips it;
- pandas 3 reads CivilComments' ``split`` column as a string column and refuses the integers wilds writes into
  it: the dataset is built with pandas' ``future.infer_string`` off;
- each folder needs ``RELEASE_v<version>.txt`` or wilds tries to download: a missing file, or one of another
  release, is reported by name before wilds runs; so are missing metadata columns.

Text (CivilComments) goes through the reward-model workload's offline hashed n-gram encoder
(:mod:`shiftbench.text`) into the ``mlp`` model; WILDS' own baseline is DistilBERT. Images go to torchvision
ResNets (``resnet50`` by default; WILDS uses DenseNet-121 for Camelyon17 and FMoW) with WILDS' resolutions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import re
import sys
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from shiftbench.data import Environment, ShiftDataset, Split
from shiftbench.datasets.digits import MLP_HPARAMS
from shiftbench.datasets.image_folder import (
    IMAGE_HPARAMS,
    DataFiles,
    LazySplit,
    eval_transform,
    image_loader,
    train_transform,
    version_string,
)
from shiftbench.errors import UserError
from shiftbench.hparams import POSITIVE, HParam
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting

# ------------------------------------------------------------------------------------------------ importing wilds


def scatter(src: torch.Tensor, index: torch.Tensor, dim: int = -1, out: torch.Tensor | None = None,
            dim_size: int | None = None, reduce: str = "sum") -> torch.Tensor:  # fmt: skip
    """``torch_scatter.scatter`` for what WILDS calls: a 1-d ``src`` reduced into ``dim_size`` bins by ``index``
    with ``reduce`` = sum or mean (empty bins are 0, as in torch_scatter)."""
    if src.dim() != 1 or index.dim() != 1 or out is not None or reduce not in ("sum", "add", "mean"):
        raise NotImplementedError("the torch_scatter stand-in supports 1-d sum/mean only")
    n = int(dim_size) if dim_size is not None else (int(index.max()) + 1 if index.numel() else 0)
    index = index.long()
    total = torch.zeros(n, dtype=src.dtype, device=src.device).index_add_(0, index, src)
    if reduce == "mean":
        count = torch.zeros(n, dtype=src.dtype, device=src.device).index_add_(0, index, torch.ones_like(src))
        total = total / count.clamp(min=1)
    return total


def import_wilds() -> types.ModuleType:
    """``import wilds`` with the torch_scatter stand-in and without the PyPI version check."""
    if "wilds" in sys.modules:
        return sys.modules["wilds"]
    try:
        import torch_scatter  # noqa: F401 -- a real one is preferred
    except ImportError:
        shim = types.ModuleType("torch_scatter")
        shim.__doc__ = "shiftbench's pure-torch stand-in for torch_scatter.scatter (1-d sum/mean)"
        shim.scatter = scatter  # type: ignore[attr-defined]
        sys.modules["torch_scatter"] = shim
    # wilds/version.py runs check_outdated in a non-daemon thread when `from outdated import check_outdated`
    # succeeds; a None entry in sys.modules makes that import fail, so the check is skipped.
    saved = sys.modules.get("outdated", None)
    had = "outdated" in sys.modules
    sys.modules["outdated"] = None  # type: ignore[assignment]
    try:
        import wilds
    except ImportError as e:
        raise UserError(f"WILDS datasets need the wilds package ({e}): pip install 'shiftbench[wilds]'") from None
    finally:
        if had:
            sys.modules["outdated"] = saved  # type: ignore[assignment]
        else:
            sys.modules.pop("outdated", None)
    return wilds


@contextlib.contextmanager
def _object_strings():
    """pandas >= 3 reads text columns as a string dtype that refuses the integers wilds writes into them."""
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ctx = pd.option_context("future.infer_string", False)
        except (KeyError, ValueError, AttributeError):  # pandas without the option: strings are objects already
            ctx = contextlib.nullcontext()
        with ctx:
            yield


# ---------------------------------------------------------------------------------------------- the datasets


@dataclass(frozen=True)
class WildsSpec:
    """What the adapter needs to know about one WILDS dataset (facts from wilds 2.0.0 and its example configs)."""

    name: str
    """WILDS' name (``wilds.get_dataset``)."""
    version: str
    """The release wilds 2.0.0 reads by default."""
    modality: str
    """``image`` or ``text``."""
    groupby: tuple[str, ...]
    """Default training groups: the ``groupby_fields`` of WILDS' example config."""
    values: Mapping[str, tuple[str, ...]]
    """Per groupable field, its values present in the training split, as WILDS' ``metadata_map`` spells them (or
    the integer code where the field has no map)."""
    columns: Mapping[str, tuple[str, ...]]
    """Metadata files (relative to the dataset folder) and the columns wilds reads from them."""
    path: Callable[[Any, int], str] | None = None
    """The image file of example ``i`` (relative to the dataset folder)."""
    resolution: int = 224
    resize_scale: float = 1.0
    default_model: str = "resnet50"


_IDENTITIES = ("male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white")
_AUXILIARY = ("identity_any", "severe_toxicity", "obscene", "threat", "insult", "identity_attack", "sexual_explicit")
_BINARY = ("0", "1")

SPECS: dict[str, WildsSpec] = {
    "waterbirds": WildsSpec(
        "waterbirds", "1.0", "image", ("background", "y"),
        {"background": ("land", "water"), "y": ("landbird", "waterbird")},
        {"metadata.csv": ("img_filename", "y", "split", "place")},
        path=lambda d, i: d._input_array[i], resize_scale=256 / 224,
    ),
    "celeba": WildsSpec(
        "celebA", "1.0", "image", ("male", "y"), {"male": _BINARY, "y": ("not blond", "blond")},
        {"list_attr_celeba.csv": ("image_id", "Blond_Hair", "Male"), "list_eval_partition.csv": ("partition",)},
        path=lambda d, i: f"img_align_celeba/{d._input_array[i]}",
    ),
    "camelyon17": WildsSpec(
        "camelyon17", "1.0", "image", ("hospital",), {"hospital": ("0", "3", "4"), "y": _BINARY},
        {"metadata.csv": ("patient", "node", "x_coord", "y_coord", "slide", "center", "split", "tumor")},
        path=lambda d, i: d._input_array[i], resolution=96,
    ),
    "civilcomments": WildsSpec(
        "civilcomments", "1.0", "text", ("black", "y"), {**{k: _BINARY for k in _IDENTITIES}, "y": _BINARY},
        {"all_data_with_identities.csv": ("comment_text", "split", "toxicity", *_IDENTITIES, *_AUXILIARY)},
        default_model="mlp",
    ),
    "iwildcam": WildsSpec(
        # WILDS groups iWildCam by its 243 training camera locations; one stream per location does not fit a
        # harness that draws a batch from every training environment each step, so the default pools them.
        "iwildcam", "2.0", "image", (), {},
        {"metadata.csv": ("split", "filename", "y", "location_remapped", "sequence_remapped", "datetime")},
        path=lambda d, i: f"train/{d._input_array[i]}", resolution=448,
    ),
    "fmow": WildsSpec(
        "fmow", "1.1", "image", ("region",),
        {"region": ("Asia", "Europe", "Africa", "Americas", "Oceania", "Other"),
         "year": tuple(str(y) for y in range(2002, 2018))},
        {"rgb_metadata.csv": ("split", "country_code", "timestamp", "category"),
         "country_code_mapping.csv": ("alpha-3", "region")},
        path=lambda d, i: f"images/rgb_img_{d.full_idxs[i]}.png",
    ),
}

_WORST = {"fmow": "acc_worst_region"}
"""WILDS' worst-group field where it is not ``acc_wg``."""
_KEY = re.compile(r"[^\w.\-]+")


def _split_header(data: bytes) -> list[str]:
    first = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return next(csv.reader(io.StringIO(first)), [])


class WildsDataset(ShiftDataset):
    """Base of the ``wilds:<name>`` datasets; ``SPEC`` says which.

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    SPEC: ClassVar[WildsSpec]
    DEFAULT_TEST_ENVS = (0,)
    N_STEPS = 5001
    EVAL_EVERY = 500
    TEST_ENV = "test"
    METADATA_KEYS: ClassVar[tuple[str, ...]] = ("group",)
    """Every split carries each example's training-group index (-1: none), for the group methods."""

    @classmethod
    def groupby(cls, options: Mapping[str, Any]) -> list[str]:
        fields = [f.strip() for f in str(options["groupby"]).split(",") if f.strip()]
        unknown = [f for f in fields if f not in cls.SPEC.values]
        if unknown:
            known = ", ".join(cls.SPEC.values) or "none: this dataset's groups depend on the data"
            raise UserError(f"{cls.registry_name}: cannot group by {', '.join(unknown)}; fields with known values: "
                            f"{known} (or groupby= to pool the training split)")
        return fields

    @classmethod
    def group_values(cls, options: Mapping[str, Any]) -> list[tuple[str, ...]]:
        fields = cls.groupby(options)
        return list(itertools.product(*(cls.SPEC.values[f] for f in fields)))

    @classmethod
    def environment_names(cls, options: Mapping[str, Any]) -> list[str]:
        o = cls.resolve_options(options)
        fields = cls.groupby(o)
        groups = [", ".join(f"{f}:{v}" for f, v in zip(fields, combo)) for combo in cls.group_values(o)]
        return [cls.TEST_ENV] + (groups if fields else ["train"])

    # -- files -----------------------------------------------------------------------------------------------
    @classmethod
    def data_dir(cls, root: str | None, options: Mapping[str, Any]) -> Path:
        version = str(options.get("version") or cls.SPEC.version)
        if root is None:
            raise UserError(f"{cls.registry_name} reads {cls.SPEC.name}_v{version}/ under --data-root "
                            "(or $SHIFTBENCH_DATA); none was given")
        return Path(root).expanduser() / f"{cls.SPEC.name}_v{version}"

    @classmethod
    def check(cls, root: str | None, options: Mapping[str, Any], download: bool) -> None:
        o = cls.resolve_options(options)
        if download and (root is None or not cls.data_dir(root, o).is_dir()):
            return
        cls._check_files(root, o)

    @classmethod
    def _check_files(cls, root: str | None, o: Mapping[str, Any]) -> DataFiles:
        """The RELEASE file and the metadata columns, checked before wilds reads anything."""
        folder = cls.data_dir(root, o)
        version = str(o.get("version") or cls.SPEC.version)
        release = folder / f"RELEASE_v{version}.txt"
        if not folder.is_dir():
            raise UserError(f"{cls.registry_name}: {folder} does not exist (expected the WILDS folder with "
                            f"{release.name}); pass --data-root, or --download to let wilds fetch it")
        if not release.is_file():
            other = sorted(p.name for p in folder.glob("RELEASE_v*.txt"))
            found = f"it holds {', '.join(other)}, another release" if other else "it is missing"
            raise UserError(f"{cls.registry_name}: {release} is required by wilds for {cls.SPEC.name} v{version}; "
                            f"{found}: use the v{version} files (or --option version=...)")
        files = DataFiles(folder, cls.registry_name)
        files.read_bytes(release)
        for name, columns in cls.SPEC.columns.items():
            data = files.read_bytes(folder / name)
            header = _split_header(data)
            missing = [c for c in columns if c not in header]
            if missing:
                raise UserError(f"{folder / name}: missing column(s) {', '.join(missing)} that wilds "
                                f"{cls.SPEC.name} reads; the file is damaged or of another release")
        return files

    # -- loading ---------------------------------------------------------------------------------------------
    def __init__(self, root: str | None = None, options: Mapping[str, Any] | None = None, download: bool = False):
        super().__init__(root, options, download)
        o, spec = self.options, self.SPEC
        fields = self.groupby(o)
        folder = self.data_dir(root, o)
        # An existing folder is checked before wilds reads it (with its RELEASE file, wilds fetches nothing); a
        # missing one that --download lets wilds fetch is checked once wilds has written it.
        fetch = download and not folder.is_dir()
        if not fetch:
            self.files = self._check_files(root, o)
        wilds = import_wilds()
        try:
            with _object_strings(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # non-writable numpy arrays, CombinatorialGrouper notes
                self.wds = wilds.get_dataset(dataset=spec.name, version=o["version"] or None,
                                             root_dir=str(folder.parent), download=download)  # fmt: skip
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            raise UserError(f"{self.registry_name}: wilds could not read {folder}: {type(e).__name__}: {e}") from None
        if fetch:
            self.files = self._check_files(root, o)
        wds = self.wds
        self.num_classes = int(wds.n_classes)
        split_array = np.asarray(wds.split_array).astype(np.int64)
        meta = wds.metadata_array
        y = torch.as_tensor(np.asarray(wds.y_array), dtype=torch.int64)
        self.split_rows = {s: np.flatnonzero(split_array == code) for s, code in wds.split_dict.items()}
        group_of = self._groups(fields, meta)
        self._make_inputs(o)

        def split(rows: np.ndarray) -> Split | None:
            if len(rows) == 0:
                return None
            return self._split(rows, y, group_of)

        envs = [Environment(self.TEST_ENV, {k: s for k, s in (("in", split(self.split_rows["test"])),
                                                               ("out", split(self.split_rows["val"]))) if s})]
        val_name = "id_val" if "id_val" in self.split_rows else "val"
        names = self.environment_names(o)
        for g, name in enumerate(names[1:]):
            parts = {"in": self.split_rows["train"], "out": self.split_rows[val_name]}
            splits = {k: split(rows[group_of[rows] == g]) for k, rows in parts.items()}
            envs.append(Environment(name, {k: s for k, s in splits.items() if s is not None}))
        if not any("in" in e.splits for e in envs[1:]):
            raise UserError(f"{self.registry_name}: the train split of {folder} is empty")
        self.environments = envs
        self.extra = {s: split(self.split_rows[s]) for s in ("id_test",) if s in self.split_rows}
        self.extra = {k: v for k, v in self.extra.items() if v is not None}
        self.official = {"env0_in": "test", "env0_out": "val", **{k: k for k in self.extra}}
        self._version = self.files.version(self._paths)

    def _groups(self, fields: list[str], meta: torch.Tensor) -> np.ndarray:
        """Per row, the index of its training group (-1: none of the spec's values), from WILDS' grouper."""
        from wilds.common.grouper import CombinatorialGrouper

        if not fields:
            return np.zeros(len(meta), dtype=np.int64)
        grouper = CombinatorialGrouper(self.wds, fields)
        mapping = self.wds.metadata_map or {}
        codes = []
        for f in fields:
            known = [str(v).strip() for v in mapping[f]] if f in mapping else None
            codes.append([int(v) if known is None else (known.index(v) if v in known else -1)
                          for v in self.SPEC.values[f]])  # fmt: skip
        # The grouper numbers combinations lexicographically with the first field fastest (its ``factors``); the
        # environments follow the spec's value order, so map one numbering onto the other.
        lookup = np.full(int(grouper.n_groups), -1, dtype=np.int64)
        cardinality = grouper.cardinality.tolist()
        for g, combo in enumerate(itertools.product(*codes)):
            if all(0 <= c < n for c, n in zip(combo, cardinality)):  # a value this copy lacks: an empty environment
                lookup[int(np.dot(combo, grouper.factors_np))] = g
        return lookup[grouper.metadata_to_group(meta).numpy()]

    def _make_inputs(self, o: Mapping[str, Any]) -> None:
        spec, wds = self.SPEC, self.wds
        if spec.modality == "text":
            from shiftbench.text import make_encoder

            encoder = make_encoder(str(o["encoder"]))
            texts = [str(t) for t in wds._text_array]
            self.input_shape = tuple(encoder.shape)
            self._paths: list[Path] = []  # the texts are in the metadata file, already part of the version

            def load_text(rows: np.ndarray, train: bool, base: np.ndarray) -> torch.Tensor:
                chosen = [texts[int(base[r])] for r in rows]
                return encoder.encode([""] * len(chosen), chosen).float()

            self._load = load_text
            return
        res = int(o["resolution"])
        if not 8 <= res <= 1024:
            raise UserError(f"{self.registry_name}: resolution={res} must be from 8 to 1024")
        self.input_shape = (3, res, res)
        folder = Path(wds.data_dir)
        paths = [folder / spec.path(wds, i) for i in range(len(wds))]
        self._paths = paths
        train_tf = train_transform(res) if o["augment"] else None
        eval_tf = eval_transform(res, spec.resize_scale)
        decode = image_loader(self.files, paths, train_tf, eval_tf)

        def load_image(rows: np.ndarray, train: bool, base: np.ndarray) -> torch.Tensor:
            return decode(base[rows], train)

        self._load = load_image

    def _split(self, rows: np.ndarray, y: torch.Tensor, group_of: np.ndarray) -> LazySplit:
        index = torch.as_tensor(rows, dtype=torch.int64)
        tensors = {"y": y[index], "idx": index, "group": torch.as_tensor(group_of[rows], dtype=torch.int64)}
        load = self._load
        return LazySplit(lambda r, train: load(r, train, rows), tensors)

    # -- the harness interface -------------------------------------------------------------------------------
    def train_splits(self, test_envs: tuple[int, ...]) -> list[tuple[str, Split]]:
        """Training groups with training examples (a group absent from this copy of the data has no stream)."""
        return [(e.name, e.splits["in"]) for i, e in enumerate(self.environments)
                if i not in test_envs and "in" in e.splits]  # fmt: skip

    def eval_splits(self) -> dict[str, Split]:
        out = {}
        for i, e in enumerate(self.environments):
            for part, s in e.splits.items():
                if i == 0 or part == "out" or self.options["eval_train"]:
                    out[f"env{i}_{part}"] = s
        return {**out, **self.extra}

    def evaluate(self, split_name: str, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        metrics = super().evaluate(split_name, outputs)
        if split_name not in self.official:
            return metrics
        idx = torch.as_tensor(outputs["idx"], dtype=torch.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results, _ = self.wds.eval(torch.as_tensor(outputs["pred"]).long(), self.wds.y_array[idx].long(),
                                       self.wds.metadata_array[idx])  # fmt: skip
        # WILDS reports 0.0 for a group the split has no example of (with count 0): such a metric is dropped, not a
        # claim of 0% on data the split does not hold
        empty = [k[len("count_"):] for k, v in results.items() if k.startswith("count_") and float(v) == 0]
        for k, v in results.items():
            if not k.startswith("count_") and not any(k.endswith(f"_{g}") for g in empty):
                metrics[_KEY.sub("_", k)] = float(v)
        worst = _WORST.get(self.SPEC.name, "acc_wg")
        if worst in results:
            metrics["worst_group_acc"] = float(results[worst])
        return metrics

    def version(self) -> str:
        return version_string(self._version)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "wilds": {"name": self.SPEC.name, "version": self.wds.version,
                                                "official_splits": self.official,
                                                "sizes": {k: int(len(v)) for k, v in self.split_rows.items()}},
                "validation_split": "env0_out", "data": self._version}  # fmt: skip


def _register(key: str, spec: WildsSpec) -> None:
    options = {
        "version": Setting("", f"the dataset release (empty: {spec.version}, the latest wilds 2.0.0 knows)"),
        "groupby": Setting(",".join(spec.groupby), "comma-separated metadata fields whose combinations are the "
                           "training environments (empty: pool them)"),
        "resolution": Setting(spec.resolution, "image side (default: WILDS' for the dataset)", POSITIVE),
        "augment": Setting(False, "DomainBed's training augmentation on images (WILDS' defaults use none)"),
        "encoder": Setting("hashing:1024,512,0", "text encoder spec for text datasets (shiftbench.text.make_encoder)"),
        "eval_train": Setting(False, "also evaluate the training groups' 'in' splits"),
    }  # fmt: skip
    hparams: dict[str, HParam] = dict(MLP_HPARAMS) if spec.modality == "text" else dict(IMAGE_HPARAMS)
    cls = type(f"Wilds_{key}", (WildsDataset,), {
        "__doc__": f"WILDS {spec.name} v{spec.version} ({spec.modality}; training groups: "
                   f"{' x '.join(spec.groupby) or 'pooled'}), read with the wilds package from --data-root.",
        "__module__": __name__, "SPEC": spec, "OPTIONS": options, "HPARAMS": hparams,
        "DEFAULT_MODEL": spec.default_model,
    })  # fmt: skip
    DATASETS.register(f"wilds:{key}")(cls)


for _key, _spec in SPECS.items():
    _register(_key, _spec)
