"""Code version: which code produced a result (git commit when there is one, and a digest of the source)."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import shiftbench


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over every .py file of the installed shiftbench package (works without git, e.g. `pip install .`)."""
    import shiftbench.datasets
    import shiftbench.methods

    h = hashlib.sha256()
    for pkg in (shiftbench, shiftbench.methods, shiftbench.datasets):
        root = Path(pkg.__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(f"{pkg.__name__}/{p.relative_to(root)}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str | None, bool]:
    """(commit, dirty) of the repository the source lives in, or (None, False)."""
    root = Path(shiftbench.__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        if not commit:
            return None, False
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=5,
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, False


def code_version() -> str:
    commit, dirty = git_commit()
    src = source_digest()[:12]
    if commit:
        return f"{shiftbench.__version__}+g{commit[:12]}{'.dirty' if dirty else ''}.src{src}"
    return f"{shiftbench.__version__}+src{src}"
