"""bench/records.py: the trial folder's one JSONL reader and its torn-line policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiftbench import records, trainer
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


def test_the_trainer_reexports_the_file_names_and_status(tmp_path: Path):
    assert (trainer.FINAL, trainer.FAILED, trainer.SPEC, trainer.CHECKPOINT, trainer.RESULTS, trainer.PREDICTIONS,
            trainer.WEIGHTS) == ("final.json", "failed.json", "spec.json", "checkpoint.pt", "results.jsonl",
                                 "predictions.npz", "model.pt")
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
