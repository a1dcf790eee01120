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


def test_cuda_adversarial_training_and_robust_eval_match_cpu(small, tmp_path):
    # PGD runs where the model lives; its accuracies under attack agree with the CPU run's
    spec = TrialSpec.resolve("rotated_digits", "adversarial", steps=30, eval_every=30,
                             dataset_options=small["rotated_digits"], callbacks=("robust_eval:steps=5,restarts=1",))
    cpu = run_trial(spec, tmp_path / "cpu", RunOptions(device="cpu"))["record"]
    gpu = run_trial(spec, tmp_path / "gpu", RunOptions(device="cuda"))["record"]
    for key in ("env0_in_acc", "env0_in_robust_acc", "env1_in_robust_acc"):
        assert gpu[key] == pytest.approx(cpu[key], abs=0.08), key


def test_cuda_reward_model_and_drift_callback(tmp_path):
    # the preference workload with bfloat16 autocast, and the drift tests on CUDA tensors
    spec = TrialSpec.resolve("spurious_prefs", "vrex", steps=60, eval_every=30,
                             dataset_options={"n_pairs": 300, "bon_prompts": 4}, callbacks=("drift",))
    cpu = run_trial(spec, tmp_path / "cpu", RunOptions(device="cpu"))
    amp = run_trial(spec, tmp_path / "amp", RunOptions(device="cuda", amp=True))
    assert amp["status"] == "done" and amp["device"].startswith("cuda")
    env = f"env{spec.test_envs[0]}"
    for view in ("inputs", "outputs"):
        assert amp["drift"]["envs"][env][view]["n_test"] == cpu["drift"]["envs"][env][view]["n_test"]
    assert amp["record"]["env0_in_acc"] == pytest.approx(cpu["record"]["env0_in_acc"], abs=0.1)
