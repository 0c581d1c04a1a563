"""The run's metrics.json, rewritten atomically so a reader never sees half a file."""
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.files import write_atomically
from errors import WriteError

_IMPORTED_AT = time.time()


def process_age_s() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere since this module's import)."""
    try:
        with open("/proc/self/stat") as f:  # field 22: start time in clock ticks after boot
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - _IMPORTED_AT


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON through a temp file and a rename (``WriteError`` if it cannot be written)."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()), fault="json_write")  # a temp name per process


def mark_failed(run_dir: str | Path, error: BaseException, status: str = "failed") -> None:
    """Set ``status`` and the error's first line in the run's metrics.json, keeping what it held; a completed
    run's record is left as it is. Where even that cannot be written, say so on stderr in one line."""
    path = Path(run_dir) / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    if metrics.get("status") == "completed":  # a later command's error is not this finished run's
        return
    message = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    metrics.update(status=status, error=message)
    try:
        write_json(path, metrics)
    except WriteError as e:  # the disk that failed the run may not take its record either
        print(f"error: {message} (and the run could not be marked {status}: {e})", file=sys.stderr, flush=True)
