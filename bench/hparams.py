"""Hyperparameters: each plug-in declares a default and a random-search distribution in its own file.

Draws are seeded by (hparams seed, hyperparameter name) as in DomainBed, so adding a hyperparameter never
changes the draws of the others. ``hparams_seed == 0`` means the defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import UserError


def seed_hash(*parts: Any) -> int:
    """A stable 31-bit integer from any printable parts (Python's hash() is salted per process)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class Rule:
    """A condition a hyperparameter's value must meet, and how the error states it (``must be <text>``)."""

    text: str
    ok: Callable[[Any], bool]


POSITIVE = Rule("> 0", lambda v: v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)


def between(lo: float, hi: float) -> Rule:
    """lo <= value <= hi."""
    return Rule(f"between {lo} and {hi}", lambda v: lo <= v <= hi)


@dataclass(frozen=True)
class HParam:
    """One hyperparameter.

    Attributes:
        default: the value used when hparams_seed is 0; its type is the type a user's value must have.
        sample: draws a value from a seeded numpy RandomState.
        check: what a user's value must also meet (a numeric one is always refused when NaN or infinite). A
            redeclaration without a check (a dataset's own learning-rate range) keeps the one declared before it.
    """

    default: Any
    sample: Callable[[np.random.RandomState], Any]
    check: Rule | None = None


def log_uniform(lo_exp: float, hi_exp: float) -> Callable[[np.random.RandomState], float]:
    """10 ** U(lo_exp, hi_exp)."""
    return lambda r: float(10 ** r.uniform(lo_exp, hi_exp))


def log_uniform_int(lo_exp: float, hi_exp: float, base: float = 10) -> Callable[[np.random.RandomState], int]:
    """int(base ** U(lo_exp, hi_exp))."""
    return lambda r: int(base ** r.uniform(lo_exp, hi_exp))


def uniform(lo: float, hi: float) -> Callable[[np.random.RandomState], float]:
    return lambda r: float(r.uniform(lo, hi))


def choice(options: list) -> Callable[[np.random.RandomState], Any]:
    return lambda r: options[r.randint(len(options))]


def fixed(value: Any) -> Callable[[np.random.RandomState], Any]:
    return lambda r: value


def collect(*sources: Mapping[str, HParam]) -> dict[str, HParam]:
    """Merges declarations; later sources override earlier ones."""
    out: dict[str, HParam] = {}
    for s in sources:
        for name, hp in s.items():
            if hp.check is None and name in out and out[name].check is not None:
                hp = dataclasses.replace(hp, check=out[name].check)
            out[name] = hp
    return out


def resolve(space: Mapping[str, HParam], hparams_seed: int, overrides: Mapping[str, Any] | None = None) -> dict:
    """Draws (or takes defaults of) every hyperparameter in ``space``, then applies user overrides.

    Raises:
        UserError: an override names a hyperparameter the space does not have.
    """
    out = {}
    for name in sorted(space):
        hp = space[name]
        out[name] = hp.default if hparams_seed == 0 else hp.sample(np.random.RandomState(seed_hash(hparams_seed, name)))
    for name, value in (overrides or {}).items():
        if name not in space:
            import difflib

            near = difflib.get_close_matches(name, space, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"unknown hyperparameter {name!r}{hint}; known: {', '.join(sorted(space))}")
        out[name] = validate(name, coerce(value, space[name].default, name), space[name])
    return out


def validate(name: str, value: Any, hp: HParam) -> Any:
    """A user's value of ``hp`` if it has the default's type (an integral float passes for an int), is finite
    where numeric and meets ``hp.check``.

    Raises:
        UserError: naming the hyperparameter, the value and what it must be.
    """
    like = hp.default

    def refuse(what: str) -> UserError:
        return UserError(f"hyperparameter {name}={value!r} must be {what} (default {like!r})")

    return conform(value, type(like), () if hp.check is None else (hp.check,), refuse)


TYPE_WORDS: dict[type, str] = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
"""How messages name the value types of hyperparameters, dataset options and callback settings."""


def conform(value: Any, kind: type, rules: Sequence[Rule], refuse: Callable[[str], UserError]) -> Any:
    """``value`` if it is of type ``kind`` (an integral float passes for an int and becomes one; a bool is not a
    number), finite where numeric, and meets every rule: the one validator of hyperparameters, dataset options
    and callback settings (:mod:`shiftbench.settings`). Other kinds are not type-checked.

    Raises:
        UserError: ``refuse(what)``, where the value must be ``what``.
    """
    if issubclass(kind, bool):
        if not isinstance(value, bool):
            raise refuse(TYPE_WORDS[bool])
        return value
    if issubclass(kind, (int, float)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise refuse("a number")
        if not math.isfinite(value):
            raise refuse("a finite number")
        if issubclass(kind, int) and not isinstance(value, numbers.Integral):
            if not float(value).is_integer():
                raise refuse("a whole number")
            value = int(value)
    elif issubclass(kind, str) and not isinstance(value, str):
        raise refuse(TYPE_WORDS[str])
    for rule in rules:
        if not rule.ok(value):
            raise refuse(rule.text)
    return value


def parse_text(value: str, kind: type) -> Any:
    """A CLI string as a value of type ``kind`` (bool: 1/true/yes or 0/false/no); other kinds keep the string.

    Raises:
        ValueError: the text does not read as that type.
    """
    if issubclass(kind, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(value)
    if issubclass(kind, int):
        return int(value)
    if issubclass(kind, float):
        return float(value)
    return value


def coerce(value: Any, like: Any, name: str) -> Any:
    """Converts a CLI string to the type of the default."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    try:
        return parse_text(value, type(like))
    except ValueError:
        raise UserError(f"hyperparameter {name}={value!r} is not {TYPE_WORDS[type(like)]}") from None
