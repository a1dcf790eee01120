"""Packed training (shiftbench.pack, issue 18): a pack's trials equal the same trials run alone.

Tiny colored_digits (400 examples per environment, 8x8), a 32-wide MLP: every pack is checked against
``run_trial`` on the same specs, record by record. Run with ``-s`` to see the largest observed differences.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shiftbench.callbacks import Interrupted, RunOptions
from shiftbench.config import TrialSpec
from shiftbench.pack import group_trials, pack_key, run_pack
from shiftbench.pack.adam import StackedAdam
from shiftbench.trainer import run_trial

OPTIONS = {"env_size": 400, "resolution": 8}
FIX = {"batch_size": 16, "mlp_width": 32}
TIMING = ("step_time", "elapsed")


def spec(method, seed=0, test_envs=None, steps=101, eval_every=5, **hp):
    return TrialSpec.resolve("colored_digits", method, seed=seed, test_envs=test_envs, steps=steps,
                             eval_every=eval_every, dataset_options=OPTIONS, hparams={**FIX, **hp})  # fmt: skip


# Per method: K = 3 trials differing in lr, weight decay, seed, held-out environment and the method's own numbers
# (anneal steps inside the first 100 steps, so the optimizer reset is exercised per trial at different steps).
PACKS = {
    "erm": [{}, {"lr": 3e-3, "weight_decay": 1e-3}, {"lr": 1e-2}],
    "irm": [{"irm_lambda": 10.0, "irm_penalty_anneal_iters": 20}, {"lr": 3e-3, "irm_lambda": 300.0,
            "irm_penalty_anneal_iters": 45}, {"weight_decay": 1e-4, "irm_lambda": 1.0, "irm_penalty_anneal_iters": 0}],
    "vrex": [{"vrex_lambda": 10.0, "vrex_penalty_anneal_iters": 30}, {"lr": 2e-3, "vrex_lambda": 100.0,
             "vrex_penalty_anneal_iters": 60}, {"weight_decay": 1e-3, "vrex_penalty_anneal_iters": 500}],
    "groupdro": [{"groupdro_eta": 0.01}, {"lr": 3e-3, "groupdro_eta": 0.1}, {"weight_decay": 1e-3, "groupdro_eta": 1.0}],
}  # fmt: skip


def make_specs(method):
    return [spec(method, seed=i, test_envs=(2,) if i != 1 else (0,), **hp) for i, hp in enumerate(PACKS[method])]


def records(d):
    return [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]


def compare(solo_dir, pack_dir) -> tuple[float, float]:
    """Asserts the issue's tolerances; returns (largest relative training-loss difference, largest accuracy
    difference in points)."""
    a, b = records(solo_dir), records(pack_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [list(r) for r in a] == [list(r) for r in b]  # the same keys in the same order
    loss_rel = acc_pts = 0.0
    for ra, rb in zip(a, b):
        for k in ra:
            if k in TIMING or k == "step":
                continue
            if k in ("loss", "nll"):
                rel = abs(ra[k] - rb[k]) / abs(ra[k])
                assert rel <= 1e-5, (k, ra["step"], ra[k], rb[k])
                loss_rel = max(loss_rel, rel)
            elif k == "penalty":
                # a product of two small gradients that cancels towards 0: relative to the loss it enters
                assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra["loss"]), (k, ra["step"], ra[k], rb[k])
    fa, fb = a[-1], b[-1]
    for k in fa:
        if k.endswith("_acc"):
            pts = 100 * abs(fa[k] - fb[k])
            assert pts <= 0.1, (k, fa[k], fb[k])
            acc_pts = max(acc_pts, pts)
    assert json.loads((solo_dir / "spec.json").read_text()) == json.loads((pack_dir / "spec.json").read_text())
    assert sorted(p.name for p in solo_dir.iterdir()) == sorted(p.name for p in pack_dir.iterdir())
    na, nb = np.load(solo_dir / "predictions.npz"), np.load(pack_dir / "predictions.npz")
    assert sorted(na.files) == sorted(nb.files) and np.array_equal(na["idx"], nb["idx"])
    fin_a, fin_b = (json.loads((d / "final.json").read_text()) for d in (solo_dir, pack_dir))
    assert sorted(fin_a) == sorted(fin_b) and fin_a["hash"] == fin_b["hash"]
    return loss_rel, acc_pts


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernel", "columns"])
def test_stacked_adam_matches_torch_adam_on_every_slice(fused, monkeypatch):
    if not fused:
        monkeypatch.setattr("shiftbench.pack.adam.FUSED", set())
    torch.manual_seed(0)
    lrs, wds = [1e-3, 3e-2, 1e-1], [0.0, 1e-2, 1e-4]
    ps = [torch.randn(4, 5, requires_grad=True) for _ in lrs]
    opts = [torch.optim.Adam([p], lr=lr, weight_decay=wd) for p, lr, wd in zip(ps, lrs, wds)]
    stacked = {"w": torch.stack([p.detach().clone() for p in ps])}
    adam = StackedAdam.from_optimizers(stacked, opts, [[p] for p in ps])
    assert adam.fused is fused
    worst = 0.0
    for t in range(60):
        if t == 20:  # slice 1 alone forgets its state, as AnnealedPenalty's reset does
            adam.reset(torch.tensor([False, True, False]))
            opts[1].state.clear()
        grads = [torch.randn(4, 5) for _ in ps]
        for p, o, g in zip(ps, opts, grads):
            p.grad = g.clone()
            o.step()
        adam.step({"w": torch.stack(grads)})
        worst = max(worst, max((stacked["w"][k] - ps[k].detach()).abs().max().item() for k in range(3)))
    assert worst <= 1e-6
    assert adam.steps.tolist() == [60.0, 40.0, 60.0]
    # and back into torch: the same state torch holds
    fresh = [torch.optim.Adam([p], lr=lr) for p, lr in zip(ps, lrs)]
    adam.write_back(fresh, [[p] for p in ps])
    for o, f, p in zip(opts, fresh, ps):
        assert float(f.state[p]["step"]) == float(o.state[p]["step"])
        assert torch.allclose(f.state[p]["exp_avg_sq"], o.state[p]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    print(f"\nStackedAdam ({'fused' if fused else 'columns'}) vs torch.optim.Adam, 60 steps: largest parameter "
          f"difference {worst:.2e}")


@pytest.mark.parametrize("method", list(PACKS))
def test_pack_equals_trials_alone(method, tmp_path, monkeypatch):
    from shiftbench.pack import evaluate

    if method in ("erm", "irm"):  # the vectorised evaluation (CUDA's default) through a whole pack, on the CPU
        monkeypatch.setattr(evaluate, "VECTORISED_ON", ("cuda", "cpu"))
    specs = make_specs(method)
    assert len({pack_key(s) for s in specs}) == 1
    solo = [run_trial(s, tmp_path / "solo" / s.short_hash, RunOptions(device="cpu")) for s in specs]
    packed = run_pack(specs, [tmp_path / "pack" / s.short_hash for s in specs], RunOptions(device="cpu"))
    assert [r["status"] for r in packed] == ["done"] * 3 == [r["status"] for r in solo]
    worst = [compare(tmp_path / "solo" / s.short_hash, tmp_path / "pack" / s.short_hash) for s in specs]
    print(f"\n{method}: largest relative training-loss difference {max(w[0] for w in worst):.2e}, "
          f"largest final accuracy difference {max(w[1] for w in worst):.3f} points")


def test_vectorised_evaluation_equals_each_trials_own(tmp_path, monkeypatch):
    from shiftbench.pack import evaluate
    from shiftbench.pack.evaluate import eval_reason, evaluate_together
    from shiftbench.pack.functional import stack_params
    from shiftbench.trainer import Trainer

    monkeypatch.setattr(evaluate, "VECTORISED_ON", ("cuda", "cpu"))  # CUDA only by default: slower on a CPU

    specs = make_specs("erm")  # other seeds (so other data), one holding out another environment
    trainers = [Trainer(s, tmp_path / s.short_hash, RunOptions(device="cpu", eval_batch_size=50)) for s in specs]
    runs = [t._build() for t in trainers]
    assert eval_reason(runs, trainers) is None
    params = stack_params([r.model for r in runs])
    together = evaluate_together(runs, trainers, params, runs[0].model, 50, amp=False)  # 16 rows per member
    worst = 0.0
    for t, r, got in zip(trainers, runs, together):
        alone = t.split_outputs(r)
        assert list(got) == list(alone) == list(t.eval_splits)
        for name in alone:
            assert sorted(got[name]) == sorted(alone[name])
            for key in ("idx", "label", "pred", "correct"):
                assert np.array_equal(got[name][key], alone[name][key]), (name, key)
            for key in ("loss", "score"):
                np.testing.assert_allclose(got[name][key], alone[name][key], rtol=1e-5, atol=1e-6)
                worst = max(worst, float(np.abs(got[name][key] - alone[name][key]).max()))
        assert r.dataset.evaluate(name, got[name]) == r.dataset.evaluate(name, alone[name])
    print(f"\nvectorised evaluation vs each trial's own: largest loss/score difference {worst:.2e}")


def test_one_diverging_trial_fails_alone(tmp_path):
    specs = [spec("erm", seed=0, steps=21), spec("erm", seed=1, steps=21, lr=1e12)]
    solo = run_trial(specs[1], tmp_path / "solo", RunOptions(device="cpu"))
    assert solo["status"] == "failed"
    out = run_pack(specs, [tmp_path / s.short_hash for s in specs], RunOptions(device="cpu"))
    assert out[0]["status"] == "done" and out[1]["status"] == "failed"
    assert out[1]["reason"] == solo["reason"] and out[1]["step"] == solo["step"]
    assert not (tmp_path / specs[1].short_hash / "checkpoint.pt").exists()
    assert (tmp_path / specs[0].short_hash / "final.json").exists()


def test_killed_pack_resumes_packed_and_unpacked(tmp_path):
    specs = make_specs("irm")
    solo = [run_trial(s, tmp_path / "solo" / s.short_hash, RunOptions(device="cpu")) for s in specs]
    dirs = [tmp_path / "pack" / s.short_hash for s in specs]
    with pytest.raises(Interrupted) as info:
        run_pack(specs, dirs, RunOptions(device="cpu", stop_after=40))
    assert info.value.pack_results == [None, None, None]
    for d in dirs:
        ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
        assert ckpt["step"] == 41 and not (d / "final.json").exists()
    shutil.copytree(tmp_path / "pack", tmp_path / "unpacked")
    run_pack(specs, dirs, RunOptions(device="cpu"))  # resumed as a pack
    for s in specs:
        run_trial(s, tmp_path / "unpacked" / s.short_hash, RunOptions(device="cpu"))  # resumed alone
        for where in ("pack", "unpacked"):
            compare(tmp_path / "solo" / s.short_hash, tmp_path / where / s.short_hash)
    # an unpacked checkpoint resumes in a pack, too
    with pytest.raises(Interrupted):
        run_trial(specs[0], tmp_path / "mixed" / specs[0].short_hash, RunOptions(device="cpu", stop_after=60))
    run_pack(specs, [tmp_path / "mixed" / s.short_hash for s in specs], RunOptions(device="cpu"))
    for s in specs:
        compare(tmp_path / "solo" / s.short_hash, tmp_path / "mixed" / s.short_hash)


def test_group_trials_buckets_by_shape():
    a, b = spec("erm", seed=0), spec("erm", seed=1, lr=1e-2)  # seeds and lr differ: one bucket
    wide = spec("erm", seed=0, mlp_width=64)  # another width: another bucket
    irm = spec("irm", seed=0)  # another method
    mixup = spec("mixup", seed=0)  # not packable: alone
    dropout = spec("erm", seed=2, mlp_dropout=0.1)  # dropout: alone
    groups = group_trials([a, wide, b, irm, mixup, dropout])
    assert groups == [[a, b], [wide], [irm], [mixup], [dropout]]
    assert pack_key(mixup) is None and pack_key(dropout) is None
    assert group_trials([a, b, spec("erm", seed=3)], k=2) == [[a, b], [spec("erm", seed=3)]]


def test_auto_packs_each_bucket_at_its_own_k():
    """One large draw must not shrink the packs of small ones (the benchmark once cut every bucket at the K of the
    largest model in the sweep)."""
    from shiftbench.pack import choose_k, packs_of

    small = [spec("erm", seed=s) for s in range(6)]
    big = [spec("erm", seed=s, mlp_width=1024, mlp_depth=3, batch_size=512) for s in range(6)]
    k_small, k_big = choose_k(small, "cpu"), choose_k(big, "cpu")
    assert k_big < 6 <= k_small  # the cost model tells them apart: 4e9 flops per step on a CPU
    packs = packs_of(small + big, "auto", "cpu")
    assert packs[0] == small and all(len(p) <= k_big for p in packs[1:])
    assert sum(packs[1:], []) == big
    assert packs_of(small + big, 4, "cpu") == [small[:4], small[4:], big[:4], big[4:]]


def test_pack_speed_quick_runs_both_sides_and_agrees():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench_scripts" / "pack_speed.py"
    mod_spec = importlib.util.spec_from_file_location("pack_speed", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    rows = mod.main(["--quick", "--cpu-only"])
    (row,) = rows
    assert row["trials"] == 8 and row["packs"] == 4  # 4 methods x 2 seeds: one bucket of 2 per method
    assert row["off_s"] > 0 and row["pack_s"] > 0
    assert row["acc_diff_pts"] <= 0.1
