"""A bus wrapper that counts the bytes a node publishes and receives, for the run's metrics.

It wraps the aggregator's connection in ``fedbus run``: the services stay unaware of it, and
the per-round difference of the counters is the traffic of that round at the aggregator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from fedbus.bus import Admit, Bus, Message, Subscription

__all__ = ["MeteredBus"]


class _MeteredSubscription:
    def __init__(self, inner: Subscription, owner: MeteredBus) -> None:
        self._inner = inner
        self._owner = owner

    async def __aenter__(self) -> _MeteredSubscription:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        async for msg in self._inner:
            self._owner.received += len(msg.payload)
            yield msg

    async def get(self, timeout: float | None = None) -> Message:
        msg = await self._inner.get(timeout)
        self._owner.received += len(msg.payload)
        return msg


class MeteredBus:
    """Delegates to ``inner``; ``sent``/``received`` count payload bytes (before chunking)."""

    def __init__(self, inner: Bus) -> None:
        self.inner = inner
        self.node_id = inner.node_id
        self.sent = 0
        self.received = 0

    async def __aenter__(self) -> MeteredBus:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.inner.publish(topic, payload, retain=retain)
        self.sent += len(payload)

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None) -> Subscription:
        return _MeteredSubscription(
            self.inner.subscribe(*filters, admit=admit, max_queued_bytes=max_queued_bytes), self)

    def __getattr__(self, name: str) -> Any:
        # Anything else a service asks of its bus (statistics, ...) is the real bus's.
        return getattr(self.inner, name)
