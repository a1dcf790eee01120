"""DomainBed's image-folder datasets (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet) and the file-backed data
machinery the real-data loaders share: lazily decoded image splits, sha256 manifests and DVC versions.

Layout (DomainBed's ``MultipleEnvironmentImageFolder``): ``<root>/<folder>/<domain>/<class>/<image>``. Domains are
the sorted subfolders of ``<folder>``, classes the sorted union of the class subfolders; each domain is one
environment, split into ``in`` and ``out`` by a seeded permutation (``holdout_fraction`` 0.2, DomainBed's default).
Presets name the folder and DomainBed's environment names: ``pacs`` (``PACS``: A, C, P, S), ``vlcs`` (``VLCS``:
C, L, S, V), ``office_home`` (``office_home``: A, C, P, R), ``terra_incognita`` (``terra_incognita``: L100, L38,
L43, L46), ``domain_net`` (``domain_net``: clip, info, paint, quick, real, sketch). ``image_folder`` is any such
folder: ``--option path=FOLDER`` (absolute, or relative to ``--data-root``) and, unless the path is absolute,
``domains=a,b,c``.

Transforms are DomainBed's (``datasets.py``): evaluation resizes to ``resolution`` x ``resolution`` and normalises
with ImageNet's mean and standard deviation; training batches add ``RandomResizedCrop(scale=(0.7, 1))``, a
horizontal flip, ``ColorJitter(0.3, 0.3, 0.3, 0.3)`` and ``RandomGrayscale`` (``augment=false`` turns this off).
Images are decoded when a batch needs them; the augmentation of batch *k* is seeded by (stream seed, *k*), so a
resumed trial sees the batches an uninterrupted one would.

Data versions. ``shiftbench prepare`` writes ``manifest.json`` (sha256 of every file) into a data folder; a loader
reading from a folder with a manifest checks each file it reads against it and refuses one whose digest differs.
A dataset's version is the sha256 over the (path, sha256) pairs of its files (from the manifest when there is one,
else from the metadata files it read and the sizes of the images), plus DVC's md5 of the folder when a ``dvc.lock``
or ``.dvc`` file above it tracks it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from shiftbench.data import HOLDOUT_FRACTION, SEED, Batch, Environment, ShiftDataset, Split, holdout_split
from shiftbench.errors import UserError
from shiftbench.io import sha256_file
from shiftbench.hparams import HParam, Rule, choice, log_uniform, log_uniform_int, seed_hash
from shiftbench.models import resnet_hparams
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "shiftbench.manifest/1"

IMAGE_HPARAMS: dict[str, HParam] = {
    # DomainBed's ranges for its ResNet datasets: lr 10^U(-5,-3.5), batch 2^U(3,5.5), weight decay 10^U(-6,-2).
    "lr": HParam(5e-5, log_uniform(-5, -3.5)),
    "batch_size": HParam(32, log_uniform_int(3, 5.5, base=2)),
    "weight_decay": HParam(0.0, log_uniform(-6, -2)),
    **resnet_hparams(),
    "mlp_width": HParam(256, choice([256])),
    "mlp_depth": HParam(2, choice([2])),
    "mlp_dropout": HParam(0.0, choice([0.0])),
}
"""Hyperparameters of image datasets: DomainBed's optimiser ranges, the ResNets' options, and a fixed MLP (for
small tests and probes)."""


# --------------------------------------------------------------------------------------------------- versions


def digest_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    """sha256 over sorted (name, value) pairs: a dataset's content version from its files' digests."""
    h = hashlib.sha256()
    for name, value in sorted(pairs):
        h.update(f"{name}\0{value}\n".encode())
    return h.hexdigest()


def find_manifest(folder: str | os.PathLike) -> Path | None:
    """The shiftbench ``manifest.json`` of ``folder`` or of the nearest folder above it (at most three levels);
    files of that name written by other tools are not ours and are passed over."""
    p = Path(folder).resolve()
    for cand in [p, *list(p.parents)[:3]]:
        f = cand / MANIFEST
        try:
            if f.is_file():
                with open(f, "rb") as fh:  # only the head: the whole file is parsed once, by read_manifest
                    if MANIFEST_SCHEMA.encode() in fh.read(4096):
                        return f
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=16)
def read_manifest(path: str, mtime_ns: int) -> dict:
    """A manifest's contents, checked to be ours (cached per path and modification time)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"manifest {path} is unreadable ({e}); rerun shiftbench prepare") from None
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA or not isinstance(data.get("files"), dict):
        raise UserError(f"manifest {path} is not a {MANIFEST_SCHEMA} manifest; rerun shiftbench prepare")
    return data


def dvc_md5(folder: str | os.PathLike) -> str | None:
    """DVC's md5 of the tracked output that contains ``folder``: from a ``dvc.lock`` stage output or a ``.dvc`` file
    in a folder above it; None when DVC does not track it."""
    import yaml

    target = Path(folder).resolve()
    for base in [target, *target.parents]:
        candidates = [(base / "dvc.lock", "lock")] + [(p, "dvc") for p in sorted(base.glob("*.dvc"))]
        for path, kind in candidates:
            if not path.is_file():
                continue
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            outs = [o for stage in (data.get("stages") or {}).values() for o in (stage.get("outs") or [])] \
                if kind == "lock" else list(data.get("outs") or [])  # fmt: skip
            for out in outs:
                out_path = (base / str(out.get("path", ""))).resolve()
                if out.get("md5") and (target == out_path or out_path in target.parents):
                    return str(out["md5"])
    return None


class DataFiles:
    """Reads a dataset's files under a data folder, checking each against the folder's manifest if it has one.

    Args:
        folder: the dataset's folder (files are named relative to the manifest's folder, else to this one).
        what: the dataset's name, for messages.
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder).resolve()
        self.what = what
        self.manifest_path = find_manifest(self.folder)
        self.base = self.manifest_path.parent if self.manifest_path else self.folder
        self.digests: dict[str, str] = {}
        if self.manifest_path:
            m = read_manifest(str(self.manifest_path), self.manifest_path.stat().st_mtime_ns)
            self.digests = dict(m["files"])
        self._checked: set[str] = set()
        self.read: dict[str, str] = {}
        """Files read whole at load time (metadata): relative name -> sha256."""

    def name(self, path: str | os.PathLike) -> str:
        p = Path(path).resolve()
        try:
            return p.relative_to(self.base).as_posix()
        except ValueError:
            return str(p)

    def check(self, path: str | os.PathLike, data: bytes | None = None) -> str:
        """Verifies a file against the manifest (once per process); returns its sha256 (when computed)."""
        name = self.name(path)
        if not self.manifest_path or name in self._checked:
            return self.digests.get(name, "")
        want = self.digests.get(name)
        if want is None:
            raise UserError(f"{path} is not listed in {self.manifest_path}; rerun shiftbench prepare for {self.what}")
        got = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
        if got != want:
            raise UserError(f"{path} does not match {self.manifest_path} (sha256 {got[:12]}…, manifest "
                            f"{want[:12]}…): the data changed since shiftbench prepare; restore it or rerun prepare")
        self._checked.add(name)
        return got

    def read_bytes(self, path: str | os.PathLike, record: bool = True) -> bytes:
        """The file's bytes, checked against the manifest; ``record`` adds its digest to the version's inputs."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"{self.what}: cannot read {path}: {e.strerror or e}") from None
        digest = self.check(path, data)
        if record:
            self.read[self.name(path)] = digest or hashlib.sha256(data).hexdigest()
        return data

    def image(self, path: str | os.PathLike):
        """The file decoded as an RGB PIL image; a missing, truncated or undecodable file is a UserError naming it."""
        import io

        from PIL import Image

        data = self.read_bytes(path, record=False)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError ... for bad files
            raise UserError(f"{self.what}: cannot decode image {path} ({type(e).__name__}: {e}); the file is "
                            "truncated or not an image: restore it") from None

    def version(self, files: Sequence[str | os.PathLike]) -> dict[str, Any]:
        """The content version of ``files`` (plus the metadata read so far): sha256 and, when tracked, DVC's md5."""
        pairs = list(self.read.items())
        for f in files:
            name = self.name(f)
            if name in self.read:
                continue
            if self.manifest_path:
                if name not in self.digests:
                    raise UserError(f"{f} is not listed in {self.manifest_path}; rerun shiftbench prepare")
                pairs.append((name, self.digests[name]))
            else:
                try:
                    pairs.append((name, f"size:{os.path.getsize(f)}"))
                except OSError as e:
                    raise UserError(f"{self.what}: cannot read {f}: {e.strerror or e}") from None
        out: dict[str, Any] = {"sha256": digest_pairs(pairs), "files": len(pairs),
                               "manifest": str(self.manifest_path) if self.manifest_path else None}
        md5 = dvc_md5(self.folder)
        if md5:
            out["dvc_md5"] = md5
        return out


def version_string(v: Mapping[str, Any]) -> str:
    """``<sha256>`` or ``<sha256>+dvc:<md5>``: what ``ShiftDataset.version`` returns (MLflow keeps the first 36
    characters as the dataset digest, i.e. the sha256's prefix)."""
    return v["sha256"] + (f"+dvc:{v['dvc_md5']}" if v.get("dvc_md5") else "")


# -------------------------------------------------------------------------------------------------- transforms


def eval_transform(resolution: int, resize_scale: float = 1.0) -> Callable:
    """Resize (to ``resolution * resize_scale``, then centre-crop when the scale exceeds 1), tensor, normalise."""
    from torchvision import transforms as T

    steps: list = []
    if resize_scale > 1.0:
        steps += [T.Resize(int(round(resolution * resize_scale))), T.CenterCrop(resolution)]
    else:
        steps += [T.Resize((resolution, resolution))]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(resolution: int) -> Callable:
    """DomainBed's training augmentation."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(0.7, 1.0)), T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.3), T.RandomGrayscale(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------------------ splits


class LazySplit(Split):
    """Examples whose inputs are made on demand (decoded images, encoded text); labels and metadata are tensors.

    Args:
        load: ``load(rows, train)`` -> the ``x`` tensor of those rows (positions in this split; ``train``
            picks the training transforms).
        tensors: ``y``, ``idx`` and metadata, one row per example.
    """

    def __init__(self, load: Callable[[np.ndarray, bool], torch.Tensor], tensors: Mapping[str, torch.Tensor],
                 device: torch.device | None = None):  # fmt: skip
        self.load = load
        self.tensors = dict(tensors)
        self.n = len(next(iter(self.tensors.values())))
        self.device = device or torch.device("cpu")
        self._perm_cache: tuple[int, int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.n

    def to(self, device: torch.device) -> "LazySplit":
        return LazySplit(self.load, self.tensors, torch.device(device))

    def _gather(self, rows: np.ndarray, keys: tuple[str, ...] | None, train: bool) -> Batch:
        keys = tuple(self.tensors) + ("x",) if keys is None else keys
        index = torch.as_tensor(rows, dtype=torch.int64)
        out = {k: self.tensors[k][index].to(self.device) for k in keys if k in self.tensors}
        if "x" in keys:
            out["x"] = self.load(rows, train).to(self.device)
        return out

    def batch_at(self, k: int, batch_size: int, seed: int, keys: tuple[str, ...] | None = None) -> Batch:
        bs = min(batch_size, self.n)
        epoch, pos = divmod(k, self.n // bs)
        # one permutation per (seed, epoch), not per step (as TensorSplit._perm)
        if self._perm_cache is None or self._perm_cache[:2] != (seed, epoch):
            self._perm_cache = (seed, epoch, np.random.RandomState(seed_hash(seed, epoch)).permutation(self.n))
        perm = self._perm_cache[2]
        # Augmentations draw from torch's global generator: seed it per batch, and leave the caller's state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_hash(seed, "augment", k))
            return self._gather(perm[pos * bs : (pos + 1) * bs], keys, train=True)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, self.n, batch_size):
            yield self._gather(np.arange(i, min(i + batch_size, self.n)), None, train=False)


def image_loader(files: DataFiles, paths: Sequence[str | os.PathLike], train_tf: Callable | None,
                 eval_tf: Callable) -> Callable[[np.ndarray, bool], torch.Tensor]:  # fmt: skip
    """A ``LazySplit`` loader decoding ``paths[rows]``; ``train_tf`` (None: ``eval_tf``) for training batches."""

    def load(rows: np.ndarray, train: bool) -> torch.Tensor:
        tf = train_tf if train and train_tf is not None else eval_tf
        return torch.stack([tf(files.image(paths[int(r)])) for r in rows])

    load.paths = paths  # type: ignore[attr-defined]
    return load


# ------------------------------------------------------------------------------------------------ image folders


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataset(ShiftDataset):
    """Any DomainBed-layout image folder, ``<folder>/<domain>/<class>/<image>``: one environment per domain.

    Options: ``OPTIONS`` (``shiftbench list datasets`` prints them with their defaults).
    """

    TASK = "classification"
    DEFAULT_TEST_ENVS = (0,)
    DEFAULT_MODEL = "resnet50"
    N_STEPS = 5001  # DomainBed's default
    EVAL_EVERY = 300  # DomainBed's CHECKPOINT_FREQ for these datasets
    OPTIONS: ClassVar[dict[str, Setting]] = {
        "path": Setting("", "the folder (absolute, or relative to --data-root); presets default to DomainBed's folder "
                        "name"),
        "domains": Setting("", "comma-separated domain folder names (empty: every subfolder, sorted)"),
        "resolution": Setting(224, "image side after resizing (DomainBed: 224)",
                              Rule("from 8 to 1024", lambda v: 8 <= v <= 1024)),
        "holdout_fraction": HOLDOUT_FRACTION,
        "seed": SEED.with_help("data seed (the in/out split); a trial uses its trial seed unless this is set (pin it, "
                               "e.g. seed=0, for the same data in every trial)"),
        "augment": Setting(True, "DomainBed's training augmentation on training batches"),
    }  # fmt: skip
    HPARAMS: ClassVar[dict[str, HParam]] = IMAGE_HPARAMS
    FOLDER: ClassVar[str] = ""
    """The preset's folder under the data root (DomainBed's)."""

    @classmethod
    def environment_names(cls, options: Mapping[str, Any]) -> list[str]:
        if cls.ENVIRONMENTS:
            return list(cls.ENVIRONMENTS)
        o = cls.resolve_options(options)
        if o["domains"]:
            return [d.strip() for d in str(o["domains"]).split(",") if d.strip()]
        if o["path"] and Path(o["path"]).expanduser().is_absolute() and Path(o["path"]).expanduser().is_dir():
            return subfolders(Path(o["path"]).expanduser())
        raise UserError("image_folder needs --option domains=A,B,C (the domain folders) or an absolute path=FOLDER")

    @classmethod
    def folder_of(cls, root: str | None, options: Mapping[str, Any]) -> Path:
        rel = str(options.get("path") or cls.FOLDER)
        if not rel:
            raise UserError("image_folder needs --option path=FOLDER (absolute, or relative to --data-root)")
        p = Path(rel).expanduser()
        if p.is_absolute():
            return p
        if root is None:
            raise UserError(f"{cls.registry_name} reads {rel}/ under --data-root (or $SHIFTBENCH_DATA); none was given")
        return Path(root).expanduser() / p

    @classmethod
    def domain_folders(cls, root: str | None, options: Mapping[str, Any]) -> list[Path]:
        """The environments' folders, checked to exist; the names match ``environment_names``."""
        o = cls.resolve_options(options)
        folder = cls.folder_of(root, o)
        if not folder.is_dir():
            raise UserError(f"{cls.registry_name}: folder {folder} does not exist; expected "
                            f"{folder}/<domain>/<class>/<image> (pass --data-root or --option path=...)")
        if o["domains"]:
            names = [d.strip() for d in str(o["domains"]).split(",") if d.strip()]
        else:
            names = subfolders(folder)
            want = cls.environment_names(o)
            if cls.ENVIRONMENTS and len(names) != len(want):
                raise UserError(f"{cls.registry_name}: {folder} holds {len(names)} domain folders "
                                f"({', '.join(names)}); DomainBed's layout has {len(want)} ({', '.join(want)})")
        for n in names:
            if not (folder / n).is_dir():
                raise UserError(f"{cls.registry_name}: domain folder {folder / n} does not exist")
        return [folder / n for n in names]

    @classmethod
    def check(cls, root: str | None, options: Mapping[str, Any], download: bool) -> None:
        cls.domain_folders(root, options)

    def __init__(self, root: str | None = None, options: Mapping[str, Any] | None = None, download: bool = False):
        super().__init__(root, options, download)
        o = self.options
        res = o["resolution"]
        domains = self.domain_folders(root, o)
        self.files = DataFiles(self.folder_of(root, o), self.registry_name)
        per_domain = [{c: list_images(d / c) for c in subfolders(d)} for d in domains]
        self.classes = sorted({c for found in per_domain for c, imgs in found.items() if imgs})
        if not self.classes:
            raise UserError(f"{self.registry_name}: no images under {self.folder_of(root, o)} "
                            f"(expected <domain>/<class>/<image>, extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.num_classes = len(self.classes)
        self.input_shape = (3, res, res)
        train_tf = train_transform(res) if o["augment"] else None
        eval_tf = eval_transform(res)
        self.environments, self._paths, assigned = [], [], []
        for i, (name, d, found) in enumerate(zip(self.environment_names(o), domains, per_domain)):
            paths = [p for c in self.classes for p in found.get(c, [])]
            labels = torch.tensor([k for k, c in enumerate(self.classes) for _ in found.get(c, [])])
            if len(paths) < 2:
                raise UserError(f"{self.registry_name}: domain folder {d} holds {len(paths)} images; need at least 2")
            self._paths += paths
            splits = {}
            for part, rows in zip(("in", "out"), holdout_split(len(paths), float(o["holdout_fraction"]),
                                                              seed_hash(int(o["seed"]), "holdout", i))):
                if len(rows) == 0:
                    raise UserError(f"{self.registry_name}: domain {d} has no '{part}' images with holdout_fraction "
                                    f"{o['holdout_fraction']}; add images or change holdout_fraction")
                assigned.append((f"{i}/{part}", ",".join(map(str, rows.tolist()))))
                sub = [paths[r] for r in rows]
                loader = image_loader(self.files, sub, train_tf, eval_tf)
                splits[part] = LazySplit(loader, {"y": labels[rows], "idx": torch.as_tensor(rows, dtype=torch.int64)})
            self.environments.append(Environment(name, splits))
        # the version covers the files' content and which rows each in/out split holds (the data seed and
        # holdout_fraction redraw those): sha256 over both digests, each kept beside it
        files = self.files.version(self._paths)
        splits = digest_pairs(assigned)
        self._version = {**files, "sha256": digest_pairs([("files", files["sha256"]), ("splits", splits)]),
                         "files_sha256": files["sha256"], "splits_sha256": splits}

    def version(self) -> str:
        return version_string(self._version)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classes": self.classes, "data": self._version}


IMAGE_FOLDER_PRESETS: dict[str, tuple[str, tuple[str, ...], int]] = {
    # name: (DomainBed's folder, DomainBed's environment names, CHECKPOINT_FREQ)
    "pacs": ("PACS", ("A", "C", "P", "S"), 300),
    "vlcs": ("VLCS", ("C", "L", "S", "V"), 300),
    "office_home": ("office_home", ("A", "C", "P", "R"), 300),
    "terra_incognita": ("terra_incognita", ("L100", "L38", "L43", "L46"), 300),
    "domain_net": ("domain_net", ("clip", "info", "paint", "quick", "real", "sketch"), 1000),
}

DATASETS.register("image_folder")(ImageFolderDataset)

for _name, (_folder, _envs, _freq) in IMAGE_FOLDER_PRESETS.items():
    DATASETS.register(_name)(type(_name.title().replace("_", ""), (ImageFolderDataset,), {
        "__doc__": f"DomainBed's {_folder} image folders (``<data-root>/{_folder}/<domain>/<class>/<image>``); "
                   f"environments {', '.join(_envs)}.",
        "__module__": __name__, "FOLDER": _folder, "ENVIRONMENTS": _envs, "EVAL_EVERY": _freq,
    }))  # fmt: skip
