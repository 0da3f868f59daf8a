"""A bus around a bus: the base of the wrappers that see every message a node sends and
receives without the services knowing (byte metering, signatures). A wrapper overrides
``publish`` and ``receive``; everything else is the inner bus's."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from fedbus.bus._base import Admit, Bus, Message, Screen, Subscription

__all__ = ["BusWrapper"]


class _Subscription:
    """The inner bus's subscription, each message passed through the wrapper's ``receive``
    (None: dropped)."""

    def __init__(self, inner: Subscription, owner: BusWrapper) -> None:
        self._inner = inner
        self._owner = owner

    async def __aenter__(self) -> _Subscription:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        async for msg in self._inner:
            passed = await self._owner.receive(msg)
            if passed is not None:
                yield passed

    async def get(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            passed = await self._owner.receive(await self._inner.get(left))
            if passed is not None:
                return passed


class BusWrapper:
    """Delegates to ``inner``."""

    def __init__(self, inner: Bus) -> None:
        self.inner = inner
        self.node_id = inner.node_id

    async def __aenter__(self) -> Any:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      tail: bytes = b"") -> None:
        await self.inner.publish(topic, payload, retain=retain, tail=tail)

    async def receive(self, msg: Message) -> Message | None:
        """A delivered message, as the services will see it (None: they will not)."""
        return msg

    #: Checks made as a message arrives, before it is queued (None: none): see ``Screen``.
    #: What it returns is what ``receive`` gets later.
    screen: Screen | None = None

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None,
                  screen: Screen | None = None) -> Subscription:
        own, outer = self.screen, screen  # this wrapper's checks first, as with ``receive``
        both: Screen | None = own if outer is None else outer if own is None else (
            lambda m: None if (checked := own(m)) is None else outer(checked))
        return _Subscription(self.inner.subscribe(*filters, admit=admit,
                                                  max_queued_bytes=max_queued_bytes,
                                                  screen=both), self)

    def __getattr__(self, name: str) -> Any:
        # anything else a service asks of its bus (statistics, fault injection, ...)
        return getattr(self.inner, name)
