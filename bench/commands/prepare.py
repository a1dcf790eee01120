"""``shiftbench prepare --params params.yaml --out data/``: materialise the datasets a sweep names, with a manifest.

For every dataset in the sweep file's ``datasets`` (with its ``dataset_options``):

- a dataset read from files (``wilds:<name>``, ``image_folder`` and its presets: their folder; ``colored_mnist``
  and ``rotated_mnist``: their four IDX files) is copied from ``--data-root`` into ``OUT`` with the same layout
  (hard links where the file system allows), so a sweep run with ``--data-root OUT`` reads exactly the prepared
  files;
- a generated dataset (the embedded digits, ...) is built and its tensors written as ``.npy`` files under
  ``OUT/<name>/env<i>_<split>/``, next to its content version.

``OUT/manifest.json`` lists the sha256 of every file written (keys sorted, no timestamps, so an unchanged dataset
gives a byte-identical manifest and DVC sees nothing to rerun). Loaders reading from a folder with a manifest
check each file against it. ``--check`` re-hashes every file of an existing manifest and names the first one whose
digest differs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import atomic_write


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="materialise the datasets of a sweep file into a folder with a manifest",
                              description=__doc__.split("\n\n", 1)[0])  # fmt: skip
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="sweep file naming the datasets")
    p.add_argument("--out", type=Path, default=Path("data"), help="folder to write (default: data)")
    p.add_argument("--data-root", default=os.environ.get("SHIFTBENCH_DATA"),
                   help="where real datasets are read from (default: $SHIFTBENCH_DATA; unset: embedded datasets only)")
    p.add_argument("--download", action="store_true", help="let loaders download missing datasets")
    p.add_argument("--check", action="store_true", help="only verify OUT against its manifest")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..datasets.image_folder import MANIFEST

    if a.check:
        n = check_manifest(a.out)
        print(f"{a.out / MANIFEST}: {n} files match", file=sys.stderr)
        return 0
    manifest = prepare(a.params, a.out, a.data_root, a.download)
    sizes = ", ".join(f"{k}: {v['files']} files" for k, v in manifest["datasets"].items())
    print(f"prepared {a.out} ({sizes}); manifest {a.out / MANIFEST}", file=sys.stderr)
    return 0


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _source_folder(cls, root: str | None, options: dict) -> Path | None:
    """The folder a file-backed dataset reads (None for generated datasets)."""
    for attr in ("data_dir", "folder_of"):
        fn = getattr(cls, attr, None)
        if callable(fn):
            return Path(fn(root, options))
    return None


def prepare(params: Path, out: Path, root: str | None, download: bool = False) -> dict[str, Any]:
    """Materialises the datasets of ``params`` into ``out`` and writes the manifest; returns it."""
    import numpy as np

    from ..config import load_suite
    from ..data import TensorSplit
    from ..datasets.image_folder import MANIFEST, MANIFEST_SCHEMA, digest_pairs
    from ..io import sha256_file
    from ..registry import DATASETS
    from ..data import load_dataset

    sweep = load_suite(str(params))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    datasets: dict[str, Any] = {}
    for name in sweep.datasets:
        cls = DATASETS.get(name)
        options = cls.resolve_options(sweep.dataset_options.get(name, {}))
        source = _source_folder(cls, root, options)
        entry: dict[str, Any] = {"options": options}
        if callable(getattr(cls, "data_files", None)):  # named files under the root (MNIST's IDX files)
            cls.check(root, options, download)
            base = Path(str(root)).expanduser().resolve()
            written = []
            for src in cls.data_files(root, options):
                target = out / src.resolve().relative_to(base)
                _link_or_copy(src, target)
                written.append(target)
            entry.update(folder=".", kind="files")
        elif source is not None:
            cls.check(root, options, download)
            try:
                rel = source.resolve().relative_to(Path(str(root)).expanduser().resolve())
            except ValueError:
                raise UserError(f"prepare copies {name} from under --data-root ({root}); {source} is outside it") \
                    from None
            dest = out / rel
            written = []
            for src in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
                target = dest / src.relative_to(source)
                _link_or_copy(src, target)
                written.append(target)
            entry.update(folder=rel.as_posix(), kind="files")
        else:
            ds = load_dataset(name, options, root, download)
            dest = out / name.replace(":", "_")
            if dest.exists():
                shutil.rmtree(dest)
            written = []
            for i, env in enumerate(ds.environments):
                for part, split in env.splits.items():
                    if not isinstance(split, TensorSplit):
                        continue
                    for key, t in split.tensors.items():
                        target = dest / f"env{i}_{part}" / f"{key}.npy"
                        target.parent.mkdir(parents=True, exist_ok=True)
                        atomic_write(target, lambda f, t=t: np.save(f, t.cpu().numpy(), allow_pickle=False), mode="wb")
                        written.append(target)
            entry.update(folder=dest.relative_to(out).as_posix(), kind="generated", version=ds.version(),
                         environments=ds.env_names)  # fmt: skip
        digests = {p.relative_to(out).as_posix(): sha256_file(p) for p in written}
        files.update(digests)
        entry.update(files=len(digests), sha256=digest_pairs(list(digests.items())))
        datasets[name] = entry
    manifest = {"schema": MANIFEST_SCHEMA, "datasets": datasets, "files": dict(sorted(files.items()))}
    # schema first (loaders recognise the file by it), every mapping in a fixed order: byte-identical reruns
    atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def check_manifest(out: Path) -> int:
    """Re-hashes every file of ``out``'s manifest; raises UserError naming the first missing or changed file."""
    from ..datasets.image_folder import MANIFEST, read_manifest
    from ..io import sha256_file

    path = Path(out) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} does not exist; run shiftbench prepare first")
    manifest = read_manifest(str(path), path.stat().st_mtime_ns)  # the loaders' parse and schema check
    for rel, want in manifest["files"].items():
        f = Path(out) / rel
        if not f.is_file():
            raise UserError(f"{f} is listed in {path} but missing; rerun shiftbench prepare")
        got = sha256_file(f)
        if got != want:
            raise UserError(f"{f} does not match {path} (sha256 {got[:12]}…, manifest {want[:12]}…); "
                            "restore it or rerun shiftbench prepare")
    return len(manifest["files"])
