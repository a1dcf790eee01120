"""The ``coordination`` task type: an example is a partner, its score is the return the learner earns with it.

The task registry loads this module beside ``shiftbench.tasks`` (registry.TASKS), so the type is listed in any
process, whether or not a coordination dataset was imported. Scores are produced by playing, which only a coordination method can do (it holds the
learner and the game); this task turns them into the harness's per-example outputs:

- ``score``: the mean return with the partner;
- ``correct``: that return divided by the game's optimum (in [0, 1] for these games: 1 = as good as a perfectly
  coordinated pair), which is what ``acc`` averages and what model selection reads;
- ``loss``: 1 - ``correct`` (the normalised regret);
- ``pred``: the most frequent outcome (the lever pulled, the corner met on; -1 for none).
"""

from __future__ import annotations

import torch

from shiftbench.errors import UserError
from shiftbench.registry import TASKS
from shiftbench.tasks import Task


def _not_generic() -> UserError:
    return UserError("coordination datasets are scored by playing with partners; use a coordination method "
                     "(selfplay, otherplay, cooperative)")  # fmt: skip


@TASKS.register("coordination")
class Coordination(Task):
    """Returns with partners; methods play the game themselves (see the module docstring)."""

    input_keys = ("partner",)
    batch_keys = ("partner",)
    dedicated_methods = True
    """Only methods that name this task in their ``TASKS`` train on it (losses over examples do not apply)."""

    def scores(self, model, batch):
        raise _not_generic()

    def features(self, model, batch):
        raise _not_generic()

    def loss(self, scores, batch, scale=1.0, reduction="mean"):
        raise _not_generic()

    def outputs(self, scores: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """``scores`` ``(n, 3)``: mean return, normalised return, outcome (as :meth:`World.evaluate` returns)."""
        scores = scores.float()
        return {"score": scores[:, 0], "correct": scores[:, 1], "loss": 1.0 - scores[:, 1],
                "pred": scores[:, 2].long()}  # fmt: skip
