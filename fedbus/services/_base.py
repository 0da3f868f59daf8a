"""What every aggregating service shares: the update intake, presence, waiting for trainers,
the upload gate, publishing, and moving big work off the event loop.

Subclasses say only what differs, by implementing the ``IntakeHost`` hooks that are about
their bookkeeping: ``expects_ready``, ``admit``, ``fold``, and ``_on_lost`` / ``_grant_round``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.checkpoint import AggregatorState
from fedbus.codec import Compression, Envelope, Limits, encode
from fedbus.compress import UpdateCodec
from fedbus.door import OFFLOAD_BYTES, Rejections, model_limits
from fedbus.errors import BusError, FedbusError
from fedbus.manifest import EvalSpec, RoundSpec
from fedbus.manifest.model import preview
from fedbus.services._durability import Durability, DurabilitySettings
from fedbus.services._gate import UploadGate, pregrant_plan
from fedbus.services.intake import Intake, IntakeSettings
from fedbus.wire import GRANT, presence

__all__ = ["OFFLOAD_BYTES", "AggregatorBase", "AggregatorSettings"]

# Bus counters that mean data was lost or refused on the way in; reported per round.
#: The bus's counters of what it lost or refused on the way in; each round report carries
#: their increase (``bus_loss``), a full subscription queue included.
_LOSS_COUNTERS = ("transfers_expired", "transfers_dropped", "chunks_rejected",
                  "dropped_queue_full", "signature_refused")


@dataclass(frozen=True, slots=True)
class AggregatorSettings:
    """What every aggregator is configured with (the manifest's round, evaluate, codec)."""

    job: str
    node_id: str
    trainers: frozenset[str]
    #: Rounds (synchronous) or model versions (asynchronous) to produce.
    rounds: int
    #: The manifest's ``round:`` section itself (deadline, quorum, min_clients, upload slots,
    #: bounds): read as it is, never copied field by field (a relay group's is the same
    #: with its own ``min_clients``).
    round: RoundSpec = RoundSpec()
    #: The manifest's ``evaluate:`` section.
    evaluate: EvalSpec = EvalSpec()
    seed: int = 0
    #: Updates above this many bytes (the bus's chunk size) ask for an upload slot first.
    gate_bytes: int = 1_000_000
    compression: Compression = Compression()
    #: The broadcast model's lossy view (manifest ``codec.model``); ``weights`` stay exact.
    model_codec: UpdateCodec = UpdateCodec(stochastic=False)
    #: How the children pack their updates (manifest ``codec.update``): what an update
    #: granted with the order may weigh (``round.upload_burst_mb``).
    update_codec: UpdateCodec = UpdateCodec()
    #: Outer bounds; an update's own limits are derived from the model (``model_limits``).
    limits: Limits = Limits()
    #: Checkpoints go to this checkpointer (None: no durability; the manifest's checkpointer).
    durability: DurabilitySettings | None = None


C = TypeVar("C", bound=AggregatorSettings)


class AggregatorBase(ABC, Generic[C]):
    #: Its round orders grant the first uploads (``round.upload_burst_mb``).
    grants_with_order = False
    config: C
    bus: Bus
    weights: dict[str, np.ndarray]
    _log: Any

    def _init_intake(self, aux_models: int) -> None:
        """Call once ``config``, ``bus`` and ``weights`` are set."""
        c = self.config
        self.intake = Intake(self, IntakeSettings(
            job=c.job, node_id=c.node_id, children=c.trainers,
            limits=model_limits(self.weights, 1 + aux_models, c.limits),
            max_examples=c.round.max_examples, max_norm=c.round.max_update_norm,
        ))
        self._gate = UploadGate(c.round.max_uploads, timeout_s=c.round.deadline_s)
        #: (updates a round's order grants outright, the bytes each may weigh)
        self._pregrants = pregrant_plan(
            self.weights, c.update_codec, aux_models, c.round.upload_burst_mb,
            gate_bytes=c.gate_bytes, children=len(c.trainers)) if self.grants_with_order \
            else (0, 0)
        #: Grants on their way out (``_grant_due``); held so they are not collected mid-send.
        self._sending: set[asyncio.Task[None]] = set()
        #: This aggregator's run: trainers keep their round numbering per epoch, so a
        #: restarted aggregator (with or without a checkpoint) is followed, not ignored.
        self.epoch = uuid.uuid4().hex[:12]
        #: stochastic rounding of the broadcast (``codec.model``), when asked for
        self._model_rng = np.random.default_rng([c.seed, 0x6D6F64])
        self._loss_seen: dict[str, int] = {}
        self.durability = None if c.durability is None else Durability(
            job=c.job, node_id=c.node_id, settings=c.durability, limits=c.limits,
            rejections=self.intake.rejections)
        if self.durability is not None:
            self.intake.door.expect(self.durability.entry())

    @property
    def online(self) -> set[str]:
        return self.intake.online

    @property
    def rejections(self) -> Rejections:
        return self.intake.rejections

    # --- what subclasses say ------------------------------------------------------------
    @abstractmethod
    def expects_ready(self, sender: str, number: int) -> bool: ...

    @abstractmethod
    def admit(self, env: Envelope, sender: str) -> int: ...

    @abstractmethod
    def fold(self, update: Any, env: Envelope) -> None: ...

    @abstractmethod
    def _on_lost(self, node: str) -> None:
        """``node`` went offline (its last will, or its own goodbye)."""

    @abstractmethod
    def _grant_round(self, node: str) -> int:
        """The round (or model version) a grant to ``node`` is for."""

    # --- IntakeHost plumbing shared by all ------------------------------------------------
    def node_online(self, node: str) -> None:
        pass

    def node_offline(self, node: str) -> None:
        self._log.warning("node_lost", peer=node)
        self._gate.release(node)
        self._on_lost(node)

    def upload_done(self, node: str) -> None:
        self._gate.release(node)

    def folded(self, update: Any, env: Envelope, norm: float, nbytes: int) -> None:
        """An update was folded; only an aggregator feeding a store's sketches cares."""

    def ready(self, node: str) -> None:
        self._gate.request(node)

    # --- incoming -------------------------------------------------------------------------
    # The round API (public: a relay runs its group's rounds through it).
    def subscribe(self) -> Subscription:
        """This node's subscription: its children's updates, presence, its checkpointer."""
        c = self.config
        filters: tuple[str, ...] = (topics.updates_for(c.job, c.node_id),
                                    topics.presence_all(c.job))
        if self.durability is not None:
            filters += (self.durability.topic,)
        # What may legitimately wait unread: one small update (or `ready`) from every child,
        # the granted uploads, and presence. Beyond that it is a flood on an open broker:
        # dropped and counted instead of held (the fuzz test measured 2.2x RSS without it).
        update = self.intake.settings.limits.max_frame_bytes
        small = min(update, c.gate_bytes)
        backlog = len(c.trainers) * (small + 4096) + c.round.max_uploads * update + (1 << 20)
        backlog += self._pregrants[0] * self._pregrants[1]
        return self.bus.subscribe(*filters, admit=self._admit_chunks,
                                  max_queued_bytes=backlog, screen=self.intake.door.screen)


    def _admit_chunks(self, topic: str, total: int) -> bool:
        """Only a trainer holding an upload grant may make this node buffer a chunked
        transfer, and no bigger than an update can be: strangers cannot fill the slots."""
        if self.durability is not None and topic == self.durability.topic:
            # a restore (a model and its strategy's state) from our checkpointer
            return total <= self.config.limits.max_frame_bytes
        try:
            parsed = topics.parse(topic)
        except BusError:
            return False
        if parsed.channel != "update" or total > self.intake.settings.limits.max_frame_bytes:
            return False
        if self._gate.admits(parsed.sender, total):
            return True
        if self._gate.readmit(parsed.sender, time.monotonic()):
            self._log.warning("upload_regranted", peer=parsed.sender,
                              detail="its upload started after the grant expired; a slot "
                                     "was free")
            return True
        return False

    async def dispatch(self, msg: Message) -> None:
        """Handle one message from ``subscribe()``'s subscription."""
        if self.durability is not None and msg.topic == self.durability.topic:
            adm = await self.intake.door.open(msg)
            if adm is not None:
                self.durability.on_message(adm.env)
        else:
            await self.intake.handle(msg)
        await self._grant_due()

    async def _until(self, sub: Subscription, done: Callable[[], bool], timeout: float) -> bool:
        """Handle messages as usual until ``done()`` or ``timeout``; True when done."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                msg = await sub.get(timeout=left)
            except TimeoutError:
                return done()
            await self.dispatch(msg)
        return True

    async def _restore(self, sub: Subscription) -> AggregatorState | None:
        """Ask the checkpointer for this node's newest state. None: there is none, or the
        checkpointer did not answer in time (said loudly: the job starts over)."""
        d = self.durability
        if d is None:
            return None
        c, timeout = self.config, d.settings.checkpoint.restore_timeout_s
        await self.bus.publish(topics.control(c.job, d.settings.checkpointer),
                               encode(d.request()))
        if not await self._until(sub, lambda: d.restore_answered, timeout):
            self._log.error("restore_unanswered", checkpointer=d.settings.checkpointer,
                            timeout_s=timeout,
                            detail="no checkpoint restored: the job starts from its first round")
            return None
        state = d.restored_state()
        if state is None:
            self._log.info("restore_none", detail="no checkpoint yet: a fresh start")
        return state

    async def _checkpoint(self, sub: Subscription, state: AggregatorState) -> float | None:
        """Send ``state`` to the checkpointer and wait for its acknowledgement (``wait_s``, or
        for good with ``on_unacked: wait``). Returns the latency, None when unacknowledged."""
        d = self.durability
        assert d is not None
        c, wait_s = self.config, d.settings.checkpoint.wait_s
        started = time.monotonic()
        payload = await self._offload(lambda: encode(d.checkpoint_frame_envelope(state)))
        await self.bus.publish(topics.state(c.job, c.node_id), payload)
        while True:
            if await self._until(sub, lambda: state.round in d.acked, wait_s):
                latency = d.acked[state.round] - started
                self._log.info("checkpoint_acked", round=state.round,
                               seconds=round(latency, 4), bytes=len(payload))
                return latency
            if d.settings.checkpoint.on_unacked != "wait":
                self._log.error("checkpoint_unacked", round=state.round, wait_s=wait_s,
                                detail="the checkpointer did not confirm this round: going on "
                                       "without durability (checkpoint.on_unacked: continue)")
                return None
            self._log.error("checkpoint_unacked", round=state.round, wait_s=wait_s,
                            detail="holding the next round until the checkpointer confirms "
                                   "(checkpoint.on_unacked: wait); sending it again")
            await self.bus.publish(topics.state(c.job, c.node_id), payload)

    async def _grant_due(self) -> None:
        """Send the upload grants that are due; take back those left unused too long.

        A grant is sent without holding up the intake: a QoS 1 publish waits for the broker's
        PUBACK, which reaches us behind every chunk the broker has already queued to us —
        measured at 10 x 1M, up to 38 ms a grant with the next completed upload waiting
        unfolded meanwhile. A grant that cannot be sent is logged; its slot comes back when
        it expires, as for a grant that was lost."""
        grant, expired = self._gate.due(time.monotonic())
        for node in expired:
            self._log.warning("upload_grant_expired", peer=node)
        for node in grant:
            env = Envelope(kind=GRANT, job=self.config.job, sender=self.config.node_id,
                           round=self._grant_round(node), meta={"epoch": self.epoch})
            task = asyncio.create_task(
                self.bus.publish(topics.control(self.config.job, node), encode(env)),
                name=f"grant-{node}")
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.warning("grant_unsent", task=task.get_name(), error=str(exc))

    async def wait_for_clients(self, sub: Subscription, needed: int, timeout: float) -> None:
        """Handle messages until ``needed`` children are online; FedbusError after
        ``timeout``."""
        deadline = time.monotonic() + timeout
        # `online` holds only this node's children (the intake ignores other presence)
        while len(self.online) < needed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FedbusError(
                    f"only {len(self.online)} of the {needed} trainers needed "
                    f"(round.min_clients) came online within {timeout}s: "
                    f"{preview(sorted(self.online)) or 'none'}"
                )
            try:
                msg = await sub.get(timeout=left)
            except TimeoutError:
                continue
            await self.dispatch(msg)
        self._log.info("clients_ready", online=len(self.online))

    def _bus_losses(self) -> dict[str, int]:
        """Loss on the way in since the last call (expired or refused chunked transfers,
        messages dropped by a full subscription queue): what used to vanish as one log line
        now lands in the round's report."""
        stats = getattr(self.bus, "stats", None)
        if not isinstance(stats, Mapping):
            return {}
        out: dict[str, int] = {}
        for key in _LOSS_COUNTERS:
            now = int(stats.get(key, 0))
            if now > self._loss_seen.get(key, 0):
                out[key] = now - self._loss_seen.get(key, 0)
            self._loss_seen[key] = now
        return out

    # --- outgoing -------------------------------------------------------------------------
    async def _publish(self, topic: str, kind: str, number: int, meta: Mapping[str, Any]) -> None:
        env = Envelope(kind=kind, job=self.config.job, sender=self.config.node_id, round=number,
                       meta={**meta, "epoch": self.epoch})
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
