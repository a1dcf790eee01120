"""Hyperparameters: each plug-in declares a default and a random-search distribution in its own file.

Draws are seeded by (hparams seed, hyperparameter name) as in DomainBed, so adding a hyperparameter never
changes the draws of the others. ``hparams_seed == 0`` means the defaults.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .errors import UserError


def seed_hash(*parts: Any) -> int:
    """A stable 31-bit integer from any printable parts (Python's hash() is salted per process)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class HParam:
    """One hyperparameter.

    Attributes:
        default: the value used when hparams_seed is 0.
        sample: draws a value from a seeded numpy RandomState.
    """

    default: Any
    sample: Callable[[np.random.RandomState], Any]


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
        out.update(s)
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
        default = space[name].default
        out[name] = coerce(value, default, name)
    return out


def coerce(value: Any, like: Any, name: str) -> Any:
    """Converts a CLI string to the type of the default."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    try:
        if isinstance(like, bool):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except ValueError:
        raise UserError(f"hyperparameter {name}={value!r} is not a {type(like).__name__}") from None
    return value
