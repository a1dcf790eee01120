"""Sweeps: content-addressed trials, idempotent reruns (no duplicate trials, no duplicate MLflow runs)."""

from __future__ import annotations

import json

import pytest

from shiftbench.config import SweepSpec, load_suite
from shiftbench.errors import UserError
from shiftbench.sweep import prepare_out, run_sweep, trial_dir
from shiftbench.records import FINAL
from shiftbench.trainer import Interrupted, RunOptions, run_trial


def tiny_sweep(small, **kw) -> SweepSpec:
    raw = {"name": "tiny", "datasets": ["colored_digits"], "methods": ["erm", "vrex"], "test_envs": "default",
           "n_hparams": 2, "n_seeds": 1, "steps": 6, "eval_every": 3,
           "dataset_options": {"colored_digits": small["colored_digits"]}, **kw}  # fmt: skip
    return SweepSpec.from_mapping(raw)


def mlflow_runs(out):
    from shiftbench.tracking import Tracker

    t = Tracker(out, "shiftbench-tiny")
    return t.client.search_runs([t.experiment_id], max_results=1000)


def test_rerun_is_idempotent_with_no_duplicate_mlflow_runs(small, tmp_path):
    sweep = tiny_sweep(small)
    first = run_sweep(sweep, tmp_path, progress=False)
    assert first["total"] == 4 and first["done"] == 4 and first["skipped_done"] == 0
    runs = mlflow_runs(tmp_path)
    trial_runs = [r for r in runs if "shiftbench.trial_hash" in r.data.tags]
    parents = [r for r in runs if "shiftbench.sweep_hash" in r.data.tags]
    assert len(trial_runs) == 4 and len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    assert {r.data.tags["shiftbench.trial_hash"] for r in trial_runs} == {t.hash for t in sweep.trials()}
    stamp = {t.hash: (trial_dir(tmp_path, t) / FINAL).stat().st_mtime_ns for t in sweep.trials()}

    again = run_sweep(sweep, tmp_path, progress=False)
    assert again["skipped_done"] == 4 and again["done"] == 0
    assert len(list((tmp_path / "trials").iterdir())) == 4
    assert {t.hash: (trial_dir(tmp_path, t) / FINAL).stat().st_mtime_ns for t in sweep.trials()} == stamp
    runs2 = mlflow_runs(tmp_path)
    assert sorted(r.info.run_id for r in runs2) == sorted(r.info.run_id for r in runs)
    from shiftbench.tracking import Tracker

    client = Tracker(tmp_path, "shiftbench-tiny").client
    steps = [m.step for m in client.get_metric_history(trial_runs[0].info.run_id, "env2_in_acc")]
    assert steps == [0, 3, 5]  # one value per evaluation, not duplicated by the rerun


def test_rerun_resumes_a_partial_trial(small, tmp_path):
    sweep = tiny_sweep(small, methods=["erm"], n_hparams=1)
    (t,) = sweep.trials()
    prepare_out(tmp_path, sweep)
    with pytest.raises(Interrupted):
        run_trial(t, trial_dir(tmp_path, t), RunOptions(stop_after=0))
    counts = run_sweep(sweep, tmp_path, progress=False, track=False)
    assert counts["resumed"] == 1 and counts["done"] == 1
    reference = run_trial(t, tmp_path / "ref")
    assert (trial_dir(tmp_path, t) / FINAL).exists()
    got = run_trial(t, trial_dir(tmp_path, t))
    assert got["record"]["env2_in_acc"] == reference["record"]["env2_in_acc"]


@pytest.mark.slow
def test_worker_pool_matches_sequential(small, tmp_path):
    sweep = tiny_sweep(small)
    run_sweep(sweep, tmp_path / "seq", progress=False, track=False)
    run_sweep(sweep, tmp_path / "pool", workers=2, progress=False, track=False)
    for t in sweep.trials():
        a = run_trial(t, trial_dir(tmp_path / "seq", t))["record"]
        b = run_trial(t, trial_dir(tmp_path / "pool", t))["record"]
        # Workers use fewer threads, so float reductions differ in the last digits.
        assert a["env2_in_loss"] == pytest.approx(b["env2_in_loss"], rel=1e-3)


def test_grid_expansion_counts():
    sweep = SweepSpec.from_mapping({"datasets": ["colored_digits", "rotated_digits"], "methods": ["erm", "irm"],
                                    "test_envs": "each+pairs", "n_hparams": 3, "n_seeds": 2})  # fmt: skip
    # colored: 3 singles + 3 pairs; rotated: 6 singles + 15 pairs; x 2 methods x 3 draws x 2 seeds
    assert len(sweep.trials()) == (6 + 21) * 2 * 3 * 2
    assert len({t.hash for t in sweep.trials()}) == len(sweep.trials())


def test_named_suites_follow_their_protocols():
    db = load_suite("domainbed")
    assert (db.n_hparams, db.n_seeds, db.steps, db.eval_every, db.test_envs) == (20, 3, 5001, 100, "each+pairs")
    qs = load_suite("quickstart")
    assert set(qs.methods) == {"erm", "groupdro", "irm", "vrex"}
    assert set(qs.datasets) == {"colored_digits", "rotated_digits"}
    assert qs.n_seeds >= 2 and qs.n_hparams >= 2


def test_every_shipped_suite_resolves_and_describes_itself(capsys):
    from shiftbench.cli import main
    from shiftbench.config import suite_names

    names = suite_names()
    assert {"quickstart", "domainbed", "prefs", "cbft_p60", "cbft_p90", "adversarial", "coordination"} <= set(names)
    for name in names:
        assert load_suite(name).trials(), name  # every trial spec resolves: names, environments, callbacks
    assert main(["list", "suites"]) == 0
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()[1:])
    assert set(listed) == set(names)
    from shiftbench.config import SUITES_DIR

    for name, said in listed.items():  # the whole opening comment, never cut mid-sentence
        lines = (SUITES_DIR / f"{name}.yaml").read_text().splitlines()
        comment = [x.lstrip("#").strip() for x in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))]]
        assert said == " ".join(comment), name


def test_suite_overrides_and_validation(tmp_path):
    s = load_suite("quickstart", n_seeds=1, steps=10)
    assert s.n_seeds == 1 and s.steps == 10
    with pytest.raises(UserError, match="unknown method 'ermm'"):
        SweepSpec.from_mapping({"datasets": ["colored_digits"], "methods": ["ermm"]})


def test_an_error_raised_while_an_interrupt_is_handled_leaves_the_trial_resumable(small, tmp_path, monkeypatch):
    # torch.save's zip writer raises RuntimeError when a Ctrl-C (or a Ray cancel) lands inside it: the trial was
    # stopped, not broken, so no failed.json may be written (a rerun must resume it)
    from shiftbench import sweep as sweep_mod

    spec = tiny_sweep(small).trials()[0]

    def interrupted(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(sweep_mod, "run_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod._train(spec.to_dict(), str(tmp_path / "t"), {})
    assert not (tmp_path / "t" / "failed.json").exists()

    def broken(*a, **k):
        raise RuntimeError("a real crash")

    monkeypatch.setattr(sweep_mod, "run_trial", broken)
    (tmp_path / "t").mkdir(exist_ok=True)
    assert sweep_mod._train(spec.to_dict(), str(tmp_path / "t"), {})["status"] == "failed"
    assert json.loads((tmp_path / "t" / "failed.json").read_text())["reason"] == "RuntimeError: a real crash"


def test_a_sweep_resolves_each_trial_once_and_checks_data_once(small, tmp_path, monkeypatch, capsys):
    """Issue 13: ``trials()`` used to resolve every trial three times per sweep and the data check and --out claim
    ran twice. Through the CLI path (parse the suite, print the header, run), TrialSpec.resolve runs exactly once
    per trial and the dataset check once per dataset."""
    from shiftbench import cli, config
    from shiftbench.registry import DATASETS

    resolves, checks = [], []
    real_resolve = config.TrialSpec.resolve.__func__
    monkeypatch.setattr(config.TrialSpec, "resolve",
                        classmethod(lambda cls, *a, **k: resolves.append(a[:2]) or real_resolve(cls, *a, **k)))
    ds_cls = DATASETS.get("colored_digits")
    real_check = ds_cls.check.__func__
    monkeypatch.setattr(ds_cls, "check", classmethod(lambda cls, *a: checks.append(a) or real_check(cls, *a)))
    rc = cli.main(["sweep", "--datasets", "colored_digits", "--methods", "erm,irm", "--steps", "2",
                   "--n-hparams", "1", "--n-seeds", "1", "--test-envs", "default", "--out", str(tmp_path / "o"),
                   "--no-mlflow", "--no-progress", *sum((["--option", f"{k}={v}"] for k, v in small["colored_digits"].items()), [])])
    assert rc == 0
    assert len(resolves) == 2, resolves  # 2 methods x 1 test-env set x 1 draw x 1 seed, each resolved once
    assert len(checks) == 1
    assert "sweep " in capsys.readouterr().err


def test_pack_through_the_driver_gives_each_trial_its_own_folder_and_run(small, tmp_path):
    """``--pack`` end to end: the driver's pack jobs (two packs of 3 trials: ERM and IRM over 3 seeds) write the
    same trial folders, with records equal within float tolerance, as ``--pack off``; one MLflow run per trial."""
    import os

    from shiftbench.pack import group_trials

    raw = {"name": "tiny", "datasets": ["colored_digits"], "methods": ["erm", "irm"], "test_envs": "default",
           "n_hparams": 1, "n_seeds": 3, "steps": 20, "eval_every": 10,
           "dataset_options": {"colored_digits": small["colored_digits"]}}  # fmt: skip
    sweep = SweepSpec.from_mapping(raw)
    assert [len(g) for g in group_trials(sweep.trials())] == [3, 3]
    packed = run_sweep(sweep, tmp_path / "packed", progress=False, pack="auto")
    alone = run_sweep(sweep, tmp_path / "off", progress=False, track=False)
    assert packed["done"] == alone["done"] == 6
    for t in sweep.trials():
        a, b = trial_dir(tmp_path / "packed", t), trial_dir(tmp_path / "off", t)
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        ra, rb = (json.loads((d / FINAL).read_text())["record"] for d in (a, b))
        for k, v in rb.items():
            if k not in ("elapsed", "step_time"):
                assert ra[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert len(mlflow_runs(tmp_path / "packed")) == 6 + 1  # one per trial + the sweep's parent
