"""The host allocator's settings for a training process: glibc malloc keeps freed tensor memory instead of
handing it back to the kernel after every step.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block over its mmap threshold (128 KiB at
first) with a fresh ``mmap`` and returns it with ``munmap`` when it is freed, so every activation of
every step is new memory that the kernel must fault in and zero again: on the CIFAR recipe that was
about a million page faults a minute and 10% of the process's CPU time spent in the kernel
(docs/speed.md). Raising the mmap threshold to glibc's ceiling (32 MiB on 64-bit) and the trim
threshold to 1 GiB keeps those blocks in the heap, where the next step reuses them. What training
computes does not change: only where the bytes live.

``ATTNLAB_MALLOC=default`` leaves glibc as it is (for example under an ``LD_PRELOAD``-ed jemalloc or
tcmalloc, which replace ``malloc`` and ignore these settings anyway).
"""
import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("attnlab")

# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30  # free heap kept before glibc hands it back to the kernel
SETTINGS = {"M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD)}


def keep_freed_memory() -> dict[str, int]:
    """Set glibc's mmap and trim thresholds for this process; returns the settings applied (empty when
    the C library is not glibc, or ``ATTNLAB_MALLOC=default``)."""
    if os.environ.get("ATTNLAB_MALLOC", "tuned") == "default" or platform.libc_ver()[0] != "glibc":
        return {}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = {}
    for name, (parameter, value) in SETTINGS.items():
        if libc.mallopt(parameter, value) == 1:  # mallopt returns 1 on success
            applied[name] = value
        else:
            log.debug("mallopt(%s, %d) was refused; glibc keeps its default", name, value)
    return applied
