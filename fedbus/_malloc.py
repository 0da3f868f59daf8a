"""glibc's malloc, tuned for a process that turns over model-sized buffers every round.

Every node allocates and frees several model-sized buffers a round: a trainer the model it
reassembles, the trained weights, the delta, the encoded update, its frames; an aggregator
each reassembled update and the encoded model. glibc serves a block above its mmap threshold
(128 KiB, raised only after the first free, never above 32 MiB on its own) with a fresh
``mmap``, so every page of every such buffer is faulted in and zeroed by the kernel again the
next round. On the 2-core VM of docs/benchmarks.md a fresh 44 MB ``bytes`` costs 55 ms where a
reused one costs 8 ms (700 MB/s against 5 GB/s).

Here blocks up to 1 GiB come from the heap and up to 1 GiB of freed memory is kept for the
next round: the process keeps its high-water mark resident instead of handing pages back and
faulting them in again. Measured (10 trainers, one process, and the aggregator, over
mosquitto): 11M parameters a round 4.6 -> 2.2 s, the aggregator's peak RSS 618 -> 760 MiB;
1M, the aggregator's CPU a round 0.16 -> 0.11 s ("The shorter round" in
docs/benchmarks.md). The first version (threshold 32 MiB, trainers only) did nothing for
buffers above 32 MiB.

It is applied to every ``fedbus serve`` / ``fedbus run`` process and simulation worker, and
to the mosquitto ``fedbus`` spawns itself (through glibc's environment tunables).
``FEDBUS_MALLOC=default`` turns it off; ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` in the environment (glibc's own tunables) win over it.
"""

from __future__ import annotations

import ctypes
import os
import platform

import structlog

__all__ = ["broker_env", "tune_for_rounds"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap and are reused (glibc 2.36 takes 1 GiB from mallopt;
#: one that refuses it gets its old dynamic ceiling, 32 MiB).
MMAP_THRESHOLD = 1 << 30
_FALLBACK_MMAP_THRESHOLD = 32 << 20
#: Freed memory at the top of the heap kept for the next round rather than returned.
TRIM_THRESHOLD = 1 << 30

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
    threshold = MMAP_THRESHOLD
    if not mallopt(_M_MMAP_THRESHOLD, threshold):
        threshold = _FALLBACK_MMAP_THRESHOLD
        if not mallopt(_M_MMAP_THRESHOLD, threshold):
            return False
    ok = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("tune_malloc", applied=ok, mmap_threshold=threshold,
              trim_threshold=TRIM_THRESHOLD)
    return ok


def broker_env() -> dict[str, str]:
    """The environment for a broker this process starts: the same tuning through glibc's
    tunables (mosquitto turns over a 1 MB buffer per chunk it relays), unless turned off or
    set already."""
    env = dict(os.environ)
    if env.get("FEDBUS_MALLOC", "").lower() != "default" and not (
            "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env):
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
                   MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    return env
