"""File helpers: atomic writes (a temporary file in the same folder, fsync'd, then renamed over the target),
JSON reading and writing, and file digests. JSON-lines files are read by ``records.read_jsonl`` (one torn-line
policy)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file(path: Path, data: str | bytes) -> None:
    """Writes ``data`` (str as UTF-8) atomically."""
    atomic_write(path, lambda f: f.write(data.encode("utf-8") if isinstance(data, str) else data), mode="wb")


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1, sort_keys=True, default=_jsonable))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.writelines(json.dumps(r, sort_keys=True, default=_jsonable) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuses an output folder that can never be written, before anything is created.

    The folder may exist (then it must be a folder we can write in) or not (then its nearest existing ancestor
    must be a folder we can write in, as ``mkdir -p`` needs).

    Raises:
        UserError: the path is a file, an ancestor is a file, or the folder (or that ancestor) is not writable.
    """
    from .errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder path (new or existing)")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.exists():
        probe = Path(".")
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, so no folder can be made under it; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {probe} (permission denied or read-only); "
                        f"choose a folder you can write to")  # fmt: skip
    return path


class CreatedDirs:
    """Remembers which folders of ``path`` (it and its missing ancestors) did not exist, so that a run refused early
    can remove exactly those, while still empty, and leave nothing behind (``remove_if_empty``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.missing: list[Path] = []
        p = self.path
        while not p.exists() and p != p.parent:
            self.missing.append(p)  # deepest first
            p = p.parent

    def remove_if_empty(self) -> None:
        """Removes the folders this run created, deepest first, stopping at the first that is not empty."""
        for p in self.missing:
            try:
                p.rmdir()  # only ever removes an empty folder
            except FileNotFoundError:
                continue
            except OSError:
                return
