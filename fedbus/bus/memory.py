"""An in-process broker and bus with MQTT's semantics, for unit tests and single-process runs.

Routes by filter (``+``, ``#``), keeps retained messages, delivers ``$share/<group>/<filter>`` to
one group member (round robin), fires last wills on ``kill()`` and chunks like ``MqttBus``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog

from fedbus.bus._base import Admit, Will
from fedbus.bus._chunking import ChunkLimits, frames
from fedbus.bus._dispatch import Dispatcher, QueueSubscription
from fedbus.errors import BusError
from fedbus.topics import matches, strip_share

__all__ = ["MemoryBroker", "MemoryBus"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Entry:
    """One broker-side subscription: a client and a filter (refcounted by local subscribers)."""

    bus: MemoryBus
    topic_filter: str
    refs: int = 1


class MemoryBroker:
    """Routes messages between ``MemoryBus`` clients in one event loop."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._retained: dict[str, bytes] = {}
        self._round_robin: dict[tuple[str, str], int] = {}
        self._clients: dict[str, MemoryBus] = {}
        self.published = 0

    @property
    def retained_topics(self) -> list[str]:
        return sorted(self._retained)

    def _connect(self, bus: MemoryBus) -> None:
        old = self._clients.get(bus.client_id)
        if old is not None and old is not bus:
            # MQTT session takeover: the newcomer wins, the old connection is dropped.
            self._disconnect(old, fire_will=True)
            old._taken_over()
        self._clients[bus.client_id] = bus

    def _disconnect(self, bus: MemoryBus, *, fire_will: bool) -> None:
        if self._clients.get(bus.client_id) is bus:
            del self._clients[bus.client_id]
        self._entries = [e for e in self._entries if e.bus is not bus]
        if fire_will and bus.will is not None:
            self._route(bus.will.topic, bus.will.payload, retain=bus.will.retain)

    def _subscribe(self, bus: MemoryBus, topic_filter: str) -> list[tuple[str, bytes]]:
        """Add a subscription; return the retained messages it should see (not for $share)."""
        for entry in self._entries:
            if entry.bus is bus and entry.topic_filter == topic_filter:
                entry.refs += 1
                break
        else:
            self._entries.append(_Entry(bus, topic_filter))
        group, _ = strip_share(topic_filter)
        if group is not None:
            return []  # MQTT 5: retained messages are not sent for shared subscriptions
        return [(t, p) for t, p in sorted(self._retained.items()) if matches(topic_filter, t)]

    def _unsubscribe(self, bus: MemoryBus, topic_filter: str) -> None:
        for entry in self._entries:
            if entry.bus is bus and entry.topic_filter == topic_filter:
                entry.refs -= 1
                if entry.refs <= 0:
                    self._entries.remove(entry)
                return

    def _route(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.published += 1
        if retain:
            if payload:
                self._retained[topic] = payload
            else:
                self._retained.pop(topic, None)  # MQTT: empty retained payload clears it
        shared: dict[tuple[str, str], list[_Entry]] = {}
        for entry in self._entries:
            if not matches(entry.topic_filter, topic):
                continue
            group, inner = strip_share(entry.topic_filter)
            if group is None:
                entry.bus._receive(topic, payload, entry.topic_filter)
            else:
                shared.setdefault((group, inner), []).append(entry)
        for key, members in shared.items():
            turn = self._round_robin.get(key, 0)
            self._round_robin[key] = turn + 1
            chosen = members[turn % len(members)]
            chosen.bus._receive(topic, payload, chosen.topic_filter)


class MemoryBus:
    """A ``Bus`` on a ``MemoryBroker``. ``kill()`` simulates an abrupt disconnect (fires the will).

    Payloads above ``chunk_bytes`` are chunked exactly as ``MqttBus`` does it, so tests of big
    messages and of chunk limits run in memory too. Retained payloads are never chunked (a broker
    keeps one retained message per topic).
    """

    def __init__(
        self,
        broker: MemoryBroker,
        node_id: str,
        *,
        will: Will | None = None,
        birth: Will | None = None,
        client_id: str | None = None,
        chunk_bytes: int = 1_000_000,
        limits: ChunkLimits | None = None,
    ) -> None:
        if chunk_bytes <= 0:
            raise BusError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.node_id = node_id
        self.client_id = client_id or node_id  # == node id, so ACL %c rules match
        self.birth = birth
        self.will = will
        self.chunk_bytes = chunk_bytes
        self._broker = broker
        self._dispatch = Dispatcher(limits)
        self._state = "new"  # new -> open -> closed
        self._published = 0
        self._received = 0

    @property
    def stats(self) -> dict[str, int]:
        r = self._dispatch.reassembler
        return {
            "published": self._published,
            "received": self._received,
            "delivered": self._dispatch.delivered,
            "unrouted": self._dispatch.unrouted,
            "queue_high_water": self._dispatch.high_water(),
            "dropped_queue_full": self._dispatch.dropped(),
            "buffered_bytes": r.buffered_bytes,
            "partial_transfers": r.partial_transfers,
            **{k: r.counters[k] for k in _REASSEMBLY_COUNTERS},
            **{f"rejected_{k}": v for k, v in r.rejected.items()},
        }

    async def __aenter__(self) -> MemoryBus:
        if self._state != "new":
            raise BusError(f"bus {self.node_id} cannot be reopened; make a new one")
        self._state = "open"
        # A memory bus never reconnects, so its birth message (sent by MqttBus on reconnects
        # only) is never due; services announce themselves once subscribed.
        self._broker._connect(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(fire_will=False)

    async def kill(self) -> None:
        """Vanish without a goodbye: the broker publishes the will, subscriptions end."""
        self._close(fire_will=True)

    def _close(self, *, fire_will: bool) -> None:
        if self._state == "open":
            self._broker._disconnect(self, fire_will=fire_will)
        self._state = "closed"
        self._dispatch.close_all()

    def _taken_over(self) -> None:
        self._state = "closed"
        self._dispatch.close_all()

    def _check_open(self) -> None:
        if self._state != "open":
            raise BusError(f"bus {self.node_id} is not open: use `async with bus:`")

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._check_open()
        if "+" in topic or "#" in topic or not topic:
            raise BusError(f"cannot publish to {topic!r}: topics have no wildcards")
        data = bytes(payload)  # subscribers must never see a buffer the caller mutates later
        limit = self._dispatch.reassembler.limits.max_message_bytes
        if len(data) > limit:
            raise BusError(f"payload of {len(data)} bytes exceeds max_message_bytes={limit}")
        # A broker keeps one retained message per topic, so retained payloads travel whole.
        size = max(self.chunk_bytes, len(data)) if retain else self.chunk_bytes
        parts: Iterable[bytes] = frames(data, max(size, 1))
        for part in parts:
            self._broker._route(topic, part, retain=retain)
        self._published += 1

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None) -> QueueSubscription:
        return QueueSubscription(filters, self._open_sub, self._close_sub, admit=admit,
                                 max_queued_bytes=max_queued_bytes)

    async def _open_sub(self, sub: QueueSubscription) -> None:
        self._check_open()
        self._dispatch.add(sub)
        for f in dict.fromkeys(sub.filters):
            for topic, payload in self._broker._subscribe(self, f):
                self._dispatch.deliver(topic, payload, retain=True, only=sub)

    async def _close_sub(self, sub: QueueSubscription) -> None:
        self._dispatch.remove(sub)
        if self._state == "open":
            for f in dict.fromkeys(sub.filters):
                self._broker._unsubscribe(self, f)

    def _receive(self, topic: str, payload: bytes, via: str) -> None:
        self._received += 1
        self._dispatch.deliver(topic, payload, via=(via,))


_REASSEMBLY_COUNTERS = (
    "chunks_received",
    "chunks_rejected",
    "transfers_completed",
    "transfers_expired",
    "transfers_dropped",
)
