"""The store's query desk: workload queries answered next to the recording, at most
``max_queries`` at once (more get a "busy" reply), each after what arrived before it is
recorded, so that what it asks about is in the store."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Message
from fedbus.codec import Envelope, encode
from fedbus.door import Door
from fedbus.errors import CodecError, FedbusError
from fedbus.services.store.config import (
    PRECOMPUTE_DUTY,
    QUERY_CATCH_UP_S,
    REPLY,
    StoreConfig,
)
from fedbus.store.workloads import Workloads

__all__ = ["QueryDesk"]

log = structlog.get_logger(__name__)


class QueryDesk:
    def __init__(self, config: StoreConfig, bus: Bus, door: Door, workloads: Workloads,
                 stats: Counter[str], progress: asyncio.Condition,
                 handled: Callable[[], int]) -> None:
        self.config = config
        self.bus = bus
        self.door = door
        self.workloads = workloads
        self.stats = stats
        self.progress = progress
        self._handled = handled
        #: Queries being answered, and the idle-time precomputation when running.
        self.tasks: set[asyncio.Task[None]] = set()
        # Idle work is throttled (PRECOMPUTE_DUTY), not niced: a niced thread preempted while
        # holding the GIL stalls the receiver (StoreConfig.work_nice).
        self._idle_pool = ThreadPoolExecutor(1, thread_name_prefix=f"{config.node_id}-idle")
        #: Closed rounds waiting for their precomputed values (newest first; bounded).
        self._due: deque[int] = deque(maxlen=2)
        self._precomputing: asyncio.Task[None] | None = None
        self._log = log.bind(node=config.node_id, role="store", job=config.job)

    def close(self) -> None:
        self.workloads.stopping.set()  # a running precomputation ends at its next model
        self._idle_pool.shutdown(wait=False, cancel_futures=True)

    # --- idle work: per-round values, so that evaluating queries are lookups ----------------
    def precompute(self, r: int) -> None:
        """After round ``r`` closed (with full updates): compute its leave-one-out and
        Shapley values in idle time (one thread, at most PRECOMPUTE_DUTY of a core)."""
        if not self.config.precompute or self.workloads.utility is None:
            return
        if len(self._due) == self._due.maxlen:
            self.stats["precompute_skipped"] += 1  # behind: the oldest waiting round goes
        self._due.append(r)
        if self._precomputing is None or self._precomputing.done():
            self._precomputing = asyncio.create_task(self._precompute_loop(),
                                                     name=f"{self.config.node_id}.idle")
            self.tasks.add(self._precomputing)
            self._precomputing.add_done_callback(self.tasks.discard)

    async def _precompute_loop(self) -> None:
        while self._due:
            r = self._due.pop()
            started = time.monotonic()
            try:
                evaluations = await self.workloads.precompute(
                    r, permutations=self.config.precompute_permutations,
                    executor=self._idle_pool, duty=PRECOMPUTE_DUTY)
            except FedbusError as exc:  # e.g. retention dropped the round's updates meanwhile
                self.stats["precompute_failed"] += 1
                self._log.warning("store_precompute_failed", round=r, error=str(exc))
                continue
            self.stats["precomputed"] += 1
            self._log.info("store_round_precomputed", round=r, evaluations=evaluations,
                           seconds=round(time.monotonic() - started, 3))
            async with self.progress:
                self.progress.notify_all()

    # --- queries ----------------------------------------------------------------------------
    def spawn(self, msg: Message, enqueued: int) -> None:
        """Answer ``msg`` once the first ``enqueued`` backlog messages are recorded."""
        busy = len(self.tasks) >= self.config.max_queries
        if busy:
            self.stats["queries_refused"] += 1
        task = asyncio.create_task(self._answer(msg, enqueued, busy=busy))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, msg: Message, enqueued: int, *, busy: bool = False) -> None:
        c = self.config
        adm = self.door.open_now(msg)  # small: QUERY_LIMITS
        if adm is None:
            return
        env, requester = adm.env, adm.sender
        name, args = env.meta.get("workload"), env.meta.get("args", {})
        meta: dict[str, Any] = {"request_id": env.msg_id, "workload": name}
        tensors: dict[str, np.ndarray] = {}
        started = time.monotonic()
        if busy:
            meta.update(ok=False, error=f"store busy: {c.max_queries} queries running; retry")
        elif not isinstance(name, str) or not isinstance(args, dict):
            meta.update(ok=False, error="a query needs meta.workload (str) and meta.args (map)")
        else:
            try:
                await self._caught_up(enqueued)
                result = await self.workloads.run(name, args)
                meta.update(ok=True, result=result.data)
                tensors = result.tensors
            except FedbusError as exc:
                meta.update(ok=False, error=str(exc))
        meta["seconds"] = round(time.monotonic() - started, 6)
        self.stats["queries"] += 1
        reply = Envelope(kind=REPLY, job=c.job, sender=c.node_id, round=0, meta=meta,
                         tensors=tensors)
        try:
            payload = await asyncio.to_thread(encode, reply, c.compression)
        except CodecError as exc:
            payload = encode(Envelope(kind=REPLY, job=c.job, sender=c.node_id, round=0,
                                      meta={"request_id": env.msg_id, "ok": False,
                                            "error": f"result not encodable: {exc}"}))
        await self.bus.publish(topics.reply(c.job, requester), payload)
        self._log.info("query_answered", workload=name, peer=requester, ok=meta["ok"],
                       seconds=meta["seconds"])

    async def _caught_up(self, upto: int) -> None:
        """Wait (at most ``QUERY_CATCH_UP_S``) until the first ``upto`` backlog messages are
        handled; a store far behind answers from what it has."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(QUERY_CATCH_UP_S), self.progress:
                await self.progress.wait_for(lambda: self._handled() >= upto)
