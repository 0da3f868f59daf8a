"""The transport seam: what every service may assume about the message bus.

Nothing outside ``fedbus.bus`` knows that the transport is MQTT. Payloads are opaque bytes;
messages larger than a bus's chunk size are split and reassembled by the bus itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

__all__ = ["Admit", "Bus", "Message", "Screen", "Subscription", "Will"]

#: Asked before a subscription's bus buffers a chunked transfer: (topic, declared total bytes)
#: -> may it? Lets a service say who may make it hold memory (a trainer it granted an upload,
#: up to the size of an update), so strangers cannot fill the reassembly slots.
Admit = Callable[[str, int], bool]

#: Asked as a whole message arrives, before it is queued for its reader: the message to
#: queue (checked, perhaps rewritten) or None (refused: never queued, counted by the screen's
#: owner). A signing bus checks signatures here, so a flood of forgeries never takes the
#: queue space a real message needs (fedbus.bus.signed).
Screen = Callable[["Message"], "Message | None"]


@dataclass(frozen=True, slots=True)
class Message:
    """A message as delivered to a subscriber. ``payload`` is the whole, reassembled payload."""

    topic: str
    payload: bytes
    retain: bool = False
    #: Who signed it, checked against their key (fedbus.bus.signed); None: not signed.
    signer: str | None = None
    #: A chunked payload's signature trailer, split off by the bus as it joined the chunks
    #: (so the payload is not copied to remove it); empty when there is none or when the
    #: trailer is still at the end of ``payload`` (a payload that travelled whole).
    tail: bytes = b""
    #: With ``tail``: a BLAKE3 hasher that has read exactly ``payload``, made by the bus as
    #: the chunks arrived, so the signature check does not read the payload again.
    hashed: Any = None


@dataclass(frozen=True, slots=True)
class Will:
    """Published by the broker on the node's behalf when the node vanishes (last will)."""

    topic: str
    payload: bytes
    retain: bool = True


@runtime_checkable
class Subscription(Protocol):
    """An async iterator of messages matching one or more filters.

    Use as ``async with bus.subscribe(f) as sub: async for msg in sub: ...``. The
    subscription is active (broker-side) once ``__aenter__`` returns, so a publish that
    happens after it is never missed.
    """

    async def __aenter__(self) -> Subscription: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[Message]: ...

    async def get(self, timeout: float | None = None) -> Message:
        """Next message; raises ``TimeoutError`` after ``timeout`` seconds."""
        ...


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe with QoS 1 semantics, retained messages, wills and $share groups."""

    node_id: str

    async def __aenter__(self) -> Bus: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      tail: bytes = b"") -> None:
        """Publish at QoS 1. Large payloads are chunked transparently. ``tail``: the payload's
        signature trailer (fedbus.bus.signed), sent after it without copying the payload;
        a chunked one reaches subscribers as ``Message.tail``."""
        ...

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None,
                  screen: Screen | None = None) -> Subscription:
        """Messages matching ``filters``. ``admit`` (optional) vets chunked transfers on them
        before any of their bytes are buffered; refused ones are dropped and counted.
        ``max_queued_bytes`` (optional) bounds what may wait unread; beyond it messages are
        dropped and counted (``stats["dropped_queue_full"]``). ``screen`` (optional) sees
        each whole message before it is queued (``Screen``)."""
        ...
