"""Report sections: the :class:`Section` a plug-in contributes and the registry glue that finds and orders them.

A section is registered in :data:`shiftbench.registry.SECTIONS`, the same :class:`~shiftbench.registry.Registry` as
every other plug-in kind: built-ins live in the modules the registry loads (a callback's section in the callback's
own file in ``shiftbench.hooks``), external ones come through the entry-point group ``shiftbench.sections``. The
report imports none of them by name: :func:`build_sections` asks the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ..registry import SECTIONS

Trial = dict[str, Any]


@dataclass(frozen=True)
class Section:
    """An extra part of the report contributed by another module (drift statistics, attestations, ...).

    Attributes:
        key: stable key of the section in report.json and metrics.json.
        title: heading.
        markdown: body in Markdown (leaderboard.md; also printed to the terminal unless ``terminal`` is set).
        html: body in HTML (escaped by the contributor).
        metrics: machine-readable content for report.json.
        files: extra files to write, relative path -> text or bytes.
        terminal: a one-line summary printed to the terminal instead of ``markdown`` (a long table belongs in the
            files, not above the leaderboard); None: the terminal shows ``markdown``.
        numbers: the section's entry in metrics.json (numbers only); None: the numeric leaves of ``metrics``
            (see :func:`shiftbench.report.numbers_only`).
    """

    key: str
    title: str
    markdown: str
    html: str
    metrics: Any = None
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    terminal: str | None = None
    numbers: Mapping[str, Any] | None = None


class ReportSection:
    """Base of a registered report section: ``build`` reads only the trials' records and files.

    Sections appear after the leaderboard tables in ascending :attr:`ORDER`, then by name, whatever was imported
    first.
    """

    ORDER: ClassVar[float] = 100.0
    """Place in the report; the built-ins use 10 (drift) to 50 (attestation), so 100 puts a new one after them."""
    registry_name: ClassVar[str]

    def build(self, trials: Sequence[Trial]) -> Section | None:
        """The section for these done trials, or None when it has nothing to say about them."""
        raise NotImplementedError


SECTIONS.base = ReportSection


def report_section(key: str, order: float = ReportSection.ORDER) -> Callable[[Any], Any]:
    """Decorator registering a report section under ``key`` in :data:`shiftbench.registry.SECTIONS`.

    It takes a :class:`ReportSection` subclass (registered as it is; ``order`` is then its ``ORDER``) or a function
    ``fn(trials) -> Section | None``, which is wrapped in one with that ``order`` and returned unchanged.
    """

    def deco(obj: Any) -> Any:
        if isinstance(obj, type):
            return SECTIONS.register(key)(obj)
        cls = type(f"{obj.__name__}_section", (ReportSection,),
                   {"ORDER": order, "build": lambda self, trials: obj(trials), "__doc__": obj.__doc__,
                    "__module__": obj.__module__})  # fmt: skip
        SECTIONS.register(key)(cls)
        return obj

    return deco


def build_sections(trials: Sequence[Trial]) -> list[Section]:
    """Every registered section that has something to say about these trials, in report order."""
    classes = sorted(SECTIONS.items(), key=lambda kv: (kv[1].ORDER, kv[0]))
    return [s for s in (cls().build(trials) for _, cls in classes) if s is not None]
