"""The trainer: wait for round orders, train the task in a worker thread, send back a delta.

Training never runs on the event loop, so MQTT keepalives (our heartbeat) keep flowing while
a slow Raspberry Pi trains. The same class serves every topology: it only knows its parent.

What it takes, and from whom (the wiring): orders and ``done`` only from its parent on
``model/<parent>`` (asynchronous orders on ``work/<self>/<parent>``, for this trainer
alone), grants only on ``control/<self>``, each naming the parent as sender; a
round number only if it is plausible (within the job's rounds, newer than the last one of
the same aggregator run, ``epoch``); a model no bigger than its own task's model. A ``done``
ends the trainer only when the broker authenticates publishers (``authenticated``): on an
anonymous broker anyone could forge one, so the trainer says the job is over and keeps
serving. It watches its own presence and re-announces itself when someone (a forgery, or a
will that crossed a reconnect) says it is offline while it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Message
from fedbus.clientside import ClientSide
from fedbus.codec import Compression, Envelope, Limits, encode
from fedbus.compress import LocalDelta, UpdateCodec, check_model, decode_model
from fedbus.door import Door, Entry, SeenIds, model_limits
from fedbus.errors import BusError, CodecError, FedbusError, UpdateRejected
from fedbus.services._gate import upload_threshold
from fedbus.task import FitResult, Task
from fedbus.wire import (
    DONE,
    GRANT,
    PRESENCE,
    READY,
    ROUND,
    UPDATE,
    join_tensors,
    presence,
    split_tensors,
)

__all__ = ["Order", "Packed", "TaskSource", "Trainer", "TrainerConfig", "UpdateSource"]

log = structlog.get_logger(__name__)


class RingHook(Protocol):
    """A hybrid ring group's say in delivery (``fedbus.services.ring.RingMember``)."""

    def joins(self, order: Envelope, result: FitResult) -> bool: ...

    def flatten(self, delta: Mapping[str, np.ndarray], result: FitResult) -> np.ndarray: ...

    async def reduce(self, order: Envelope, epoch: str, vec: np.ndarray, result: FitResult,
                     own: bytes) -> None: ...

    def reducing(self, epoch: str, number: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    job: str
    node_id: str
    parent: str
    #: The job's rounds (or model versions): an order beyond them is implausible.
    rounds: int = 1 << 31
    #: The broker authenticates publishers and its ACL ties topics to them (``fedbus acl``):
    #: then orders and ``done`` on the parent's topic are the parent's, and a ``done`` ends
    #: the trainer. On an anonymous broker nothing on a topic can be trusted.
    authenticated: bool = True
    #: Model-sized tensor sets an order carries besides the model (SCAFFOLD's control: 1).
    client_aux_models: int = 0
    compression: Compression = Compression()
    #: Lossy update compression (manifest ``codec.update``), decoded by the aggregator's intake.
    update_codec: UpdateCodec = UpdateCodec()
    #: Outer bounds; an order's own limits are derived from the task's model.
    limits: Limits = Limits()


#: Aggregator runs (epochs) whose last round is remembered.
_EPOCHS = 8
#: Large updates held for their upload grant at once (the current one and one before it).
_MAX_PENDING = 2
#: How often one delivered update is sent again when asked (repairs, not an amplifier).
_MAX_RESENDS = 3
#: Seconds between a trainer's answers to presences that say it is offline.
REANNOUNCE_S = 1.0


@dataclass(slots=True)
class Order:
    """A checked round order, waiting to be trained: ``weights`` as they came (perhaps a
    ``codec.model`` view, made dense by ``dense_weights`` off the event loop)."""

    env: Envelope
    epoch: str
    weights: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]
    config: dict[str, Any]

    def dense_weights(self) -> dict[str, np.ndarray]:
        return decode_model(self.weights, self.env.meta)  # codec.model: checked on arrival


@dataclass(frozen=True, slots=True)
class Packed:
    """An update ready to send: its payload, the fit's result, the seconds it took, and the
    flat vector a ring group sums (None when the update goes straight to the parent)."""

    payload: bytes
    result: FitResult
    duration: float
    vec: np.ndarray | None


#: Turns (the delta from the order's model, the fit's result, seconds) into the update to
#: send: the trainer's client-side chain and encoding. Sources call it in a worker thread.
Packer = Callable[[Mapping[str, np.ndarray], FitResult, float], Packed]


@runtime_checkable
class UpdateSource(Protocol):
    """Where a trainer's update comes from: a task trained in a worker thread
    (``TaskSource``), or a relay's round of its group (``fedbus.services.relay``)."""

    def get_weights(self) -> dict[str, np.ndarray]:
        """The model's names, shapes and dtypes (what orders are checked against)."""
        ...

    async def produce(self, order: Order, pack: Packer) -> Packed:
        """Train from ``order`` and return ``pack(delta, result, seconds)``. Raises
        ``FedbusError`` when there is nothing to send."""
        ...


class TaskSource:
    """A task trained in ONE worker-thread trip with the packing: each trip back to the event
    loop is a wake-up and a GIL hand-off, N of them a round in a process of N trainers."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.task.get_weights()

    async def produce(self, order: Order, pack: Packer) -> Packed:
        return await asyncio.to_thread(self._fit_and_pack, order, pack)

    def _fit_and_pack(self, order: Order, pack: Packer) -> Packed:
        weights = order.dense_weights()
        started = time.monotonic()
        try:
            self.task.set_weights(weights)
        except Exception as exc:
            raise FedbusError(f"global model does not fit this task: {exc}") from exc
        result = self.task.fit(order.config, order.extra)
        if result.num_examples <= 0:
            raise FedbusError("task trained on 0 examples: nothing to send")
        # made dense only if something reads it; int8 packing subtracts on the way
        delta = LocalDelta(self.task.get_weights(), weights)
        return pack(delta, result, time.monotonic() - started)


class Trainer:
    """Serves round orders from ``config.parent`` until it says the job is done."""

    def __init__(
        self,
        config: TrainerConfig,
        bus: Bus,
        source: Task | UpdateSource,
    ) -> None:
        self.config = config
        self.bus = bus
        self.source: UpdateSource = (source if isinstance(source, UpdateSource)
                                     else TaskSource(source))
        #: Set by a ring group member wrapping this trainer: its updates go through the ring.
        self.ring: RingHook | None = None
        # lives as long as the trainer: top-k keeps what it has not sent yet (error feedback)
        self._client = ClientSide(config.update_codec)
        self.rounds_trained = 0
        self._orders_seen = SeenIds(capacity=4096)
        #: Rounds delivered per aggregator run (epoch), most recent run last.
        self._delivered: dict[str, list[int]] = {}
        self._epoch: str | None = None
        self._done = False
        self._worker: asyncio.Task[None] | None = None
        self._reannounce: asyncio.Task[None] | None = None
        self._reannounce_owed = False
        #: The last synchronous update sent: (epoch, round, payload), sent again if asked.
        self._last_sent: tuple[str, int, bytes] | None = None
        self._resent = 0
        self._next: Order | None = None
        #: (epoch, round) being trained now
        self._current: tuple[str, int] | None = None
        #: A large update waiting for the aggregator's upload grant: (round, epoch, payload).
        #: Large updates waiting for the aggregator's upload grant, by (round, epoch): kept
        #: when a new order comes (a forged one must not make the trainer drop a real upload),
        #: at most ``_MAX_PENDING``, oldest dropped first.
        self._pending: dict[tuple[int, str], bytes] = {}
        self._limits = model_limits(self.source.get_weights(), 1 + config.client_aux_models,
                                    config.limits)
        self._log = log.bind(node=config.node_id, role="trainer", job=config.job)
        c = config
        self._model_topic = topics.model(c.job, c.parent)
        self._control_topic = topics.control(c.job, c.node_id)
        # asynchronous orders come to this trainer alone, never on the shared model topic
        self._work_topic = topics.work(c.job, c.node_id, c.parent)
        self._presence_topic = topics.presence(c.job, c.node_id)
        # The front door: orders and `done` only from the parent, grants addressed to us
        # from the parent, each no bigger than our own model; our own presence (watched).
        parent = frozenset({c.parent})
        self.door = Door(c.job, c.node_id)
        self.rejections = self.door.rejections
        self.door.expect(Entry(self._model_topic, frozenset({ROUND, DONE}), senders=parent,
                               limits=self._limits, dedupe=False))
        self.door.expect(Entry(self._work_topic, frozenset({ROUND}), senders=parent,
                               limits=self._limits, dedupe=False))
        self.door.expect(Entry(self._control_topic, frozenset({GRANT}), senders=parent,
                               topic_sender=False, dedupe=False))
        self._own_presence = self.door.expect(Entry(
            self._presence_topic, frozenset({PRESENCE}), senders=frozenset({c.node_id}),
            label="presence_", dedupe=False))

    @property
    def job_done(self) -> bool:
        """The parent said the job is over (on an anonymous broker the trainer keeps serving)."""
        return self._done

    async def run(self) -> int:
        """Returns the number of rounds this trainer took part in."""
        filters = (self._model_topic, self._control_topic, self._work_topic,
                   self._presence_topic)
        # A trainer expects a model, perhaps a re-broadcast, and small control messages: what
        # waits unread beyond that is a flood, dropped (and counted) instead of held.
        backlog = 4 * self._limits.max_frame_bytes + (1 << 20)
        async with self.bus.subscribe(*filters, admit=self._admit_chunks,
                                      max_queued_bytes=backlog, screen=self.door.screen) as sub:
            await self._publish_presence("online")
            try:
                async for msg in sub:
                    if await self._handle(msg):
                        break
                    if self._worker is not None and self._worker.done():
                        self._worker.result()  # surface a bug in the worker, not hide it
                        self._worker = None
            finally:
                for task in (self._worker, self._reannounce):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                # Best effort: if the connection is gone, the broker's last will says it.
                with contextlib.suppress(FedbusError):
                    await self._publish_presence("offline")
        return self.rounds_trained

    def _admit_chunks(self, topic: str, total: int) -> bool:
        # Only the parent's model arrives in chunks (broadcast, or in a work order for us), and
        # it is no bigger than our own model.
        return (topic in (self._model_topic, self._work_topic)
                and total <= self._limits.max_frame_bytes)

    async def _handle(self, msg: Message) -> bool:
        """One message; True when the job is over and this trainer should exit."""
        if msg.topic == self._presence_topic:
            await self._on_own_presence(msg)
            return False
        adm = await self.door.open(msg)
        if adm is None:
            return False
        env = adm.env
        epoch = env.meta.get("epoch", "")
        if not isinstance(epoch, str) or len(epoch) > 64:
            self.rejections.reject("bad_epoch", f"epoch {epoch!r}")
            return False
        if env.kind == DONE:
            return self._on_done(env, epoch)
        if env.kind == ROUND:
            await self._on_round(env, epoch)
        else:
            await self._on_grant(env, epoch)
        return False

    def _on_done(self, env: Envelope, epoch: str) -> bool:
        if epoch != self._epoch or env.round < max(self._delivered.get(epoch, []), default=0):
            # A done for another aggregator run than the one we follow, or from the past.
            self.rejections.reject("unexpected_done", f"done for round {env.round} of run "
                                                      f"{epoch!r}, following {self._epoch!r}")
            return False
        self._done = True
        if self.config.authenticated:
            self._log.info("job_done", rounds_trained=self.rounds_trained)
            return True
        self._log.info("job_done_untrusted", rounds_trained=self.rounds_trained,
                          detail="anonymous broker: anyone could send this done, so this "
                                 "trainer keeps serving; stop it with a signal")
        return False

    async def _on_own_presence(self, msg: Message) -> None:
        adm = self.door.open_now(msg)  # small: PRESENCE_LIMITS
        if adm is not None and adm.env.meta.get("status") == "online":
            return  # our own announcement coming back
        # Someone says we are gone (a forgery, garbage, or a will that crossed a reconnect):
        # we are not, so say so; counted, since on an authenticated broker nobody else can.
        self.rejections.reject("presence_contradicted", "our presence was overwritten")
        # At most one answer a REANNOUNCE_S: a flood of forged "offline"s must not turn this
        # trainer into an amplifier (it answered each of ~2,000 before). The answer owed
        # for the last of a burst is sent when the interval ends, so we end up "online".
        if self._reannounce is None or self._reannounce.done():
            self._reannounce = asyncio.create_task(self._reannounce_presence(),
                                                   name=f"presence-{self.config.node_id}")
        else:
            self._reannounce_owed = True

    async def _reannounce_presence(self) -> None:
        while True:
            self._reannounce_owed = False
            with contextlib.suppress(BusError):
                await self._publish_presence("online")
            await asyncio.sleep(REANNOUNCE_S)
            if not self._reannounce_owed:
                return

    def _plausible(self, env: Envelope, epoch: str) -> bool:
        """Is this order one we should act on? Logs and counts why not.

        Within the job's rounds; not a redelivery; not a round already delivered for this
        aggregator run. With an authenticated broker every order is the parent's, so rounds
        only move forward (an older one is a late re-broadcast); on an anonymous broker a
        forged far-ahead round must not make the real ones look old, so any round not yet
        delivered is served: a forgery can waste a training run, never freeze the trainer.
        """
        c = self.config
        asynchronous = env.meta.get("mode") == "async"
        low = 0 if asynchronous else 1
        if not low <= env.round <= c.rounds:
            self.rejections.reject("implausible_round",
                                   f"round {env.round}, the job has {c.rounds}")
            return False
        if not self._orders_seen.add(env.msg_id):
            # a QoS 1 redelivery or a replay: not acted on twice, and counted
            self.rejections.reject("duplicate", f"order {env.msg_id} seen before")
            return False
        delivered = self._delivered.pop(epoch, [])
        self._delivered[epoch] = delivered  # most recently used run last
        while len(self._delivered) > _EPOCHS:
            del self._delivered[next(iter(self._delivered))]
        if epoch != self._epoch:
            if self._epoch is not None:
                self._log.warning("aggregator_restarted", epoch=epoch, round=env.round)
            self._epoch = epoch
        if asynchronous:
            return True
        last = max(delivered, default=0)
        if env.round in delivered or (c.authenticated and env.round < last):
            # a re-broadcast (round extension) of a round we already delivered, or older
            self.rejections.reject("old_round", f"round {env.round}: delivered up to {last}")
            return False
        return True

    async def _on_round(self, env: Envelope, epoch: str) -> None:
        c = self.config
        selected = env.meta.get("selected", [])
        if not isinstance(selected, list) or c.node_id not in selected:
            return
        if self._current == (epoch, env.round) and env.meta.get("mode") != "async" and not (
                self.ring is not None and self.ring.reducing(epoch, env.round)):
            # (A ring member still summing with its ring when asked again was delivered:
            # its group's update was refused, so its own update is wanted, resent below.)
            self.rejections.reject("old_round", f"round {env.round} is being trained")
            return
        last = self._last_sent
        if last is not None and last[:2] == (epoch, env.round) \
                and self._orders_seen.add(env.msg_id):
            if self._resent >= _MAX_RESENDS:
                # a few resends repair a loss; more is someone replaying orders at us
                self.rejections.reject("resend_limit", f"round {env.round} asked again")
                return
            self._resent += 1
            # The parent asks again for a round we delivered (a re-broadcast names only those
            # it is missing): our update was lost on the way — a broker restart without
            # persistence, a dropped chunk. Send the same update again; it dedupes the rest.
            self._log.warning("update_resent", round=env.round, bytes=len(last[2]))
            await self._deliver(env.round, epoch, last[2],
                                upload_threshold(env.meta, c.node_id))
            return
        if not self._plausible(env, epoch):
            return
        config = env.meta.get("config", {})
        if not isinstance(config, dict):
            self.rejections.reject("bad_config", f"config is {type(config).__name__}")
            return
        try:
            # judged now (counted here if forged), made dense later in the worker thread:
            # dequantizing a model is not work for the event loop N trainers share
            weights, extra = split_tensors(env.tensors)
            check_model(weights, env.meta)
        except UpdateRejected as exc:
            self.rejections.reject(exc.reason, exc.detail)
            return
        order = Order(env, epoch, weights, extra, config)
        if self._worker is not None and not self._worker.done():
            # Training happens beside the message loop (which keeps rejecting garbage and
            # answering grants); an order that comes meanwhile waits, and a newer one
            # replaces it: a flood of orders costs at most one extra training run.
            if self._next is not None:
                self._log.info("order_superseded", round=self._next.env.round,
                               by=env.round)
            self._next = order
            return
        self._worker = asyncio.create_task(self._work(order), name=f"train-{c.node_id}")

    async def _work(self, order: Order | None) -> None:
        while order is not None:
            self._current = (order.epoch, order.env.round)
            try:
                await self._train_and_send(order)
            finally:
                self._current = None
            order, self._next = self._next, None
            if order is not None and order.env.meta.get("mode") != "async" \
                    and order.env.round in self._delivered.get(order.epoch, []):
                order = None  # delivered meanwhile (a re-broadcast queued behind itself)

    async def _train_and_send(self, order: Order) -> None:
        env, epoch = order.env, order.epoch
        while len(self._pending) >= _MAX_PENDING:
            old, _ = oldest = next(iter(self._pending))
            del self._pending[oldest]
            self._log.warning("upload_abandoned", round=old, new_round=env.round)
        if env.meta.get("mode") != "async":
            self._last_sent = None  # the parent has moved on: no need to hold the old update
        try:
            packed = await self.source.produce(order, functools.partial(self._pack, order))
        except FedbusError as exc:
            self._log.error("training_failed", round=env.round, error=str(exc))
            return
        except Exception as exc:  # the user's code: report, stay alive for the next round
            self._log.exception("task_raised", round=env.round, error=repr(exc))
            return
        del order  # the payload (and a ring's vector) is all that is needed
        payload, result, duration, vec = packed.payload, packed.result, packed.duration, packed.vec
        ring = self.ring if vec is not None else None
        if env.meta.get("mode") != "async":
            rounds = self._delivered.setdefault(epoch, [])
            rounds.append(env.round)
            del rounds[:-64]  # bounded: a re-broadcast comes within a round or two
        self.rounds_trained += 1
        if env.meta.get("mode") != "async":
            # kept until the next round: if the parent asks again, this update was lost
            self._last_sent = (epoch, env.round, payload)
            self._resent = 0
        if ring is not None and vec is not None:
            # summed with the ring group; if the ring fails, this payload is delivered alone
            self._log.info("update_to_ring", round=env.round, examples=result.num_examples,
                           seconds=round(duration, 3), bytes=len(payload))
            await ring.reduce(env, epoch, vec, result, payload)
            return
        gated = await self._deliver(env.round, epoch, payload,
                                    upload_threshold(env.meta, self.config.node_id))
        self._log.info("update_ready" if gated else "update_sent", round=env.round,
                       examples=result.num_examples, seconds=round(duration, 3),
                       bytes=len(payload))

    async def _deliver(self, number: int, epoch: str, payload: bytes, gate: Any) -> bool:
        """Send an update, or announce it (``ready``) when it must wait for an upload slot;
        True in that case."""
        c = self.config
        topic = topics.update(c.job, c.parent, c.node_id)
        if isinstance(gate, int) and not isinstance(gate, bool) and len(payload) > gate:
            # Large: announce it and upload when the aggregator grants a slot (UploadGate).
            self._pending[(number, epoch)] = payload
            ready = Envelope(kind=READY, job=c.job, sender=c.node_id, round=number,
                             meta={"bytes": len(payload)})
            await self.bus.publish(topic, encode(ready))
            return True
        await self.bus.publish(topic, payload)
        return False

    async def _on_grant(self, env: Envelope, epoch: str) -> None:
        payload = self._pending.pop((env.round, epoch), None)
        if payload is None:
            self.rejections.reject("unexpected_grant", f"grant for round {env.round}")
            return
        await self.bus.publish(topics.update(self.config.job, self.config.parent,
                                             self.config.node_id), payload)
        self._log.info("update_sent", round=env.round, bytes=len(payload), granted=True)

    def _pack(self, order: Order, delta: Mapping[str, np.ndarray], result: FitResult,
              duration: float) -> Packed:
        """In a worker thread: the client-side chain (DP, compression) and the encoding; for
        a ring member, the flat vector its ring sums."""
        c, env = self.config, order.env
        prepared = self._client.prepare(delta, result.metrics, order.config, c.node_id)
        result = FitResult(result.num_examples, prepared.metrics, result.aux)
        try:
            update = Envelope(
                kind=UPDATE,
                job=c.job,
                sender=c.node_id,
                round=env.round,
                meta={
                    "num_examples": int(result.num_examples),
                    "metrics": prepared.metrics,
                    "duration_s": round(duration, 4),
                    # the order this answers: an aggregator folds only work it issued
                    "work": env.msg_id,
                    **prepared.meta,
                },
                tensors=join_tensors(prepared.tensors, result.aux),
            )
            payload = encode(update, c.compression)
        except (ValueError, TypeError, CodecError) as exc:  # e.g. metrics that are not numbers
            raise FedbusError(f"could not encode the update: {exc}") from exc
        ring = self.ring if self.ring is not None and self.ring.joins(env, result) else None
        vec = None if ring is None else ring.flatten(prepared.delta, result)
        return Packed(payload, result, duration, vec)

    async def _publish_presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "trainer", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)
