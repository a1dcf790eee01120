"""What ``shiftbench list`` prints, without importing the plug-ins on every call.

Importing the built-in plug-ins loads torch (about 2 CPU-seconds). The catalog (each registered name with its
description and the few attributes ``list`` shows) is built once by importing them and cached in
``$XDG_CACHE_HOME/shiftbench/`` (default ``~/.cache/shiftbench/``) under a fingerprint of every source file of the
package (path, size, modification time) and of the installed entry points of the plug-in groups. Any edit, install
or new external plug-in changes the fingerprint, so a stale catalog is never read; a cache that cannot be read or
written is ignored (the catalog is then built in-process).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping

KINDS = ("methods", "datasets", "models", "callbacks")
"""The registries ``list`` shows, by their plural names (also the entry-point groups ``shiftbench.<kind>``)."""
_VERSION = 2  # bump when the catalog's shape changes


def description(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line (its whole summary, never cut mid-sentence)."""
    paragraph = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    return " ".join(paragraph)


def settings_of(declared: Mapping[str, Any]) -> list[dict[str, str]]:
    """Declared options or settings (:class:`shiftbench.settings.Setting`) as catalog rows: name, default as one
    types it after ``key=``, help."""
    from .settings import as_settings, shown

    return [{"name": k, "default": shown(s.default), "help": s.help} for k, s in sorted(as_settings(declared).items())]


def settings_lines(entry: Mapping[str, Any]) -> list[str]:
    """What ``list`` prints under a catalog entry: one indented line per option (a dataset's) or setting (a
    callback's), ``key=default`` and its help; none for other entries."""
    rows = entry.get("options") or entry.get("settings") or []
    return [f"      {row['name'] + '=' + row['default']:26s} {row['help']}".rstrip() for row in rows]


def _source_roots() -> list[Path]:
    roots = []
    for name in ("shiftbench", "shiftbench.methods", "shiftbench.datasets"):
        spec = find_spec(name)
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return roots


def fingerprint() -> str:
    """A digest of the package's source files and of the plug-in entry points installed now."""
    h = hashlib.sha256(f"v{_VERSION}".encode())
    for root in _source_roots():
        for path in sorted(root.rglob("*.py")):
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for kind in KINDS:
        for ep in sorted(entry_points(group=f"shiftbench.{kind}"), key=lambda e: (e.name, e.value)):
            h.update(f"{kind}\0{ep.name}\0{ep.value}\n".encode())
    return h.hexdigest()[:32]


def build() -> dict[str, list[dict[str, Any]]]:
    """The catalog, from the live registries (imports every plug-in)."""
    from .registry import CALLBACKS, DATASETS, METHODS, MODELS

    out: dict[str, list[dict[str, Any]]] = {}
    out["methods"] = [{"name": n, "doc": description(METHODS.get(n).__doc__),
                       "tasks": list(METHODS.get(n).TASKS) if METHODS.get(n).TASKS is not None else None}
                      for n in METHODS.names()]  # fmt: skip
    out["datasets"] = [{"name": n, "doc": description(DATASETS.get(n).__doc__), "task": DATASETS.get(n).TASK,
                        "options": settings_of(DATASETS.get(n).OPTIONS)} for n in DATASETS.names()]  # fmt: skip
    out["models"] = [{"name": n, "doc": description(MODELS.get(n).__doc__)} for n in MODELS.names()]
    # settings are given as name:k=v, so they belong to the family entry ("robust_eval:")
    out["callbacks"] = [{"name": n, "doc": description(CALLBACKS.get(n).__doc__),
                         "settings": settings_of(CALLBACKS.get(n).SETTINGS) if n.endswith(":") else []}
                        for n in CALLBACKS.names()]  # fmt: skip
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shiftbench"


def load() -> dict[str, list[dict[str, Any]]]:
    """The catalog: from the cache when its fingerprint matches, else built and cached."""
    path = _cache_dir() / f"catalog-{fingerprint()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    catalog = build()
    try:
        from .io import atomic_write

        for old in path.parent.glob("catalog-*.json"):  # earlier fingerprints are dead weight
            old.unlink(missing_ok=True)
        atomic_write(path, lambda f: json.dump(catalog, f, indent=1))
    except OSError:
        pass
    return catalog
