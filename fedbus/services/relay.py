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
With ``pre_aggregate: N`` it forwards one update per N instead (fedbus.services.preaggregate
says what goes up and how exact it is): the root's update traffic drops ~N times.

A relay's death is its will: the parent drops its whole subtree at once.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
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
from fedbus.services.async_aggregator import (
    AsyncAggregator,
    AsyncAggregatorConfig,
    forwarded_counts,
)
from fedbus.services.preaggregate import Combined, Window
from fedbus.services.trainer import Order, Packed, Packer, Trainer, TrainerConfig
from fedbus.task import FitResult
from fedbus.wire import (
    DONE,
    GRANT,
    READY,
    ROUND,
    UPDATE,
    join_tensors,
    presence,
    split_model,
)
from strategies import AsyncStrategy, ClientUpdate, Selector, Weights

__all__ = ["AsyncRelay", "Relay"]

log = structlog.get_logger(__name__)

#: Times a large forwarded update is announced (``ready``) before, no grant having come
#: within a deadline each time, it is given up on (counted and logged as lost).
ANNOUNCE_TRIES = 3


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
    """A checked child update (or a pre-aggregate of several) waiting to go upward: a child's
    tensors as the child packed them (an fp16/int8/top-k update stays that small on the way
    up, and is not quantized twice); a pre-aggregate's dense."""

    senders: tuple[str, ...]
    origin: str
    base: int
    num_examples: int
    metrics: dict[str, float]
    tensors: dict[str, np.ndarray]
    codec: Any
    #: Updates it stands for, who made them and from which versions (count 1: one update).
    count: int = 1
    origins: Mapping[str, int] | None = None
    bases: Mapping[int, int] | None = None

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"num_examples": self.num_examples, "metrics": self.metrics}
        if self.origin:
            meta["origin"] = self.origin
        if self.count > 1:
            meta["count"] = self.count
            if self.origins:
                meta["origins"] = dict(self.origins)
            if self.bases:
                meta["bases"] = [[b, n] for b, n in sorted(self.bases.items())]
        if self.codec is not None:
            meta[META_KEY] = self.codec
        return meta


class _Forward(AsyncStrategy):
    """The asynchronous relay's "strategy": it holds the parent's newest model and version
    (set by the relay when an order comes) and queues every update for forwarding, or, with
    ``pre_aggregate`` > 1, folds it into the window; it never moves the model itself."""

    name: ClassVar[str] = "forward"
    takes_counts: ClassVar[bool] = True  # a child relay's pre-aggregate goes on as one

    def __init__(self, pre_aggregate: int = 1,
                 scale: Callable[[int], float] | None = None) -> None:
        self._weights: Weights = {}
        self._version = 0
        #: The parent's order config, passed on to the children (strategy knobs).
        self.config: dict[str, Any] = {}
        #: Child updates waiting to go upward, oldest first, and the children they came from
        #: (held back until theirs has left: bounded memory).
        self.queue: deque[_Forwarded] = deque()
        self.waiting: Counter[str] = Counter()
        #: Set by the relay for the update being submitted: who made it, as it came.
        self.origin = ""
        self.packed: tuple[dict[str, np.ndarray], Any] = ({}, None)
        self.members: tuple[dict[str, int], dict[int, int]] = ({}, {})
        #: Updates per forwarded one (1: each on its own), the root's staleness weighting.
        self.pre_aggregate = pre_aggregate
        self.scale = scale or (lambda s: 1.0)
        self.window: Window | None = None

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
        origins, bases = self.members
        if self.pre_aggregate <= 1:
            tensors, codec = self.packed
            self._queue(_Forwarded((update.sender,), self.origin or update.sender,
                                   update.base_round, update.num_examples,
                                   dict(update.metrics), tensors, codec,
                                   update.count, origins, bases))
            return None
        if self.window is not None and not self.window.fits(update.base_round):
            self.flush()
        if self.window is None:
            self.window = Window()
        self.window.add(update.sender, update.base_round, update.delta, count=update.count,
                        num_examples=update.num_examples, metrics=update.metrics,
                        origins=origins or {self.origin or update.sender: update.count},
                        bases=bases)
        if self.window.count >= self.pre_aggregate:
            self.flush()
        return None

    def flush(self) -> Combined | None:
        """The window, combined, to the queue."""
        window, self.window = self.window, None
        if window is None:
            return None
        c = window.combine(self._version, self.scale,
                           {k: v.dtype for k, v in self._weights.items()})
        origin = next(iter(c.origins)) if len(c.origins) == 1 else ""
        self._queue(_Forwarded(c.senders, origin, c.base, c.num_examples, c.metrics,
                               join_tensors(c.delta), None, c.count, c.origins, c.bases))
        return c

    def _queue(self, item: _Forwarded) -> None:
        self.queue.append(item)
        self.waiting.update(item.senders)

    def pop(self) -> _Forwarded:
        item = self.queue.popleft()
        self.waiting.subtract(item.senders)
        return item

    def clear(self) -> int:
        """Forget what waits here; the child updates it held."""
        n = (self.window.count if self.window is not None else 0) \
            + sum(item.count for item in self.queue)
        self.window = None
        self.queue.clear()
        self.waiting.clear()
        return n


class AsyncRelay(AsyncAggregator):
    """An asynchronous aggregator toward its children whose model comes from its parent.

    ``config.trainers`` are its children, ``config.rounds`` the job's model versions (an
    order beyond them is implausible), ``config.max_staleness`` the root's bound (an update
    already too stale here is too stale there). ``pre_aggregate`` > 1: forward one update
    per that many (fedbus.services.preaggregate), re-based with ``scale``, the root
    strategy's ``staleness_scale``. ``run()`` returns the updates forwarded (messages).
    """

    def __init__(self, config: AsyncAggregatorConfig, bus: Bus, parent: str,
                 selector: Selector, weights: Weights, *, pre_aggregate: int = 1,
                 scale: Callable[[int], float] | None = None) -> None:
        self.forward = _Forward(pre_aggregate, scale)
        super().__init__(config, bus, self.forward, selector, weights)
        c = config
        self.parent = parent
        #: Updates sent upward (messages), and the child updates they stood for.
        self.forwarded = 0
        self.forwarded_updates = 0
        #: Child updates that will never reach the parent, by why (each one logged too).
        self.lost: Counter[str] = Counter()
        self.done = False
        self._held = False  # a model from the parent is here: children can be started
        self._parent_epoch: str | None = None
        self._orders_seen = SeenIds(capacity=4096)
        #: A large forwarded update waiting for the parent's grant: (base version, payload,
        #: updates it stands for), when it was last announced, and how many times.
        self._upload: tuple[int, bytes, int] | None = None
        self._upload_since = 0.0
        self._announced = 0
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
        self._drop("job_done")
        self._log.info("relay_finished", forwarded=self.forwarded,
                       forwarded_updates=self.forwarded_updates, lost=dict(self.lost),
                       contributions=dict(sorted(self.contributions.items())))
        return self.forwarded

    def _drop(self, why: str) -> None:
        """Count (and log) what waits here and will never go up: the window, the queue and
        an upload waiting for its grant."""
        n = self.forward.clear() + (self._upload[2] if self._upload else 0)
        self._upload = None
        if n:
            self.lost[why] += n
            self._log.warning("updates_not_forwarded", reason=why, updates=n)

    async def _relay_step(self, sub: Subscription) -> None:
        c = self.config
        wait = 1.0
        if self._assigned:
            first = min(a.sent_at for a in self._assigned.values())
            wait = max(0.0, min(wait, first + c.round.deadline_s - time.monotonic()))
        if self.forward.window is not None:
            wait = max(0.0, min(wait, self.forward.window.opened + c.round.deadline_s
                                - time.monotonic()))
        try:
            msg: Message | None = await sub.get(timeout=wait)
        except TimeoutError:
            msg = None
        if msg is not None:
            await self.dispatch(msg)
        self._expire()
        if self._upload is not None and time.monotonic() - self._upload_since > c.round.deadline_s:
            await self._reannounce()
        # forward first: a child is restarted once its update has left (bounded memory), and
        # in the same step, so a fast child never waits for the next message to come
        await self._pump()
        if self._held and not self.done:
            await self._refill()
        why = self._window_due()
        if why:
            flushed = self.forward.flush()
            assert flushed is not None
            self._log.info("window_flushed", reason=why, updates=flushed.count,
                           base_version=flushed.base, version=self.version)
            await self._pump()

    def _window_due(self) -> str:
        """Why the window must go now: its first member waited a deadline (nothing waits
        here for ever), or its oldest is as stale as the bound allows (any later and the
        root would refuse it); "" when it may wait for more."""
        window = self.forward.window
        if window is None:
            return ""
        if time.monotonic() - window.opened >= self.config.round.deadline_s:
            return "deadline"
        bound = self.max_staleness
        return "staleness" if bound is not None and self.version - window.oldest() >= bound \
            else ""

    async def _reannounce(self) -> None:
        """No grant came for a deadline (the ready or the grant was lost, or the parent's
        gate forgot it): announce the upload again; after ``ANNOUNCE_TRIES`` give up on it,
        counted and logged, so the rest does not wait behind it for ever."""
        assert self._upload is not None
        base, payload, count = self._upload
        c = self.config
        if self._announced >= ANNOUNCE_TRIES:
            self._upload = None
            self.lost["no_grant"] += count
            self._log.error("upload_abandoned", base_version=base, updates=count,
                            announced=self._announced, waited_s=c.round.deadline_s)
            return
        self._announced += 1
        self._upload_since = time.monotonic()
        self._log.warning("upload_reannounced", base_version=base, updates=count,
                          announced=self._announced)
        ready = Envelope(kind=READY, job=c.job, sender=c.node_id, round=base,
                         meta={"bytes": len(payload)})
        await self.bus.publish(topics.update(c.job, self.parent, c.node_id), encode(ready))

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
            max_queued_bytes=backlog, screen=self.intake.door.screen)

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
                self._drop("parent_restarted")
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
        payload, count = self._upload[1], self._upload[2]
        self._upload = None
        await self.bus.publish(topics.update(self.config.job, self.parent, self.config.node_id),
                               payload)
        self.forwarded += 1
        self.forwarded_updates += count

    # --- forwarding --------------------------------------------------------------------
    def fold(self, update: ClientUpdate, env: Envelope) -> None:
        relay = update.sender in self.config.relays
        origin = env.meta.get("origin") if relay else None
        self.forward.origin = origin if isinstance(origin, str) and len(origin) <= 64 else ""
        # a child relay's pre-aggregate: who made its members, from which versions
        self.forward.members = forwarded_counts(env)[1:] if relay else ({}, {})
        # the intake has decoded and checked it; what goes up is what came in
        self.forward.packed = (dict(env.tensors), env.meta.get(META_KEY))
        super().fold(update, env)

    def _held_back(self) -> set[str]:
        return set(+self.forward.waiting)

    async def _pump(self) -> None:
        """Send queued updates upward in arrival order; a large one waits for its grant
        (the parent's upload gate), and the rest wait behind it."""
        c = self.config
        topic = topics.update(c.job, self.parent, c.node_id)
        while self._upload is None and self.forward.queue:
            item = self.forward.pop()
            env = Envelope(kind=UPDATE, job=c.job, sender=c.node_id, round=item.base,
                           meta={**item.meta(), "via": c.node_id}, tensors=item.tensors)
            payload = await self._offload(functools.partial(encode, env, c.compression))
            if len(payload) > c.gate_bytes:
                self._upload = (item.base, payload, item.count)
                self._upload_since = time.monotonic()
                self._announced = 1
                ready = Envelope(kind=READY, job=c.job, sender=c.node_id,
                                 round=item.base, meta={"bytes": len(payload)})
                await self.bus.publish(topic, encode(ready))
                return
            await self.bus.publish(topic, payload)
            self.forwarded += 1
            self.forwarded_updates += item.count

    async def _publish_presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "relay", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)

