"""A bus wrapper that counts the bytes a node publishes and receives, for the run's metrics.

It wraps the aggregator's connection in ``fedbus run``: the services stay unaware of it, and
the per-round difference of the counters is the traffic of that round at the aggregator.
"""

from __future__ import annotations

from fedbus.bus import Bus, Message
from fedbus.bus.wrap import BusWrapper

__all__ = ["MeteredBus"]


class MeteredBus(BusWrapper):
    """Delegates to ``inner``; ``sent``/``received`` count payload bytes (before chunking)."""

    def __init__(self, inner: Bus) -> None:
        super().__init__(inner)
        self.sent = 0
        self.received = 0

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      tail: bytes = b"") -> None:
        await self.inner.publish(topic, payload, retain=retain, tail=tail)
        self.sent += len(payload) + len(tail)

    async def receive(self, msg: Message) -> Message | None:
        self.received += len(msg.payload) + len(msg.tail)
        return msg
