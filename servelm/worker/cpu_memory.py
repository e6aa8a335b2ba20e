"""Keep freed tensor memory in the process heap on Linux/glibc.

By default glibc serves allocations above 128 KiB with fresh mmap()s and hands them back on
free, so every step's multi-MB activations and gather buffers page-fault in again: on the
reference machine that made a K/V gather 5x slower than the copy itself. Raising the mmap
and trim thresholds lets freed blocks be reused. The cost is that RSS stays at its peak,
which is what a long-running engine wants anyway.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper limit on 64-bit


def keep_freed_memory_in_heap() -> bool:
    """Returns True when the allocator was tuned (glibc found), False otherwise."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
