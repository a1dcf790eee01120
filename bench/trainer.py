"""One trial: dataset -> environments -> streams; method.update every step; evaluation, checkpoints, records.

The trainer knows nothing of sweeps. Everything method- or workload-specific enters through the plug-in
interfaces (``Algorithm``, ``ShiftDataset``, ``Task``) or a ``Callback``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .algorithm import Algorithm, MethodContext
from .config import TrialSpec, canonical_json
from .callbacks import Callback, Interrupted, RunOptions, TrialRun, resolve_device  # noqa: F401 (importable from here)
from .data import ShiftDataset, Split, input_range, load_dataset  # noqa: F401
from .errors import TrialFailed, UserError
from .hparams import seed_hash
from .io import CreatedDirs
from .models import build_model, eval_batch_for, eval_layout
from .provenance import code_version
from . import records
from .records import env_split, metric_key, trial_status  # noqa: F401 (importable from here)
from .registry import CALLBACKS, METHODS, TASKS


class Trainer:
    """Runs one trial in ``trial_dir`` (resuming from its checkpoint if there is one)."""

    def __init__(self, spec: TrialSpec, trial_dir: Path, options: RunOptions | None = None, callbacks=()):
        self.spec = spec
        self.dir = Path(trial_dir)
        self.opt = options or RunOptions()
        self.extra_callbacks = list(callbacks)

    # -- setup ---------------------------------------------------------------------------------------------------
    def _build(self) -> TrialRun:
        spec = self.spec
        device = resolve_device(self.opt.device)
        dataset = load_dataset(spec.dataset, spec.dataset_options, self.opt.data_root, self.opt.download)
        task = TASKS.get(dataset.TASK)()
        torch.manual_seed(seed_hash(spec.seed, "init"))
        model = build_model(spec.model, dataset.input_shape, task.n_outputs(dataset.num_classes), spec.hparams)
        model.to(device)
        train = dataset.train_splits(spec.test_envs)
        algorithm = METHODS.get(spec.method)(model, task, len(train), spec.hparams).to(device)
        self._moved: dict[int, Split] = {}
        self.train_names = [n for n, _ in train]
        self.train_envs = tuple(next(i for i, e in enumerate(dataset.environments) if e.name == n and i not in
                                     spec.test_envs) for n in self.train_names)  # fmt: skip
        self.train_splits = [self._on_device(s, device) for _, s in train]
        self.eval_splits = {k: self._on_device(s, device) for k, s in dataset.eval_splits().items()}
        self.stream_seeds = [seed_hash(spec.seed, "stream", n) for n in self.train_names]
        self.batch_keys = tuple(dict.fromkeys(task.batch_keys + algorithm.BATCH_KEYS))
        run = TrialRun(spec, self.dir, dataset, algorithm, device, self.opt)
        probe = next((next(s.eval_batches(2))[task.input_keys[0]] for s in self.eval_splits.values() if len(s)), None)
        run.eval_batch_size = self.opt.eval_batch_size or eval_batch_for(model, probe, device)
        context = MethodContext(
            train_env_names=self.train_names,
            # training ``in`` splits too: a dataset may not evaluate them (WILDS), but methods count and resample them
            splits={**{env_split(i, "in"): self._on_device(dataset.environments[i].splits["in"], device)
                       for i in self.train_envs}, **self.eval_splits},
            train_envs=self.train_envs,
            stream=self._stream_fn,
            device=device,
            workdir=self.dir,
            seed=spec.seed,
            train_reference=functools.partial(self._train_reference, run),
            input_range=input_range(dataset, [s for _, s in train], task.input_keys),
        )
        algorithm.setup(context)
        self.callbacks = sorted([CALLBACKS.get(n)(n) for n in spec.callbacks] + self.extra_callbacks,
                                key=lambda cb: cb.ORDER)
        return run

    def _on_device(self, split: Split, device: torch.device) -> Split:
        if id(split) not in self._moved:
            self._moved[id(split)] = split.to(device)
        return self._moved[id(split)]

    def _stream_fn(self, split_name: str, batch_size: int) -> Callable[[int], dict]:
        """k -> the k-th batch of a named split: pure in k, so methods resume exactly."""
        split = self.eval_splits[split_name]
        seed = seed_hash(self.spec.seed, "extra-stream", split_name)
        return lambda k: split.batch_at(k, batch_size, seed)

    def _train_reference(self, run: TrialRun, method: str = "erm", steps: int = 1000, hparams=None, name=None):
        """Trains a model with another method on this trial's training streams (cached in the trial folder)."""
        name = name or f"reference_{method}_{steps}"
        task, spec = run.task, self.spec
        torch_state = torch.get_rng_state()
        torch.manual_seed(seed_hash(spec.seed, name))
        model = build_model(spec.model, run.dataset.input_shape, task.n_outputs(run.dataset.num_classes), spec.hparams)
        model.to(run.device)
        cached = records.read_reference(self.dir, name, run.device)
        if cached is not None:
            model.load_state_dict(cached)
        else:
            mcls = METHODS.get(method)
            hp = {k: v.default for k, v in mcls.hparam_space(run.dataset.HPARAMS).items()}
            hp.update({k: spec.hparams[k] for k in ("lr", "weight_decay", "batch_size") if k in spec.hparams})
            hp.update(hparams or {})
            alg = mcls(model, task, len(self.train_splits), hp).to(run.device)
            for k in range(steps):
                alg.update(self._minibatches(k, hp["batch_size"], salt=name), k)
            records.write_reference(self.dir, name, model.state_dict())
        torch.set_rng_state(torch_state)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _minibatches(self, step: int, batch_size: int, salt: str = "") -> list[dict]:
        return [
            s.batch_at(step, batch_size, sd if not salt else seed_hash(sd, salt), self.batch_keys)
            for s, sd in zip(self.train_splits, self.stream_seeds)
        ]

    def _autocast(self, device: torch.device):
        if self.opt.amp and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, run: TrialRun, keep_outputs: bool = False) -> dict[str, float]:
        """The evaluation record's metrics (``<split>_<metric>``) of every evaluation split; with ``keep_outputs``
        the per-example outputs are kept in ``run.final_outputs`` for predictions.npz."""
        record: dict[str, float] = {}
        for name, outputs in self.split_outputs(run).items():
            for metric, value in run.dataset.evaluate(name, outputs).items():
                record[metric_key(name, metric)] = value
            if keep_outputs:
                run.final_outputs[name] = outputs
        return record

    def split_outputs(self, run: TrialRun) -> dict[str, dict[str, Any]]:
        """Every evaluation split's per-example outputs (``Task.split_outputs``) from the method's ``scores``."""
        alg, task = run.algorithm, run.task
        layout = eval_layout(run.model, run.device, task.input_keys)
        alg.eval()
        with torch.inference_mode(), self._autocast(run.device):
            out = {name: task.split_outputs(((b, alg.scores(b)) for b in map(layout, split.eval_batches(
                run.eval_batch_size))), len(split)) for name, split in self.eval_splits.items()}  # fmt: skip
        alg.train()
        return out

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Runs (or resumes, or skips) the trial; returns the final record or the failure.

        Raises:
            UserError: the folder holds another trial, or the trial cannot start (missing data, a bad device); a
                refusal leaves behind no folder this call created.
        """
        records.refuse_other_trial(self.dir, self.spec.hash)  # before the done check: another trial's metrics
        status = trial_status(self.dir)                          # must not pass for this one's
        if status == "done":
            return records.read_final(self.dir)
        if status == "failed":
            if not self.opt.retry_failed:
                return records.read_failed(self.dir)
            records.clear_failed(self.dir)
        created = CreatedDirs(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        try:
            run = self._build()
        except UserError:
            if not records.has_spec(self.dir):
                created.remove_if_empty()
            raise
        if not records.has_spec(self.dir):
            records.write_spec(self.dir, {
                "hash": self.spec.hash, "spec": self.spec.to_dict(), "data_version": run.dataset.version(),
                "code_version": code_version(), "task": run.dataset.TASK, "env_names": run.dataset.env_names,
                "train_envs": self.train_names, "dataset": run.dataset.describe(),
            })  # fmt: skip
        start = 0
        ckpt = records.load_checkpoint(self.dir, run.device)
        if ckpt is not None:
            run.algorithm.load_checkpoint_state(ckpt["algorithm"])
            torch.set_rng_state(ckpt["rng"])
            if run.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"], run.device)
            run.records = list(ckpt["records"])
            start = ckpt["step"]
            t0 -= ckpt.get("elapsed", 0.0)
        else:
            torch.manual_seed(seed_hash(self.spec.seed, "train"))
        for cb in self.callbacks:
            cb.on_start(run)
        try:
            self._loop(run, start, t0)
        except TrialFailed as e:
            return self._fail(run, e)
        return self._finish(run, t0)

    def _fail(self, run: TrialRun, e: TrialFailed) -> dict[str, Any]:
        """Writes failed.json for a trial that failed in its loop, drops its checkpoint, returns the record."""
        records.write_failed(self.dir, {"status": "failed", "hash": self.spec.hash, "reason": str(e),
                                        "step": run.step, "records": run.records})  # fmt: skip
        records.remove_checkpoint(self.dir)
        return records.read_failed(self.dir)

    def _loop(self, run: TrialRun, start: int, t0: float) -> None:
        spec, alg = self.spec, run.algorithm
        bs = int(spec.hparams["batch_size"])
        sums: dict[str, torch.Tensor] = {}
        n, t_last = 0, time.time()
        t_ckpt = t_last
        for step in range(start, spec.steps):
            run.step = step
            minibatches = self._minibatches(step, bs)
            with self._autocast(run.device):
                stats = alg.update(minibatches, step)
            for k, v in stats.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
            n += 1
            if step % spec.eval_every == 0 or step == spec.steps - 1:
                t_ckpt = self._evaluation(run, step, sums, n, (time.time() - t_last) / n, t0, t_ckpt)
                sums, n, t_last = {}, 0, time.time()

    def _evaluation(self, run: TrialRun, step: int, sums: dict[str, torch.Tensor], n: int, step_time: float,
                    t0: float, t_ckpt: float) -> float:
        """The evaluation at ``step``: the record (training stats averaged over the ``n`` steps since the last
        one, evaluation, callbacks), results.jsonl, and a checkpoint when one is due; returns the time of the
        last checkpoint. The packed loop (``shiftbench.pack``) calls this too.

        Raises:
            TrialFailed: a non-finite training statistic.
            Interrupted: ``stop_after`` reached (after the checkpoint).
        """
        spec = self.spec
        last = step == spec.steps - 1
        record: dict[str, Any] = {"step": step}
        for k, v in sums.items():
            record[k] = float(v) / n
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise TrialFailed(f"non-finite training {bad[0]} ({record[bad[0]]}) by step {step}; "
                              f"lower the learning rate (lr={spec.hparams.get('lr')}) or check the data")
        record["step_time"] = step_time
        record.update(self.evaluate(run, keep_outputs=last))
        for cb in self.callbacks:
            cb.on_eval(run, record)
        record["elapsed"] = time.time() - t0
        run.records.append(record)
        records.write_results(self.dir, run.records)
        stop = self.opt.stop_after is not None and step >= self.opt.stop_after and not last
        if not last and (stop or time.time() - t_ckpt >= self.opt.checkpoint_interval):
            self._checkpoint(run, step + 1, t0)
            t_ckpt = time.time()
        if stop:
            raise Interrupted(f"stopped after step {step}")
        return t_ckpt

    def _checkpoint(self, run: TrialRun, next_step: int, t0: float) -> None:
        state = {
            "step": next_step,
            "records": run.records,
            "algorithm": run.algorithm.checkpoint_state(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            "elapsed": time.time() - t0,
        }
        records.save_checkpoint(self.dir, state)

    def _finish(self, run: TrialRun, t0: float) -> dict[str, Any]:
        records.write_predictions(self.dir, run.final_outputs)
        records.write_weights(self.dir, run.model.state_dict())
        final = {
            "status": "done",
            "hash": self.spec.hash,
            "record": run.records[-1],
            "wall_time": time.time() - t0,
            "device": str(run.device),
            "code_version": code_version(),
        }
        for cb in self.callbacks:
            before = canonical_json(final["record"])
            cb.on_end(run, final)
            if canonical_json(final["record"]) != before:
                # end-of-trial statistics (drift, ...) join the last evaluation record, in results.jsonl too
                run.records[-1] = final["record"]
                records.write_results(self.dir, run.records)
        records.write_final(self.dir, final)
        records.remove_checkpoint(self.dir)
        return final


def run_trial(spec: TrialSpec, trial_dir: Path, options: RunOptions | None = None, callbacks=()) -> dict[str, Any]:
    """Runs one trial to completion (or failure); see ``Trainer``."""
    return Trainer(spec, trial_dir, options, callbacks).run()
