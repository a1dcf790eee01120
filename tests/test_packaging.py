"""Packaging: the three folders install as one package, and the local datasets/ never shadows HuggingFace's."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


def test_import_datasets_never_resolves_to_repo(cli_env, repo):
    # Started as the Makefile and docs start things: from the repo root, with PYTHONSAFEPATH=1.
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('datasets')\n"
        "print(spec.origin if spec else 'absent')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=cli_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert not origin.startswith(str(repo / "datasets")), f"`import datasets` resolved to the repo: {origin}"


def test_import_datasets_inside_pytest_is_not_the_repo(repo):
    import importlib.util

    spec = importlib.util.find_spec("datasets")
    assert spec is None or not str(spec.origin).startswith(str(repo / "datasets"))
    import shiftbench.datasets

    assert Path(shiftbench.datasets.__file__).parent == repo / "datasets"


def test_console_script_help_from_any_folder(tmp_path, cli_env, exe):
    out = subprocess.run([exe, "--help"], cwd=tmp_path, env=cli_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("list", "train", "sweep", "report", "demo"):
        assert cmd in out.stdout


@pytest.mark.slow
def test_plain_wheel_maps_the_three_folders(tmp_path, repo):
    # `pip install .` installs what this wheel holds: shiftbench, shiftbench.methods, shiftbench.datasets.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(repo)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    wheel = next(tmp_path.glob("shiftbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "shiftbench/cli.py" in names and "shiftbench/methods/erm.py" in names
    assert "shiftbench/suites/quickstart.yaml" in names
    assert any(n.startswith("shiftbench/datasets/") and n.endswith(".py") for n in names)
    top = {n.split("/")[0] for n in names}
    assert "datasets" not in top and "methods" not in top and "bench" not in top
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "shiftbench = shiftbench.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
def test_plain_install_runs_from_another_folder(tmp_path, repo):
    # A non-editable `pip install .` (into a target folder, reusing this environment's dependencies).
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target),
         str(repo)], check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    code = (
        "import shiftbench, shiftbench.cli\n"
        "from shiftbench.registry import METHODS, DATASETS\n"
        "print(shiftbench.__file__)\n"
        "print(','.join(METHODS.names()))\n"
        "print(','.join(DATASETS.names()))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path, methods, datasets = out.stdout.split()
    assert path.startswith(str(target))
    assert {"erm", "groupdro", "irm", "vrex"} <= set(methods.split(","))
    assert {"colored_digits", "rotated_digits"} <= set(datasets.split(","))
