"""An in-process broker and bus with MQTT's semantics, for unit tests and single-process runs.

Routes by filter (``+``, ``#``), keeps retained messages, delivers ``$share/<group>/<filter>`` to
one group member (round robin), fires last wills on ``kill()`` and chunks like ``MqttBus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import structlog

from fedbus.bus._base import Admit, Screen, Will
from fedbus.bus._chunking import ChunkLimits, plan
from fedbus.bus._dispatch import Dispatcher, QueueSubscription, receive_stats
from fedbus.bus._repair import Repair, RepairLimits
from fedbus.errors import BusError
from fedbus.topics import strip_share

__all__ = ["MemoryBroker", "MemoryBus"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Entry:
    """One broker-side subscription: a client and a filter (refcounted by local subscribers)."""

    bus: MemoryBus
    topic_filter: str
    #: Subscription order: deliveries and $share turns follow it, as a list scan would.
    seq: int
    group: str | None
    inner: str
    refs: int = 1


class _Node:
    """A level of the subscription trie: exact children, a ``+`` child, ``#`` entries."""

    __slots__ = ("children", "entries", "hash_entries", "plus")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.entries: list[_Entry] = []  # filters ending exactly here
        self.hash_entries: list[_Entry] = []  # filters ending in '/#' here

    def empty(self) -> bool:
        return not (self.children or self.plus or self.entries or self.hash_entries)


class _SubscriptionTrie:
    """Filters indexed by level, so matching a topic visits what can match it, not every
    subscription: a publish costs O(levels x matching branches), whatever the subscriber count.

    ``steps`` counts trie nodes visited by ``match`` (the matcher's work, for tests).
    """

    def __init__(self) -> None:
        self.root = _Node()
        self.steps = 0

    def add(self, entry: _Entry) -> None:
        levels = entry.inner.split("/")
        node = self.root
        for level in levels[:-1]:
            node = self._child(node, level)
        last = levels[-1]
        if last == "#":
            node.hash_entries.append(entry)
        else:
            self._child(node, last).entries.append(entry)

    @staticmethod
    def _child(node: _Node, level: str) -> _Node:
        if level == "+":
            if node.plus is None:
                node.plus = _Node()
            return node.plus
        child = node.children.get(level)
        if child is None:
            child = node.children[level] = _Node()
        return child

    def remove(self, entry: _Entry) -> None:
        levels = entry.inner.split("/")
        path: list[tuple[_Node, str]] = []
        node = self.root
        for level in levels[:-1]:
            nxt = node.plus if level == "+" else node.children.get(level)
            if nxt is None:
                return
            path.append((node, level))
            node = nxt
        last = levels[-1]
        if last == "#":
            node.hash_entries.remove(entry)
        else:
            leaf = node.plus if last == "+" else node.children.get(last)
            if leaf is None:
                return
            leaf.entries.remove(entry)
            path.append((node, last))
            node = leaf
        # Prune empty branches so a churn of short-lived subscriptions leaves no garbage.
        while path and node.empty():
            parent, level = path.pop()
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
            node = parent

    def match(self, topic: str) -> list[_Entry]:
        """Entries whose filter matches ``topic``, in subscription order."""
        levels = topic.split("/")
        dollar = topic.startswith("$")
        found: list[_Entry] = []
        stack: list[tuple[_Node, int]] = [(self.root, 0)]
        while stack:
            node, i = stack.pop()
            self.steps += 1
            # MQTT: wildcards at the first level never match topics starting with '$'.
            wild = not (dollar and i == 0)
            if wild:
                found.extend(node.hash_entries)  # 'a/#' matches 'a' and everything below
            if i == len(levels):
                found.extend(node.entries)
                continue
            child = node.children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if wild and node.plus is not None:
                stack.append((node.plus, i + 1))
        found.sort(key=lambda e: e.seq)
        return found


class _RetainedTree:
    """Retained messages indexed by topic level, so a new subscription reads what its filter
    matches instead of scanning every retained topic (10,000 presence messages in a simulation).
    """

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}
        self._payloads: dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._payloads)

    def topics(self) -> list[str]:
        return sorted(self._payloads)

    def set(self, topic: str, payload: bytes) -> None:
        if topic not in self._payloads:
            node = self._root
            for level in topic.split("/"):
                node = node.setdefault(level, {})
            node[_LEAF] = topic
        self._payloads[topic] = payload

    def clear(self, topic: str) -> None:
        if self._payloads.pop(topic, None) is None:
            return
        path: list[tuple[dict[str, Any], str]] = []
        node = self._root
        for level in topic.split("/"):
            path.append((node, level))
            node = node[level]
        del node[_LEAF]
        while path and not node:
            parent, level = path.pop()
            del parent[level]
            node = parent

    def match(self, topic_filter: str) -> list[tuple[str, bytes]]:
        flevels = topic_filter.split("/")
        out: list[str] = []

        def everything(node: dict[str, Any], top: bool) -> None:
            for level, child in node.items():
                if level == _LEAF:
                    out.append(child)
                elif not (top and level.startswith("$")):
                    everything(child, False)

        def walk(node: dict[str, Any], i: int) -> None:
            if i == len(flevels):
                if _LEAF in node:
                    out.append(node[_LEAF])
                return
            fl = flevels[i]
            if fl == "#":
                if i > 0 and _LEAF in node:
                    out.append(node[_LEAF])  # 'a/#' matches 'a' itself
                for level, child in node.items():
                    if level != _LEAF and not (i == 0 and level.startswith("$")):
                        everything(child, False)
                return
            if fl == "+":
                for level, child in node.items():
                    if level != _LEAF and not (i == 0 and level.startswith("$")):
                        walk(child, i + 1)
                return
            child = node.get(fl)
            if child is not None:
                walk(child, i + 1)

        walk(self._root, 0)
        return [(t, self._payloads[t]) for t in sorted(out)]


# Topic levels never contain NUL, so it marks "a retained message ends here".
_LEAF: Final = "\x00"


class MemoryBroker:
    """Routes messages between ``MemoryBus`` clients in one event loop.

    Subscriptions live in a topic trie and retained messages in a topic tree, so routing a
    publish and answering a new subscription cost what they match, not the number of
    subscribers or retained topics (``match_steps`` counts the trie work).
    """

    def __init__(self) -> None:
        self._trie = _SubscriptionTrie()
        self._by_bus: dict[MemoryBus, dict[str, _Entry]] = {}
        self._seq = 0
        self._retained = _RetainedTree()
        self._round_robin: dict[tuple[str, str], int] = {}
        self._clients: dict[str, MemoryBus] = {}
        self.published = 0

    @property
    def retained_topics(self) -> list[str]:
        return self._retained.topics()

    @property
    def match_steps(self) -> int:
        """Trie nodes visited by routing so far: the matcher's work, independent of wall time."""
        return self._trie.steps

    @property
    def subscriptions(self) -> int:
        return sum(len(entries) for entries in self._by_bus.values())

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
        for entry in self._by_bus.pop(bus, {}).values():
            self._trie.remove(entry)
        if fire_will and bus.will is not None:
            self._route(bus.will.topic, bus.will.payload, retain=bus.will.retain)

    def _subscribe(self, bus: MemoryBus, topic_filter: str) -> list[tuple[str, bytes]]:
        """Add a subscription; return the retained messages it should see (not for $share)."""
        entries = self._by_bus.setdefault(bus, {})
        entry = entries.get(topic_filter)
        group, inner = strip_share(topic_filter)
        if entry is not None:
            entry.refs += 1
        else:
            self._seq += 1
            entry = _Entry(bus, topic_filter, self._seq, group, inner)
            entries[topic_filter] = entry
            self._trie.add(entry)
        if group is not None:
            return []  # MQTT 5: retained messages are not sent for shared subscriptions
        return self._retained.match(topic_filter)

    def _unsubscribe(self, bus: MemoryBus, topic_filter: str) -> None:
        entries = self._by_bus.get(bus, {})
        entry = entries.get(topic_filter)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            del entries[topic_filter]
            self._trie.remove(entry)

    def _route(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self.published += 1
        if retain:
            if payload:
                self._retained.set(topic, payload)
            else:
                self._retained.clear(topic)  # MQTT: empty retained payload clears it
        shared: dict[tuple[str, str], list[_Entry]] = {}
        for entry in self._trie.match(topic):
            if entry.group is None:
                entry.bus._receive(topic, payload, entry.topic_filter)
            else:
                shared.setdefault((entry.group, entry.inner), []).append(entry)
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
        repair_limits: RepairLimits | None = None,
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
        self._repair = Repair(node_id, self._dispatch.reassembler, send_frame=self._resend,
                              publish=self.publish, subscribe=self.subscribe,
                              limits=repair_limits)
        self._state = "new"  # new -> open -> closed
        self._published = 0
        self._received = 0

    @property
    def stats(self) -> dict[str, int]:
        return {"published": self._published, "received": self._received,
                **receive_stats(self._dispatch, self._repair.counters)}

    async def __aenter__(self) -> MemoryBus:
        if self._state != "new":
            raise BusError(f"bus {self.node_id} cannot be reopened; make a new one")
        self._state = "open"
        # A memory bus never reconnects, so its birth message (sent by MqttBus on reconnects
        # only) is never due; services announce themselves once subscribed.
        self._broker._connect(self)
        self._repair.start()
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
        self._repair.stop()
        self._dispatch.close_all()

    def _taken_over(self) -> None:
        self._state = "closed"
        self._repair.stop()
        self._dispatch.close_all()

    def _check_open(self) -> None:
        if self._state != "open":
            raise BusError(f"bus {self.node_id} is not open: use `async with bus:`")

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      tail: bytes = b"") -> None:
        self._check_open()
        if "+" in topic or "#" in topic or not topic:
            raise BusError(f"cannot publish to {topic!r}: topics have no wildcards")
        data = bytes(payload)  # subscribers must never see a buffer the caller mutates later
        limit = self._dispatch.reassembler.limits.max_message_bytes
        if len(data) + len(tail) > limit:
            raise BusError(f"payload of {len(data) + len(tail)} bytes exceeds "
                           f"max_message_bytes={limit}")
        # A broker keeps one retained message per topic, so retained payloads travel whole.
        size = max(self.chunk_bytes, len(data) + len(tail)) if retain else self.chunk_bytes
        transfer = plan(data, max(size, 1), tail=tail)
        if transfer is None:
            self._send_frame(topic, data + tail if tail else data, retain)
        else:
            self._repair.sent(topic, transfer)
            for index in range(transfer.count):
                self._send_frame(topic, transfer.frame(index), retain)
        self._published += 1

    def _send_frame(self, topic: str, frame: bytes, retain: bool) -> None:
        """Hand one frame to the broker (the place a lossy test bus drops frames)."""
        self._broker._route(topic, frame, retain=retain)

    async def _resend(self, topic: str, frame: bytes) -> None:
        if self._state == "open":
            self._send_frame(topic, frame, False)

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None,
                  screen: Screen | None = None) -> QueueSubscription:
        return QueueSubscription(filters, self._open_sub, self._close_sub, admit=admit,
                                 max_queued_bytes=max_queued_bytes, screen=screen)

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
