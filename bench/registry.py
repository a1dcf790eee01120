"""One decorator registry per plug-in kind; it is the only list of names.

Built-in plug-ins are the modules of a package, or of several packages and modules (imported on first lookup);
external ones come through the entry-point group ``shiftbench.<kind>s``.
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
        package: the package whose modules hold the built-in plug-ins, or a tuple of packages and modules (a module
            is imported itself; a package, every module in it whose name does not start with ``_``).
    """

    def __init__(self, kind: str, package: str | tuple[str, ...]):
        self.kind = kind
        self.package = package
        self.packages: tuple[str, ...] = (package,) if isinstance(package, str) else tuple(package)
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
        for package in self.packages:
            pkg = importlib.import_module(package)
            for mod in pkgutil.iter_modules(getattr(pkg, "__path__", [])):  # a plain module has no __path__
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{package}.{mod.name}")
        for ep in entry_points(group=f"shiftbench.{self.kind}s"):
            ep.load()

    def pop(self, name: str) -> type[T] | None:
        """Unregisters ``name`` (a plug-in registered for a while, as tests do) and returns it; None if unknown."""
        return self._items.pop(name, None)

    def items(self) -> list[tuple[str, type[T]]]:
        """(name, plug-in) of every registered plug-in, in registration order (built-ins loaded first)."""
        self._load()
        return list(self._items.items())

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
TASKS: Registry = Registry("task", ("shiftbench.tasks", "shiftbench.coordination.task"))
"""Task types: classification and preference in shiftbench.tasks, coordination beside its games."""
MODELS: Registry = Registry("model", "shiftbench.models")
SECTIONS: Registry = Registry("section", ("shiftbench.hooks", "shiftbench.coordination.report",
                                          "shiftbench.attest.report"))
"""Report sections (:class:`shiftbench.report.ReportSection`): a callback's section lives in its own file in
shiftbench.hooks; the coordination and attestation sections in those packages' ``report`` modules."""
