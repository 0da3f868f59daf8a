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

import structlog

from fedbus.bus._base import Bus, Message
from fedbus.bus.wrap import BusWrapper
from fedbus.log import worth_a_line
from fedbus.signing import SignatureError, Signer, Verifier

__all__ = ["SignedBus"]

log = structlog.get_logger(__name__)

# Checking a signature hashes the payload: above this, in a worker thread (as decoding is).
_OFFLOAD_BYTES = 1 << 20


class SignedBus(BusWrapper):
    """Delegates to ``inner``; signs with ``signer``, checks with ``verifier``."""

    def __init__(self, inner: Bus, signer: Signer, verifier: Verifier) -> None:
        super().__init__(inner)
        self.signer = signer
        self.verifier = verifier
        self.refused: Counter[str] = Counter()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        signed = (await asyncio.to_thread(self.signer.sign, payload)
                  if len(payload) >= _OFFLOAD_BYTES else self.signer.sign(payload))
        await self.inner.publish(topic, signed, retain=retain)

    async def receive(self, msg: Message) -> Message | None:
        """``msg`` with its signature checked and stripped, or None (refused, counted)."""
        try:
            if len(msg.payload) >= _OFFLOAD_BYTES:
                payload, signer = await asyncio.to_thread(self.verifier.verify, msg.payload)
            else:
                payload, signer = self.verifier.verify(msg.payload)
        except SignatureError as exc:
            self.refused[exc.reason] += 1
            if worth_a_line(self.refused[exc.reason]):  # all counted; a flood is a few lines
                log.warning("message_refused", node=self.node_id, reason=exc.reason,
                            detail=exc.detail, topic=msg.topic, total=self.refused[exc.reason])
            return None
        return Message(msg.topic, payload, msg.retain, signer=signer)

    @property
    def stats(self) -> dict[str, int]:
        inner = getattr(self.inner, "stats", {})
        return {**inner, "signature_refused": sum(self.refused.values()),
                **{f"signature_{k}": v for k, v in self.refused.items()}}
