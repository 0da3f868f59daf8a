"""Lost chunks repaired, not fatal: a receiver asks the sender for just the chunks it lacks.

Both buses run one ``Repair`` each. Two halves:

- **Asking** (every receiver): a partial transfer that made no progress for
  ``ChunkLimits.nack_after_s`` names its missing chunk indices in a NACK to the node that owns
  the transfer's topic, on ``topics.nack(job, owner, me)`` — at most ``max_nacks`` times per
  transfer, then it expires as before. Only topics with exactly one publisher are repaired
  (``topics.repair_owner``: model and update topics), so a receiver asks the owner and no one
  else, and on a broker with ACLs no one else could answer on the owner's topic anyway.
- **Answering** (every sender): the owner keeps its newest chunked payload on each such topic
  (``RepairLimits``: topics, bytes, age; one model-sized payload for an aggregator) and
  serves NACKs on ``topics.nacks_for(job, me)``, rebuilding only the requested frames and
  publishing them on the original topic (every receiver drops what it already has as a
  duplicate). A NACK for a transfer it no longer keeps is ignored; each kept transfer has a
  resend budget (``resend_factor`` x its chunk count, shared by all requesters), so forged
  or repeated NACKs cannot make a node send more than a bounded multiple of what it published.

NACK payload (big-endian): ``b"FN"``, version 1, the 16-byte transfer id, an index count n
(<= ``MAX_NACK_INDICES``), then n uint32 chunk indices.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import structlog

from fedbus import topics
from fedbus.bus._chunking import MAX_NACK_INDICES, Reassembler, Transfer
from fedbus.bus._dispatch import QueueSubscription
from fedbus.errors import BusError
from fedbus.log import worth_a_line

__all__ = ["NACK_MAGIC", "Repair", "RepairLimits", "decode_nack", "encode_nack"]

log = structlog.get_logger(__name__)

NACK_MAGIC: Final = b"FN"
NACK_VERSION: Final = 1
_NACK: Final = struct.Struct("!2sB16sI")


def encode_nack(transfer: bytes, indices: list[int]) -> bytes:
    idx = indices[:MAX_NACK_INDICES]
    return _NACK.pack(NACK_MAGIC, NACK_VERSION, transfer, len(idx)) + struct.pack(
        f"!{len(idx)}I", *idx)


def decode_nack(payload: bytes) -> tuple[bytes, list[int]] | None:
    """(transfer id, indices), or None for anything that is not a well-formed NACK."""
    if len(payload) < _NACK.size:
        return None
    magic, version, transfer, n = _NACK.unpack_from(payload)
    if magic != NACK_MAGIC or version != NACK_VERSION or n > MAX_NACK_INDICES \
            or len(payload) != _NACK.size + 4 * n:
        return None
    return transfer, list(struct.unpack_from(f"!{n}I", payload, _NACK.size))


@dataclass(frozen=True, slots=True)
class RepairLimits:
    """What a sender keeps to answer NACKs, and how much it will resend."""

    keep_transfers: int = 4
    keep_bytes: int = 512 * 1024 * 1024
    keep_s: float = 60.0
    #: Chunks resent per kept transfer, over all NACKs: at most this x its chunk count.
    resend_factor: float = 2.0


@dataclass(slots=True)
class _Kept:
    topic: str
    transfer: Transfer
    at: float
    resent: int = 0
    warned: bool = False  # over budget: said once per transfer, a flood stays quiet


SendFrame = Callable[[str, bytes], Awaitable[None]]
Subscribe = Callable[..., QueueSubscription]
#: The biggest well-formed NACK; a chunked transfer on a NACK topic above it is refused
#: before anything is buffered, and at most this many bytes of NACKs wait unread.
_MAX_NACK_BYTES: Final = _NACK.size + 4 * MAX_NACK_INDICES
_MAX_QUEUED_NACK_BYTES: Final = 1 << 20


class Repair:
    """One bus's NACK sender and server (see the module doc)."""

    def __init__(
        self, node_id: str, reassembler: Reassembler, *, send_frame: SendFrame,
        publish: SendFrame, subscribe: Subscribe, limits: RepairLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.limits = limits or RepairLimits()
        self.counters: Counter[str] = Counter()
        self._reassembler = reassembler
        self._send_frame = send_frame
        self._publish = publish
        self._subscribe = subscribe
        self._clock = clock
        self._kept: OrderedDict[bytes, _Kept] = OrderedDict()
        self._kept_bytes = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks[""] = asyncio.create_task(self._ask_loop(), name=f"nack-{self.node_id}")

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._kept.clear()
        self._kept_bytes = 0

    # -- the sender's half --------------------------------------------------------------------

    def sent(self, topic: str, transfer: Transfer) -> None:
        """Keep ``transfer`` (about to be published on ``topic``) to answer NACKs, if this node
        owns the topic; start serving NACKs for the topic's job on first use."""
        owner = topics.repair_owner(topic)
        if owner is None or owner[1] != self.node_id or not self._tasks:
            return
        job = owner[0]
        # Only the newest transfer per topic: receivers drop a sender's older partial
        # transfers once newer ones arrive, and the aggregator holds one model, not four.
        for tid in [k for k, kept in self._kept.items() if kept.topic == topic]:
            self._kept_bytes -= len(self._kept.pop(tid).transfer.payload)
        self._kept[transfer.transfer] = _Kept(topic, transfer, self._clock())
        self._kept_bytes += len(transfer.payload)
        self._forget_old()
        if job not in self._tasks:
            self._tasks[job] = asyncio.create_task(self._serve(job), name=f"repair-{job}")

    def _forget_old(self) -> None:
        lim, deadline = self.limits, self._clock() - self.limits.keep_s
        while self._kept and (len(self._kept) > lim.keep_transfers
                              or self._kept_bytes > lim.keep_bytes
                              or next(iter(self._kept.values())).at < deadline):
            _, old = self._kept.popitem(last=False)
            self._kept_bytes -= len(old.transfer.payload)

    async def _serve(self, job: str) -> None:
        try:
            # NACK topics are open to anyone the broker lets write them: bounded like any input
            async with self._subscribe(topics.nacks_for(job, self.node_id),
                                       admit=lambda _t, total: total <= _MAX_NACK_BYTES,
                                       max_queued_bytes=_MAX_QUEUED_NACK_BYTES) as sub:
                async for msg in sub:
                    await self.answer(msg.topic, msg.payload)
        except BusError as exc:  # e.g. an ACL without the nack topics: repair off, bus fine
            log.warning("repair_unavailable", node=self.node_id, job=job, error=str(exc))

    async def answer(self, nack_topic: str, payload: bytes) -> int:
        """Resend what a NACK asks for, within the budget; return how many chunks were sent."""
        requester = nack_topic.rsplit("/", 1)[-1]
        nack = decode_nack(payload)
        if nack is None:
            self.counters["nacks_malformed"] += 1
            if worth_a_line(self.counters["nacks_malformed"]):
                log.warning("drop_nack", reason="malformed", requester=requester,
                            size=len(payload), total=self.counters["nacks_malformed"])
            return 0
        self._forget_old()
        transfer_id, indices = nack
        kept = self._kept.get(transfer_id)
        if kept is None:
            self.counters["nacks_unknown"] += 1
            log.debug("drop_nack", reason="not_kept", requester=requester,
                     transfer=transfer_id.hex())
            return 0
        t = kept.transfer
        wanted = sorted({i for i in indices if 0 <= i < t.count})
        budget = int(self.limits.resend_factor * t.count) - kept.resent
        if len(wanted) > budget:
            self.counters["nacks_over_budget"] += 1
            emit = log.debug if kept.warned else log.warning
            kept.warned = True
            emit("drop_nack", reason="over_budget", requester=requester,
                        transfer=t.transfer.hex(), asked=len(wanted), budget=max(budget, 0))
            wanted = wanted[: max(budget, 0)]
        kept.resent += len(wanted)
        for index in wanted:
            await self._send_frame(kept.topic, t.frame(index))
        self.counters["chunks_resent"] += len(wanted)
        if wanted:
            log.info("resend_chunks", topic=kept.topic, requester=requester,
                     transfer=t.transfer.hex(), chunks=len(wanted), count=t.count)
        return len(wanted)

    # -- the receiver's half ------------------------------------------------------------------

    async def _ask_loop(self) -> None:
        tick = min(1.0, self._reassembler.limits.nack_after_s / 2)
        while True:
            # periodic check for stalled transfers; with none in progress, every 4 ticks (an
            # idle node woke every second for nothing: a quarter of 10,000 idle trainers' CPU)
            busy = self._reassembler.partial_transfers > 0
            await asyncio.sleep(tick if busy else 4 * tick)
            await self.ask()

    async def ask(self) -> int:
        """Send a NACK for each stalled transfer; return how many were sent."""
        sent = 0
        for topic, transfer, missing in self._reassembler.stalled():
            owner = topics.repair_owner(topic)
            if owner is None or owner[1] == self.node_id:
                continue
            job, node = owner
            try:
                await self._publish(topics.nack(job, node, self.node_id),
                                    encode_nack(transfer, missing))
            except BusError as exc:
                log.warning("nack_failed", topic=topic, owner=node, error=str(exc))
                continue
            sent += 1
            self.counters["nacks_sent"] += 1
            log.info("send_nack", topic=topic, owner=node, transfer=transfer.hex(),
                     missing=len(missing))
        return sent

