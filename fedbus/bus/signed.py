"""A bus that signs everything its node publishes and checks everything it receives.

It wraps a node's connection when the manifest asks for signed messages (``security.sign``;
``fedbus.connect`` builds it): every publish leaves with the node's signature, and every
delivered message is checked against its signer's public key before anyone sees it. A
message whose signature is missing (where required), unknown or wrong is never delivered:
it is counted (``signature_refused`` and one counter a reason, in ``stats``; aggregators
report them in each round's ``bus_loss``) and logged. Who signed a delivered message rides
along as ``Message.signer``; the front door (``fedbus.door``) then insists that the signer
is the sender the topic or envelope names, so nobody can speak for a node it is not.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import structlog

from fedbus.bus._base import Admit, Bus, Message, Subscription
from fedbus.signing import SignatureError, Signer, Verifier

__all__ = ["SignedBus"]

log = structlog.get_logger(__name__)

# Checking a signature hashes the payload: above this, in a worker thread (as decoding is).
_OFFLOAD_BYTES = 1 << 20


class _SignedSubscription:
    def __init__(self, inner: Subscription, owner: SignedBus) -> None:
        self._inner = inner
        self._owner = owner

    async def __aenter__(self) -> _SignedSubscription:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        async for msg in self._inner:
            checked = await self._owner.check(msg)
            if checked is not None:
                yield checked

    async def get(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            checked = await self._owner.check(await self._inner.get(left))
            if checked is not None:
                return checked


class SignedBus:
    """Delegates to ``inner``; signs with ``signer``, checks with ``verifier``."""

    def __init__(self, inner: Bus, signer: Signer, verifier: Verifier) -> None:
        self.inner = inner
        self.node_id = inner.node_id
        self.signer = signer
        self.verifier = verifier
        self.refused: Counter[str] = Counter()

    async def __aenter__(self) -> SignedBus:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        signed = (await asyncio.to_thread(self.signer.sign, payload)
                  if len(payload) >= _OFFLOAD_BYTES else self.signer.sign(payload))
        await self.inner.publish(topic, signed, retain=retain)

    def subscribe(self, *filters: str, admit: Admit | None = None,
                  max_queued_bytes: int | None = None) -> Subscription:
        return _SignedSubscription(self.inner.subscribe(*filters, admit=admit,
                                                        max_queued_bytes=max_queued_bytes),
                                   self)

    async def check(self, msg: Message) -> Message | None:
        """``msg`` with its signature checked and stripped, or None (refused, counted)."""
        try:
            if len(msg.payload) >= _OFFLOAD_BYTES:
                payload, signer = await asyncio.to_thread(self.verifier.verify, msg.payload)
            else:
                payload, signer = self.verifier.verify(msg.payload)
        except SignatureError as exc:
            self.refused[exc.reason] += 1
            log.warning("message_refused", node=self.node_id, reason=exc.reason,
                        detail=exc.detail, topic=msg.topic, total=self.refused[exc.reason])
            return None
        return Message(msg.topic, payload, msg.retain, signer=signer)

    @property
    def stats(self) -> dict[str, int]:
        inner = getattr(self.inner, "stats", {})
        return {**inner, "signature_refused": sum(self.refused.values()),
                **{f"signature_{k}": v for k, v in self.refused.items()}}

    def __getattr__(self, name: str) -> Any:
        # fault injection and transport details (kill, endpoint, ...) are the inner bus's
        return getattr(self.inner, name)
