"""What both aggregators share: presence, waiting for trainers, publishing, and moving big
work off the event loop. Subclasses say what a message means while they wait (``_on_idle``).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.codec import Compression, Envelope, Limits, encode
from fedbus.errors import FedbusError
from fedbus.services._wire import GRANT, UploadGate, presence

__all__ = ["OFFLOAD_BYTES", "AggregatorBase", "AggregatorSettings"]

# Decoding, folding or encoding a model of this size or more happens in a worker thread, so
# the event loop (and with it MQTT keepalives) never stalls on a big model.
OFFLOAD_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    """What every aggregator is configured with (the manifest's round, evaluate, codec)."""

    job: str
    node_id: str
    trainers: frozenset[str]
    #: Rounds (synchronous) or model versions (asynchronous) to produce.
    rounds: int
    #: A round closes, or an asynchronous trainer is given up on, this long after the order.
    deadline_s: float = 60.0
    #: Online trainers needed before the first round or order.
    min_clients: int = 1
    start_timeout_s: float = 120.0
    evaluate_every: int = 1
    seed: int = 0
    #: Large updates upload at most this many at a time (``UploadGate``).
    max_uploads: int = 4
    #: Updates above this many bytes (the bus's chunk size) ask for an upload slot first.
    gate_bytes: int = 1_000_000
    max_examples: int = 1 << 40
    compression: Compression = Compression()
    limits: Limits = Limits()


class _Config(Protocol):
    @property
    def job(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def trainers(self) -> frozenset[str]: ...


C = TypeVar("C", bound=_Config)


class AggregatorBase(ABC, Generic[C]):
    config: C
    bus: Bus
    weights: dict[str, np.ndarray]
    online: set[str]
    _gate: UploadGate
    _log: Any

    @abstractmethod
    async def _on_idle(self, msg: Message) -> None:
        """Handle a message that arrives while no round or work is under way."""

    @abstractmethod
    def _grant_round(self, node: str) -> int:
        """The round (or model version) a grant to ``node`` is for."""

    async def _grant_due(self) -> None:
        """Send the upload grants that are due; take back those left unused too long."""
        grant, expired = self._gate.due(time.monotonic())
        for node in expired:
            self._log.warning("upload_grant_expired", peer=node)
        for node in grant:
            env = Envelope(kind=GRANT, job=self.config.job, sender=self.config.node_id,
                           round=self._grant_round(node))
            await self.bus.publish(topics.control(self.config.job, node), encode(env))

    async def _wait_for_clients(self, sub: Subscription, needed: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.online & self.config.trainers) < needed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FedbusError(
                    f"only {len(self.online)} of the {needed} trainers needed "
                    f"(round.min_clients) came online within {timeout}s: {sorted(self.online)}"
                )
            try:
                msg = await sub.get(timeout=left)
            except TimeoutError:
                continue
            await self._on_idle(msg)
        self._log.info("clients_ready", online=len(self.online))

    async def _publish(self, topic: str, kind: str, number: int, meta: Mapping[str, Any]) -> None:
        env = Envelope(kind=kind, job=self.config.job, sender=self.config.node_id, round=number,
                       meta=dict(meta))
        await self.bus.publish(topic, encode(env))

    async def _publish_presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "aggregator", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)

    async def _offload(self, fn: Callable[[], Any]) -> Any:
        nbytes = sum(v.nbytes for v in self.weights.values())
        if nbytes >= OFFLOAD_BYTES:
            return await asyncio.to_thread(fn)
        return fn()
