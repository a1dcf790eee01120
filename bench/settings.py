"""Settings: dataset options and callback settings, each declared once with its default, type, help and checks.

A plug-in declares a dict of :class:`Setting` (a dataset's ``OPTIONS``, a callback's ``SETTINGS``); :func:`resolve`
checks what a user gave against it, with the validator hyperparameters use (:func:`shiftbench.hparams.conform`),
and returns plain values, defaults filled in; ``shiftbench list`` prints the declarations. The type of a setting is
the type of its default; strings from the command line are read as that type, as ``--hparams`` values are.

Messages name where the value came from, the value, what it must be and the default, e.g.
``dataset colored_digits: option env_size=-3 must be > 0 (default 4000)``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import UserError
from .hparams import TYPE_WORDS, Rule, conform, parse_text


@dataclass(frozen=True)
class Setting:
    """One option or setting.

    Attributes:
        default: the value when the user gives none; its type is the type a user's value must have.
        help: what it does, in one or two sentences (``shiftbench list`` prints it).
        check: what a user's value must also meet (one rule or several); a numeric value must always be finite.
        choices: the only values allowed, if the setting is one of a few.
        type: the value type, needed only when the default is None (then None is allowed too).
    """

    default: Any
    help: str
    check: Rule | tuple[Rule, ...] | None = None
    choices: tuple[Any, ...] | None = None
    type: type | None = None

    def __post_init__(self) -> None:
        if self.default is None and self.type is None:
            raise TypeError("a Setting whose default is None must name its type")

    @property
    def kind(self) -> type:
        """The value type."""
        return self.type or type(self.default)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule a value must meet, choices included."""
        rules = () if self.check is None else (self.check,) if isinstance(self.check, Rule) else tuple(self.check)
        if self.choices is not None:
            allowed = self.choices
            rules += (Rule(f"one of {', '.join(shown(c) for c in allowed)}", lambda v: v in allowed),)
        return rules

    def with_default(self, default: Any) -> "Setting":
        """The same setting with another default (a dataset's own size, say)."""
        return dataclasses.replace(self, default=default)

    def with_help(self, help: str) -> "Setting":
        """The same setting described for one dataset (what its seed draws, say)."""
        return dataclasses.replace(self, help=help)


def shown(value: Any) -> str:
    """A value as a user types it after ``key=`` on the command line (``true``, ``0.2``, ``''`` for empty text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        return value if value else "''"
    return repr(value)


def as_settings(declared: Mapping[str, Any]) -> dict[str, Setting]:
    """A declaration dict with any plain default (an external plug-in's ``OPTIONS = {"n": 300}``) made a Setting
    without help."""
    return {k: v if isinstance(v, Setting) else Setting(v, "") for k, v in declared.items()}


def with_defaults(declared: Mapping[str, Setting], **defaults: Any) -> dict[str, Setting]:
    """``declared`` with other defaults for the named settings (each must be declared there)."""
    unknown = set(defaults) - set(declared)
    if unknown:
        raise KeyError(f"not declared: {sorted(unknown)}")
    return {k: s.with_default(defaults[k]) if k in defaults else s for k, s in declared.items()}


def defaults(declared: Mapping[str, Any]) -> dict[str, Any]:
    """The default of every setting."""
    return {k: s.default for k, s in as_settings(declared).items()}


def resolve(declared: Mapping[str, Any], given: Mapping[str, Any], where: str, noun: str = "option") -> dict[str, Any]:
    """Every declared setting's value: the user's (read from text if it is a string, then validated) or the
    default. This is the one place dataset options and callback settings are validated.

    Args:
        declared: name -> :class:`Setting` (plain defaults are accepted, see :func:`as_settings`).
        given: the user's values; strings are read as the default's type.
        where: what they belong to, for messages (``dataset colored_digits``, ``callback 'robust_eval:eps=2'``).
        noun: what one of them is called (``option``, ``setting``).

    Raises:
        UserError: an unknown name (with the nearest known one), text that does not read as the type, a value
            of the wrong type or one that fails a rule.
    """
    decl = as_settings(declared)
    for key in given:
        if key not in decl:
            near = difflib.get_close_matches(str(key), decl, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"{where}: bad {noun} {f'{key}={shown(given[key])}'!r}{hint}: unknown {noun} {key!r}; "
                            f"known: {', '.join(sorted(decl)) or 'none'}")
    out = {}
    for key, s in decl.items():
        if key not in given:
            out[key] = s.default
            continue
        value = given[key]
        if isinstance(value, str) and not issubclass(s.kind, str):
            if s.default is None and value.lower() == "none":
                value = None
            else:
                try:
                    value = parse_text(value, s.kind)
                except ValueError:
                    word = TYPE_WORDS.get(s.kind, s.kind.__name__)
                    raise UserError(f"{where}: {noun} {key}={value!r} is not {word}") from None
        if value is None and s.default is None:
            out[key] = None
            continue

        def refuse(what: str, key: str = key, value: Any = value, s: Setting = s) -> UserError:
            return UserError(f"{where}: {noun} {key}={value!r} must be {what} (default {s.default!r})")

        out[key] = conform(value, s.kind, s.rules, refuse)
    return out


def parse_pairs(text: str, where: str, known: Mapping[str, Any]) -> dict[str, str]:
    """``k=v,k=v`` (a callback name's settings) as a dict of strings; :func:`resolve` reads and checks them.

    Raises:
        UserError: an item that is not ``key=value``.
    """
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep:
            raise UserError(f"{where}: bad setting {item!r}; write key=value with keys "
                            f"{', '.join(sorted(known)) or '(none: this callback has no settings)'}")
        out[k.strip()] = v.strip()
    return out
