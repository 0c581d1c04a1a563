"""The host allocator's settings for a training process: glibc malloc keeps freed tensor memory instead of
handing it back to the kernel after every step.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block over its mmap threshold (128 KiB at
first, rising with the blocks freed) with a fresh ``mmap`` and returns it with ``munmap`` when it is
freed, and hands the heap's free top back to the kernel over its trim threshold; either way much of a
step's activation memory is faulted in and zeroed by the kernel again. On the CIFAR recipe that was
0.9 to 1.2 million page faults in 90 steps and about 10% of the process's CPU time in the kernel
(docs/speed.md). Raising the mmap threshold to glibc's ceiling (32 MiB on 64-bit) and the trim
threshold to 1 GiB keeps those blocks in the heap, where the next step reuses them. What training
computes does not change: only where the bytes live. The price: up to 1 GiB of freed memory stays with
the process (and with loader workers forked after it) instead of going back to the system.

``ATTNLAB_MALLOC=default`` leaves glibc as it is (for example under an ``LD_PRELOAD``-ed jemalloc or
tcmalloc, which replace ``malloc`` and ignore these settings).
"""
import ctypes
import logging
import os

from errors import ConfigError

log = logging.getLogger("attnlab")

# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30  # free heap kept before glibc hands it back to the kernel
SETTINGS = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD)}
CHOICES = ("tuned", "default")  # ATTNLAB_MALLOC's values


def keep_freed_memory() -> dict[str, int]:
    """Set glibc's mmap and trim thresholds for this process; returns the settings applied (empty when
    the C library is not glibc, or ``ATTNLAB_MALLOC=default``)."""
    choice = os.environ.get("ATTNLAB_MALLOC", "tuned")
    if choice not in CHOICES:
        raise ConfigError(f"ATTNLAB_MALLOC={choice} is not allowed: use one of {', '.join(CHOICES)}, or unset it")
    if choice == "default" or not _glibc():
        return {}
    libc = ctypes.CDLL("libc.so.6")
    applied = {}
    for name, (parameter, value) in SETTINGS.items():
        if libc.mallopt(parameter, value) == 1:  # mallopt returns 1 on success
            applied[name] = value
        else:
            log.debug("mallopt(%s, %d) was refused; glibc keeps its default", name, value)
    return applied


def _glibc() -> bool:
    """Whether this process's C library is glibc (mallopt and its parameter numbers are glibc's)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # not a name this platform knows
        return False
