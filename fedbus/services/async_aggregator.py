"""The asynchronous aggregator: keep trainers busy, fold each update into the model as it lands.

There are no rounds. Work goes out as a ``round`` envelope (``meta.mode == "async"``) on each
started trainer's own topic (``work/<trainer>/<me>``), so a trainer receives only its own
orders and the model bytes it is sent grow with its own work, not everyone's. Each update is
submitted to an ``AsyncStrategy`` (FedAsync, FedBuff) with its staleness, and idle trainers are
refilled from the newest model. The job ends after ``rounds`` model versions. Lost trainers
(last will) and trainers silent past the deadline free their slot, so the job never waits on a
dead node; the work they were given is remembered, so one that comes back with its update
within the staleness bound is still counted.

Relays among the children (``config.relays``) stand for whole groups: they are never idle, get
every new model version, and forward their trainers' updates one by one, each tagged with the
version it was trained from, so the staleness computed here is exact at any depth. A relay that
pre-aggregates (``pre_aggregate`` on the relay node) forwards one update standing for several
(``meta.count``, who made them in ``meta.origins``, their versions in ``meta.bases``): the
strategy counts it as that many updates arriving back to back (``ClientUpdate.count``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.checkpoint import AggregatorState
from fedbus.codec import Envelope, encode
from fedbus.compress import encode_model
from fedbus.errors import FedbusError, UpdateRejected
from fedbus.services._base import AggregatorBase, AggregatorSettings
from fedbus.services.aggregator import RoundReport, _plain
from fedbus.task import EvalResult
from fedbus.wire import DONE, METRICS, ROUND, join_tensors
from strategies import AsyncStrategy, ClientUpdate, Selector, Weights

__all__ = ["MAX_COUNT", "AsyncAggregator", "AsyncAggregatorConfig", "AsyncReport",
           "forwarded_counts"]

log = structlog.get_logger(__name__)

_NOT_ASKED: Final = object()
#: Model versions remembered per relay: a forwarded update must name one of them.
_RELAY_VERSIONS: Final = 256
#: Pieces of work given up on remembered per trainer (a slow one may be given up on again
#: before its first late update lands).
_GIVEN_UP: Final = 4
#: The most updates one forwarded update may stand for (a relay's pre-aggregate).
MAX_COUNT: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class AsyncAggregatorConfig(AggregatorSettings):
    #: Reject (and count) updates trained from a model more than this many versions old.
    max_staleness: int | None = None
    #: Children that are relays (``fedbus.services.relay.AsyncRelay``): sent every new model
    #: version, they forward many updates, each tagged with its base version.
    relays: frozenset[str] = frozenset()


@dataclass(slots=True)
class AsyncReport(RoundReport):
    """One model version: ``round`` is the version, ``accepted`` the updates folded into it
    (a fast trainer may appear twice), ``selected`` who was started since the last version."""

    staleness: list[int] = field(default_factory=list)
    given_up: list[str] = field(default_factory=list)
    in_flight: int = 0
    #: Updates accepted since the job started, this version's included.
    updates: int = 0

    def as_meta(self) -> dict[str, Any]:
        meta = RoundReport.as_meta(self)  # zero-argument super() fails on slotted dataclasses
        meta.update(mode="async", version=self.round, in_flight=self.in_flight,
                    updates=self.updates, given_up=self.given_up)
        if self.staleness:
            meta["staleness_mean"] = round(sum(self.staleness) / len(self.staleness), 4)
            meta["staleness_max"] = max(self.staleness)
        return meta


#: Orders remembered per trainer (its current work and a few given up on, still welcome).
_WORK_IDS = 8


@dataclass(frozen=True, slots=True)
class _Assignment:
    version: int
    sent_at: float


@dataclass(slots=True)
class _Period:
    """What happened between two model versions."""

    started: float
    selected: set[str] = field(default_factory=set)
    accepted: list[str] = field(default_factory=list)
    lost: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)
    staleness: list[int] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_weight: float = 0.0


class AsyncAggregator(AggregatorBase[AsyncAggregatorConfig]):
    """Runs an ``AsyncStrategy`` over ``bus`` until ``config.rounds`` model versions exist.

    ``selector`` decides who starts when a slot frees (``InFlightSelector`` keeps C busy); the
    aggregator never gives a trainer a second piece of work while one is outstanding.
    ``initialized=True`` means the strategy already holds its model (restored from a
    checkpoint) and ``weights`` is ignored.
    """

    def __init__(
        self,
        config: AsyncAggregatorConfig,
        bus: Bus,
        strategy: AsyncStrategy,
        selector: Selector,
        weights: Weights,
        *,
        evaluate: Callable[[Weights], EvalResult] | None = None,
        initialized: bool = False,
    ) -> None:
        self.config = config
        self.bus = bus
        self.strategy = strategy
        self.selector = selector
        if not initialized:
            strategy.init({k: np.ascontiguousarray(v) for k, v in weights.items()})
        self.weights: Weights = {k: np.array(v) for k, v in strategy.weights.items()}
        self.evaluate = evaluate
        self.max_staleness = (config.max_staleness if config.max_staleness is not None
                              else strategy.max_staleness)
        self.history: list[RoundReport] = []
        #: Every model version's report, for displays; one small item a version.
        self.reports: asyncio.Queue[RoundReport] = asyncio.Queue()
        #: Accepted updates per trainer over the whole job.
        self.contributions: Counter[str] = Counter()
        self._assigned: dict[str, _Assignment] = {}
        #: The message ids of the last orders sent to each trainer: an update must echo one
        #: (``meta.work``), so an order this aggregator never issued (a forgery on an open
        #: broker) cannot have its update folded.
        self._work_ids: dict[str, deque[str]] = {}
        #: The last pieces of work each trainer was given up on (deadline or lost), by model
        #: version: its update is still accepted if it comes within the staleness bound.
        self._given_up: dict[str, OrderedDict[int, None]] = {}
        #: The version a trainer's pending ``ready`` is for (its grant names it).
        self._ready_round: dict[str, int] = {}
        #: Per relay, the versions sent to it (bounded) and the newest one (None: to send).
        self._relay_sent: dict[str, OrderedDict[int, None]] = {}
        self._relay_version: dict[str, int] = {}
        #: When each relay was last sent a model or last forwarded an update: silent for a
        #: deadline, it is sent the newest model again (the last one may have been lost).
        self._relay_active: dict[str, float] = {}
        self._dispatches = 0
        self._idle_since: float | None = None
        self._period = _Period(started=time.monotonic())
        self._log = log.bind(node=config.node_id, role="aggregator", job=config.job,
                             mode="async")
        self._init_intake(0)
        #: latency of the last checkpoint's acknowledgement (None: unacknowledged)
        self._durable: float | object | None = _NOT_ASKED

    @property
    def version(self) -> int:
        return self.strategy.version

    @property
    def in_flight(self) -> list[str]:
        return sorted(self._assigned)

    # --- main loop -------------------------------------------------------------------------
    async def run(self) -> Weights:
        c = self.config
        async with self.subscribe() as sub:
            await self._publish_presence("online")
            try:
                restored = await self._restore(sub)
                if restored is not None:
                    self._apply(restored)
                await self.wait_for_clients(sub, c.round.min_clients, c.round.start_timeout_s)
                self._period = self._new_period()
                await self._refill()
                while self.version < c.rounds:
                    await self._step(sub)
                await self._publish(topics.model(c.job, c.node_id), DONE, self.version,
                                    {"rounds": c.rounds, "mode": "async"})
            finally:
                # A stop (SIGTERM: compose down, systemctl stop) disconnects cleanly, so no will
                # fires: say goodbye, or the retained `online` keeps the next instance waiting
                # as a standby for good (fedbus.failover). Best effort, as the trainer's.
                with contextlib.suppress(FedbusError):
                    await self._publish_presence("offline")
        self._log.info("job_finished", version=self.version,
                       updates=sum(self.contributions.values()),
                       contributions=dict(sorted(self.contributions.items())))
        return self.weights

    @property
    def _relays_busy(self) -> bool:
        """Online relays always hold work (their groups train from the newest model)."""
        return bool(self.online & self.config.relays)

    async def _step(self, sub: Subscription) -> None:
        c = self.config
        if self._assigned or self._relays_busy:
            wait = min([a.sent_at + c.round.deadline_s for a in self._assigned.values()]
                       + [t + c.round.deadline_s for r, t in self._relay_active.items()
                          if r in self.online])
        else:
            wait = (self._idle_since or time.monotonic()) + c.round.start_timeout_s
        timeout = max(0.0, wait - time.monotonic())
        msg: Message | None
        try:
            msg = await sub.get(timeout=timeout)
        except TimeoutError:
            msg = None
        before = self.version
        if msg is not None:
            await self.dispatch(msg)
        self._expire()
        if self.version != before and self.durability is not None and _crossed(
                before, self.version, self.durability.settings.checkpoint.every, c.rounds):
            # Before new work goes out: the checkpoint holds the dispatch counter that seeds
            # the next orders, so a restored aggregator sends exactly the orders this one would.
            self._durable = await self._checkpoint(sub, self._state_now())
        if self.version < c.rounds:
            await self._refill()
        if self.version != before:
            await self._close_period(before)
        if self._assigned or self._relays_busy or self.version >= c.rounds:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = time.monotonic()
        elif time.monotonic() - self._idle_since >= c.round.start_timeout_s:
            # Nobody to give work to (all lost, or the selector picks none): fail loudly
            # rather than wait forever, as the synchronous aggregator does at its start.
            available = sorted(self.online & c.trainers)
            raise FedbusError(f"no trainer took work for {c.round.start_timeout_s}s "
                              f"(round.start_timeout_s) at model version {self.version}; "
                              f"online: {available}")

    def _state_now(self) -> AggregatorState:
        return AggregatorState(
            job=self.config.job, node=self.config.node_id, round=self.version,
            weights=self.weights, strategy=self.strategy.state_dict(),
            selector=self.selector.state_dict(),
            info={"mode": "async", "dispatches": self._dispatches,
                  "strategy": type(self.strategy).__name__},
        )

    def _apply(self, state: AggregatorState) -> None:
        """Continue from a checkpoint: the strategy (model, version, buffer), the selector,
        and the dispatch counter. Work that was in flight is gone: it is sent out again."""
        self.strategy.load_state_dict(state.strategy)
        self.selector.load_state_dict(state.selector)
        dispatches = state.info.get("dispatches", 0)
        self._dispatches = dispatches if isinstance(dispatches, int) else 0
        self.weights = {k: np.array(v) for k, v in self.strategy.weights.items()}
        self._log.warning("restored", round=self.version, version=self.version,
                          epoch=self.epoch)

    def _expire(self) -> None:
        now = time.monotonic()
        for node, a in sorted(self._assigned.items()):
            if now - a.sent_at >= self.config.round.deadline_s:
                del self._assigned[node]
                self._give_up(node, a)
                self._gate.release(node)
                self._period.given_up.add(node)
                self.selector.report(node, a.version, completed=False, duration_s=now - a.sent_at)
                self._log.warning("update_missing", node=node, base_version=a.version,
                                  version=self.version, deadline_s=self.config.round.deadline_s)

    async def _refill(self) -> None:
        """Start work on idle trainers, as many as the selector wants, from the newest model."""
        c = self.config
        now = time.monotonic()
        relays = [r for r in sorted(self.online & c.relays)
                  if self._relay_version.get(r) != self.version
                  or now - self._relay_active.get(r, now) >= c.round.deadline_s]
        live = sorted((self.online & c.trainers) - c.relays - self._held_back())
        picked = self.selector.select(live, self.version) if live else []
        new = sorted(set(picked) & set(live) - set(self._assigned))
        if not new and not relays:
            return
        for node in new:
            self._assigned[node] = _Assignment(self.version, now)
        for relay in relays:
            sent = self._relay_sent.setdefault(relay, OrderedDict())
            sent[self.version] = None
            while len(sent) > _RELAY_VERSIONS:
                sent.popitem(last=False)
            self._relay_version[relay] = self.version
            self._relay_active[relay] = now
        self._period.selected.update(new, relays)
        await self._send_work(sorted([*new, *relays]))
        self._log.debug("work_dispatched", version=self.version, nodes=new, relays=relays,
                        in_flight=len(self._assigned))

    def _held_back(self) -> set[str]:
        """Idle trainers not to start yet (a relay holds back those whose last update it has
        not forwarded: at most one update per trainer waits in its memory)."""
        return set()

    async def _close_period(self, before: int) -> None:
        c = self.config
        p = self._period
        self._period = self._new_period()
        number = self.version
        report = AsyncReport(
            round=number,
            selected=sorted(p.selected),
            accepted=list(p.accepted),
            lost=sorted(p.lost),
            seconds=time.monotonic() - p.started,
            aggregated=True,
            train_loss=p.loss_sum / p.loss_weight if p.loss_weight else None,
            rejected=self.rejections.since_report(),
            bus_loss=self._bus_losses(),
            strategy=_plain(self.strategy.report()),
            staleness=list(p.staleness),
            given_up=sorted(p.given_up),
            in_flight=len(self._assigned),
            updates=sum(self.contributions.values()),
        )
        if self._durable is not _NOT_ASKED:
            report.checkpoint_s = self._durable if isinstance(self._durable, float) else None
            report.durable = isinstance(self._durable, float)
            self._durable = _NOT_ASKED
        if self.evaluate is not None and _crossed(before, number, c.evaluate.every, c.rounds):
            report.eval = await asyncio.to_thread(self.evaluate, self.weights)
        self.history.append(report)
        self.reports.put_nowait(report)
        await self._publish(topics.metrics(c.job, c.node_id), METRICS, number, report.as_meta())
        self._log.info("version_finished", **report.as_meta())

    def _new_period(self) -> _Period:
        return _Period(started=time.monotonic())

    # --- incoming: the intake's hooks -----------------------------------------------------
    def _grant_round(self, node: str) -> int:
        ready = self._ready_round.pop(node, None)
        if ready is not None:
            return ready
        work = self._assigned.get(node)
        return work.version if work is not None else self.version

    def _on_lost(self, node: str) -> None:
        # A relay that comes back is sent the newest model again (its group's work is gone).
        if node in self.config.relays:
            self._relay_version.pop(node, None)
            self._period.lost.add(node)
        lost = self._assigned.pop(node, None)
        if lost is not None:
            self._give_up(node, lost)
            self._period.lost.add(node)
            self.selector.report(node, lost.version, completed=False,
                                 duration_s=time.monotonic() - lost.sent_at)

    def _give_up(self, node: str, work: _Assignment) -> None:
        versions = self._given_up.setdefault(node, OrderedDict())
        versions[work.version] = None
        while len(versions) > _GIVEN_UP:
            versions.popitem(last=False)

    def _work_for(self, sender: str, version: int) -> str | None:
        """Which work an update from ``version`` answers: ``relay`` (a forwarded update of a
        version sent to that relay), ``assigned`` (the outstanding work), ``given_up`` (work
        given up on, come back after all), or None."""
        if sender in self.config.relays:
            return "relay" if version in self._relay_sent.get(sender, ()) else None
        work = self._assigned.get(sender)
        if work is not None and work.version == version:
            return "assigned"
        if version in self._given_up.get(sender, ()):
            return "given_up"
        return None

    def expects_ready(self, sender: str, number: int) -> bool:
        if self._work_for(sender, number) is None:
            return False
        self._ready_round[sender] = number  # its grant must name this version
        return True

    def admit(self, env: Envelope, sender: str) -> int:
        if sender not in self.config.relays \
                and env.meta.get("work") not in self._work_ids.get(sender, ()):
            raise UpdateRejected("unknown_work", f"update for work {env.meta.get('work')!r}, "
                                                 "not an order this aggregator sent")
        if self._work_for(sender, env.round) is None:
            work = self._assigned.get(sender)
            if work is None:
                raise UpdateRejected("not_selected",
                                     f"no work outstanding (update from version {env.round})")
            raise UpdateRejected("stale", f"update from version {env.round}, work went out "
                                          f"at {work.version}")
        return self.version - env.round

    def fold(self, update: ClientUpdate, env: Envelope) -> None:
        # Garbage on a trainer's topic never gets here, so it cannot cancel the work.
        sender, staleness = update.sender, update.staleness
        source = self._work_for(sender, env.round)
        count, origins, bases = forwarded_counts(env) if source == "relay" else (1, {}, {})
        now = time.monotonic()
        work = self._assigned.get(sender) if source == "assigned" else None
        if self.max_staleness is not None and staleness > self.max_staleness:
            if work is not None:
                del self._assigned[sender]
                self.selector.report(sender, env.round, completed=False,
                                     duration_s=now - work.sent_at)
            if source == "given_up":
                del self._given_up[sender][env.round]
            raise UpdateRejected("too_stale", f"staleness {staleness} > max_staleness "
                                              f"{self.max_staleness}")
        moved = self._submit(dataclasses.replace(update, count=count) if count > 1 else update)
        if work is not None:
            del self._assigned[sender]
            self.selector.report(sender, env.round, completed=True,
                                 duration_s=now - work.sent_at)
        elif source == "given_up":
            del self._given_up[sender][env.round]
            self._log.info("late_update_accepted", node=sender, base_version=env.round,
                           staleness=staleness)
        if source == "relay":
            self._relay_active[sender] = now
        # through a relay: the trainer that did the work is named in the update
        origin = env.meta.get("origin") if source == "relay" else None
        who = origin if isinstance(origin, str) and len(origin) <= 64 else sender
        p = self._period
        for name, n in (origins or {who: count}).items():
            self.contributions[name] += n
            p.accepted += [name] * n
        # a pre-aggregate's members, by the version each was trained from
        for base, n in (bases or {env.round: count}).items():
            p.staleness += [staleness + env.round - base] * n
        loss = update.metrics.get("train_loss")
        if loss is not None:
            p.loss_sum += float(loss) * update.num_examples
            p.loss_weight += update.num_examples
        if moved is not None:
            self.weights = moved

    def _submit(self, update: ClientUpdate) -> Weights | None:
        """``update`` to the strategy; a counted one, to a strategy that cannot take counts,
        as that many updates of its delta one by one (each meeting the version it meets).
        Members beyond the job's last version are not used (as the flat star would not
        use updates arriving after it), logged."""
        if update.count == 1:
            return self.strategy.submit(update)
        left = self.config.rounds - self.version
        if self.strategy.takes_counts:
            room = self.strategy.room(left)
            if room is None or room >= update.count:
                return self.strategy.submit(update)
            self._log.info("updates_beyond_last_version", peer=update.sender,
                           updates=update.count - room)
            return self.strategy.submit(dataclasses.replace(update, count=room)) \
                if room else None
        moved = None
        for _ in range(update.count):
            if self.version >= self.config.rounds:
                break
            one = dataclasses.replace(update, count=1,
                                      staleness=self.version - update.base_round)
            moved = self.strategy.submit(one) or moved
        return moved

    # --- outgoing ------------------------------------------------------------------------
    async def _send_work(self, nodes: list[str]) -> None:
        """One order per node, on its own topic: a trainer receives only its own work.
        ``batch`` says how many orders this dispatch sent (a simulation coordinator hosting
        many clients waits for all of them before it orders their arrivals)."""
        c = self.config
        self._dispatches += 1
        version = self.version
        # ``round`` seeds the trainer's batch order: a per-dispatch counter, so a fast trainer
        # given the same model version twice does not replay the same batches.
        config = {"round": self._dispatches, "version": version, "seed": c.seed,
                  **self.strategy.client_config(version)}
        model, codec_meta = (await self._offload(functools.partial(
            encode_model, self.weights, c.model_codec, self._model_rng))
            if c.model_codec.mode != "none" else (self.weights, {}))
        tensors = join_tensors(model)
        for node in nodes:
            env = Envelope(
                kind=ROUND,
                job=c.job,
                sender=c.node_id,
                round=version,
                meta={"selected": [node], "mode": "async", "config": config,
                      "deadline_s": c.round.deadline_s, "upload_gate_bytes": c.gate_bytes,
                      "epoch": self.epoch, "batch": len(nodes), **codec_meta},
                tensors=tensors,
            )
            payload = await self._offload(functools.partial(encode, env, c.compression))
            self._work_ids.setdefault(node, deque(maxlen=_WORK_IDS)).append(env.msg_id)
            await self.bus.publish(topics.work(c.job, node, c.node_id), payload)


def _crossed(before: int, now: int, every: int, last: int) -> bool:
    """Is something due every ``every`` versions (and at ``last``) between ``before`` and
    ``now``? A counted update may make several versions at once, past a multiple of it."""
    return now >= last or now // every > before // every


def forwarded_counts(env: Envelope) -> tuple[int, dict[str, int], dict[int, int]]:
    """A forwarded update's count, and who made its members and from which versions (empty
    when the relay does not say, or says it inconsistently: then the update's own tag)."""
    count = env.meta.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise UpdateRejected("bad_count", f"count {count!r} is not an integer in "
                                          f"[1, {MAX_COUNT}]")
    origins = env.meta.get("origins")
    if not (isinstance(origins, dict) and len(origins) <= count
            and all(isinstance(k, str) and len(k) <= 64 and isinstance(n, int)
                    and not isinstance(n, bool) and n >= 1 for k, n in origins.items())
            and sum(origins.values()) == count):
        origins = {}
    bases: dict[int, int] = {}
    raw = env.meta.get("bases")
    if isinstance(raw, list) and len(raw) <= count:
        for pair in raw:
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                    and 0 <= pair[0] <= env.round and pair[1] >= 1):
                bases = {}
                break
            bases[pair[0]] = bases.get(pair[0], 0) + pair[1]
        if sum(bases.values()) != count:
            bases = {}
    return count, origins, bases
