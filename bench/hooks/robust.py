"""Robust evaluation for every method: accuracy under attack, per split, at every evaluation.

Name the callback in a spec's ``callbacks`` (suite YAML ``callbacks: [robust_eval]``). The settings live in the name,
so they are part of the trial's spec and hash, and need no option plumbing:

* ``robust_eval``: L∞ PGD, ε = 0.1, 20 steps of 2.5·ε/20, 2 random restarts (``adversarial`` trains with 7 steps and
  one start by default), on the first 500 examples of every split.
* ``robust_eval:<key>=<value>,...`` overrides any of ``threat`` (linf | l2 | spatial), ``eps``, ``steps``,
  ``step_size``, ``restarts``, ``random_start`` (0/1), ``bounds`` (``lo:hi``, ``none`` or ``auto``), ``max_rotation``,
  ``max_shift``, ``k`` (spatial), ``examples`` (per split; 0 = all) and ``key`` (the metric's name, default
  ``robust``), e.g. ``robust_eval:threat=l2,eps=0.5,key=robust_l2`` next to a plain ``robust_eval``.

Each evaluation record gains ``<split>_<key>_acc`` and ``<split>_<key>_loss`` for every evaluated split
(``env{i}_in``, ``env{i}_out``, ...) and the settings as ``<key>_threat``, ``<key>_eps``, ...; ``final.json`` gets
the settings under ``robust_eval``. The attack runs at every evaluation, not only the last, because the leaderboard
reports it at the checkpoint a selection rule picks by clean accuracy; the ``examples`` cap keeps that affordable
(a fixed subset, so numbers are comparable across steps and methods).

The valid input range (``bounds=auto``) is the dataset's ``INPUT_RANGE`` when it declares one, else the smallest box
holding all of the dataset's inputs. Random starts come from a generator seeded by (trial seed, key, step, split),
so the attack neither depends on nor disturbs the training random stream.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Any

import torch

from shiftbench.attacks import Threat, parse_bounds, perturb
from shiftbench.errors import UserError
from shiftbench.hparams import seed_hash
from shiftbench.registry import CALLBACKS
from shiftbench.callbacks import Callback, TrialRun
from shiftbench.data import input_range

NAME = "robust_eval"
DEFAULT = {"threat": "linf", "eps": 0.1, "steps": 20, "restarts": 2, "examples": 500, "key": "robust",
           "bounds": "auto"}
_THREAT_FIELDS = {f.name for f in fields(Threat)} - {"kind", "bounds"}
_INTS = ("steps", "restarts", "k", "examples", "random_start")


def parse_settings(name: str) -> dict[str, Any]:
    """The settings of a ``robust_eval[:k=v,...]`` callback name, defaults filled in.

    Raises:
        UserError: an unknown key or a value of the wrong type.
    """
    out = dict(DEFAULT)
    _, _, rest = name.partition(":")
    known = {"threat", "bounds", "examples", "key"} | _THREAT_FIELDS
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, sep, v = item.partition("=")
        if not sep or k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"callback {name!r}: bad setting {item!r}{hint}; write key=value with keys "
                            f"{', '.join(sorted(known))}")
        try:
            if k in ("threat", "bounds", "key"):
                out[k] = v
            elif k in _INTS:
                out[k] = int(v)
            else:
                out[k] = float(v)
        except ValueError:
            raise UserError(f"callback {name!r}: {k}={v!r} is not {'an integer' if k in _INTS else 'a number'}")\
                from None
    if not str(out["key"]).isidentifier():
        raise UserError(f"callback {name!r}: key={out['key']!r} must be a plain name (letters, digits, _)")
    if out["examples"] < 0:
        raise UserError(f"callback {name!r}: examples must be >= 0 (0 = every example)")
    return out


def resolve_threat(settings: dict[str, Any], auto_bounds: tuple[float, float] | None = None) -> Threat:
    """The threat of parsed settings; ``auto_bounds`` is the valid range that ``bounds=auto`` stands for."""
    bounds = auto_bounds if settings["bounds"] == "auto" else parse_bounds(settings["bounds"])
    kw = {k: settings[k] for k in _THREAT_FIELDS if k in settings}
    if "random_start" in kw:
        kw["random_start"] = bool(kw["random_start"])
    return Threat(kind=settings["threat"], bounds=None if bounds is None else tuple(bounds), **kw)


class RobustEval(Callback):
    """Accuracy under attack for every split at every evaluation (see the module docstring for the settings).

    Args:
        name: ``robust_eval[:settings]`` (the trainer passes the spec's name); None: the defaults.
    """

    def __init__(self, name: str | None = None):
        super().__init__(name or NAME)
        self.settings: dict[str, Any] = {}
        self.threat: Threat | None = None

    @classmethod
    def validate(cls, name: str, dataset_cls: type | None = None) -> None:
        # builds the threat (kind, eps, steps, bounds checked); "auto" bounds need the data, so none stands in here
        resolve_threat(parse_settings(name))

    def on_start(self, run: TrialRun) -> None:
        self.settings = parse_settings(self.name)
        auto = None
        if self.settings["bounds"] == "auto":  # the trainer's rule for methods, over every evaluated split
            auto = input_range(run.dataset, list(run.dataset.eval_splits().values()), run.task.input_keys)
        self.threat = resolve_threat(self.settings, auto)

    def on_eval(self, run: TrialRun, record: dict[str, Any]) -> None:
        key, n_max = self.settings["key"], self.settings["examples"]
        alg, task = run.algorithm, run.task
        alg.eval()
        try:
            for split_name, split in run.dataset.eval_splits().items():
                g = torch.Generator(device=run.device)
                g.manual_seed(seed_hash(run.spec.seed, NAME, key, record.get("step"), split_name))
                correct, losses, seen = [], [], 0
                for b in split.eval_batches(min(n_max or run.options.eval_batch_size, run.options.eval_batch_size)):
                    b = {k: v.to(run.device) for k, v in b.items()}
                    if n_max:
                        b = {k: v[: n_max - seen] for k, v in b.items()}
                    adv = perturb(alg.scores, task, b, self.threat, g)
                    with torch.no_grad():
                        out = task.outputs(alg.scores(adv), adv)
                    correct.append(out["correct"].float().cpu())
                    losses.append(out["loss"].float().cpu())
                    seen += len(out["correct"])
                    if n_max and seen >= n_max:
                        break
                record[f"{split_name}_{key}_acc"] = float(torch.cat(correct).mean())
                record[f"{split_name}_{key}_loss"] = float(torch.cat(losses).mean())
        finally:
            alg.train()
        record.update({f"{key}_{k}": v for k, v in self.describe().items()})

    def describe(self) -> dict[str, Any]:
        """The attack's settings (for records and final.json)."""
        bounds = self.threat.bounds
        return {**self.threat.describe(), "examples": self.settings["examples"],
                "bounds": "none" if bounds is None else f"{bounds[0]:g}:{bounds[1]:g}"}

    def on_end(self, run: TrialRun, final: dict[str, Any]) -> None:
        final.setdefault(NAME, []).append({"name": self.name, "key": self.settings["key"], **self.describe()})


CALLBACKS.register(NAME)(RobustEval)


@CALLBACKS.register(NAME + ":")
class RobustEvalWith(RobustEval):
    """``robust_eval:<key>=<value>,...``: robust evaluation with other settings (the family of names)."""
