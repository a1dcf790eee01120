"""The plug-in interfaces carry what later workloads need, without touching the trainer.

Each test registers a small plug-in for its own duration: a preference (Bradley–Terry) dataset, a dataset with its
own group evaluator, a method with a frozen reference model and a second data stream, and a callback that adds
metrics to every record and a file at the end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shiftbench.algorithm import Algorithm
from shiftbench.config import TrialSpec
from shiftbench.data import Environment, ShiftDataset, TensorSplit, tensor_digest
from shiftbench.errors import UserError
from shiftbench.methods.erm import ERM
from shiftbench.registry import CALLBACKS, DATASETS, METHODS, Registry
from shiftbench.trainer import Callback, Interrupted, RunOptions, run_trial


@pytest.fixture
def register():
    """register(registry, name, cls) for the duration of one test."""
    added = []

    def add(registry, name, cls):
        registry.register(name)(cls)
        added.append((registry, name))
        return cls

    yield add
    for registry, name in added:
        registry._items.pop(name, None)


class PairsDataset(ShiftDataset):
    """Pairs of 6-d responses; the chosen one has the larger first feature; the second feature is a spurious cue
    agreeing with the preference at a per-domain rate."""

    TASK = "preference"
    ENVIRONMENTS = ("chat", "code", "safety")
    DEFAULT_TEST_ENVS = (2,)
    OPTIONS = {"n": 300}

    def __init__(self, root=None, options=None, download=False):
        super().__init__(root, options, download)
        self.input_shape, self.num_classes = (6,), 1
        g = torch.Generator().manual_seed(0)
        self.environments = []
        for e, rate in enumerate((0.9, 0.8, 0.1)):
            n = self.options["n"]
            a, b = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
            chosen = torch.where((a[:, 0] > b[:, 0])[:, None], a, b)
            rejected = torch.where((a[:, 0] > b[:, 0])[:, None], b, a)
            agree = torch.rand(n, generator=g) < rate
            chosen[:, 1], rejected[:, 1] = torch.where(agree, 1.0, -1.0), torch.where(agree, -1.0, 1.0)
            t = {"chosen": chosen, "rejected": rejected, "idx": torch.arange(n), "group": agree.long()}
            cut = int(n * 0.8)
            self.environments.append(Environment(self.ENVIRONMENTS[e], {
                "in": TensorSplit({k: v[:cut] for k, v in t.items()}),
                "out": TensorSplit({k: v[cut:] for k, v in t.items()})}))  # fmt: skip

    def version(self):
        return tensor_digest({f"{e.name}/{s}/{k}": v for e in self.environments for s, sp in e.splits.items()
                              for k, v in sp.tensors.items()})  # fmt: skip


@pytest.mark.parametrize("method", ["erm", "groupdro", "irm", "vrex"])
def test_every_method_trains_a_bradley_terry_reward_model(method, register, tmp_path):
    register(DATASETS, "test_pairs", PairsDataset)
    spec = TrialSpec.resolve("test_pairs", method, steps=60, eval_every=20)
    final = run_trial(spec, tmp_path / "t")
    rec = final["record"]
    assert final["status"] == "done"
    assert rec["env0_in_acc"] > 0.85  # pairwise accuracy on a training domain (cue and content agree there)
    preds = np.load(tmp_path / "t" / "predictions.npz")
    sel = preds["split"] == "env2_in"
    assert np.allclose(preds["correct"][sel], preds["score"][sel] > 0)  # score = reward difference


class GroupEval(PairsDataset):
    """Owns its evaluation: adds worst-group accuracy over the ``group`` metadata, as WILDS' evaluators do."""

    def evaluate(self, split_name, outputs):
        base = super().evaluate(split_name, outputs)
        groups = self.eval_splits()[split_name].tensors["group"].numpy()[outputs["idx"] - outputs["idx"].min()]
        accs = [outputs["correct"][groups == g].mean() for g in np.unique(groups)]
        return {**base, "worst_group_acc": float(min(accs))}


def test_dataset_owned_evaluation_reaches_the_records(register, tmp_path):
    register(DATASETS, "test_groups", GroupEval)
    run_trial(TrialSpec.resolve("test_groups", "erm", steps=10, eval_every=5), tmp_path / "t")
    records = [json.loads(x) for x in (tmp_path / "t" / "results.jsonl").read_text().splitlines()]
    assert all("env2_out_worst_group_acc" in r for r in records)
    # The last record's numbers, recomputed from the final predictions and the pairs' group labels: per split, the
    # lowest accuracy over the groups (cue agrees / disagrees), and the plain accuracy over all pairs.
    preds, data, last = np.load(tmp_path / "t" / "predictions.npz"), GroupEval(), records[-1]
    gaps = []
    for split in ("env0_in", "env1_out", "env2_in", "env2_out"):
        sel = preds["split"] == split
        t = data.eval_splits()[split].tensors
        row = {int(i): k for k, i in enumerate(t["idx"])}
        groups = t["group"].numpy()[[row[int(i)] for i in preds["idx"][sel]]]
        correct = preds["correct"][sel].astype(float)
        by_group = [correct[groups == g].mean() for g in np.unique(groups)]
        assert last[f"{split}_worst_group_acc"] == pytest.approx(min(by_group), abs=1e-6), split
        assert last[f"{split}_acc"] == pytest.approx(correct.mean(), abs=1e-6), split
        gaps.append(correct.mean() - min(by_group))
    assert max(gaps) > 0.05  # the groups do differ somewhere, so the check above is not acc == worst-group acc


class Distill(ERM):
    """A CBFT-shaped method: a frozen reference model trained by another method, and a second data stream."""

    def setup(self, context):
        self.reference = context.train_reference("erm", steps=15)
        self.extra = context.stream(f"env{0}_out", 16)

    def update(self, minibatches, step):
        extra = self.extra(step)
        with torch.no_grad():
            target = self.reference(extra["x"]).softmax(1)
        distill = -(target * self.model(extra["x"]).log_softmax(1)).sum(1).mean()
        loss = torch.stack(self.risks(minibatches)).mean() + distill
        self.step_on(loss)
        return {"loss": loss.detach(), "distill": distill.detach()}


def test_method_with_reference_model_and_second_stream_resumes_exactly(register, small, tmp_path):
    register(METHODS, "test_distill", Distill)
    spec = TrialSpec.resolve("colored_digits", "test_distill", steps=21, eval_every=5,
                             dataset_options=small["colored_digits"])  # fmt: skip
    whole = run_trial(spec, tmp_path / "whole")
    assert (tmp_path / "whole" / "reference_erm_15.pt").exists()
    assert "distill" in whole["record"]
    with pytest.raises(Interrupted):
        run_trial(spec, tmp_path / "cut", RunOptions(stop_after=5))
    resumed = run_trial(spec, tmp_path / "cut")
    assert resumed["record"]["env2_in_loss"] == whole["record"]["env2_in_loss"]


class Probe(Callback):
    """Adds a metric to every record (as a robust-accuracy pass would) and a file at the end (as an attestation)."""

    def on_eval(self, run, record):
        with torch.no_grad():
            x = run.dataset.eval_splits()["env0_out"].tensors["x"][:64].to(run.device)
            record["probe_norm"] = float(run.model.featurizer(x).norm(dim=1).mean())

    def on_end(self, run, final):
        (run.dir / "probe.json").write_text(json.dumps({"steps": len(run.records)}))
        final["probe"] = "written"


def test_callbacks_add_metrics_and_files(register, small, tmp_path):
    register(CALLBACKS, "test_probe", Probe)
    spec = TrialSpec.resolve("colored_digits", "erm", steps=11, eval_every=5, dataset_options=small["colored_digits"],
                             callbacks=("test_probe",))  # fmt: skip
    final = run_trial(spec, tmp_path / "t")
    assert final["probe"] == "written" and "probe_norm" in final["record"]
    assert json.loads((tmp_path / "t" / "probe.json").read_text()) == {"steps": 3}
    plain = TrialSpec.resolve("colored_digits", "erm", steps=11, eval_every=5, dataset_options=small["colored_digits"])
    assert plain.hash != spec.hash  # a callback that changes the records changes the trial


def test_registry_rejects_duplicates_and_wrong_bases_and_suggests():
    reg = Registry("widget", "shiftbench.methods")
    reg.base = Algorithm

    @reg.register("alpha")
    class Alpha(ERM):
        pass

    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(type("Other", (ERM,), {}))
    with pytest.raises(TypeError, match="must subclass Algorithm"):
        reg.register("beta")(object)
    with pytest.raises(ValueError, match="lowercase"):
        reg.register("Gamma")(Alpha)
    with pytest.raises(UserError, match="did you mean 'alpha'"):
        reg.get("alpah")


def test_report_sections_from_other_modules(small, tmp_path):
    from shiftbench import report

    @report.report_section("test_counts")
    def counts(trials):
        n = len(trials)
        return report.Section("test_counts", "Trial count", f"{n} trials counted", f"<p>{n} trials counted</p>",
                              {"n": n}, {"extra/count.txt": str(n)})  # fmt: skip

    try:
        spec = TrialSpec.resolve("colored_digits", "erm", steps=3, eval_every=3,
                                 dataset_options=small["colored_digits"])
        run_trial(spec, tmp_path / "runs" / "trials" / spec.short_hash)
        trials = report.scan_runs(tmp_path / "runs").done
        metrics = report.write_report(trials, tmp_path / "rep", plots=False)
        assert metrics["sections"]["test_counts"] == {"n": 1}
        assert "## Trial count\n\n1 trials counted" in (tmp_path / "rep" / "leaderboard.md").read_text()
        assert "<p>1 trials counted</p>" in (tmp_path / "rep" / "leaderboard.html").read_text()
        assert (tmp_path / "rep" / "extra" / "count.txt").read_text() == "1"
    finally:
        report.SECTIONS.pop("test_counts")
