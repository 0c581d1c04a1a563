"""One run per directory: the process that owns a run directory holds a lock on it for the run's life.

An OS lock (``flock``) on ``RUN_DIR/.run.lock``, which the kernel frees when its holder dies. Where the
file system has none (Lustre mounted without it, some NFS), a lock file created exclusively beside it,
whose holder touches it every few seconds; one left untouched for ``STALE_S`` belonged to a dead process.
"""
import errno
import fcntl
import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from errors import RunDirBusy

HEARTBEAT_S = 5.0
STALE_S = 60.0
REQUEUE_WAIT_S = 120.0  # a requeued SLURM job's predecessor may still be writing its last checkpoint
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder() -> dict[str, object]:
    """Who holds the lock: host, pid and since when."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe(path: Path) -> str:
    """The holder a lock file names, in words."""
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (OSError, ValueError, KeyError):
        return "another process"


class RunLock:
    """Exclusive ownership of a run directory; ``with RunLock(run_dir):`` or ``acquire``/``release``."""

    def __init__(self, run_dir: str | Path, wait_s: float | None = None):
        self.path = Path(run_dir) / ".run.lock"
        self.heartbeat_path = self.path.with_name(".run.lock.heartbeat")
        requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
        self.wait_s = wait_s if wait_s is not None else (REQUEUE_WAIT_S if requeued else 0.0)
        self._fd: int | None = None
        self._beating: threading.Event | None = None

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait_s``; raises ``RunDirBusy`` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while not self._try():
            if time.monotonic() >= deadline:
                held = self.heartbeat_path if self._fd is None and self.heartbeat_path.exists() else self.path
                raise RunDirBusy(f"{self.path.parent} is in use by {_describe(held)}: one run writes a run directory "
                                 "at a time; wait for it to end, or pass another hydra.run.dir")
            time.sleep(1.0)

    def _try(self) -> bool:
        """One attempt: flock where the file system has it, else the heartbeat file."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_FLOCK:
                raise
            return self._try_heartbeat()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        self._fd = fd
        return True

    def _try_heartbeat(self) -> bool:
        """Create the heartbeat file exclusively (taking over one left stale) and keep touching it."""
        try:
            if time.time() - self.heartbeat_path.stat().st_mtime > STALE_S:
                self.heartbeat_path.unlink(missing_ok=True)  # its holder died without removing it
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self.heartbeat_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        os.write(fd, json.dumps(_holder()).encode())
        os.close(fd)
        self._beating = threading.Event()
        threading.Thread(target=self._beat, args=(self._beating,), daemon=True, name="run-lock-heartbeat").start()
        return True

    def _beat(self, stop: threading.Event) -> None:
        """Touch the heartbeat file until released."""
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.heartbeat_path)
            except OSError:
                return

    def release(self) -> None:
        """Give the directory up (the lock file stays: removing a locked file would let two hold it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._beating is not None:
            self._beating.set()
            self._beating = None
            self.heartbeat_path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
