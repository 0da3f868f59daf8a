"""The checkpointer: persists what aggregators publish on ``state/<aggregator>`` and serves it
back when a restarted aggregator asks.

Protocol (all through ``fedbus.topics``; the wiring and ACLs follow it):

    aggregator -> state/<aggregator>      ``checkpoint``      its state after a committed round
    checkpointer -> state/<checkpointer>  ``checkpoint_ack``  stored durably (meta.node, round)
    aggregator -> control/<checkpointer>  ``restore_request`` (meta.request)
    checkpointer -> state/<checkpointer>  ``restore``         the newest good state, or empty

A checkpoint is checked (a restorable state of a known aggregator, within the size limits)
before it is stored, and stored before it is acknowledged; storing runs in a worker thread,
so a slow disk or Redis never stalls the message loop. It never blocks a round by itself:
the aggregator decides how long it waits for an acknowledgement (``checkpoint.wait_s``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

import structlog

from fedbus import topics
from fedbus.bus import Bus, Message
from fedbus.checkpoint import CHECKPOINT, CheckpointStore, state_from
from fedbus.codec import Envelope, Limits, decode, encode
from fedbus.door import Door, Entry, Rejections
from fedbus.errors import BusError, CodecError
from fedbus.wire import presence

__all__ = ["CHECKPOINT_ACK", "RESTORE", "RESTORE_REQUEST", "Checkpointer", "CheckpointerConfig"]

log = structlog.get_logger(__name__)

CHECKPOINT_ACK: Final = "checkpoint_ack"
RESTORE_REQUEST: Final = "restore_request"
RESTORE: Final = "restore"


@dataclass(frozen=True, slots=True)
class CheckpointerConfig:
    job: str
    node_id: str
    #: The aggregators whose state this checkpointer keeps (the manifest's).
    aggregators: frozenset[str]
    limits: Limits = Limits()
    #: The job's rounds (asynchronous: model versions): a checkpoint beyond them is a forgery
    #: that would be kept as the newest and end every later restart at once.
    rounds: int | None = None


class Checkpointer:
    """Runs until cancelled (a service, like a broker)."""

    def __init__(self, config: CheckpointerConfig, bus: Bus, store: CheckpointStore) -> None:
        self.config = config
        self.bus = bus
        self.store = store
        self.rejections = Rejections(config.node_id)
        #: (aggregator, round) of every checkpoint stored by this process, in order.
        self.stored: list[tuple[str, int]] = []
        self._own = topics.state(config.job, config.node_id)
        # The front door: checkpoints from the manifest's aggregators on their state topics,
        # restore requests from them on our control topic.
        aggregators = config.aggregators
        self.door = Door(config.job, config.node_id, rejections=self.rejections)
        # (no dedupe: an aggregator whose ack was lost sends the same checkpoint again, and
        # storing it twice is harmless; the ack it needs names that message)
        self.door.expect(Entry(topics.state_all(config.job), frozenset({CHECKPOINT}),
                               senders=aggregators, limits=config.limits, dedupe=False))
        # a restore request carries no tensors: small limits, so a compression bomb sent
        # here is refused before it is inflated (it was decoded with the job's 2 GiB bound)
        self.door.expect(Entry(topics.control(config.job, config.node_id),
                               frozenset({RESTORE_REQUEST}), senders=aggregators,
                               topic_sender=False))
        self._log = log.bind(node=config.node_id, role="checkpointer", job=config.job)

    async def run(self) -> int:
        c = self.config
        filters = (topics.state_all(c.job), topics.control(c.job, c.node_id))
        async with self.bus.subscribe(*filters, admit=self._admit,
                                      screen=self.door.screen) as sub:
            await self.bus.publish(topics.presence(c.job, c.node_id),
                                   encode(presence(c.job, c.node_id, "checkpointer", "online")),
                                   retain=True)
            try:
                async for msg in sub:
                    await self._handle(msg)
            finally:
                self.store.close()
        return len(self.stored)

    def _admit(self, topic: str, total: int) -> bool:
        try:
            parsed = topics.parse(topic)
        except BusError:
            return False
        return (parsed.channel == "state" and parsed.sender in self.config.aggregators
                and total <= self.config.limits.max_frame_bytes)

    async def _handle(self, msg: Message) -> None:
        if msg.topic == self._own:
            return  # our own acknowledgements and restores coming back
        adm = await self.door.open(msg)
        if adm is None:
            return
        if adm.env.kind == CHECKPOINT:
            await self._store(adm.env, msg.payload)
        else:
            await self._serve(adm.env)

    async def _store(self, env: Envelope, frame: bytes) -> None:
        c = self.config
        if c.rounds is not None and not 0 <= env.round <= c.rounds:
            self.rejections.reject("implausible_round", f"checkpoint of round {env.round}, "
                                   f"the job has {c.rounds}", sender=env.sender)
            return
        try:
            state_from(env)  # restorable, or it is not worth keeping
        except CodecError as exc:
            self.rejections.reject(exc.reason, exc.detail, sender=env.sender)
            return
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.store.save, c.job, env.sender, env.round, frame)
        except Exception as exc:  # disk full, Redis and disk both down: say so, stay up
            self._log.error("checkpoint_failed", peer=env.sender, round=env.round,
                            error=repr(exc))
            return
        seconds = time.monotonic() - started
        self.stored.append((env.sender, env.round))
        ack = Envelope(kind=CHECKPOINT_ACK, job=c.job, sender=c.node_id, round=env.round,
                       meta={"node": env.sender, "of": env.msg_id, "seconds": round(seconds, 4),
                             "bytes": len(frame)})
        await self.bus.publish(self._own, encode(ack))
        self._log.info("checkpoint_stored", peer=env.sender, round=env.round, bytes=len(frame),
                       seconds=round(seconds, 4))

    async def _serve(self, request: Envelope) -> None:
        c = self.config
        node = request.sender
        found = await asyncio.to_thread(self.store.latest, c.job, node)
        meta = {"node": node, "request": request.msg_id}
        if found is None:
            reply = Envelope(kind=RESTORE, job=c.job, sender=c.node_id, round=0,
                             meta={**meta, "empty": True})
            self._log.info("restore_served", peer=node, round=None)
        else:
            stored = decode(found[1], self.config.limits)
            reply = Envelope(kind=RESTORE, job=c.job, sender=c.node_id, round=stored.round,
                             meta={**meta, "state": dict(stored.meta)}, tensors=stored.tensors)
            self._log.info("restore_served", peer=node, round=stored.round)
        await self.bus.publish(self._own, await asyncio.to_thread(encode, reply))
