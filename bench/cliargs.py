"""Argument types, the help formatter and the parser class shared by ``shiftbench``'s subcommands.

Kept free of heavy imports: every subcommand module imports this while the parser is built, and ``shiftbench
--help`` must not load torch.
"""

from __future__ import annotations

import argparse

from .errors import UserError


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already speaks of its default, the option is
    a flag or required, or its default is None (such options say in their help what happens without them)."""

    _FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction,
              argparse._CountAction)  # fmt: skip

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or not action.option_strings
            or action.required
            or isinstance(action, self._FLAGS)
            or action.default in (None, argparse.SUPPRESS)
        ):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(d) for d in default) or "none"
        return f"{text} (default: {str(default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`; subparsers inherit it."""

    def __init__(self, *args, **kwargs):
        given = kwargs.get("formatter_class") or HelpFormatter
        if not issubclass(given, HelpFormatter):  # e.g. RawDescriptionHelpFormatter: keep its layout, add defaults
            given = type(f"Defaults{given.__name__}", (given, HelpFormatter), {})
        kwargs["formatter_class"] = given
        super().__init__(*args, **kwargs)


def csv_ints(s: str) -> tuple[int, ...]:
    """``"0,2"`` -> ``(0, 2)``."""
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def csv(s: str) -> list[str]:
    """``"erm, irm"`` -> ``["erm", "irm"]``."""
    return [x.strip() for x in s.split(",") if x.strip()]


def callbacks(s: str) -> list[str]:
    """``drift,robust_eval:eps=0.3,steps=20,attest`` -> three names: a ``k=v`` piece belongs to the callback
    before it (settings of a ``name:k=v,...`` callback are themselves comma-separated)."""
    out: list[str] = []
    for piece in csv(s):
        if "=" in piece and ":" not in piece.split("=", 1)[0] and out and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    """``["a=1", "b = x"]`` -> ``{"a": "1", "b": "x"}``; an item without ``=`` is a UserError naming ``what``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{what} {item!r} must look like name=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def pack_size(s: str) -> str | int:
    """``--pack``: ``off``, ``auto`` or a pack size K >= 1 (K = 1 is ``off``)."""
    if s in ("off", "auto"):
        return s
    try:
        k = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected off, auto or a whole number of trials per pack, got {s!r}") \
            from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"a pack holds at least 1 trial (got {k}); use off, auto or K >= 1")
    return "off" if k == 1 else k
