"""Throughput of the harness against bare PyTorch loops with the same model and batches (`make bench`).

Prints, for each method: training steps/s through shiftbench's trainer and through a bare loop (batches prepared
in advance, the method's objective written inline), their ratio, and evaluation examples/s. Two workloads:
colored_digits with its default MLP, and 28x28 MNIST-shaped inputs with DomainBed's MNIST CNN at batch 64 per
environment. Figures depend on the machine; run on an idle one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from shiftbench.config import TrialSpec
from shiftbench.data import Environment, ShiftDataset, TensorSplit
from shiftbench.models import build_model
from shiftbench.registry import DATASETS
from shiftbench.trainer import RunOptions, Trainer


@DATASETS.register("bench_mnist_shaped")
class MNISTShaped(ShiftDataset):
    """Random 2x28x28 inputs in three environments of 70,000/3 examples (a stand-in of ColoredMNIST's shape)."""

    ENVIRONMENTS = ("e0", "e1", "e2")
    DEFAULT_TEST_ENVS = (2,)
    DEFAULT_MODEL = "mnist_cnn"
    OPTIONS = {"n": 70000}

    def __init__(self, root=None, options=None, download=False):
        super().__init__(root, options, download)
        g = torch.Generator().manual_seed(0)
        self.input_shape, self.num_classes = (2, 28, 28), 2
        per = self.options["n"] // 3
        self.environments = []
        for name in self.ENVIRONMENTS:
            x = torch.rand(per, 2, 28, 28, generator=g)
            y = torch.randint(0, 2, (per,), generator=g)
            n_in = int(per * 0.8)
            idx = torch.arange(per)
            split = lambda s: TensorSplit({"x": x[s], "y": y[s], "idx": idx[s]})  # noqa: E731
            self.environments.append(Environment(name, {"in": split(slice(0, n_in)), "out": split(slice(n_in, per))}))

    def version(self):
        return "bench"


def bare_step(method: str, model, opt, xs, ys, step: int, q=None):
    """One step of the method's objective written directly in PyTorch (the limit)."""
    if method == "erm":
        loss = F.cross_entropy(model(torch.cat(xs)), torch.cat(ys))
    else:
        logits = model(torch.cat(xs)).split([len(x) for x in xs])
        risks = torch.stack([F.cross_entropy(lg, y) for lg, y in zip(logits, ys)])
        if method == "groupdro":
            q.mul_(torch.exp(0.01 * risks.detach())).div_(q.sum())
            loss = (q * risks).sum()
        elif method == "vrex":
            loss = risks.mean() + ((risks - risks.mean()) ** 2).mean()
        elif method == "irm":
            pen = 0.0
            for lg, y in zip(logits, ys):
                s = torch.ones((), requires_grad=True, device=lg.device)
                g1 = torch.autograd.grad(F.cross_entropy(lg[0::2] * s, y[0::2]), s, create_graph=True)[0]
                g2 = torch.autograd.grad(F.cross_entropy(lg[1::2] * s, y[1::2]), s, create_graph=True)[0]
                pen = pen + g1 * g2
            loss = risks.mean() + pen / len(xs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def bench_method(dataset: str, method: str, steps: int, options: dict, batch_size: int, rounds: int = 5,
                 measure_eval: bool = True, device: str = "cpu") -> dict:
    spec = TrialSpec.resolve(dataset, method, steps=steps, eval_every=steps, dataset_options=options,
                             hparams={"batch_size": batch_size})  # fmt: skip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(spec, d, RunOptions(device=device))
        run = trainer._build()
        torch.manual_seed(0)
        model = build_model(spec.model, run.dataset.input_shape, run.dataset.num_classes, spec.hparams).to(run.device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        pre = []
        for k in range(20):
            mb = trainer._minibatches(k, batch_size)
            pre.append(([b["x"] for b in mb], [b["y"] for b in mb]))
        q = torch.ones(len(pre[0][0]), device=run.device) / len(pre[0][0])

        def harness_chunk(start: int, n: int) -> float:
            t = time.perf_counter()
            for k in range(start, start + n):
                stats = run.algorithm.update(trainer._minibatches(k, batch_size), k)
                float(stats["loss"])  # the trainer reads stats lazily; one sync per step is the worst case
            return n / (time.perf_counter() - t)

        def bare_chunk(n: int) -> float:
            t = time.perf_counter()
            for k in range(n):
                float(bare_step(method, model, opt, *pre[k % 20], k, q).detach())  # the same one sync per step
            return n / (time.perf_counter() - t)

        harness_chunk(0, 3), bare_chunk(3)  # warm-up
        # Alternate short chunks and take medians, so a busy neighbour slows both sides alike.
        chunk = max(1, steps // rounds)
        h_rates, b_rates = [], []
        for r in range(rounds):
            h_rates.append(harness_chunk(3 + r * chunk, chunk))
            b_rates.append(bare_chunk(chunk))
        harness, bare = statistics.median(h_rates), statistics.median(b_rates)

        n_eval = sum(len(s) for s in trainer.eval_splits.values())
        eval_rate = float("nan")
        if measure_eval:  # evaluation does not depend on the method: measured once per workload
            trainer.evaluate(run) if run.device.type == "cuda" else None  # warm-up: CUDA kernels, cuDNN plans
            t = time.perf_counter()
            trainer.evaluate(run)
            eval_rate = n_eval / (time.perf_counter() - t)
    return {"dataset": dataset, "method": method, "harness_steps_per_s": harness, "bare_steps_per_s": bare,
            "ratio_bare_over_harness": bare / harness, "eval_examples_per_s": eval_rate, "eval_examples": n_eval}


def eval_side(side: str, dataset: str, device: str, batch: int | None, images: int = 70000) -> dict:
    """One evaluation pass over every evaluation split, timed after a warm-up pass, in this process (its peak
    resident memory is the process's own): ``harness`` through ``Trainer.evaluate`` (its chosen evaluation batch,
    or ``batch``), ``domainbed`` as DomainBed's ``misc.accuracy`` does it (``model.eval()``, ``torch.no_grad()``,
    slices of 64 of the same tensors, correct predictions summed)."""
    import resource
    import tempfile

    spec = TrialSpec.resolve(dataset, "erm", steps=1, eval_every=1, dataset_options={"n": images})
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(spec, d, RunOptions(device=device, eval_batch_size=batch))
        run = trainer._build()
        n = sum(len(s) for s in trainer.eval_splits.values())

        def domainbed_pass() -> float:
            model = run.model
            model.eval()
            correct = 0.0
            with torch.no_grad():
                for split in trainer.eval_splits.values():
                    x, y = split.tensors["x"], split.tensors["y"]
                    for i in range(0, len(x), 64):
                        p = model(x[i:i + 64])
                        correct += p.argmax(1).eq(y[i:i + 64]).float().sum().item()
            model.train()
            return correct

        one = (lambda: trainer.evaluate(run)) if side == "harness" else domainbed_pass
        reset = _reset_peak_rss()  # from here on: the evaluation's own peak, not the dataset's construction
        one()  # warm-up: allocator, oneDNN/cuDNN plans
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        one()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"side": side, "examples": n, "examples_per_s": rate, "peak_rss_mb": peak / 2**20,
            "eval_peak_rss_mb": _peak_rss_kb() / 2**10 if reset else None,
            "batch": run.eval_batch_size if side == "harness" else 64}


def _reset_peak_rss() -> bool:
    """Resets this process's peak resident size (Linux: ``5`` into /proc/self/clear_refs resets VmHWM); False where
    it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    """VmHWM of /proc/self/status, in kB: the peak resident size since the last ``_reset_peak_rss``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def eval_comparison(dataset: str, device: str, images: int = 70000, rounds: int = 2) -> list[dict]:
    """``eval_side`` for both sides, each in its own process (so peak memory is that side's), alternated."""
    import subprocess

    rows = []
    for _ in range(rounds):
        for side in ("domainbed", "harness"):
            out = subprocess.run([sys.executable, __file__, "--eval-side", side, "--eval-dataset", dataset,
                                  "--device", device, "--eval-images", str(images)], capture_output=True, text=True,
                                 check=True)  # fmt: skip
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--cnn-steps", type=int, default=30)
    p.add_argument("--methods", default="erm,groupdro,irm,vrex")
    p.add_argument("--workloads", default="digits,cnn", help="digits (colored_digits MLP), cnn (MNIST-shaped CNN)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (harness and bare loop on the same device)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--eval-side", choices=("harness", "domainbed"), help=argparse.SUPPRESS)
    p.add_argument("--eval-dataset", default="bench_mnist_shaped", help=argparse.SUPPRESS)
    p.add_argument("--eval-images", type=int, default=70000,
                   help="images of the evaluation comparison (default: 70,000, DomainBed's MNIST)")
    a = p.parse_args(argv)
    if a.eval_side:
        print(json.dumps(eval_side(a.eval_side, a.eval_dataset, a.device, None, a.eval_images)))
        return 0
    rows = []
    methods = a.methods.split(",")
    if "digits" in a.workloads:
        rows += [bench_method("colored_digits", m, a.steps, {}, 64, measure_eval=i == 0, device=a.device)
                 for i, m in enumerate(methods)]
    if "cnn" in a.workloads:
        rows += [bench_method("bench_mnist_shaped", m, a.cnn_steps, {}, 64, measure_eval=i == 0, device=a.device)
                 for i, m in enumerate(methods)]
    where = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device} ({where})")
    print(f"{'dataset':20s} {'method':9s} {'harness st/s':>12s} {'bare st/s':>10s} {'bare/harness':>12s} "
          f"{'eval ex/s':>10s}")
    for r in rows:
        print(f"{r['dataset']:20s} {r['method']:9s} {r['harness_steps_per_s']:12.1f} {r['bare_steps_per_s']:10.1f} "
              f"{r['ratio_bare_over_harness']:12.3f} {r['eval_examples_per_s']:10.0f}")
    cnn = [r for r in rows if r["dataset"] == "bench_mnist_shaped"]
    if cnn:
        secs = 70000 / cnn[0]["eval_examples_per_s"]
        print(f"evaluation of 70,000 MNIST-shaped images with the MNIST CNN: {secs:.1f} s (goal: < 90 s)")
    if "cnn" in a.workloads:
        sides = eval_comparison("bench_mnist_shaped", a.device, a.eval_images)
        print(f"evaluation of the MNIST-shaped set ({a.eval_images:,} images, MNIST CNN), each side in its own "
              "process, alternated:")
        print(f"{'side':10s} {'batch':>6s} {'images/s':>9s} {'peak RSS MB':>12s} {'eval peak MB':>13s}")
        for r in sides:
            during = "n/a" if r["eval_peak_rss_mb"] is None else f"{r['eval_peak_rss_mb']:.0f}"
            print(f"{r['side']:10s} {r['batch']:6d} {r['examples_per_s']:9.0f} {r['peak_rss_mb']:12.0f} "
                  f"{during:>13s}")
        print("(peak RSS: the whole process's, building the data included; eval peak: from the first evaluation "
              "pass on)")
        best = {side: max(r["examples_per_s"] for r in sides if r["side"] == side) for side in ("harness", "domainbed")}
        print(f"harness / DomainBed-style images/s: {best['harness'] / best['domainbed']:.2f} (goal: >= 1.5)")
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
