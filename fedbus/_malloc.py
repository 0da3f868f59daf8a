"""glibc's malloc, tuned for a process that turns over model-sized buffers every round.

A trainer allocates and frees several model-sized buffers a round: the reassembled model, the
trained weights, the delta, the encoded update, one frame per chunk. glibc serves each block
above its mmap threshold (128 KiB, raised only after the first free) with a fresh ``mmap``, so
every page of every such buffer is faulted in and zeroed by the kernel again the next round.
Measured at 10 trainers x 1M float32 parameters in one process: ~29,000 page faults a round;
with the threshold fixed at 32 MiB and freed memory kept up to 64 MiB, ~5,000, and the
trainers' process used 15-20% less CPU (docs/benchmarks.md, "The wire").

It is applied to trainer-only processes (``fedbus serve`` of trainers, simulation workers);
not to aggregators and stores, whose peak RSS is a target of its own and grew by ~15 MiB
with it. ``FEDBUS_MALLOC=default`` turns it off; ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` in the environment (glibc's own tunables) win over it.
"""

from __future__ import annotations

import ctypes
import os
import platform

import structlog

__all__ = ["tune_for_rounds"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and are reused; glibc's ceiling for it is 32 MiB.
MMAP_THRESHOLD = 32 << 20
#: Freed memory at the top of the heap kept for the next round rather than returned.
TRIM_THRESHOLD = 64 << 20

log = structlog.get_logger("fedbus.malloc")


def tune_for_rounds() -> bool:
    """Keep freed model-sized buffers for reuse; True when applied. Never raises: an
    unavailable or refusing allocator leaves the process as it was."""
    if os.environ.get("FEDBUS_MALLOC", "").lower() == "default":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the operator's own glibc tunables
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("tune_malloc", applied=ok, mmap_threshold=MMAP_THRESHOLD,
              trim_threshold=TRIM_THRESHOLD)
    return ok
