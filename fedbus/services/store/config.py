"""The store service's settings and the message kinds it answers with."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Final

from fedbus.codec import Compression, Limits

__all__ = ["PRECOMPUTE_DUTY", "QUERY", "QUERY_CATCH_UP_S", "QUERY_LIMITS", "REPLY",
           "StoreConfig", "lower_priority"]

QUERY: Final = "query"  # anyone -> store (query/<store>/<sender>): {workload, args}
REPLY: Final = "reply"  # store -> requester (reply/<sender>): {request_id, ok, result|error}
#: Queries are small: a workload name and a few arguments.
QUERY_LIMITS: Final = Limits(max_frame_bytes=64 << 10, max_decompressed_bytes=64 << 10,
                             max_tensors=0)
#: Share of one core the idle-time precomputation may use (it rests between evaluations).
PRECOMPUTE_DUTY: Final = 0.5
#: How long a query waits for the backlog that arrived before it to be recorded.
QUERY_CATCH_UP_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    job: str
    node_id: str
    #: The aggregator whose rounds this store records.
    aggregator: str
    trainers: frozenset[str]
    #: A simulated population's clients (``<prefix>0`` .. ``<prefix><count - 1>``), which
    #: are not manifest nodes: (prefix, count), or None.
    population: tuple[str, int] | None = None
    seed: int = 0
    sketch_dim: int = 2048
    #: Keep full updates at all (the last ``full_update_rounds`` rounds; 0: sketches only).
    full_updates: bool = True
    #: ``updates``: every update from the broker, sketched here; ``sketches``: the
    #: aggregator's per-round sketch record (``sketch/<agg>``; no full updates).
    feed: str = "updates"
    backlog_bytes: int = 512 << 20
    exit_on_done: bool = True
    #: The job's rounds (async: model versions): an order beyond them, or a `done` for
    #: another round, is a forgery. None: not known (no such checks).
    rounds: int | None = None
    #: Does the recorded aggregator run an asynchronous strategy (its orders say mode:
    #: async)? An order in the other mode is a forgery. None: not known (no such check).
    asynchronous: bool | None = None
    max_queries: int = 4
    #: Nice value of the thread that decodes, sketches and writes (Linux: per thread). 0 by
    #: default: measured, a niced thread that holds the GIL when the kernel preempts it
    #: stalls the store's receiver too, the store falls behind, and rounds got slower.
    work_nice: int = 0
    #: After each round closes, compute its leave-one-out and Shapley values in idle time
    #: (one thread, at most half a core), so that debugging and contribution queries are
    #: lookups.
    precompute: bool = True
    precompute_permutations: int = 32
    max_examples: int = 1 << 40
    limits: Limits = Limits()
    compression: Compression = Compression()


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (Linux applies it per thread; where
    that is not possible the thread keeps its priority)."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
