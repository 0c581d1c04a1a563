"""engine/allocator.py: freed tensor memory stays in the heap (far fewer page faults), and a run records it."""
import json
import os
import platform
import subprocess
import sys

import pytest

from engine.run import train
from tests.helpers import ROOT

# A child process takes ResNet-20 training steps (the CIFAR recipe's batch, bf16, channels_last) and counts the
# page faults the kernel served over the last four: a step frees and re-allocates its activations.
STEPS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from engine.allocator import keep_freed_memory
applied = keep_freed_memory()
from models import build_model
torch.manual_seed(0)
model = build_model({{"name": "resnet20"}}, {{"name": "none"}}, num_classes=10).to(memory_format=torch.channels_last)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last), torch.randint(0, 10, (128,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(len(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def step_faults(setting: str) -> tuple[int, int]:
    """(settings applied, page faults over four training steps) in a fresh process with ATTNLAB_MALLOC."""
    out = subprocess.run([sys.executable, "-c", STEPS.format(root=str(ROOT))], capture_output=True, text=True,
                         env={**os.environ, "ATTNLAB_MALLOC": setting, "OMP_NUM_THREADS": "1"}, check=True)
    applied, faults = out.stdout.split()
    return int(applied), int(faults)


@glibc_only
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again():
    applied, tuned = step_faults("tuned")
    none, default = step_faults("default")
    assert (applied, none) == (2, 0)
    # measured: about 38,000 faults with glibc's defaults (the activations mmapped afresh or the heap trimmed
    # and grown again), about 3,000 tuned (none of them a step's own)
    assert default > 10_000, default
    assert tuned < default / 5, (tuned, default)


@glibc_only
@pytest.mark.parametrize("setting", ["tuned", "default"])
def test_a_run_records_the_allocator_it_trained_with(setting, tmp_path, monkeypatch, quick_config):
    monkeypatch.setenv("ATTNLAB_MALLOC", setting)
    train(quick_config("trainer.epochs=1"), str(tmp_path))
    assert json.loads((tmp_path / "metrics.json").read_text())["host_malloc"] == setting
