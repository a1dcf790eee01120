"""One decorator registry per plug-in kind; it is the only list of names.

Built-in plug-ins are the modules of a package (imported on first lookup); external ones come through the
entry-point group ``shiftbench.<kind>s``.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase names to plug-in classes of one base type.

    Args:
        kind: what the plug-ins are ("method", "dataset", ...), used in messages and the entry-point group.
        package: the package whose modules hold the built-in plug-ins.
    """

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self.package = package
        self._items: dict[str, type[T]] = {}
        self._loaded = False
        self.base: type | None = None

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: registers ``cls`` under ``name``; rejects duplicates and wrong base classes."""

        def deco(cls: type[T]) -> type[T]:
            if name != name.lower():
                raise ValueError(f"{self.kind} names are lowercase: {name!r}")
            if self.base is not None and not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} {name!r} must subclass {self.base.__name__}")
            if name in self._items and self._items[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._items[name].__module__}")
            self._items[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")
        for ep in entry_points(group=f"shiftbench.{self.kind}s"):
            ep.load()

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> type[T]:
        """Looks a name up; an unknown one raises a UserError with the nearest names."""
        self._load()
        base, _, _ = name.partition(":")  # "wilds:waterbirds" style names resolve on their family
        for key in (name, base + ":") if ":" in name else (name,):
            if key in self._items:
                return self._items[key]
        near = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
        raise UserError(f"unknown {self.kind} {name!r}: {hint}known: {', '.join(sorted(self._items))}")

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


METHODS: Registry = Registry("method", "shiftbench.methods")
DATASETS: Registry = Registry("dataset", "shiftbench.datasets")
CALLBACKS: Registry = Registry("callback", "shiftbench.hooks")
TASKS: Registry = Registry("task", "shiftbench.tasks")
MODELS: Registry = Registry("model", "shiftbench.models")
