"""The command line: bad input ends in one clear line and a non-zero exit, with nothing marked finished."""

from __future__ import annotations

import json
import subprocess

import pytest

from shiftbench.cli import main

SMALL_OPTS = ["--option", "env_size=120", "resolution=8"]


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--dataset", "colored_digits", "--method", "ircm"], "did you mean 'irm'"),
        (["train", "--dataset", "rotated_digit", "--method", "erm"], "did you mean 'rotated_digits'"),
        (["train", "--dataset", "colored_digits", "--method", "erm", "--test-envs", "7"], "test environment 7 is out"),
        (["train", "--dataset", "colored_digits", "--method", "erm", "--steps", "-5"], "steps and eval_every must be"),
        (["train", "--dataset", "colored_digits", "--method", "erm", "--hparams", "lr"], "must look like name=value"),
        (["train", "--dataset", "colored_digits", "--method", "erm", "--option", "colour=1"], "unknown option"),
        (["train", "--dataset", "colored_mnist", "--method", "erm", "--data-root", "/nonexistent-mnist"],
         "train-images-idx3-ubyte"),
        (["sweep", "--datasets", "colored_digits", "--methods", "erm", "--steps", "0"], "steps must be a positive"),
        (["sweep", "--suite", "quickstrat"], "did you mean 'quickstart'"),
        (["sweep", "--datasets", "colored_digits", "--methods", "erm", "--test-envs", "5"], "out of range"),
        (["train", "--dataset", "colored_digits", "--method", "erm", "--callbacks", "drfit"], "did you mean 'drift'"),
        (["sweep", "--datasets", "colored_digits", "--methods", "erm", "--callbacks", "robust_eval:epz=1"],
         "did you mean 'eps'"),
        (["sweep", "--datasets", "colored_digits", "--methods", "erm", "--callbacks", "robust_eval:threat=l3"],
         "unknown threat 'l3'"),
        (["train", "--dataset", "colored_digits", "--method", "erm", "--callbacks", "robust_eval:bounds=1:0"],
         "must be (lo, hi) with lo < hi"),
        (["sweep", "--datasets", "colored_digits", "--methods", "erm", "--launcher", "rey"], "did you mean 'ray'"),
        (["sweep", "--datasets", "colored_digits", "--methods", "erm", "--launcher", "ray", "--slurm-partition", "x"],
         "--slurm-partition is not an option of --launcher ray"),
    ],
)
def test_bad_input_one_line_nonzero(argv, expected, tmp_path, capsys):
    code, _, err = run_main(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert expected in one_line_error(err)
    assert not list(tmp_path.rglob("final.json"))


def test_malformed_suite_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [colored_digits\nmethods: erm\n")
    code, _, err = run_main(capsys, "sweep", "--suite", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "malformed YAML at line" in one_line_error(err)


def test_unknown_suite_key_suggests_the_right_one(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("datasets: [colored_digits]\nmethods: [erm]\nn_seed: 3\n")
    code, _, err = run_main(capsys, "sweep", "--suite", str(bad), "--out", str(tmp_path / "o"))
    line = one_line_error(err)
    assert code == 2 and "unknown key 'n_seed'" in line and "did you mean 'n_seeds'" in line
    assert not (tmp_path / "o").exists()


def test_out_folder_holding_a_different_sweep_is_refused(tmp_path, capsys):
    common = ["sweep", "--datasets", "colored_digits", "--methods", "erm", "--test-envs", "2", "--eval-every", "2",
              "--no-mlflow", "--no-progress", "--out", str(tmp_path / "o")]  # fmt: skip
    code, _, _ = run_main(capsys, *common, "--steps", "2")
    assert code == 0
    code, _, err = run_main(capsys, *common, "--steps", "3")
    assert code == 2 and "holds a different sweep" in one_line_error(err)


def test_nan_trial_fails_and_the_sweep_goes_on(tmp_path, capsys):
    suite = tmp_path / "nan.yaml"
    suite.write_text(
        "datasets: [colored_digits]\nmethods: [erm, groupdro]\ntest_envs: default\nsteps: 6\neval_every: 3\n"
        "hparams: {erm: {lr: 1.0e+30}}\ndataset_options: {colored_digits: {env_size: 120, resolution: 8}}\n"
    )
    code, _, err = run_main(capsys, "sweep", "--suite", str(suite), "--out", str(tmp_path / "o"), "--no-progress",
                            "--no-mlflow")  # fmt: skip
    assert code == 0
    assert "1 finished now" in err and "1 failed" in err
    failed = list((tmp_path / "o").rglob("failed.json"))
    done = list((tmp_path / "o").rglob("final.json"))
    assert len(failed) == 1 and len(done) == 1
    assert "non-finite training loss" in json.loads(failed[0].read_text())["reason"]


def test_console_script_bad_input_has_no_traceback(exe, cli_env, tmp_path):
    out = subprocess.run([exe, "train", "--dataset", "colored_digits", "--method", "ermm", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=cli_env)  # fmt: skip
    assert out.returncode == 2
    assert one_line_error(out.stderr) == (
        "shiftbench train: error: unknown method 'ermm': did you mean 'erm'? known: erm, groupdro, irm, vrex"
    ) or "did you mean 'erm'" in out.stderr


def test_list_shows_every_plugin(capsys):
    code, out, _ = run_main(capsys, "list")
    assert code == 0
    for name in ("erm", "groupdro", "irm", "vrex", "colored_digits", "rotated_digits", "colored_mnist",
                 "rotated_mnist", "quickstart", "domainbed", "mnist_cnn"):  # fmt: skip
        assert name in out


def test_train_prints_final_metrics(tmp_path, capsys):
    code, out, err = run_main(capsys, "train", "--dataset", "colored_digits", "--method", "vrex", "--steps", "4",
                              "--eval-every", "2", "--out", str(tmp_path / "t"), "--no-mlflow", *SMALL_OPTS)  # fmt: skip
    assert code == 0, err
    rec = json.loads(out)
    assert rec["step"] == 3 and 0.0 <= rec["env2_in_acc"] <= 1.0


def test_sweep_then_report_writes_the_leaderboard(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "datasets: [colored_digits]\nmethods: [erm, irm]\ntest_envs: each\nsteps: 4\neval_every: 2\nn_seeds: 2\n"
        "dataset_options: {colored_digits: {env_size: 120, resolution: 8}}\n"
    )
    code, _, err = run_main(capsys, "sweep", "--suite", str(suite), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 0, err
    assert "mlflow ui --backend-store-uri" in err and "12 finished now" in err
    code, out, err = run_main(capsys, "report", str(tmp_path / "o"), "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "training-domain validation" in out and "irm" in out and "-90%" in out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    cell = metrics["datasets"]["colored_digits"]["rules"]["oracle"]["methods"]["erm"]["env2"]
    assert cell["n_seeds"] == 2 and 0 <= cell["mean"] <= 100
    for f in ("leaderboard.md", "leaderboard.html", "leaderboard.tex"):
        assert (tmp_path / "r" / f).stat().st_size > 200
    assert list((tmp_path / "r" / "plots").glob("*.png"))


def test_report_on_an_empty_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "r"))
    assert code == 2 and "holds no finished trial" in one_line_error(err)


def test_sweep_on_missing_mnist_fails_before_writing_anything(tmp_path, capsys):
    code, _, err = run_main(capsys, "sweep", "--datasets", "rotated_mnist", "--methods", "erm", "--out",
                            str(tmp_path / "o"), "--data-root", str(tmp_path / "nothing"), "--no-progress")  # fmt: skip
    assert code == 2 and "MNIST files not found" in one_line_error(err)
    assert not (tmp_path / "o" / "sweep.json").exists() and not list(tmp_path.rglob("final.json"))


def test_train_callbacks_option_runs_the_named_callbacks(tmp_path, capsys):
    # drift and a robust evaluation whose settings contain a comma: both must run and enter the trial's spec
    out = tmp_path / "t"
    code, _, err = run_main(capsys, "train", "--dataset", "colored_digits", "--method", "erm", *SMALL_OPTS,
                            "--steps", "6", "--eval-every", "3", "--no-mlflow", "--out", str(out),
                            "--callbacks", "drift,robust_eval:steps=2,restarts=1,examples=16")
    assert code == 0, err
    spec = json.loads((out / "spec.json").read_text())
    assert spec["spec"]["callbacks"] == ["drift", "robust_eval:steps=2,restarts=1,examples=16"]
    final = json.loads((out / "final.json").read_text())
    assert set(final["drift"]["envs"]) == {"env2"}  # the held-out environment (-90%)
    assert any(k.startswith("robust") for k in final["record"]), sorted(final["record"])


def imports_cli(source: str) -> bool:
    """Whether Python source imports shiftbench's cli module (absolutely, relatively, or ``from . import cli``)."""
    import ast

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name == "shiftbench.cli" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module in ("shiftbench.cli", "cli") or module.endswith(".cli") and module.startswith("shiftbench"):
                return True
            if node.level and module.rpartition(".")[2] == "cli":
                return True
            if module in ("", "shiftbench") and any(a.name == "cli" for a in node.names):
                return True
    return False


def test_no_module_imports_the_cli():
    """Issue 13: the command modules are imported by cli.py, so none of them (nor anything else in the package)
    may import cli.py back; shared argument helpers live in cliargs.py. Read from the source, not by importing."""
    from pathlib import Path

    import shiftbench

    for bad in ("from shiftbench.cli import parse_kv", "from ..cli import parse_kv", "from . import cli",
                "import shiftbench.cli", "from shiftbench import cli"):
        assert imports_cli(bad), bad
    assert not imports_cli("from shiftbench.cliargs import parse_kv") and not imports_cli("from .cliargs import csv")
    offenders = [str(p) for p in Path(shiftbench.__file__).parent.rglob("*.py")
                 if p.name != "cli.py" and imports_cli(p.read_text(encoding="utf-8"))]
    assert offenders == [], offenders
