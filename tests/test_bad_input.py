"""Issue 12, part 3: every bad input ends in one line on stderr and exit status 2, never a traceback, and leaves
nothing behind. Each case runs through the real entry point (``shiftbench.cli.main``), a couple through the console
script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from shiftbench.cli import main
from shiftbench.errors import UserError

TINY = ["--option", "env_size=120", "resolution=8"]
TRAIN = ["train", "--dataset", "colored_digits", "--method", "erm", "--test-envs", "2", "--steps", "2",
         "--eval-every", "2", "--no-mlflow", *TINY]  # fmt: skip
SWEEP = ["sweep", "--datasets", "colored_digits", "--methods", "erm", "--test-envs", "2", "--steps", "2",
         "--eval-every", "2", "--no-mlflow", "--no-progress"]  # fmt: skip


def refused(capsys, *argv: str) -> str:
    """Runs the CLI and returns its one error line; fails unless it exited 2 with one line and no traceback."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert "Traceback" not in err and "Error:" not in err.replace("error:", "")
    return lines[0]


# ---------------------------------------------------------------------------------------------------- --out paths


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_out_that_is_a_file_or_under_a_file_is_refused(command, tmp_path, capsys):
    argv = TRAIN if command == "train" else SWEEP
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    line = refused(capsys, *argv, "--out", str(afile))
    assert line == f"shiftbench {command}: error: --out {afile} is a file, not a folder; give a folder path " \
                   f"(new or existing)"  # fmt: skip
    line = refused(capsys, *argv, "--out", str(afile / "sub" / "o"))
    assert f"{afile} is a file, so no folder can be made under it" in line
    assert afile.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(not os.path.isdir("/proc/1") or os.access("/proc/1", os.W_OK), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_out_that_cannot_be_written_is_refused(command, capsys):
    # /proc/1 is a folder nobody, root included, can create entries in: the same refusal as a read-only disk
    line = refused(capsys, *(TRAIN if command == "train" else SWEEP), "--out", "/proc/1/shiftbench-out")
    assert "--out /proc/1/shiftbench-out: cannot write in /proc/1 (permission denied or read-only)" in line


def test_out_not_writable_for_a_user_without_permission():
    """The same through the console script, as an unprivileged user on a read-only folder (root writes anywhere,
    so as root the script runs as ``nobody``)."""
    base = Path(tempfile.mkdtemp(prefix="shiftbench-ro-"))  # pytest's tmp_path is private to its owner
    try:
        base.chmod(0o755)
        locked, home = base / "locked", base / "home"
        locked.mkdir(mode=0o555)
        home.mkdir(mode=0o777)
        locked.chmod(0o555)
        home.chmod(0o777)
        kwargs = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
        env = dict(os.environ, PYTHONSAFEPATH="1", MPLBACKEND="Agg", HOME=str(home))
        exe = Path(sys.executable).parent / "shiftbench"
        try:
            out = subprocess.run([str(exe), *TRAIN, "--out", str(locked / "o")], capture_output=True, text=True,
                                 env=env, cwd=home, timeout=120, **kwargs)  # fmt: skip
        except (PermissionError, OSError):
            pytest.skip("cannot run as an unprivileged user here")
        if out.returncode != 2 and "shiftbench train: error" not in out.stderr:
            pytest.skip(f"the unprivileged user cannot run the environment: {out.stderr[-200:]!r}")
        assert out.stderr.strip() == (f"shiftbench train: error: --out {locked / 'o'}: cannot write in {locked} "
                                      f"(permission denied or read-only); choose a folder you can write to")
        assert out.returncode == 2 and list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize("item, says", [
    ("lr=nan", "hyperparameter lr=nan must be a finite number (default 0.001)"),
    ("lr=inf", "hyperparameter lr=inf must be a finite number (default 0.001)"),
    ("lr=-0.1", "hyperparameter lr=-0.1 must be > 0 (default 0.001)"),
    ("lr=0", "hyperparameter lr=0.0 must be > 0 (default 0.001)"),
    ("batch_size=0", "hyperparameter batch_size=0 must be > 0 (default 64)"),
    ("batch_size=-4", "hyperparameter batch_size=-4 must be > 0 (default 64)"),
    ("weight_decay=-1e-4", "hyperparameter weight_decay=-0.0001 must be >= 0 (default 0.0)"),
    ("irm_lambda=nan", "hyperparameter irm_lambda=nan must be a finite number (default 100.0)"),
])  # fmt: skip
def test_bad_hyperparameter_values_are_refused_before_a_folder_is_made(item, says, tmp_path, capsys):
    method = "irm" if item.startswith("irm") else "erm"
    argv = [a if a != "erm" else method for a in TRAIN]
    line = refused(capsys, *argv, "--hparams", item, "--out", str(tmp_path / "o"))
    assert line == f"shiftbench train: error: {says}"
    assert not (tmp_path / "o").exists()


def test_hyperparameter_types_and_checks_in_a_suite(tmp_path, capsys):
    from shiftbench.config import SweepSpec

    base = {"datasets": ["colored_digits"], "methods": ["erm"], "test_envs": "default"}
    for hp, says in [({"lr": True}, "lr=True must be a number"), ({"batch_size": 2.5}, "must be a whole number"),
                     ({"erm": {"batch_size": 0}}, "batch_size=0 must be > 0")]:  # fmt: skip
        with pytest.raises(UserError, match=says):
            SweepSpec.from_mapping({**base, "hparams": hp})
    assert SweepSpec.from_mapping({**base, "hparams": {"batch_size": 32.0}}).trials()[0].hparams["batch_size"] == 32


def test_a_dataset_redeclaring_lr_keeps_the_base_check():
    from shiftbench.hparams import POSITIVE, HParam, collect, fixed, resolve

    space = collect({"lr": HParam(1e-3, fixed(1e-3), POSITIVE)}, {"lr": HParam(5e-5, fixed(5e-5))})
    assert space["lr"].default == 5e-5 and space["lr"].check is POSITIVE
    with pytest.raises(UserError, match=r"lr=-1.0 must be > 0 \(default 5e-05\)"):
        resolve(space, 0, {"lr": "-1"})


def test_a_split_refuses_a_zero_batch_size_for_direct_callers():
    import torch

    from shiftbench.data import TensorSplit

    with pytest.raises(ValueError, match="batch_size must be positive"):
        TensorSplit({"x": torch.zeros(4, 1)}).batch_at(0, 0, seed=0)


# ---------------------------------------------------------------------------------------------------- suite YAML


@pytest.mark.parametrize("yaml_line, says", [
    ("steps: true", "steps must be a positive integer (got True)"),
    ("n_seeds: true", "n_seeds must be a positive integer (got True)"),
    ("eval_every: false", "eval_every must be a positive integer (got False)"),
    ("methods: {erm: 1}", "'methods' must be a list of names or a comma-separated string (got {'erm': 1})"),
    ("callbacks: drift,attest", "callbacks 'drift,attest' is one string; write a list, e.g. [drift, attest]"),
    ("callbacks: {attest: 1}", "callbacks must be a list of callback names (got {'attest': 1})"),
    ("test_envs: [[0], true]", "test_envs must be a mode name or a list of lists of integers"),
    ("hparams: {lr: 0.1, irm: {irm_lambda: 1}}", "hparams mixes fixed values and per-method tables"),
    ("hparams: {ermm: {lr: 0.1}}", "hparams names 'ermm' (did you mean 'erm'?), which is no registered method"),
    ("dataset_options: {colored_digits: 5}", "dataset_options['colored_digits'] must be a mapping"),
    ("dataset_options: {colored_digit: {env_size: 100}}", "(did you mean 'colored_digits'?)"),
    ("name: 7", "name must be text (got 7)"),
])  # fmt: skip
def test_suite_yaml_with_wrong_types_is_refused(yaml_line, says, tmp_path, capsys):
    key = yaml_line.split(":")[0]
    lines = {"datasets": "datasets: [colored_digits]", "methods": "methods: [erm]", "test_envs": "test_envs: [[2]]"}
    lines[key] = yaml_line
    suite = tmp_path / "s.yaml"
    suite.write_text("\n".join(lines.values()) + "\n")
    line = refused(capsys, "sweep", "--suite", str(suite), "--out", str(tmp_path / "o"))
    assert line.startswith(f"shiftbench sweep: error: {suite}: ") and says in line
    assert not (tmp_path / "o").exists()


def test_one_callback_string_is_a_one_element_list_not_its_letters():
    from shiftbench.config import SweepSpec

    base = {"datasets": ["colored_digits"], "methods": ["erm"], "test_envs": "default"}
    assert SweepSpec.from_mapping({**base, "callbacks": "attest"}).callbacks == ("attest",)
    spec = SweepSpec.from_mapping({**base, "callbacks": "robust_eval:eps=0.1,steps=2"})
    assert spec.callbacks == ("robust_eval:eps=0.1,steps=2",)  # its own settings hold commas
    assert SweepSpec.from_mapping({**base, "methods": "erm, irm"}).methods == ("erm", "irm")


# ------------------------------------------------------------------------------------- trial folders and refusals


def test_train_into_a_folder_holding_another_finished_trial_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    assert main([*TRAIN, "--out", str(out)]) == 0
    first = json.loads((out / "final.json").read_text())
    capsys.readouterr()
    line = refused(capsys, *TRAIN, "--seed", "1", "--out", str(out))
    assert line.startswith(f"shiftbench train: error: {out} holds a different trial (colored_digits/erm, hash "
                           f"{first['hash'][:16]}; this one is ")  # fmt: skip
    assert line.endswith("); use another --out or delete that folder")
    assert json.loads((out / "final.json").read_text()) == first
    # the same trial again is still a no-op that prints its metrics
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 1


def test_a_missing_data_root_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "o"
    line = refused(capsys, "train", "--dataset", "colored_mnist", "--method", "erm", "--no-mlflow",
                   "--data-root", str(tmp_path / "no-mnist"), "--out", str(out))  # fmt: skip
    assert "MNIST files not found" in line
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    refused(capsys, "train", "--dataset", "colored_mnist", "--method", "erm", "--no-mlflow",
            "--data-root", str(tmp_path / "no-mnist"), "--out", str(kept))  # fmt: skip
    assert kept.is_dir() and list(kept.iterdir()) == []  # a folder that was there before stays


def test_a_bad_device_leaves_no_folder_behind(tmp_path, capsys):
    line = refused(capsys, *TRAIN, "--device", "tpu", "--out", str(tmp_path / "o"))
    assert "unknown device 'tpu'" in line and not (tmp_path / "o").exists()


def test_trainer_removes_only_the_folders_it_made(tmp_path):
    from shiftbench.io import CreatedDirs

    (tmp_path / "a").mkdir()
    made = CreatedDirs(tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "keep.txt").write_text("x")
    made.remove_if_empty()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["keep.txt"]
    made = CreatedDirs(tmp_path / "x" / "y")
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "y" / "written").write_text("x")
    made.remove_if_empty()
    assert (tmp_path / "x" / "y" / "written").exists()


def test_console_script_refusals_have_no_traceback(tmp_path):
    exe = Path(sys.executable).parent / "shiftbench"
    env = dict(os.environ, PYTHONSAFEPATH="1", MPLBACKEND="Agg")
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""\
        datasets: [colored_digits]
        methods: [erm]
        steps: true
    """))
    for argv in ([*TRAIN, "--hparams", "batch_size=0", "--out", str(tmp_path / "o")],
                 ["sweep", "--suite", str(suite), "--out", str(tmp_path / "o")]):  # fmt: skip
        out = subprocess.run([str(exe), *argv], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "Traceback" not in out.stderr and "error:" in out.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ preference files

Q, A1, A2 = "What is 2+2?", "It is 4, since 2+2=4.", "It is 5."
FILES = ["train", "--dataset", "preference_files", "--method", "erm", "--steps", "2", "--eval-every", "2",
         "--no-mlflow"]  # fmt: skip
PAIR_OPTIONS = {"format": "auto", "domain_column": "", "margin_column": "", "sections": "", "skip_malformed": False,
                "max_rows": 0}  # fmt: skip


def _pairs(n: int, **columns) -> list[dict]:
    """n distinct pairs; each keyword is a column whose values cycle through the given list."""
    return [{"prompt": f"{Q} ({i})", "chosen": f"{A1} {'very ' * (i % 4)}", "rejected": f"{A2} {i}",
             **{k: v[i % len(v)] for k, v in columns.items()}} for i in range(n)]  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_non_utf8_jsonl_is_refused_with_its_line_or_skipped_and_counted(tmp_path, capsys):
    from shiftbench.datasets.prefs import load_pairs

    rows = _pairs(12, domain=["a", "b"])
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(3, b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y", "domain": "a"}')  # Latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    line = refused(capsys, *FILES, "--option", f"files={path}", "domain_column=domain", "--out", str(tmp_path / "o"))
    assert line == (f"shiftbench train: error: {path}: line 4 is not UTF-8 text (byte 0xe9 at column 16); re-save "
                    f"the file as UTF-8; fix it or pass --option skip_malformed=true to skip and count such rows")
    assert not (tmp_path / "o").exists()
    kept, skipped = load_pairs([path], dict(PAIR_OPTIONS, domain_column="domain", skip_malformed=True))
    assert skipped == {"not_utf8": 1} and len(kept) == 12
    assert [r["where"] for r in kept][3] == "p.jsonl line 5"  # line numbers still count the skipped line
    assert main([*FILES, "--option", f"files={path}", "domain_column=domain", "skip_malformed=true",
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "o" / "spec.json").read_text())["dataset"]["skipped"] == {"not_utf8": 1}


def test_a_utf8_byte_order_mark_is_not_data(tmp_path):
    from shiftbench.datasets.prefs import load_pairs

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in _pairs(3)).encode())
    assert len(load_pairs([path], PAIR_OPTIONS)[0]) == 3


@pytest.mark.parametrize("suffix, says", [
    (".parquet", "not a readable Parquet file ("),
    (".csv", "not UTF-8 text (a byte 0xff); re-save the file as UTF-8, or as JSONL to find the line"),
    (".jsonl.gz", "cannot be read ("),
])  # fmt: skip
def test_a_file_that_is_not_of_its_type_is_refused(suffix, says, tmp_path, capsys):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"prompt,chosen,rejected\nq,a,b\n\xff,c,d\n" if suffix == ".csv" else b"just some text\n")
    line = refused(capsys, *FILES, "--option", f"files={path}", "--out", str(tmp_path / "o"))
    assert line.startswith(f"shiftbench train: error: {path}: {says}")
    if suffix == ".parquet":
        assert line.endswith("if it holds text, give it its real suffix (.jsonl or .csv)")


def test_line_limit_counts_bytes_without_the_newline_and_keeps_line_numbers(tmp_path):
    from shiftbench.datasets.prefs import _lines

    path = tmp_path / "l.txt"
    path.write_bytes(b"0123456789\n01234567890\r\n0123456789\r\n\n" + b"x" * 100 + b"\n0123456789")
    with open(path, "rb") as f:
        got = [(i, None if b is None else b.rstrip(b"\r\n")) for i, b in _lines(f, 10)]
    assert got == [(1, b"0123456789"), (2, None), (3, b"0123456789"), (4, b""), (5, None), (6, b"0123456789")]


def test_a_line_over_max_line_bytes_is_refused_with_its_number_or_skipped(tmp_path, capsys):
    from shiftbench.datasets.prefs import load_pairs

    rows = _pairs(6, domain=["a", "b"])
    rows.insert(2, dict(rows[0], chosen="long " * 400))  # ~2 kB
    path = _jsonl(tmp_path / "p.jsonl", rows)
    line = refused(capsys, *FILES, "--option", f"files={path}", "domain_column=domain", "max_line_bytes=1000",
                   "--out", str(tmp_path / "o"))  # fmt: skip
    assert line.startswith(f"shiftbench train: error: {path}: line 3 is longer than max_line_bytes=1000 bytes; "
                           f"raise it with --option max_line_bytes=N")  # fmt: skip
    opts = dict(PAIR_OPTIONS, domain_column="domain", max_line_bytes=1000, skip_malformed=True)
    kept, skipped = load_pairs([path], opts)
    assert skipped == {"too_long": 1} and len(kept) == 6
    assert len(load_pairs([path], dict(opts, max_line_bytes=4096))[0]) == 7


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from shiftbench.datasets.prefs import load_pairs
from shiftbench.errors import UserError
opts = {"format": "auto", "domain_column": "", "margin_column": "", "sections": "", "skip_malformed": False,
        "max_rows": 0}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_pairs([Path(sys.argv[1])], opts)
    refusal = None
except UserError as e:
    refusal = str(e)
rows, skipped = load_pairs([Path(sys.argv[1])], dict(opts, skip_malformed=True))
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
print(json.dumps({"refusal": refusal, "rows": len(rows), "skipped": skipped, "grew_mib": grew / 1024}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_a_50_mb_line_is_refused_without_being_loaded(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(_pairs(1)[0]) + "\n")
        f.write('{"prompt": "q", "chosen": "')
        for _ in range(50):
            f.write("a" * (1 << 20))
        f.write('", "rejected": "b"}\n')
        f.write(json.dumps(_pairs(2)[1]) + "\n")
    env = dict(os.environ, PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["refusal"].startswith(f"{path}: line 2 is longer than max_line_bytes=1048576 bytes")
    assert got["rows"] == 2 and got["skipped"] == {"too_long": 1}
    assert got["grew_mib"] < 20, got  # the line is 50 MiB; reading it whole took 3.7 GB


def test_every_registered_dataset_takes_the_base_check_signature(tmp_path):
    import inspect

    from shiftbench.data import ShiftDataset
    from shiftbench.registry import DATASETS

    base = list(inspect.signature(ShiftDataset.check).parameters)
    tiny = {"partner_steps": 1, "agents": 2, "eval_episodes": 2}  # generated partner populations in seconds
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        assert list(inspect.signature(cls.check).parameters) == base, name
        options = {k: v for k, v in tiny.items() if k in cls.OPTIONS}
        for root in (None, str(tmp_path / "missing")):
            try:
                cls.check(root, options, False)
            except UserError:
                pass  # a missing root or file is the user's to fix; a TypeError would be ours


def test_sweep_over_preference_files_is_one_line_not_a_type_error(tmp_path, capsys):
    line = refused(capsys, "sweep", "--datasets", "preference_files", "--methods", "erm", "--no-mlflow",
                   "--out", str(tmp_path / "o"))  # fmt: skip
    assert "preference_files needs --option files=PATH" in line and not (tmp_path / "o").exists()
    from shiftbench.datasets.prefs import PreferenceFiles

    path = _jsonl(tmp_path / "p.jsonl", _pairs(6, domain=["a", "b"]))
    PreferenceFiles.check(None, {"files": str(path)}, False)
    with pytest.raises(UserError, match="option format='xml'"):
        PreferenceFiles.check(None, {"files": str(path), "format": "xml"}, False)


@pytest.mark.parametrize("column", ["domain", "subset", "source"])
def test_a_common_domain_column_is_found_and_said(column, tmp_path, capsys):
    path = _jsonl(tmp_path / "p.jsonl", _pairs(12, **{column: ["x", "y", "z"], "lang": ["en", "fr"]}))
    assert main([*FILES, "--option", f"files={path}", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("preference_files:")]
    assert said == [f"preference_files: no domain_column given; using the rows' {column!r} column (3 domains: x, y, "
                    f"z); pass --option domain_column=NAME to choose another"]  # fmt: skip
    spec = json.loads((tmp_path / "o" / "spec.json").read_text())
    assert spec["spec"]["dataset_options"]["domain_column"] == column and spec["env_names"] == ["x", "y", "z"]


def test_domain_precedence_and_an_explicit_column_wins(tmp_path, capsys):
    from shiftbench.datasets.prefs import PreferenceFiles

    path = _jsonl(tmp_path / "p.jsonl", _pairs(12, source=["s1", "s2"], subset=["a", "b", "c"]))
    assert PreferenceFiles.environment_names({"files": str(path)}) == ["a", "b", "c"]  # subset before source
    assert PreferenceFiles.environment_names({"files": str(path), "domain_column": "source"}) == ["s1", "s2"]
    two = [_jsonl(tmp_path / f"{n}.jsonl", _pairs(4, subset=["a", "b"])) for n in ("f1", "f2")]
    assert PreferenceFiles.environment_names({"files": ",".join(map(str, two))}) == ["f1", "f2"]  # one per file


def test_one_environment_says_what_was_found_and_which_columns_could_serve(tmp_path, capsys):
    path = _jsonl(tmp_path / "p.jsonl", _pairs(12, category=["x", "y", "z"], lang=["en", "fr"], id=list(range(12))))
    line = refused(capsys, *FILES, "--option", f"files={path}", "--out", str(tmp_path / "o"))
    assert line == ("shiftbench train: error: preference_files found one environment ('p', from the file p.jsonl, "
                    "with no domain_column), so there is nothing to hold out; columns that could serve: category "
                    "(3 values), lang (2 values); pass --option domain_column=NAME, or give files of several names")
    line = refused(capsys, *FILES, "--option", f"files={path}", "domain_column=lang", "domains=en",
                   "--out", str(tmp_path / "o"))  # fmt: skip
    assert "must be distinct and leave one to train on: preference_files has 1 (en)" in line
    one = _jsonl(tmp_path / "one.jsonl", _pairs(6, domain=["only"]))
    line = refused(capsys, *FILES, "--option", f"files={one}", "domain_column=domain", "--out", str(tmp_path / "o"))
    assert "found one environment ('only', the only value of domain_column 'domain' in one.jsonl)" in line
    assert "no column of its rows has 2 to 100 distinct values" in line
    assert not (tmp_path / "o").exists()
