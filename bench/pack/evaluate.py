"""Vectorised evaluation: every member's outputs over every evaluation split from one vmapped forward per batch.

At an evaluation step the members of a cohort hold their parameters stacked (``{name: (K, ...)}``). Their
evaluation splits have the same names and sizes (one dataset and options; only the data seed differs, so the
examples differ), so batch j of every member's split is stacked into one ``(K, B, ...)`` input, the K models run
on it as one vmapped forward, and the task's per-example outputs (loss, prediction, ...) are computed once on the
K x B rows flattened. Each member then gets ``{split: outputs}`` exactly shaped as ``Trainer.split_outputs``
returns them, and the trainer's own code turns them into the record, predictions and callbacks' inputs.

Where it runs: on CUDA devices (``VECTORISED_ON``), where one trial's evaluation is bound by kernel launches. On
a CPU the K models' forwards as one batched matmul ran at 0.45-0.69x the speed of evaluating the members one by
one (24 MLPs of width 64 on colored_digits, 2 threads; ``torch.bmm`` over K slices is slower than K plain
matmuls there), so CPU packs evaluate each member with the trainer's own loop.

The stacked batch holds ``eval_batch_size`` rows in all (``eval_batch_size // K`` per member, at least one), so the
pack's evaluation needs no more activation memory than one trial's. Rows are independent in packable models (no
batch statistics), so the batch size changes an output only by float rounding.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from ..algorithm import Algorithm
from ..callbacks import TrialRun
from ..tasks import Task
from .functional import FunctionalModel


VECTORISED_ON: tuple[str, ...] = ("cuda",)
"""Device types on which a pack evaluates its members as one program (see the module docstring)."""


def eval_reason(runs: Sequence[TrialRun], trainers: Sequence[Any]) -> str | None:
    """Why the members' evaluation does not run as one program (None: it does); they then evaluate one by one."""
    if runs[0].device.type not in VECTORISED_ON:
        return f"evaluation is vectorised on {', '.join(VECTORISED_ON)} only (faster one by one on {runs[0].device.type})"
    for r in runs:
        if type(r.algorithm).scores is not Algorithm.scores:
            return f"method {r.spec.method} evaluates with more than its model's scores"
    first = trainers[0].eval_splits
    for t in trainers[1:]:
        if list(t.eval_splits) != list(first) or any(len(t.eval_splits[n]) != len(first[n]) for n in first):
            return "the members' evaluation splits differ in names or sizes"
    return None


def evaluate_together(runs: Sequence[TrialRun], trainers: Sequence[Any], params: dict[str, torch.Tensor],
                      template: nn.Module, batch_size: int, amp: bool) -> list[dict[str, dict[str, Any]]]:
    """Each member's ``{split name: outputs}`` (``Task.split_outputs``), from the stacked ``params``.

    Args:
        runs, trainers: the members' runs and trainers, in the order of ``params``' leading dimension.
        params: the members' current parameters, stacked.
        template: a model of the members' architecture (its own parameters are not used).
        batch_size: the trials' evaluation batch size; each member's batch is ``batch_size // K``.
        amp: bfloat16 autocast on CUDA, as the trainer's evaluation uses.
    """
    task, device, k = runs[0].task, runs[0].device, len(runs)
    keys = task.input_keys
    forward = torch.func.vmap(lambda p, b: task.scores(FunctionalModel(template, p), b))
    per = max(1, batch_size // k)
    out: list[dict[str, dict[str, Any]]] = [{} for _ in runs]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda"
                else contextlib.nullcontext())  # fmt: skip
    template.eval()
    with torch.inference_mode(), autocast:
        for name in trainers[0].eval_splits:
            parts: dict[str, list[torch.Tensor]] = {}
            for batches in zip(*(t.eval_splits[name].eval_batches(per) for t in trainers)):
                stacked = {key: torch.stack([b[key] for b in batches]) for key in batches[0]}
                scores = forward(params, {key: stacked[key] for key in keys})
                n = scores.shape[1]
                flat = task.outputs(scores.flatten(0, 1), {key: v.flatten(0, 1) for key, v in stacked.items()})
                flat["idx"] = stacked["idx"].flatten(0, 1)
                if "y" in stacked:
                    flat["label"] = stacked["y"].flatten(0, 1)
                for key, v in flat.items():
                    parts.setdefault(key, []).append(v.unflatten(0, (k, n)))
            # (K, rows, ...) per key, concatenated over the batches once; member m's outputs are row m
            joined = {key: torch.cat(v, dim=1) for key, v in parts.items()}
            for m in range(k):
                out[m][name] = Task.to_numpy({key: v[m] for key, v in joined.items()})
    template.train()
    return out
