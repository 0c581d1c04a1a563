"""Files written whole or not at all: a temp file beside the target, flushed to disk, renamed into place.

A failed write (a full disk, a quota, a read-only mount) raises ``WriteError``: one line naming the path
and the OS error. Its temp file is removed and the file it would have replaced is kept.
"""
import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from engine.hooks import fault_point
from errors import WriteError

# What to do about the commonest errors; any other gets the generic advice.
ADVICE = {
    errno.ENOSPC: "free space there",
    errno.EDQUOT: "free space within the quota",
    errno.EACCES: "make it writable",
    errno.EROFS: "the file system is read-only",
}
RUN_ELSEWHERE = "point hydra.run.dir at another disk (a resume continues from the last checkpoint written)"


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError that ``error`` is or was raised from (torch.save wraps a failed write in a RuntimeError)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_error(path: str | Path, error: OSError, elsewhere: str = RUN_ELSEWHERE) -> WriteError:
    """The one-line error for a failed write of ``path``; ``elsewhere`` says how to write somewhere else."""
    reason = f"[Errno {error.errno}] {error.strerror}" if error.strerror else str(error) or type(error).__name__
    advice = ADVICE.get(error.errno, "check the file system")
    return WriteError(f"could not write {path}: {reason}; {advice}, or {elsewhere}")


@contextlib.contextmanager
def reported_as_write_error(path: str | Path, elsewhere: str = RUN_ELSEWHERE) -> Iterator[None]:
    """Turn an OSError raised inside the block (or a RuntimeError raised from one) into ``WriteError``."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as e:
        os_error = os_error_in(e)
        if os_error is None:
            raise
        raise write_error(path, os_error, elsewhere) from e


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], tmp: Path | None = None,
                     fault: str = "file_write", elsewhere: str = RUN_ELSEWHERE) -> None:
    """Call ``write`` on a temp file beside ``path`` (``tmp``, else ``.NAME.PID.tmp``), flush it to disk and
    rename it into place; on any failure remove the temp file, and raise ``WriteError`` for an OS error."""
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with reported_as_write_error(path, elsewhere):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            fault_point(fault, path=path)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a half-written file must not fill what the disk has left
        raise
