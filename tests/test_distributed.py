"""Distributed runs as users launch them: real torchrun subprocesses with gloo on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

QUICK = ("data.max_train_samples=128", "data.num_workers=0", "trainer.progress=false", "trainer.epochs=1")


def torchrun(nproc: int, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N train.py *overrides`` on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_dirs(parent: Path) -> list[Path]:
    """The run directories (those with a metrics.json) under ``parent``."""
    return sorted(p.parent for p in parent.rglob("metrics.json"))


@pytest.mark.slow
def test_two_processes_share_rank0s_run_dir_and_evaluate_exactly_like_one(tmp_path):
    # microseconds in the directory name: each rank's Hydra would pick a different one
    train = torchrun(2, *QUICK, f"hydra.run.dir={tmp_path}/train/" + "${now:%H-%M-%S-%f}")
    assert train.returncode == 0, train.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "train")  # one run, written by rank 0 only
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert (run / "checkpoints" / "last.pt").exists() and len(list((run / "tensorboard").iterdir())) == 1
    # 101 val images: divisible by neither the world size nor the batch size
    evaluation = ("trainer.eval_only=true", f"trainer.resume={run / 'checkpoints' / 'last.pt'}",
                  "data.max_val_samples=101", "data.eval_batch_size=16", "data.num_workers=0",
                  "trainer.progress=false")
    results = {}
    for nproc in (1, 2):
        proc = torchrun(nproc, *evaluation, f"hydra.run.dir={tmp_path}/eval{nproc}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads((tmp_path / f"eval{nproc}" / "metrics.json").read_text())
    assert results[1]["val_images"] == results[2]["val_images"] == 101  # each image once, none padded
    for key in ("top1_err", "top5_err", "val_loss"):
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_a_sweep_through_submitits_local_launcher(tmp_path):
    """The SLURM path (hydra/launcher=slurm) with submitit's local executor: one job per sweep point."""
    from tests.conftest import run_cli

    sweep = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "attention.reduction=4,8",
                    f"hydra.sweep.dir={tmp_path}", *QUICK, "data.max_val_samples=30")
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 2
    assert all(json.loads((r / "metrics.json").read_text())["status"] == "completed" for r in runs)
    assert (tmp_path / ".submitit").is_dir()  # the jobs went through submitit


def test_slurm_launcher_config_asks_one_process_per_gpu():
    from tests.conftest import run_cli

    proc = run_cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    launcher = proc.stdout[proc.stdout.index("  launcher:"):]
    assert "submitit_launcher.SlurmLauncher" in launcher and "partition: gpu" in launcher
    assert "gpus_per_node: 8" in launcher and "tasks_per_node: 8" in launcher


def test_a_bad_config_fails_in_seconds_before_the_process_group(tmp_path):
    import time

    start = time.monotonic()
    proc = torchrun(2, "attention.stages=[9]", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "resnet20 has no stage 9; valid stages: 1..3" in output and "Traceback" not in proc.stdout
    assert "init_process_group" not in output and time.monotonic() - start < 60
