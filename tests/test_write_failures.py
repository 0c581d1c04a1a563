"""Write failures are one clear line and leave nothing half-written: a full disk (ENOSPC injected at the
engine's write points, and a real 1 MiB tmpfs where this machine lets the tests mount one) names the path
and the OS error, removes the temp file, keeps the previous checkpoint and marks the run failed."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.files import write_atomically
from engine.run import train
from engine.tensorboard import LazyWriter
from errors import WriteError
from tests import faults
from tests.helpers import ROOT, read_metrics, run_cli

QUICK_CLI = ("data=digits", "model=resnet20", "data.max_train_samples=128", "data.max_val_samples=60",
             "trainer.progress=false", "trainer.device=cpu")


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk("checkpoint_write:2")``: from that call on, writes at that point fail with ENOSPC."""
    faults._write_counts.clear()

    def set_points(points: str) -> None:
        monkeypatch.setenv("ATTNLAB_TEST_DISK_FULL", points)

    yield set_points
    faults._write_counts.clear()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs, mounted for the test; skips where mounting is not allowed."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def temp_files(root: Path) -> list[Path]:
    """Every temp file the engine's writes could leave under ``root``."""
    return [p for p in root.rglob("*.tmp")]


def test_a_failed_write_names_the_path_and_the_os_error_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")

    def fails_midway(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as failed:
        write_atomically(target, fails_midway)
    message = str(failed.value)
    assert str(target) in message and "[Errno 28] No space left on device" in message and "\n" not in message
    assert target.read_text() == "old" and temp_files(tmp_path) == []


def test_a_checkpoint_that_does_not_fit_on_the_disk_keeps_the_previous_one(tiny_disk):
    path = tiny_disk / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(10)}, "epoch": 1}, path)
    with pytest.raises(WriteError, match="No space left on device"):  # 4 MB into 1 MiB
        save_checkpoint({"model": {"w": torch.ones(1_000_000)}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 1 and temp_files(tiny_disk) == []


def test_a_run_whose_checkpoint_write_fails_is_marked_failed_with_the_last_checkpoint_kept(quick_config, tmp_path,
                                                                                          full_disk):
    run_dir = tmp_path / "run"
    full_disk("checkpoint_write:3")  # epoch 1 writes last.pt and best.pt; epoch 2 cannot write last.pt
    with pytest.raises(WriteError) as failed:
        train(quick_config("trainer.epochs=3"), run_dir)
    assert str(run_dir / "checkpoints" / "last.pt") in str(failed.value)
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "failed" and metrics["error"].startswith("WriteError: could not write")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    assert temp_files(run_dir) == []


def test_when_even_the_failure_cannot_be_recorded_it_goes_to_stderr_in_one_line(quick_config, tmp_path, full_disk,
                                                                                capsys):
    run_dir = tmp_path / "run"
    full_disk("checkpoint_write:1,json_write:2")  # metrics.json's 'running' is written, nothing after it
    with pytest.raises(WriteError):
        train(quick_config("trainer.epochs=1"), run_dir)
    lines = [line for line in capsys.readouterr().err.splitlines() if "could not write" in line]
    assert len(lines) == 1 and lines[0].startswith("error: WriteError: could not write")
    assert "could not be marked failed" in lines[0] and str(run_dir / "metrics.json") in lines[0]
    assert read_metrics(run_dir)["status"] == "running" and temp_files(run_dir) == []


def test_a_full_tensorboard_disk_is_a_write_error_naming_the_log_dir(tiny_disk):
    writer = LazyWriter(str(tiny_disk / "tensorboard"))
    writer.add_scalar("loss", 1.0, 0)  # the event file exists, and the disk fills up afterwards
    writer.flush()
    with open(tiny_disk / "filler", "wb", buffering=0) as f:  # take every byte the disk has
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    with pytest.raises(WriteError) as failed:
        for step in range(1, 2000):  # the writer's thread meets the full disk; a later call raises its error
            writer.add_scalar("loss", 1.0, step)
            writer.flush()
    assert str(tiny_disk / "tensorboard") in str(failed.value) and "No space left" in str(failed.value)
    with pytest.raises(WriteError):  # the writer keeps its thread's error: closing it says so again
        writer.close()


def test_a_run_on_a_full_disk_ends_in_one_line_without_a_traceback(tiny_disk):
    run_dir = tiny_disk / "run"  # ResNet-20's checkpoint (2 MB with its momentum) does not fit in 1 MiB
    done = run_cli(*QUICK_CLI, "trainer.epochs=1", f"hydra.run.dir={run_dir}")
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "could not write" in line]
    assert errors and all("No space left on device" in line for line in errors), out
    assert temp_files(tiny_disk) == []
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"


def test_a_scripts_failed_figure_or_csv_write_exits_in_one_line_and_keeps_the_old_file(tmp_path):
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))  # where the scripts find their _config
    from _config import write_file

    target = tmp_path / "ablation.csv"
    target.write_text("old")

    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit) as exited:
        write_file(target, disk_full)
    message = str(exited.value.code)
    assert message.startswith(f"error: could not write {target}: [Errno 28]") and "output directory" in message
    assert target.read_text() == "old" and temp_files(tmp_path) == []
