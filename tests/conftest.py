"""Shared fixtures. Tests build their own tiny data; nothing here touches the network."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' shared helpers (methodkit)
os.environ.setdefault("MPLBACKEND", "Agg")

# Small versions of the embedded datasets: the protocol is the same, only sizes shrink.
SMALL = {
    "colored_digits": {"env_size": 300, "resolution": 8},
    "rotated_digits": {"env_size": 240, "resolution": 8},
}


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests train tiny models, which gain nothing from intra-op threads; on a loaded 2-core machine two contended
    threads run them several times slower than one. (Sweeps' worker processes set their own thread counts.)"""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_leaked_cluster_env():
    """A test that points the process at a server or cluster (``--tracking-uri`` exports MLFLOW_TRACKING_URI) must
    not leave it pointing there for the tests after it, whose server is long gone."""
    keys = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def small() -> dict:
    return SMALL


@pytest.fixture(scope="session")
def exe() -> str:
    """The console script of the environment running the tests."""
    path = Path(sys.executable).parent / "shiftbench"
    return str(path) if path.exists() else shutil.which("shiftbench") or "shiftbench"


@pytest.fixture
def cli_env(tmp_path):
    """Environment for running the console script the way the Makefile does."""
    env = dict(os.environ, PYTHONSAFEPATH="1", MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
