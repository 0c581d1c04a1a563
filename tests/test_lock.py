"""One run per directory: a second process refuses, naming the holder; the lock dies with its holder; where
the file system has no flock, a heartbeat file does the same."""
import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest

from engine import lock as run_lock
from engine.lock import RunLock
from errors import RunDirBusy
from tests.helpers import ROOT, run_cli

HOLD = "import sys, time; from engine.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


def test_a_second_run_into_a_held_directory_refuses_in_one_line_and_the_lock_dies_with_its_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ("data.max_train_samples=64", "data.max_val_samples=20", "trainer.epochs=1", "trainer.progress=false",
                f"hydra.run.dir={run_dir}")
        second = run_cli(*args)
        out = second.stdout + second.stderr
        assert second.returncode == 1 and "Traceback" not in out
        errors = [line for line in out.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"is in use by pid {holder.pid} on " in errors[0] and "hydra.run.dir" in errors[0]
        assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir):  # the kernel freed the dead holder's lock
        pass


def test_without_flock_a_heartbeat_file_holds_the_directory(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirBusy, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path):  # released: free again
        pass
    crashed = RunLock(tmp_path)
    crashed.acquire()
    crashed._beating.set()  # its holder died: the file is no longer touched
    old = time.time() - run_lock.STALE_S - 1
    os.utime(crashed.heartbeat_path, (old, old))
    with RunLock(tmp_path):  # a stale heartbeat is taken over
        pass


def test_a_requeued_slurm_job_waits_for_its_predecessor(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert RunLock(tmp_path).wait_s == run_lock.REQUEUE_WAIT_S
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert RunLock(tmp_path).wait_s == 0
