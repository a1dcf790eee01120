"""The packed loop: K trials of one shape trained as one vectorised program, each written as if it ran alone.

Every trial keeps a real ``Trainer`` (``_Member``): ``Trainer.run`` does its setup (folder checks, dataset, model,
method, spec.json, resume from its checkpoint, callbacks' ``on_start``) and stops where its training loop would
begin. From there the pack trains all members' steps between two evaluations at once (stacked parameters,
``StackedAdam``, the method's ``objective`` under ``vmap``), then writes each member's parameters, Adam state and
method state back into its own model, optimizer and method, and runs that member's evaluation, callbacks,
checkpoint and finish with the trainer's own code. So a member's folder has the single-trial layout and formats: an
unpacked rerun resumes a packed checkpoint, and a pack resumes an unpacked one.

The global torch RNG is per trial: each member's generator state is swapped in around everything of its own
(evaluation, callbacks, checkpoint, finish) and saved back, so its checkpoint's ``rng`` and its callbacks' draws
are those of the trial alone (the packed steps themselves draw nothing: packable models have no dropout).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..algorithm import is_packable
from ..callbacks import RunOptions, TrialRun
from ..config import TrialSpec
from ..errors import TrialFailed
from ..trainer import Trainer
from .adam import StackedAdam
from .evaluate import eval_reason, evaluate_together
from .functional import model_reason, stack_params, stack_trees, vectorised_step, write_params


class _Parked(Exception):
    """Raised by a member's ``_loop``: setup is done and the trial waits for the pack at step ``start``."""

    def __init__(self, run: TrialRun, start: int, t0: float):
        super().__init__("parked")
        self.run, self.start, self.t0 = run, start, t0


class _Member(Trainer):
    """A trial of a pack: ``Trainer.run`` up to the training loop, which parks instead of training; its evaluation
    takes the outputs the pack computed for all members (``precomputed``) when there are any."""

    precomputed: dict[str, dict[str, Any]] | None = None

    def _loop(self, run, start, t0):
        raise _Parked(run, start, t0)

    def minibatch_steps(self, steps: range, batch_size: int, out: list | None = None) -> list[dict[str, torch.Tensor]]:
        """``_minibatches`` of every step of ``steps``, each environment's entries stacked over the steps (written
        into ``out[e]``, one dict of tensors per environment, when given)."""
        outs = out if out is not None else [None] * len(self.train_splits)
        return [s.batches_at(steps, batch_size, sd, self.batch_keys if o is None else tuple(o), o)
                for s, sd, o in zip(self.train_splits, self.stream_seeds, outs)]  # fmt: skip

    def split_outputs(self, run):
        if self.precomputed is None:
            return super().split_outputs(run)
        out, self.precomputed = self.precomputed, None
        return out


@dataclass
class _Slot:
    """One parked member and what its loop would hold in local variables."""

    index: int
    trainer: _Member
    run: TrialRun
    step: int
    t0: float
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    t_ckpt: float = field(default_factory=time.time)
    result: Any = None
    done: bool = False

    @property
    def spec(self) -> TrialSpec:
        return self.trainer.spec

    @contextlib.contextmanager
    def own_rng(self):
        """The global RNG is this trial's while the block runs, and its state is kept for the next block."""
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.run.device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.run.device)


def member_reason(run: TrialRun) -> str | None:
    """Why a built trial cannot train in a pack (None: it can)."""
    alg = run.algorithm
    if not is_packable(type(alg)):
        return f"method {run.spec.method} is not packable"
    if set(alg.optimizers()) != {"optimizer"}:
        return "its method has more than one optimizer"
    return model_reason(run.model) or StackedAdam.check(alg.optimizer, list(run.model.parameters()))


def _signature(slot: _Slot) -> tuple:
    """What members must share to be stacked: shapes of parameters and batches, schedule, method, device."""
    run, spec = slot.run, slot.spec
    bs = int(spec.hparams["batch_size"])
    batches = slot.trainer._minibatches(slot.step, bs)
    return (
        type(run.algorithm), str(run.device), spec.steps, spec.eval_every, bs,
        tuple((n, tuple(p.shape), p.dtype) for n, p in run.model.named_parameters()),
        tuple(tuple((k, tuple(v.shape), v.dtype) for k, v in b.items()) for b in batches),
        tuple((k, tuple(v.shape)) for k, v in run.algorithm.method_state().items()),
    )  # fmt: skip


def run_pack(specs: Sequence[TrialSpec], trial_dirs: Sequence[Path], options: RunOptions | None = None,
             callbacks=()) -> list[dict[str, Any]]:  # fmt: skip
    """Runs (or resumes, or skips) each trial as ``run_trial`` would, training compatible ones as one program.

    Members that turn out not to be packable once built (``member_reason``), or whose shapes differ from the rest,
    train alone or in their own sub-pack; the outputs are the same either way.

    Returns:
        What ``run_trial`` returns for each trial, in order.

    Raises:
        The first exception a trial raised where ``run_trial`` would have raised it (a refusal, ``Interrupted``
        from ``stop_after``, a crash): the other trials first go on to their end or their checkpoint; the exception
        carries ``pack_results`` (None where a trial raised).
    """
    options = options or RunOptions()
    results: list[Any] = [None] * len(specs)
    errors: list[tuple[int, BaseException]] = []
    slots: list[_Slot] = []
    for i, (spec, d) in enumerate(zip(specs, trial_dirs)):
        member = _Member(spec, Path(d), options, callbacks)
        try:
            results[i] = member.run()  # done or failed before: nothing to train
        except _Parked as p:
            cuda = torch.cuda.get_rng_state(p.run.device) if p.run.device.type == "cuda" else None
            slots.append(_Slot(i, member, p.run, p.start, p.t0, torch.get_rng_state(), cuda))
        except Exception as e:  # noqa: BLE001 -- re-raised below, once the others are through
            errors.append((i, e))
    groups: dict[tuple, list[_Slot]] = {}
    for s in slots:
        reason = member_reason(s.run)
        if reason is not None:
            _alone(s, errors)
            continue
        groups.setdefault(_signature(s), []).append(s)
    for members in groups.values():
        _train_pack(members, options, errors)
    for s in slots:
        results[s.index] = s.result
    if errors:
        first = errors[0][1]
        first.pack_results = results  # type: ignore[attr-defined]
        raise first
    return results


def _alone(slot: _Slot, errors: list) -> None:
    """A member that cannot be packed trains with the trainer's own loop (as ``Trainer.run`` continues)."""
    tr, run = slot.trainer, slot.run
    try:
        with slot.own_rng():
            try:
                Trainer._loop(tr, run, slot.step, slot.t0)
            except TrialFailed as e:
                slot.result = _failed(slot, e)
                return
            slot.result = tr._finish(run, slot.t0)
    except Exception as e:  # noqa: BLE001
        errors.append((slot.index, e))
    finally:
        slot.done = True


def _failed(slot: _Slot, e: TrialFailed) -> dict[str, Any]:
    """What ``Trainer.run`` writes and returns for a trial that failed in its loop."""
    return slot.trainer._fail(slot.run, e)


def _segment_end(step: int, spec: TrialSpec) -> int:
    """The first evaluation step at or after ``step`` (every ``eval_every`` steps and the last)."""
    e = spec.eval_every
    return min(-(-step // e) * e, spec.steps - 1)


def _train_pack(members: list[_Slot], options: RunOptions, errors: list) -> None:
    """Trains the members (one signature) to their ends, cohort by cohort of equal next step."""
    while True:
        active = [s for s in members if not s.done]
        if not active:
            return
        cur = min(s.step for s in active)
        cohort = [s for s in active if s.step == cur]
        end = _segment_end(cur, cohort[0].spec)
        params = _train_segment(cohort, cur, end, options)
        _evaluate_cohort(cohort, params, options)
        for s in cohort:
            _after_segment(s, end, errors)


def _train_segment(cohort: list[_Slot], start: int, end: int, options: RunOptions) -> dict[str, torch.Tensor]:
    """Steps ``start..end`` of every member at once; leaves each member's model, Adam and method state updated and
    its step statistics' sums in ``slot.sums``; returns the members' parameters, stacked."""
    t_start = time.time()
    runs = [s.run for s in cohort]
    algs = [r.algorithm for r in runs]
    models = [r.model for r in runs]
    lead = algs[0]
    device = runs[0].device
    params = stack_params(models)
    adam = StackedAdam.from_optimizers(params, [a.optimizer for a in algs], [list(m.parameters()) for m in models])
    hp = {k: torch.tensor([a.pack_hparams()[k] for a in algs], device=device) for k in lead.pack_hparams()}
    state = stack_trees([a.method_state() for a in algs]) if lead.method_state() else {}
    step_fn = vectorised_step(lead.objective, lead.task, models[0])
    bs = int(cohort[0].spec.hparams["batch_size"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if options.amp and device.type == "cuda"
                else contextlib.nullcontext())  # fmt: skip
    sums: dict[str, torch.Tensor] = {}
    for step, batches in _stacked_batches(cohort, start, end, bs):
        with autocast:
            grads, _, stats, state = step_fn(params, batches, hp, state, step)
        reset = lead.optimizer_reset(step, hp)
        adam.reset(reset)
        adam.step(grads)
        for k, v in stats.items():
            sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
    write_params(params, models)
    adam.write_back([a.optimizer for a in algs], [list(m.parameters()) for m in models])
    for k, a in enumerate(algs):
        if state:
            a.load_method_state({n: v[k] for n, v in state.items()})
    share = (time.time() - t_start) / (end + 1 - start) / len(cohort)
    for k, s in enumerate(cohort):
        s.sums = {n: v[k] for n, v in sums.items()}
        s.n = end + 1 - start
        s.step_time = share
    return params


PREFETCH_BYTES = 32 << 20
"""At most this many bytes of a pack's training batches are gathered ahead (``_stacked_batches``)."""


def _stacked_batches(cohort: list[_Slot], start: int, end: int, bs: int):
    """``(step, [{key: (K, bs, ...)} per environment])`` for ``start..end``: slice k is member k's own batch
    (``_minibatches``). Each member's batches are gathered for a chunk of steps at once, with one index gather per
    environment and entry, into buffers kept for the segment (a fresh tensor per step costs its page faults again);
    the chunk is as long as ``PREFETCH_BYTES`` allows. On this project's CPU: 1.0-1.3 ms per step at K = 18 against
    3.3-3.5 ms for ``_minibatches`` per member and step stacked."""
    first = cohort[0].trainer.minibatch_steps(range(start, start + 1), bs)
    per_step = len(cohort) * sum(t.element_size() * t.numel() for env in first for t in env.values())
    chunk = max(1, min(end + 1 - start, PREFETCH_BYTES // max(1, per_step)))
    buffers = [{k: v.new_empty((len(cohort), chunk, *v.shape[1:])) for k, v in env.items()} for env in first]
    for lo in range(start, end + 1, chunk):
        steps = range(lo, min(lo + chunk, end + 1))
        for m, s in enumerate(cohort):
            s.trainer.minibatch_steps(steps, bs, [{k: v[m, : len(steps)] for k, v in env.items()} for env in buffers])
        for j, step in enumerate(steps):
            yield step, [{k: v[:, j] for k, v in env.items()} for env in buffers]


def _evaluate_cohort(cohort: list[_Slot], params: dict[str, torch.Tensor], options: RunOptions) -> None:
    """Hands every member the outputs of its evaluation, computed for all at once (``evaluate_together``), unless
    the cohort is one trial or its evaluation cannot be vectorised (``eval_reason``): then each evaluates alone."""
    runs, trainers = [s.run for s in cohort], [s.trainer for s in cohort]
    if len(cohort) < 2 or eval_reason(runs, trainers) is not None:
        return
    outputs = evaluate_together(runs, trainers, params, runs[0].model, runs[0].eval_batch_size, options.amp)
    for s, out in zip(cohort, outputs):
        s.trainer.precomputed = out


def _after_segment(slot: _Slot, step: int, errors: list) -> None:
    """The evaluation block of ``Trainer._loop`` for one member at evaluation step ``step``."""
    tr, run, spec = slot.trainer, slot.run, slot.spec
    run.step = step
    last = step == spec.steps - 1
    try:
        with slot.own_rng():
            try:
                # the step time is the pack's wall time per step, shared among its members
                slot.t_ckpt = tr._evaluation(run, step, slot.sums, slot.n, slot.step_time, slot.t0, slot.t_ckpt)
            except TrialFailed as e:
                slot.result, slot.done = _failed(slot, e), True
                return
            slot.step = step + 1
            if last:
                slot.result, slot.done = tr._finish(run, slot.t0), True
    except Exception as e:  # noqa: BLE001 -- this trial raises as it would alone; the pack goes on
        slot.done = True
        errors.append((slot.index, e))
    finally:
        tr.precomputed = None  # unused when the trial failed before its evaluation
