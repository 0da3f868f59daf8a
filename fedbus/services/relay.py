"""Relays: an aggregator toward their children, a trainer toward their parent.

Synchronous (``Relay``), built from the two services rather than beside them. The parent side
is a ``Trainer`` whose task is "run one round of my group": when the parent's order names the
relay, the trainer calls the task's ``fit``, which runs a round of the inner ``Aggregator``
(the same intake, upload gate, liveness and deadlines as the root) with the group's own
strategy (manifest: the relay node's ``strategy``, FedAvg by default) on the event loop; the
trainer sends the group model's difference upward as one update carrying the group's example
count, so the level above weighs it as it would the group's trainers. With FedAvg at both
levels the hierarchy gives the flat star's model (to float rounding).

Asynchronous (``AsyncRelay``), under a FedBuff/FedAsync root: the relay holds the newest model
version its parent sent, keeps its children busy from it (a fast trainer is restarted as soon
as its update is in, whatever its slow siblings do), and forwards every child update upward on
its own, tagged with the version it was trained from and the child that made it, so the root
computes staleness exactly (as the flat star would) and its strategy's math is unchanged.

A relay's death is its will: the parent drops its whole subtree at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.codec import Envelope, decode, encode
from fedbus.compress import META_KEY
from fedbus.door import OFFLOAD_BYTES, SeenIds, model_limits
from fedbus.errors import CodecError, FedbusError, UpdateRejected
from fedbus.services.aggregator import Aggregator, RoundReport
from fedbus.services.async_aggregator import AsyncAggregator, AsyncAggregatorConfig
from fedbus.services.trainer import Order, Packed, Packer, Trainer, TrainerConfig
from fedbus.task import FitResult
from fedbus.wire import (
    DONE,
    GRANT,
    READY,
    ROUND,
    UPDATE,
    presence,
    split_model,
)
from strategies import AsyncStrategy, ClientUpdate, Selector, Weights

__all__ = ["AsyncRelay", "Relay"]

log = structlog.get_logger(__name__)


class _GroupRound:
    """The relay's update source: its "training" is one round of its group, run on the event
    loop like any other service (no worker thread is held while the children train)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.relay.group.weights.items()}

    async def produce(self, order: Order, pack: Packer) -> Packed:
        big = sum(int(v.nbytes) for v in order.weights.values()) >= OFFLOAD_BYTES
        start = await asyncio.to_thread(order.dense_weights) if big else order.dense_weights()
        number = order.env.round
        started = time.monotonic()
        report = await self.relay.group_round(start, number)
        if not report.aggregated or report.examples <= 0:
            raise FedbusError(f"group round {number}: {len(report.accepted)} of "
                              f"{len(report.selected)} children delivered, below quorum")
        metrics = {"participants": float(len(report.accepted))}
        if report.train_loss is not None:
            metrics["train_loss"] = float(report.train_loss)
        result = FitResult(num_examples=report.examples, metrics=metrics)
        model = self.relay.group.weights

        def delta_and_pack() -> Packed:
            delta = {k: (model[k] - start[k]).astype(start[k].dtype, copy=False)
                     for k in start}
            return pack(delta, result, time.monotonic() - started)

        return await asyncio.to_thread(delta_and_pack)


class Relay:
    def __init__(self, group: Aggregator, config: TrainerConfig, bus: Bus) -> None:
        self.group = group
        self.bus = bus
        self.upward = Trainer(config, bus, _GroupRound(self))
        self._sub: Subscription | None = None
        self._gather_until = 0.0
        self._log = log.bind(node=config.node_id, role="relay", job=config.job)

    @property
    def history(self) -> list[RoundReport]:
        return self.group.history

    async def run(self) -> int:
        """Serve the parent's rounds until it says the job is done; the rounds taken part in."""
        g = self.group.config
        # Listen to the parent at once (its first order must not pass unheard while the group
        # gathers); the first group round waits for the whole group, for a bounded time.
        self._gather_until = time.monotonic() + g.round.start_timeout_s
        async with self.group.subscribe() as sub:
            self._sub = sub
            return await self.upward.run()

    async def group_round(self, weights: Mapping[str, np.ndarray], number: int) -> RoundReport:
        sub = self._sub
        assert sub is not None
        while True:  # what came in between rounds (presence) first
            try:
                msg = await sub.get(timeout=0)
            except TimeoutError:
                break
            await self.group.dispatch(msg)
        await self._gather(sub)
        self.group.weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        report = await self.group.run_round(sub, number)
        self.group.history.append(report)
        self._log.info("group_round_finished", round=number, participants=len(report.accepted),
                       examples=report.examples)
        return report

    async def _gather(self, sub: Subscription) -> None:
        """Before the first round, wait for the whole group (a hierarchy's first round has
        every trainer a star's would), but only until ``start_timeout_s`` after the start:
        a trainer that is late (or never comes) joins a later round instead of stopping the
        group."""
        g = self.group.config
        left = self._gather_until - time.monotonic()
        if left <= 0 or len(self.group.online) >= g.round.min_clients:
            return
        try:
            await self.group.wait_for_clients(sub, g.round.min_clients, left)
        except FedbusError:
            self._log.warning("group_incomplete", online=sorted(self.group.online),
                              expected=sorted(g.trainers),
                              detail="going on with who is here; late trainers join later")
        finally:
            self._gather_until = 0.0


# --------------------------------------------------------------------------- asynchronous


@dataclass(frozen=True, slots=True)
class _Forwarded:
    """A checked child update waiting to go upward: its tensors as the child packed them (an
    fp16/int8/top-k update stays that small on the way up, and is not quantized twice)."""

    sender: str
    origin: str
    base: int
    num_examples: int
    metrics: dict[str, float]
    tensors: dict[str, np.ndarray]
    codec: Any


class _Forward(AsyncStrategy):
    """The asynchronous relay's "strategy": it holds the parent's newest model and version
    (set by the relay when an order comes) and queues every update for forwarding; it never
    moves the model itself."""

    name: ClassVar[str] = "forward"

    def __init__(self) -> None:
        self._weights: Weights = {}
        self._version = 0
        #: The parent's order config, passed on to the children (strategy knobs).
        self.config: dict[str, Any] = {}
        #: Child updates waiting to go upward, oldest first.
        self.queue: deque[_Forwarded] = deque()
        #: Set by the relay for the update being submitted: who made it, as it came.
        self.origin = ""
        self.packed: tuple[dict[str, np.ndarray], Any] = ({}, None)

    def init(self, weights: Weights, version: int = 0) -> None:
        self._weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        self._version = int(version)

    @property
    def version(self) -> int:
        return self._version

    @property
    def weights(self) -> Weights:
        return self._weights

    def client_config(self, version: int) -> dict[str, Any]:
        return dict(self.config)

    def submit(self, update: ClientUpdate) -> Weights | None:
        tensors, codec = self.packed
        self.queue.append(_Forwarded(update.sender, self.origin or update.sender,
                                     update.base_round, update.num_examples,
                                     dict(update.metrics), tensors, codec))
        return None


class AsyncRelay(AsyncAggregator):
    """An asynchronous aggregator toward its children whose model comes from its parent.

    ``config.trainers`` are its children, ``config.rounds`` the job's model versions (an
    order beyond them is implausible), ``config.max_staleness`` the root's bound (an update
    already too stale here is too stale there). ``run()`` returns the updates forwarded.
    """

    def __init__(self, config: AsyncAggregatorConfig, bus: Bus, parent: str,
                 selector: Selector, weights: Weights) -> None:
        self.forward = _Forward()
        super().__init__(config, bus, self.forward, selector, weights)
        c = config
        self.parent = parent
        self.forwarded = 0
        self.done = False
        self._held = False  # a model from the parent is here: children can be started
        self._parent_epoch: str | None = None
        self._orders_seen = SeenIds(capacity=4096)
        #: A large forwarded update waiting for the parent's grant: (base version, payload).
        self._upload: tuple[int, bytes] | None = None
        self._upload_since = 0.0
        self._queued: set[str] = set()
        self._order_limits = model_limits(self.weights, 1, c.limits)
        self._up = {
            topics.work(c.job, c.node_id, parent): (ROUND,),
            topics.model(c.job, parent): (DONE,),
            topics.control(c.job, c.node_id): (GRANT,),
        }
        self._log = self._log.bind(role="relay", parent=parent)

    async def run(self) -> int:  # type: ignore[override]
        c = self.config
        async with self.subscribe() as sub:
            await self._publish_presence("online")
            while not self.done:
                await self._relay_step(sub)
            # the parent's job is over: so is the group's
            await self._publish(topics.model(c.job, c.node_id), DONE, self.version,
                                {"rounds": c.rounds, "mode": "async"})
        self._log.info("relay_finished", forwarded=self.forwarded,
                       contributions=dict(sorted(self.contributions.items())))
        return self.forwarded

    async def _relay_step(self, sub: Subscription) -> None:
        c = self.config
        wait = 1.0
        if self._assigned:
            first = min(a.sent_at for a in self._assigned.values())
            wait = max(0.0, min(wait, first + c.round.deadline_s - time.monotonic()))
        try:
            msg: Message | None = await sub.get(timeout=wait)
        except TimeoutError:
            msg = None
        if msg is not None:
            await self.dispatch(msg)
        self._expire()
        if self._upload is not None and time.monotonic() - self._upload_since > c.round.deadline_s:
            # no grant came (the parent refused the ready, or restarted): the rest must not
            # wait behind it for ever
            self._log.warning("upload_abandoned", base_version=self._upload[0],
                              waited_s=c.round.deadline_s)
            self._upload = None
        # forward first: a child is restarted once its update has left (bounded memory), and
        # in the same step, so a fast child never waits for the next message to come
        await self._pump()
        if self._held and not self.done:
            await self._refill()

    # --- the parent side ---------------------------------------------------------------
    def subscribe(self) -> Subscription:
        c = self.config
        update = self.intake.settings.limits.max_frame_bytes
        small = min(update, c.gate_bytes)
        # children's small updates and granted uploads, plus two orders from the parent
        backlog = len(c.trainers) * (small + 4096) + (c.round.max_uploads + 2) * update + (1 << 20)
        return self.bus.subscribe(
            topics.updates_for(c.job, c.node_id), topics.presence_all(c.job), *self._up,
            topics.presence(c.job, c.node_id), admit=self._admit_chunks,
            max_queued_bytes=backlog)

    def _admit_chunks(self, topic: str, total: int) -> bool:
        if topic in self._up:
            return total <= self._order_limits.max_frame_bytes
        return super()._admit_chunks(topic, total)

    async def dispatch(self, msg: Message) -> None:
        if msg.topic in self._up:
            await self._on_parent(msg)
        else:
            await super().dispatch(msg)

    async def _on_parent(self, msg: Message) -> None:
        c = self.config
        try:
            env = await asyncio.to_thread(decode, msg.payload, self._order_limits)
        except CodecError as exc:
            self.rejections.reject(exc.reason, exc.detail, topic=msg.topic)
            return
        epoch = env.meta.get("epoch", "")
        if env.sender != self.parent or env.job != c.job or not isinstance(epoch, str) \
                or env.kind not in self._up[msg.topic]:
            self.rejections.reject("wrong_sender", f"{env.kind} from {env.sender}/{env.job} "
                                                   f"on {msg.topic}")
            return
        if env.kind == DONE:
            if epoch == self._parent_epoch:
                self.done = True
            else:
                self.rejections.reject("unexpected_done", f"done of run {epoch!r}")
        elif env.kind == GRANT:
            await self._on_grant(env, epoch)
        else:
            self._on_order(env, epoch)

    def _on_order(self, env: Envelope, epoch: str) -> None:
        if env.meta.get("mode") != "async" or not 0 <= env.round <= self.config.rounds:
            self.rejections.reject("implausible_round", f"order for version {env.round}")
            return
        if not self._orders_seen.add(env.msg_id):
            self.rejections.reject("duplicate", f"order {env.msg_id} seen before")
            return
        if epoch != self._parent_epoch:
            if self._parent_epoch is not None:
                # The parent restarted: its versions start over, so what waits here, tagged
                # with the old run's versions, would be misread there.
                self._log.warning("parent_restarted", epoch=epoch, dropped=len(self.forward.queue),
                                  restarted=sorted(self._assigned))
                self.forward.queue.clear()
                self._queued.clear()
                self._upload = None
                # work in flight was given from the old run's versions: start it over
                for node, work in sorted(self._assigned.items()):
                    self.selector.report(node, work.version, completed=False)
                self._assigned.clear()
                self._given_up.clear()
            self._parent_epoch = epoch
        elif self._held and env.round < self.version:
            self.rejections.reject("old_round", f"version {env.round}, holding {self.version}")
            return
        try:
            weights, _ = split_model(env)
        except UpdateRejected as exc:
            self.rejections.reject(exc.reason, exc.detail)
            return
        if weights.keys() != self.weights.keys():
            self.rejections.reject("wrong_tensors", f"order for version {env.round}")
            return
        config = env.meta.get("config", {})
        self.forward.config = {k: v for k, v in config.items()
                               if k not in ("round", "version", "seed")} \
            if isinstance(config, dict) else {}
        self.forward.init(weights, env.round)
        self.weights = self.forward.weights
        self._held = True
        self._period = self._new_period()  # bounded: what the relay keeps is per version
        self._log.debug("model_received", version=env.round)

    async def _on_grant(self, env: Envelope, epoch: str) -> None:
        if self._upload is None or self._upload[0] != env.round or epoch != self._parent_epoch:
            self.rejections.reject("unexpected_grant", f"grant for version {env.round}")
            return
        payload = self._upload[1]
        self._upload = None
        await self.bus.publish(topics.update(self.config.job, self.parent, self.config.node_id),
                               payload)
        self.forwarded += 1

    # --- forwarding --------------------------------------------------------------------
    def fold(self, update: ClientUpdate, env: Envelope) -> None:
        origin = env.meta.get("origin") if update.sender in self.config.relays else None
        self.forward.origin = origin if isinstance(origin, str) and len(origin) <= 64 else ""
        # the intake has decoded and checked it; what goes up is what came in
        self.forward.packed = (dict(env.tensors), env.meta.get(META_KEY))
        super().fold(update, env)
        self._queued.add(update.sender)

    def _held_back(self) -> set[str]:
        return set(self._queued)

    async def _pump(self) -> None:
        """Send queued updates upward in arrival order; a large one waits for its grant
        (the parent's upload gate), and the rest wait behind it."""
        c = self.config
        topic = topics.update(c.job, self.parent, c.node_id)
        while self._upload is None and self.forward.queue:
            item = self.forward.queue.popleft()
            self._queued.discard(item.sender)
            meta: dict[str, Any] = {"num_examples": item.num_examples, "metrics": item.metrics,
                                    "origin": item.origin, "via": c.node_id}
            if item.codec is not None:
                meta[META_KEY] = item.codec
            env = Envelope(kind=UPDATE, job=c.job, sender=c.node_id, round=item.base,
                           meta=meta, tensors=item.tensors)
            payload = await self._offload(functools.partial(encode, env, c.compression))
            if len(payload) > c.gate_bytes:
                self._upload = (item.base, payload)
                self._upload_since = time.monotonic()
                ready = Envelope(kind=READY, job=c.job, sender=c.node_id,
                                 round=item.base, meta={"bytes": len(payload)})
                await self.bus.publish(topic, encode(ready))
                return
            await self.bus.publish(topic, payload)
            self.forwarded += 1

    async def _publish_presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "relay", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)

