"""glibc malloc settings for processes that move weights as ~1 MiB gRPC messages.

Every message of a weight stream becomes a fresh ~1 MiB buffer (the sender's frame, the receiver's
bytes object). glibc serves allocations above its mmap threshold (128 KiB at start, adjusted as
blocks are freed) with fresh mmap'd pages and gives them back on free, and touching fresh pages
costs ~0.5 s per GB on these machines: more than the copies themselves. With the threshold at
32 MiB and a trim threshold well above a chunk, freed chunk buffers stay on the heap and the next
message reuses them.

Measured with benchmarks/weight_sync.py (1 GiB fp32 over loopback, 1 MiB chunks, 2 quiet cores,
runs alternated): 1.17-1.26 GB/s and 0.86-0.99 s of receiver CPU untuned (one run 1.54), 1.53-1.55 GB/s
and 0.71-0.72 s with these settings made by mallopt (1.56-1.72 GB/s when set through the environment
before start); gloo moved the same tensors at 2.6-3.3 GB/s.
Set QUARTET_MALLOC_TUNING=0 to leave malloc alone; MALLOC_*_ environment settings also win.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20), (M_TOP_PAD, 64 << 20))
ENV_SWITCH = "QUARTET_MALLOC_TUNING"
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: bool | None = None


def tune_malloc_for_large_messages() -> bool:
    """Apply SETTINGS once per process (glibc on Linux only); True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if (os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux")
            or any(k in os.environ for k in _GLIBC_ENV)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    if not _applied:
        log.debug("mallopt refused a setting; malloc left at its defaults for the rest")
    return _applied
