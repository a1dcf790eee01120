"""bench/records.py: the trial folder's one JSONL reader and its torn-line policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shiftbench import io, records, trainer
from shiftbench.records import read_jsonl


def test_a_torn_last_line_is_skipped(tmp_path: Path):
    path = tmp_path / records.RESULTS
    path.write_text('{"step": 10}\n\n{"step": 20}\n{"step": 3')  # a write cut short: no newline, no closing brace
    assert read_jsonl(path) == [{"step": 10}, {"step": 20}]


def test_a_malformed_middle_line_raises_with_its_number(tmp_path: Path):
    path = tmp_path / records.RESULTS
    path.write_text('{"step": 10}\n\n{"step": 2\n{"step": 30}\n')  # line 3 is broken; the blank line 2 counts
    with pytest.raises(ValueError, match=r"^results\.jsonl line 3: "):
        read_jsonl(path)


def test_a_complete_but_malformed_last_line_raises(tmp_path: Path):
    # it ends in a newline, so the write finished: damage, not a torn append (the report lists the trial unreadable)
    path = tmp_path / "r.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match=r"^r\.jsonl line 2: "):
        read_jsonl(path)


def test_a_missing_file_is_no_records_unless_required(tmp_path: Path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    with pytest.raises(OSError):
        read_jsonl(tmp_path / "none.jsonl", missing_ok=False)


def test_the_file_names_and_status_and_the_trainer_writes_only_through_records(tmp_path: Path):
    assert (records.FINAL, records.FAILED, records.SPEC, records.CHECKPOINT, records.RESULTS, records.PREDICTIONS,
            records.WEIGHTS) == ("final.json", "failed.json", "spec.json", "checkpoint.pt", "results.jsonl",
                                 "predictions.npz", "model.pt")
    # the trainer holds no file name (it calls records' writers) and no writer of its own
    assert not [n for n in ("FINAL", "FAILED", "SPEC", "CHECKPOINT", "RESULTS", "PREDICTIONS", "WEIGHTS",
                            "atomic_write", "write_json", "write_jsonl", "read_json") if hasattr(trainer, n)]
    assert trainer.trial_status is records.trial_status
    assert records.trial_status(tmp_path) == "new"
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert records.trial_status(tmp_path) == "partial"
    (tmp_path / "failed.json").write_text("{}")
    assert records.trial_status(tmp_path) == "failed"
    (tmp_path / "final.json").write_text("{}")
    assert records.trial_status(tmp_path) == "done"


@pytest.mark.parametrize("key,parsed", [
    ("env0_in_acc", (0, "in", "acc")),
    ("env12_out_worst_group_acc", (12, "out", "worst_group_acc")),
    ("env3_in_return", (3, "in", "return")),
])
def test_env_keys_round_trip(key, parsed):
    assert records.parse_env_key(key) == parsed
    assert records.env_key(*parsed) == key
    assert records.env_split(parsed[0], parsed[1]) + "_" + parsed[2] == key


@pytest.mark.parametrize("key", ["step", "loss", "val_acc", "env0_acc", "env0_test_acc", "drift_env0_inputs_pvalue",
                                 "envx_in_acc", "env0_in_"])
def test_keys_of_no_environment_split_parse_to_none(key):
    assert records.parse_env_key(key) is None


def test_metric_key_joins_any_split_name():
    assert records.metric_key("val", "worst_group_acc") == "val_worst_group_acc"
    assert records.metric_key(records.env_split(1, "out"), "loss") == "env1_out_loss"


def test_held_out_envs_reads_the_spec_as_ints_in_order():
    assert records.held_out_envs({"spec": {"test_envs": ["2", 0]}}) == [2, 0]
    assert records.held_out_envs({"spec": {"test_envs": None}}) == []
    assert records.held_out_envs({"spec": {}}) == records.held_out_envs({}) == []


def test_write_file_writes_text_as_utf8_and_bytes_as_given_and_leaves_no_temp_file(tmp_path: Path):
    from shiftbench.io import write_file

    write_file(tmp_path / "sub" / "a.md", "± 0.5\n")
    write_file(tmp_path / "sub" / "b.png", b"\x89PNG")
    assert (tmp_path / "sub" / "a.md").read_bytes() == b"\xc2\xb1 0.5\n"
    assert (tmp_path / "sub" / "b.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.md", "b.png"]


# ---------------------------------------------------------------------------------------------------------- writers
# Each writer must write the bytes the trainer wrote before the writers existed (io.write_json, io.write_jsonl,
# io.atomic_write + np.savez / torch.save): records on disk and the hashes signed over them must not change.

_META = {"hash": "ab" * 32, "spec": {"dataset": "colored_digits", "test_envs": [2]}, "task": "classification",
         "env_names": ["+90%", "+80%", "-90%"], "data_version": np.str_("v1"), "size": np.int64(7)}


def _bytes(tmp_path: Path, name: str, write) -> bytes:
    d = tmp_path / name
    d.mkdir()
    write(d)
    (f,) = [p for p in d.iterdir()]
    return f.read_bytes()


@pytest.mark.parametrize("writer,io_writer,fname", [
    (records.write_spec, io.write_json, "spec.json"),
    (records.write_final, io.write_json, "final.json"),
    (records.write_failed, io.write_json, "failed.json"),
])
def test_json_writers_write_what_io_write_json_writes(tmp_path: Path, writer, io_writer, fname):
    ours = _bytes(tmp_path, "ours", lambda d: writer(d, _META))
    assert ours == _bytes(tmp_path, "io", lambda d: io_writer(d / fname, _META))
    assert (tmp_path / "ours" / fname).exists()
    # indent 1, sorted keys, numpy scalars as numbers/strings: worked out by hand for a small record
    assert _bytes(tmp_path, "small", lambda d: writer(d, {"b": np.int64(2), "a": [1.5]})) == \
        b'{\n "a": [\n  1.5\n ],\n "b": 2\n}'


def test_write_results_writes_sorted_json_lines(tmp_path: Path):
    rows = [{"step": 0, "loss": np.float32(0.5)}, {"step": 5, "env0_in_acc": 1.0}]
    ours = _bytes(tmp_path, "ours", lambda d: records.write_results(d, rows))
    assert ours == _bytes(tmp_path, "io", lambda d: io.write_jsonl(d / "results.jsonl", rows))
    assert ours == b'{"loss": 0.5, "step": 0}\n{"env0_in_acc": 1.0, "step": 5}\n'
    assert records.read_results(tmp_path / "ours") == [{"loss": 0.5, "step": 0}, {"env0_in_acc": 1.0, "step": 5}]


def _final_outputs():
    return {  # two splits, keys in another order in the second: the file follows PREDICTION_KEYS
        "env0_in": {"idx": np.array([3, 1]), "label": np.array([0, 1]), "pred": np.array([0, 0]),
                    "score": np.array([[0.1, -0.1], [0.2, 0.3]], dtype=np.float32),
                    "correct": np.array([1.0, 0.0], dtype=np.float32), "loss": np.array([0.6, 0.9], np.float32)},
        "env2_out": {"loss": np.array([0.4], np.float32), "idx": np.array([7]), "label": np.array([1]),
                     "pred": np.array([1]), "score": np.array([[0.0, 1.0]], dtype=np.float32),
                     "correct": np.array([1.0], dtype=np.float32)},
    }


def _old_predictions(d: Path, final_outputs) -> None:
    """Trainer._finish's assembly as it was before records.write_predictions, kept here as the reference."""
    arrays: dict[str, list[np.ndarray]] = {}
    for name, out in final_outputs.items():
        n = len(out["idx"])
        arrays.setdefault("split", []).append(np.array([name] * n))
        for k in ("idx", "label", "pred", "score", "correct", "loss"):
            if k in out:
                arrays.setdefault(k, []).append(out[k])
    io.atomic_write(d / "predictions.npz", lambda f: np.savez(f, **{k: np.concatenate(v) for k, v in arrays.items()}),
                    mode="wb")


def test_write_predictions_matches_the_trainers_assembly(tmp_path: Path):
    outs = _final_outputs()
    ours = _bytes(tmp_path, "ours", lambda d: records.write_predictions(d, outs))
    assert ours == _bytes(tmp_path, "old", lambda d: _old_predictions(d, outs))
    z = records.read_predictions(tmp_path / "ours")
    assert list(z) == ["split", "idx", "label", "pred", "score", "correct", "loss"]
    assert z["split"].tolist() == ["env0_in", "env0_in", "env2_out"]
    assert z["idx"].tolist() == [3, 1, 7]
    assert z["loss"].tolist() == pytest.approx([0.6, 0.9, 0.4])
    assert z["score"].shape == (3, 2)


def test_read_predictions_refuses_pickled_arrays(tmp_path: Path):
    np.savez(tmp_path / "predictions.npz", split=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError):
        records.read_predictions(tmp_path)


def test_weights_and_checkpoint_writers_write_what_torch_save_writes(tmp_path: Path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    old_w = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ours = _bytes(tmp_path, "ours", lambda d: records.write_weights(d, model.state_dict()))
    assert ours == _bytes(tmp_path, "old", lambda d: io.atomic_write(d / "model.pt", lambda f: torch.save(old_w, f),
                                                                       mode="wb"))
    back = records.read_weights(tmp_path / "ours")
    assert torch.equal(back["weight"], model.weight.detach())
    assert records.read_reference(tmp_path / "old", "reference_erm_5") is None
    # a reference model keeps the state_dict as the trainer saved it (its _metadata too: other bytes than model.pt)
    ours = _bytes(tmp_path, "ref", lambda d: records.write_reference(d, "reference_erm_5", model.state_dict()))
    assert ours == _bytes(tmp_path, "ref_old", lambda d: io.atomic_write(
        d / "reference_erm_5.pt", lambda f: torch.save(model.state_dict(), f), mode="wb"))
    assert (tmp_path / "ref" / "reference_erm_5.pt").is_file()
    assert torch.equal(records.read_reference(tmp_path / "ref", "reference_erm_5")["bias"], model.bias.detach())

    state = {"step": 4, "records": [{"step": 0}], "rng": torch.get_rng_state(), "cuda_rng": None, "elapsed": 1.5,
             "algorithm": {"model": old_w}}
    ours = _bytes(tmp_path, "ck", lambda d: records.save_checkpoint(d, state))
    assert ours == _bytes(tmp_path, "ck_old", lambda d: io.atomic_write(d / "checkpoint.pt",
                                                                        lambda f: torch.save(state, f), mode="wb"))
    loaded = records.load_checkpoint(tmp_path / "ck")
    assert loaded["step"] == 4 and loaded["records"] == [{"step": 0}] and torch.equal(loaded["rng"], state["rng"])
    assert records.load_checkpoint(tmp_path / "none") is None
    assert records.trial_status(tmp_path / "ck") == "partial"


def test_json_readers_read_what_the_writers_wrote(tmp_path: Path):
    records.write_spec(tmp_path, {"hash": "h", "spec": {}})
    records.write_final(tmp_path, {"status": "done", "hash": "h"})
    records.write_failed(tmp_path, {"status": "failed", "reason": "r"})
    assert records.read_spec(tmp_path) == {"hash": "h", "spec": {}}
    assert records.read_final(tmp_path) == {"status": "done", "hash": "h"}
    assert records.read_failed(tmp_path)["reason"] == "r"
    with pytest.raises(OSError):
        records.read_final(tmp_path / "nothing")


# -------------------------------------------------------------------------------------------------------- scan_runs


def _trial_folder(d: Path, trial_hash: str, *, final=None, failed=None, results=None, checkpoint=False,
                  spec_text=None) -> Path:
    d.mkdir(parents=True)
    (d / "spec.json").write_text(spec_text if spec_text is not None else
                                 json.dumps({"hash": trial_hash, "spec": {"method": "erm", "test_envs": [0]},
                                             "task": "classification"}))
    if results is not None:
        (d / "results.jsonl").write_text(results)
    if final is not None:
        (d / "final.json").write_text(final)
    if failed is not None:
        (d / "failed.json").write_text(failed)
    if checkpoint:
        (d / "checkpoint.pt").write_bytes(b"not read")
    return d


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A sweep folder built by hand, folder by folder, with what each must count as."""
    t = tmp_path / "sweep" / "trials"
    done = '{"status": "done", "record": {"step": 5, "env0_in_acc": 0.5}}'
    _trial_folder(t / "a", "h1", final=done, results='{"step": 0}\n{"step": 5}\n{"step": 1')  # done; torn last line
    _trial_folder(t / "b", "h1", final=done, results='{"step": 0}\n')  # done, same hash as a: a duplicate, dropped
    _trial_folder(t / "c", "h2", final=done)  # done without results.jsonl: final's record is its one record
    _trial_folder(t / "d", "h3", failed='{"status": "failed", "reason": "non-finite loss", "step": 3}')  # failed
    _trial_folder(t / "e", "h4", failed="{not json")  # failed, its failure unreadable
    _trial_folder(t / "f", "h5", checkpoint=True)  # incomplete (partial)
    _trial_folder(t / "g", "h6")  # incomplete (new)
    _trial_folder(t / "h", "h7", spec_text="{")  # unreadable spec
    _trial_folder(t / "i", "h8", final=done, results='{"step": 0}\n{"step": 2\n{"step": 4}\n')  # unreadable results
    _trial_folder(t / "j", "h9", final="[1, ")  # unreadable final.json
    (t / "k").mkdir()  # no spec.json: not a trial folder
    (t / "notes.txt").write_text("x")  # a file
    return tmp_path / "sweep"


def test_scan_runs_sorts_a_hand_built_sweep(runs: Path):
    scan = records.scan_runs(runs)
    assert scan.counts == {"done": 2, "failed": 2, "incomplete": 2, "unreadable": 3}
    a, c = scan.done
    assert (Path(a["dir"]).name, a["hash"], a["records"]) == ("a", "h1", [{"step": 0}, {"step": 5}])
    assert (Path(c["dir"]).name, c["records"]) == ("c", [{"step": 5, "env0_in_acc": 0.5}])
    assert a["final"]["status"] == "done" and a["task"] == "classification" and a["env_names"] is None
    assert a["spec"] == {"method": "erm", "test_envs": [0]}
    assert scan.failed[0] == {"hash": "h3", "dir": str(runs / "trials" / "d"), "reason": "non-finite loss", "step": 3,
                              "spec": {"method": "erm", "test_envs": [0]}}
    assert scan.failed[1]["reason"].startswith("failed.json unreadable: ") and scan.failed[1]["step"] is None
    assert [Path(i).name for i in scan.incomplete] == ["f", "g"]
    assert [Path(u["dir"]).name for u in scan.unreadable] == ["h", "i", "j"]
    assert scan.unreadable[0]["reason"].startswith("spec.json: ")
    assert scan.unreadable[1]["reason"].startswith("results.jsonl line 2: ")
    assert scan.sweeps == [] and scan.duplicates == 0


def test_scan_runs_layouts(runs: Path, tmp_path: Path):
    assert records.scan_runs(runs / "trials").counts == records.scan_runs(runs).counts  # a folder of trial folders
    one = records.scan_runs(runs / "trials" / "d")  # one trial folder
    assert one.counts == {"done": 0, "failed": 1, "incomplete": 0, "unreadable": 0}
    assert records.scan_runs(tmp_path / "missing").counts == dict.fromkeys(("done", "failed", "incomplete",
                                                                              "unreadable"), 0)
    assert [p.name for p in records.trial_dirs(runs, marker=records.FINAL)] == ["a", "b", "c", "i", "j"]
    assert records.trial_path(runs, "0123456789abcdef0123") == runs / "trials" / "0123456789abcdef"
    assert records.sweep_of(runs / "trials" / "a") == runs.resolve()
    assert records.sweep_of(runs) is None and records.sweep_of(tmp_path / "lone") is None


# ----------------------------------------------------------------------------------------------- a trial's model


@pytest.fixture(scope="module")
def tiny_trial(tmp_path_factory) -> Path:
    from shiftbench.config import TrialSpec

    spec = TrialSpec.resolve("colored_digits", "erm", steps=6, eval_every=3, seed=3,
                             dataset_options={"env_size": 120, "resolution": 8})
    d = tmp_path_factory.mktemp("trial") / spec.short_hash
    assert trainer.run_trial(spec, d)["status"] == "done"
    return d


def test_load_trial_model_predicts_what_the_trial_committed(tiny_trial: Path):
    torch = pytest.importorskip("torch")
    from shiftbench.registry import TASKS

    torch.manual_seed(123)
    before = torch.get_rng_state()
    model, spec, dataset = records.load_trial_model(tiny_trial)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    assert spec.hash == records.read_spec(tiny_trial)["hash"] and spec.steps == 6
    task = TASKS.get(dataset.TASK)()
    committed = records.read_predictions(tiny_trial)
    n = 0
    for name, split in dataset.eval_splits().items():
        rows = committed["split"] == name
        preds, scores, ids = [], [], []
        with torch.inference_mode():
            for b in split.eval_batches(64):
                out = task.outputs(task.scores(model, b), b)
                preds.append(out["pred"])
                scores.append(out["score"])
                ids.append(b["idx"])
        assert torch.cat(ids).numpy().tolist() == committed["idx"][rows].tolist()
        assert torch.cat(preds).numpy().tolist() == committed["pred"][rows].tolist()
        np.testing.assert_allclose(torch.cat(scores).float().numpy(), committed["score"][rows], atol=1e-6)
        n += int(rows.sum())
    assert n == len(committed["idx"]) == 3 * 120  # 3 environments of env_size 120, each split into in + out
    described, meta = records.load_described_model(tiny_trial)
    assert meta["hash"] == spec.hash
    for (k, v), (k2, v2) in zip(model.state_dict().items(), described.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_build_trial_model_is_the_trainers_initialisation():
    torch = pytest.importorskip("torch")
    from shiftbench.config import TrialSpec
    from shiftbench.hparams import seed_hash
    from shiftbench.models import build_model

    spec = TrialSpec.resolve("colored_digits", "erm", steps=6, seed=5, dataset_options={"env_size": 120,
                                                                                         "resolution": 8})
    ours = records.build_trial_model(spec, (2, 8, 8), 2, "classification").state_dict()
    torch.manual_seed(seed_hash(5, "init"))
    theirs = build_model(spec.model, (2, 8, 8), 2, spec.hparams).state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    other = records.build_trial_model(spec.to_dict() | {"seed": 6}, (2, 8, 8), 2, "classification").state_dict()
    assert not all(torch.equal(ours[k], other[k]) for k in ours)


# ---------------------------------------------------------------------------------------- one owner of the names

BENCH = Path(records.__file__).resolve().parent
TRIAL_FILES = (records.FINAL, records.FAILED, records.SPEC, records.CHECKPOINT, records.RESULTS, records.PREDICTIONS,
               records.WEIGHTS)
ALLOWED = {
    "records.py",  # the owner
}
"""Modules still allowed to name a trial file, each with its reason; the list only shrinks."""


def _literals(path: Path) -> list[tuple[int, str]]:
    """The string constants of a module (f-string parts included) that are not docstrings, with their lines."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(st.value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            for st in node.body if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_scanner_sees_a_literal_in_an_f_string_and_skips_docstrings(tmp_path: Path):
    mod = tmp_path / "m.py"
    mod.write_text('"""Reads final.json."""\n\ndef f(d):\n    """spec.json too."""\n    return f"{d}/model.pt"\n')
    assert [v for _, v in _literals(mod) if any(n in v for n in TRIAL_FILES)] == ["/model.pt"]


def test_no_other_module_names_a_trial_file():
    found = []
    for path in sorted(BENCH.rglob("*.py")):
        rel = path.relative_to(BENCH)
        if rel.parts[0] in ALLOWED:
            continue
        found += [f"{rel}:{line}: {value!r}" for line, value in _literals(path) if any(n in value for n in TRIAL_FILES)]
    assert not found, "name trial files through shiftbench.records' constants:\n" + "\n".join(found)
