"""Shared fixtures: composing the real configs, the shared CIFAR-10 copy, the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from engine.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SHARED_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"

register_configs()
# The engine's fault points run tests/faults.py in every run the tests start (torchrun's workers inherit it).
os.environ["ATTNLAB_TEST_HOOKS"] = "tests.faults"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core; more torch threads per worker would only contend.
    import torch

    torch.set_num_threads(1)


def compose_config(*overrides: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """The config train.py would see for these command-line overrides."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# Small and quiet: a class-balanced slice of digits, no progress bars.
QUICK = ("data.max_train_samples=256", "data.max_val_samples=100", "trainer.progress=false")


@pytest.fixture
def quick_config():
    """compose_config with the QUICK overrides first."""
    return lambda *overrides: compose_config(*QUICK, *overrides)


@pytest.fixture
def cifar10_root() -> Path:
    """The shared CIFAR-10 copy; skips the test when it is absent."""
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 not found at {SHARED_CIFAR10}")
    return SHARED_CIFAR10


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run train.py as a user would; returns the finished process with its output."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
        env=env, timeout=300,
    )


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` where no CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
