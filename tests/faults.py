"""Fault injection for the engine's ``fault_point``s (``ATTNLAB_TEST_HOOKS=tests.faults``, set by conftest).

Each fault is switched on by its own environment variable, so a test sets it for one run (and
torchrun's workers inherit it):
- ``ATTNLAB_TEST_PAUSE_IN_CHECKPOINT_WRITE`` / ``ATTNLAB_TEST_PAUSE_AFTER_STEP_CHECKPOINT`` = ``N:MARKER``:
  the N-th time that point is reached the process writes MARKER and waits to be killed there.
  ``ATTNLAB_TEST_PAUSE_RANK=R`` pauses rank R only; workers restarted by torchrun never pause.
- ``ATTNLAB_TEST_NONFINITE_LOSS=RANK:STEP[,STEP...]``: that rank's loss is NaN at those (1-based,
  global) steps.
- ``ATTNLAB_TEST_DISK_FULL=POINT:N[,POINT:N]``: from the N-th time a file write reaches POINT
  (``checkpoint_write``, ``json_write``, ``file_write``: its data written, before the rename) it fails
  with ENOSPC, as a full disk would.
- ``ATTNLAB_TEST_STEP_SECONDS=S``: every training step takes S seconds longer, so that a signal sent
  after a checkpoint lands well inside the epoch on a small data set; the results are unchanged.
"""
import errno
import os
import time
from pathlib import Path
from typing import Any

PAUSES = {"checkpoint_write": "ATTNLAB_TEST_PAUSE_IN_CHECKPOINT_WRITE",
          "after_step_checkpoint": "ATTNLAB_TEST_PAUSE_AFTER_STEP_CHECKPOINT"}
_pause_counts: dict[str, int] = {}
_write_counts: dict[str, int] = {}


def handle(name: str, value: Any, **context: Any) -> Any:
    """The engine's value at point ``name``, after the fault its variable asks for."""
    if name in PAUSES:
        pause(PAUSES[name])
    if name in disk_full_points():
        _write_counts[name] = _write_counts.get(name, 0) + 1
        if _write_counts[name] >= disk_full_points()[name]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(context.get("path", "")))
    elif name == "loss":
        if os.environ.get("ATTNLAB_TEST_STEP_SECONDS"):
            time.sleep(float(os.environ["ATTNLAB_TEST_STEP_SECONDS"]))
        if context["step"] in nonfinite_steps():
            return value * float("nan")
    return value


def _rank() -> str:
    """This process's rank as torchrun sets it."""
    return os.environ.get("RANK", "0")


def pause(variable: str) -> None:
    """With ``variable`` = ``N:MARKER``: on the N-th call write MARKER and wait to be killed."""
    setting = os.environ.get(variable)
    if not setting or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0:
        return
    if os.environ.get("ATTNLAB_TEST_PAUSE_RANK", _rank()) != _rank():
        return
    count, marker = setting.split(":", 1)
    _pause_counts[variable] = _pause_counts.get(variable, 0) + 1
    if _pause_counts[variable] == int(count):
        Path(marker).write_text(str(os.getpid()))
        while True:
            time.sleep(1)


def nonfinite_steps() -> set[int]:
    """The steps at which this rank's loss is made NaN."""
    setting = os.environ.get("ATTNLAB_TEST_NONFINITE_LOSS")
    if not setting:
        return set()
    rank, steps = setting.split(":", 1)
    return {int(s) for s in steps.split(",")} if rank == _rank() else set()


def disk_full_points() -> dict[str, int]:
    """The write points that fail with ENOSPC, each with the call from which it fails."""
    setting = os.environ.get("ATTNLAB_TEST_DISK_FULL", "")
    return {point: int(n) for point, n in (item.split(":") for item in setting.split(",") if item)}
