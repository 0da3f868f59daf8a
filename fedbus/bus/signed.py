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
from collections import Counter
from dataclasses import dataclass

import structlog

from fedbus.bus._base import Bus, Message
from fedbus.bus.wrap import BusWrapper
from fedbus.log import worth_a_line
from fedbus.signing import SignatureError, Signer, Verifier

__all__ = ["SignedBus"]

log = structlog.get_logger(__name__)

# Checking a signature hashes the payload: above this, in a worker thread (as decoding is).
_OFFLOAD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class _Checked(Message):
    """A message whose signature was checked (and stripped) as it arrived."""


class SignedBus(BusWrapper):
    """Delegates to ``inner``; signs with ``signer``, checks with ``verifier``."""

    def __init__(self, inner: Bus, signer: Signer, verifier: Verifier) -> None:
        super().__init__(inner)
        self.signer = signer
        self.verifier = verifier
        self.refused: Counter[str] = Counter()
        self.screen = self._check

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                      tail: bytes = b"") -> None:
        if tail:
            raise ValueError("a signing bus makes the trailer itself")
        if len(payload) < _OFFLOAD_BYTES:
            await self.inner.publish(topic, self.signer.sign(payload), retain=retain)
        else:  # the trailer beside the payload: a 44 MB update is not copied to sign it.
            # Hashed here, on the event loop, as an unsigned payload's crc32s are (the same
            # time): a trip to a worker thread and back cost more than it saved.
            await self.inner.publish(topic, payload, retain=retain,
                                     tail=self.signer.trailer(payload))

    def _check(self, msg: Message) -> Message | None:
        """In the receive path, as a message arrives: a small message, or a large one the bus
        hashed as its chunks came, is checked at once, so a forgery never waits in a queue
        (a flood of them would crowd out real messages); another large one goes on, to be
        checked off the event loop in ``receive``."""
        if len(msg.payload) >= _OFFLOAD_BYTES and msg.hashed is None:
            return msg
        try:
            payload, signer = self._verify(msg)
        except SignatureError as exc:
            self._refuse(msg, exc)
            return None
        return _Checked(msg.topic, payload, msg.retain, signer=signer)

    async def receive(self, msg: Message) -> Message | None:
        """``msg`` with its signature checked and stripped, or None (refused, counted)."""
        if isinstance(msg, _Checked):
            return msg
        try:
            payload, signer = await asyncio.to_thread(self._verify, msg) \
                if len(msg.payload) >= _OFFLOAD_BYTES else self._verify(msg)
        except SignatureError as exc:
            self._refuse(msg, exc)
            return None
        return Message(msg.topic, payload, msg.retain, signer=signer)

    def _verify(self, msg: Message) -> tuple[bytes, str | None]:
        if msg.tail:  # split off by the bus as it joined the chunks: nothing to copy
            return msg.payload, self.verifier.verify_tail(msg.payload, msg.tail, msg.hashed)
        return self.verifier.verify(msg.payload)

    def _refuse(self, msg: Message, exc: SignatureError) -> None:
        self.refused[exc.reason] += 1
        if worth_a_line(self.refused[exc.reason]):  # all counted; a flood is a few lines
            log.warning("message_refused", node=self.node_id, reason=exc.reason,
                        detail=exc.detail, topic=msg.topic, total=self.refused[exc.reason])

    @property
    def stats(self) -> dict[str, int]:
        inner = getattr(self.inner, "stats", {})
        return {**inner, "signature_refused": sum(self.refused.values()),
                **{f"signature_{k}": v for k, v in self.refused.items()}}
