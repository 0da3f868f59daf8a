"""Live ranking: before a round, an aggregator whose selector names a store asks that store
for a fresh ``scheduling`` ranking, waits a short while, and goes on without it (keeping
the previous ranking, counted and logged) when the store is slow, dead or has nothing yet.
The store never holds up a round for longer than the selector's ``timeout_s``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final, Protocol

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus
from fedbus.codec import Envelope, Limits, encode
from fedbus.door import Door, Entry
from fedbus.errors import FedbusError

__all__ = ["RANKING_LIMITS", "LiveRanking", "RankingSelector", "ask_store", "refresh_ranking"]


class RankingSelector(Protocol):
    store: str | None
    timeout_s: float
    refreshes: int
    fallbacks: dict[str, int]

    def store_query(self) -> dict[str, Any] | None: ...
    def set_ranking(self, ranking: Mapping[str, float]) -> None: ...


#: A reply with no models (the live ranking's): scores for at most a population of clients.
RANKING_LIMITS: Final = Limits(max_frame_bytes=16 << 20, max_decompressed_bytes=16 << 20,
                               max_tensors=0)


async def ask_store(bus: Bus, job: str, me: str, store: str, workload: str,
                    args: Mapping[str, Any], timeout: float, *,
                    limits: Limits = RANKING_LIMITS,
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """One query to ``store`` on ``query/<store>/<me>``; its reply (meta, tensors) from
    ``reply/<me>``, or None after ``timeout`` seconds. The reply enters through a front door
    (from ``store`` only, within ``limits``, decoded off the event loop when large): the
    aggregator asks between rounds and must not be stalled or inflated by what comes back."""
    request = Envelope(kind="query", job=job, sender=me, round=0,
                       meta={"workload": workload, "args": dict(args)})
    door = Door(job, me)
    door.expect(Entry(topics.reply(job, me), frozenset({"reply"}), senders=frozenset({store}),
                      topic_sender=False, limits=limits))
    async with bus.subscribe(topics.reply(job, me)) as sub:
        await bus.publish(topics.query(job, store, me), encode(request))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    adm = await door.open(await sub.get())
                    if adm is not None and adm.env.meta.get("request_id") == request.msg_id:
                        return dict(adm.env.meta), dict(adm.env.tensors)
        except TimeoutError:
            return None


async def refresh_ranking(bus: Bus, job: str, me: str, selector: RankingSelector, round: int,
                          log: Any = None) -> bool:
    """Ask the selector's store for a ranking and hand it over; False (and the reason
    counted in ``selector.fallbacks``) when none came."""
    args = selector.store_query()
    if args is None or selector.store is None:
        return False
    log = log or structlog.get_logger(__name__)
    reason = ""
    try:
        answer = await ask_store(bus, job, me, selector.store, "scheduling", args,
                                 selector.timeout_s)
    except FedbusError as exc:  # the bus failing must not fail the round
        answer, reason = None, f"error: {type(exc).__name__}"
    scores = None
    if answer is None:
        reason = reason or "timeout"
    elif not answer[0].get("ok"):
        reason = "no_ranking"  # e.g. the store holds no finished round yet
    else:
        result = answer[0].get("result")
        scores = result.get("scores") if isinstance(result, dict) else None
        if not isinstance(scores, dict) or not scores:
            scores, reason = None, "no_ranking"
    if scores is not None:
        try:
            selector.set_ranking({str(k): float(v) for k, v in scores.items()})
        except (TypeError, ValueError, ArithmeticError) as exc:
            scores, reason = None, f"bad_ranking: {exc}"
    if scores is None:
        selector.fallbacks[reason] = selector.fallbacks.get(reason, 0) + 1
        log.warning("ranking_fallback", round=round, store=selector.store, reason=reason,
                    detail=(answer[0].get("error") if answer is not None else None))
        return False
    selector.refreshes += 1
    log.info("ranking_refreshed", round=round, store=selector.store, clients=len(scores))
    return True


class LiveRanking:
    """A round observer of the aggregator whose selector ranks clients by a store's
    ``scheduling`` workload: before each round it asks the store for a fresh ranking (never
    holding the round up beyond the selector's ``timeout_s``)."""

    def __init__(self, job: str, node_id: str, selector: RankingSelector) -> None:
        self.job, self.node_id, self.selector = job, node_id, selector
        self._log = structlog.get_logger(__name__).bind(node=node_id, job=job)

    async def round_starting(self, number: int, bus: Bus) -> None:
        await refresh_ranking(bus, self.job, self.node_id, self.selector, number,
                              self._log)

    def update_folded(self, number: int, update: Any, meta: Mapping[str, Any], norm: float,
                      nbytes: int, arrival_s: float) -> None:
        return None

    async def round_closed(self, number: int, selected: list[str], aggregated: bool,
                           bus: Bus) -> None:
        return None

    def close(self) -> None:
        return None
