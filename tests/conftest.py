"""Shared fixtures (the QUICK digits config, the shared CIFAR-10 copy) and the GPU marker's skip."""
import os

import pytest

from tests.helpers import QUICK, SHARED_CIFAR10, compose_config

# The engine's fault points run tests/faults.py in every run the tests start (torchrun's workers inherit it).
os.environ["ATTNLAB_TEST_HOOKS"] = "tests.faults"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs several workers (three on two cores); more torch threads per worker would only contend.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def quick_config():
    """compose_config with the QUICK overrides first."""
    return lambda *overrides: compose_config(*QUICK, *overrides)


@pytest.fixture
def cifar10_root():
    """The shared CIFAR-10 copy; skips the test when it is absent."""
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 not found at {SHARED_CIFAR10}")
    return SHARED_CIFAR10


def pytest_collection_modifyitems(config, items):
    """Run the tests marked ``slow`` first, so that under xdist the long ones do not end up together at the
    end on one worker; skip tests marked ``gpu`` where no CUDA device is visible."""
    import torch

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the files' order within each group
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
