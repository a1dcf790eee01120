"""CUDA paths (skipped without a CUDA device): data kept on the device, bfloat16 autocast, CPU agreement."""

from __future__ import annotations

import pytest
import torch

from shiftbench.config import TrialSpec
from shiftbench.trainer import RunOptions, Trainer, run_trial

pytestmark = pytest.mark.gpu


def test_cuda_trial_keeps_data_on_device_and_matches_cpu(small, tmp_path):
    spec = TrialSpec.resolve("colored_digits", "irm", steps=40, eval_every=20, dataset_options=small["colored_digits"],
                             hparams={"irm_penalty_anneal_iters": 10})  # fmt: skip
    trainer = Trainer(spec, tmp_path / "probe", RunOptions(device="cuda"))
    trainer._build()
    assert all(s.device.type == "cuda" for s in trainer.train_splits)
    assert all(s.device.type == "cuda" for s in trainer.eval_splits.values())
    cpu = run_trial(spec, tmp_path / "cpu", RunOptions(device="cpu"))["record"]
    gpu = run_trial(spec, tmp_path / "gpu", RunOptions(device="cuda"))["record"]
    amp = run_trial(spec, tmp_path / "amp", RunOptions(device="cuda", amp=True))["record"]
    assert gpu["env0_in_acc"] == pytest.approx(cpu["env0_in_acc"], abs=0.05)
    assert amp["env0_in_acc"] == pytest.approx(cpu["env0_in_acc"], abs=0.1)
    assert torch.cuda.max_memory_allocated() > 0
