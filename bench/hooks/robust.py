"""Robust evaluation for every method: accuracy under attack, per split, at every evaluation.

Name the callback in a spec's ``callbacks`` (suite YAML ``callbacks: [robust_eval]``). The settings live in the name,
so they are part of the trial's spec and hash, and need no option plumbing:

* ``robust_eval``: L∞ PGD, ε = 0.1, 20 steps of 2.5·ε/20, 2 random restarts (``adversarial`` trains with 7 steps and
  one start by default), on the first 500 examples of every split.
* ``robust_eval:<key>=<value>,...`` overrides any of :data:`SETTINGS` (``threat``, ``eps``, ``steps``, ``bounds``,
  ``examples``, ``key``, ...; ``shiftbench list callbacks`` prints each with its default), e.g.
  ``robust_eval:threat=l2,eps=0.5,key=robust_l2`` next to a plain ``robust_eval``.

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

from dataclasses import fields
from typing import Any

import torch

from shiftbench.attacks import Threat, parse_bounds, perturb
from shiftbench.hparams import NON_NEGATIVE, Rule, seed_hash
from shiftbench.registry import CALLBACKS
from shiftbench.settings import Setting
from shiftbench.callbacks import Callback, TrialRun
from shiftbench.data import input_range

NAME = "robust_eval"
SETTINGS: dict[str, Setting] = {
    "threat": Setting("linf", "linf or l2 (PGD in that ε-ball) or spatial (worst of k rotations/translations)"),
    "eps": Setting(0.1, "radius of the ε-ball (PGD)", NON_NEGATIVE),
    "steps": Setting(20, "PGD ascent steps", NON_NEGATIVE),
    "step_size": Setting(Threat.step_size, "PGD step (none: 2.5·eps/steps)", NON_NEGATIVE, type=float),
    "restarts": Setting(2, "independent attempts per example (PGD random starts, or k more spatial draws)",
                        Rule(">= 1", lambda v: v >= 1)),
    "random_start": Setting(int(Threat.random_start), "1: PGD starts from a uniform point of the ε-ball; 0: from "
                            "the clean input"),
    "bounds": Setting("auto", "valid input range lo:hi every attacked input is clipped to, none (unbounded) or auto "
                      "(the dataset's INPUT_RANGE, else the range of its inputs)"),
    "max_rotation": Setting(Threat.max_rotation, "spatial: largest rotation in degrees, either way", NON_NEGATIVE),
    "max_shift": Setting(Threat.max_shift, "spatial: largest translation per axis, as a fraction of the image side",
                         NON_NEGATIVE),
    "k": Setting(Threat.k, "spatial: random transforms tried per attempt", Rule(">= 1", lambda v: v >= 1)),
    "examples": Setting(500, "examples attacked per split, the first ones (0: every example)",
                        Rule(">= 0 (0 = every example)", lambda v: v >= 0)),
    "key": Setting("robust", "the metric's name in records (<split>_<key>_acc)",
                   Rule("a plain name (letters, digits, _)", str.isidentifier)),
}  # fmt: skip
"""The settings of ``robust_eval:<key>=<value>,...`` (``shiftbench list callbacks`` prints them)."""
_THREAT_FIELDS = {f.name for f in fields(Threat)} - {"kind", "bounds"}


def parse_settings(name: str) -> dict[str, Any]:
    """The settings of a ``robust_eval[:k=v,...]`` callback name, defaults filled in (``RobustEval.settings_of``).

    Raises:
        UserError: an unknown key or a value of the wrong type or range.
    """
    return RobustEval.settings_of(name)


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

    SETTINGS = SETTINGS

    def __init__(self, name: str | None = None):
        super().__init__(name or NAME)
        self.settings: dict[str, Any] = {}
        self.threat: Threat | None = None

    @classmethod
    def validate(cls, name: str, dataset_cls: type | None = None) -> None:
        # builds the threat (kind and bounds checked); "auto" bounds need the data, so none stands in here
        resolve_threat(cls.settings_of(name))

    def on_start(self, run: TrialRun) -> None:
        self.settings = self.settings_of(self.name)
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
                for b in split.eval_batches(min(n_max or run.eval_batch_size, run.eval_batch_size)):
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
