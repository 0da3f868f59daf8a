"""What both buses share on the receiving side: local subscriptions and frame dispatch.

A bus hands every delivered frame to its ``Dispatcher`` together with the broker-side filters
that routed it; the dispatcher reassembles chunks and fans whole messages out to the local
``QueueSubscription`` objects holding those filters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Final

import structlog

from fedbus.bus._base import Admit, Message, Screen
from fedbus.bus._chunking import ChunkLimits, Reassembler, Tailed
from fedbus.errors import BusError
from fedbus.topics import matches, validate_filter

__all__ = ["Dispatcher", "QueueSubscription", "receive_stats"]

_CLOSED: Final = object()
log = structlog.get_logger(__name__)

Hook = Callable[["QueueSubscription"], Awaitable[None]]


class QueueSubscription:
    """A ``Subscription``: a queue of messages, opened and closed by its bus.

    ``max_queued_bytes`` bounds what waits unread: beyond it a message is dropped, counted
    (``dropped``) and logged, so a flood faster than the reader cannot grow the process
    without bound. Unbounded by default; a service that knows what it expects sets it.
    ``screen`` sees every message first: what it refuses is never queued (``Screen``).
    """

    def __init__(self, filters: Iterable[str], open_hook: Hook, close_hook: Hook, *,
                 admit: Admit | None = None, max_queued_bytes: int | None = None,
                 screen: Screen | None = None) -> None:
        self.filters: tuple[str, ...] = tuple(validate_filter(f) for f in filters)
        self.admit = admit
        self.max_queued_bytes = max_queued_bytes
        self.screen = screen
        self.queued_bytes = 0
        self.dropped = 0
        if not self.filters:
            raise BusError("subscribe() needs at least one topic filter")
        self._open_hook = open_hook
        self._close_hook = close_hook
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._state = "new"  # new -> open -> closed
        self.high_water = 0

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    async def __aenter__(self) -> QueueSubscription:
        if self._state != "new":
            raise BusError("a subscription can be entered once")
        self._state = "open"
        try:
            await self._open_hook(self)
        except BaseException:
            self._end()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state == "open":
            self._end()
            await self._close_hook(self)

    def push(self, message: Message) -> None:
        if self._state != "open":
            return
        if self.screen is not None:
            screened = self.screen(message)
            if screened is None:
                return
            message = screened
        size = len(message.payload)
        limit = self.max_queued_bytes
        if limit is not None and self.queued_bytes + size > limit:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("drop_message", reason="queue_full", topic=message.topic,
                            queued_bytes=self.queued_bytes, limit=limit, dropped=self.dropped)
            return
        self.queued_bytes += size
        self._queue.put_nowait(message)
        self.high_water = max(self.high_water, self._queue.qsize())

    def _end(self) -> None:
        """Stop receiving; readers drain what is queued, then see the end."""
        if self._state != "closed":
            self._state = "closed"
            self._queue.put_nowait(_CLOSED)

    async def get(self, timeout: float | None = None) -> Message:
        if self._state == "new":
            raise BusError("use the subscription as `async with bus.subscribe(...) as sub`")
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # every later reader sees the end too
            raise BusError(f"subscription {self.filters} is closed")
        assert isinstance(item, Message)
        self.queued_bytes -= len(item.payload)
        return item

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.get()
            except BusError:
                if self.closed:
                    return
                raise


class Dispatcher:
    """Reassembles frames and routes whole messages to the local subscriptions."""

    def __init__(self, limits: ChunkLimits | None = None) -> None:
        self.reassembler = Reassembler(limits)
        self._by_filter: dict[str, list[QueueSubscription]] = {}
        self.delivered = 0
        self.unrouted = 0

    @property
    def filters(self) -> list[str]:
        return list(self._by_filter)

    def add(self, sub: QueueSubscription) -> list[str]:
        """Register ``sub``; return the filters that had no local subscriber before."""
        new = [f for f in dict.fromkeys(sub.filters) if f not in self._by_filter]
        for f in dict.fromkeys(sub.filters):
            self._by_filter.setdefault(f, []).append(sub)
        return new

    def remove(self, sub: QueueSubscription) -> list[str]:
        """Unregister ``sub``; return the filters that now have no local subscriber."""
        gone = []
        for f in dict.fromkeys(sub.filters):
            subs = self._by_filter.get(f, [])
            if sub in subs:
                subs.remove(sub)
            if not subs and f in self._by_filter:
                del self._by_filter[f]
                gone.append(f)
        return gone

    def deliver(
        self,
        topic: str,
        payload: bytes | memoryview,
        *,
        retain: bool = False,
        via: Iterable[str] | None = None,
        only: QueueSubscription | None = None,
    ) -> None:
        """Handle one delivered frame.

        ``via``: the broker-side filters that routed this copy (None: match every filter).
        ``only``: deliver to this subscription alone (retained messages for a new subscriber).
        """
        routes = sorted(set(via)) if via is not None else None
        route = "\x00".join(routes) if routes is not None else ""
        if only is not None:
            route = f"only:{id(only)}"
        whole = self.reassembler.feed(topic, payload, route=route,
                                      admit=self._admission(routes, only))
        if whole is None:
            return
        message = (Message(topic=topic, payload=whole.payload, retain=retain, tail=whole.tail,
                           hashed=whole.hashed)
                   if isinstance(whole, Tailed) else
                   Message(topic=topic, payload=whole, retain=retain))
        if only is not None:
            only.push(message)
            self.delivered += 1
            return
        candidates = routes if routes is not None else list(self._by_filter)
        targets: dict[int, QueueSubscription] = {}
        for f in candidates:
            if not matches(f, topic):
                continue  # a stale session's subscription id, or a filter we dropped
            for sub in self._by_filter.get(f, ()):
                targets.setdefault(id(sub), sub)
        if not targets:
            self.unrouted += 1
            return
        for sub in targets.values():
            sub.push(message)
        self.delivered += 1

    def _admission(
        self, routes: list[str] | None, only: QueueSubscription | None
    ) -> Admit | None:
        """The admission check for a new chunked transfer: any subscriber that would receive
        it may admit it; with no subscriber holding a check, everything is admitted."""
        if only is not None:
            return only.admit
        subs = [s for f in (routes if routes is not None else list(self._by_filter))
                for s in self._by_filter.get(f, ())]
        if not subs or any(s.admit is None for s in subs):
            return None
        checks = [s.admit for s in subs if s.admit is not None]
        return lambda topic, total: any(check(topic, total) for check in checks)

    def close_all(self) -> None:
        for subs in list(self._by_filter.values()):
            for sub in subs:
                sub._end()
        self._by_filter.clear()

    def dropped(self) -> int:
        return sum(s.dropped for subs in self._by_filter.values() for s in subs)

    def high_water(self) -> int:
        return max((s.high_water for subs in self._by_filter.values() for s in subs), default=0)


#: The reassembler's counters every bus reports as they are.
_REASSEMBLY_COUNTERS: Final = ("chunks_received", "chunks_rejected", "transfers_completed",
                               "transfers_expired", "transfers_dropped")


def receive_stats(dispatch: Dispatcher, repair_counters: dict[str, int]) -> dict[str, int]:
    """What a bus's receiving side counts (the same names on every bus): deliveries, queue
    drops, reassembly and its refusals, and chunk repair."""
    r = dispatch.reassembler
    return {
        "delivered": dispatch.delivered,
        "unrouted": dispatch.unrouted,
        "queue_high_water": dispatch.high_water(),
        "dropped_queue_full": dispatch.dropped(),
        "buffered_bytes": r.buffered_bytes,
        "partial_transfers": r.partial_transfers,
        **{k: r.counters[k] for k in _REASSEMBLY_COUNTERS},
        **{f"rejected_{k}": v for k, v in r.rejected.items()},
        **repair_counters,
    }
