"""The store service: records every round of one aggregator and answers workload queries.

It subscribes to what the aggregator already receives and sends (``update/<agg>/+``,
``model/<agg>``, ``metrics/<agg>``): the broker fans each message out once more, so trainers
upload once and the aggregator does no extra work. A store that keeps no full updates is fed
the aggregator's per-round sketch record (``sketch/<agg>``, fedbus.store.feed) instead of
the updates themselves. Nothing waits for the store: a receiver
drains the subscription into a backlog bounded by bytes (beyond it messages are dropped and
counted) and one writer decodes, checks, sketches and writes it, in worker threads. Queries
arrive on ``query/<store>/<sender>`` and are answered on ``reply/<sender>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

import numpy as np
import structlog

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.codec import Envelope, Limits, encode
from fedbus.door import (
    Admitted,
    Door,
    Entry,
    SeenIds,
    check_update,
    model_limits,
)
from fedbus.errors import FedbusError, UpdateRejected
from fedbus.services.store.config import (
    QUERY,
    QUERY_LIMITS,
    StoreConfig,
    lower_priority,
)
from fedbus.services.store.queries import QueryDesk
from fedbus.services.store.rounds import (
    Members,
    OpenRound,
    RoundRejections,
    finite,
    finite_metrics_capped,
    round_record,
)
from fedbus.store.feed import SKETCHES, read_record, record_limits
from fedbus.store.repository import RoundStore
from fedbus.store.sketch import Sketcher
from fedbus.store.workloads import Workloads, digest
from fedbus.wire import (
    DONE,
    METRICS,
    READY,
    ROUND,
    UPDATE,
    presence,
    split_model,
)

__all__ = ["StoreService"]

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

_MAX_METRICS: Final = 64
_MAX_REJECTION_LOG: Final = 100
#: Model-sized tensor sets an order may carry: the model and the strategy's extras.
_ORDER_COPIES: Final = 4
#: A round's model, report and sketch record are kept even over the backlog's budget.
_VITAL: Final = frozenset({"model", "metrics", "sketch"})

class StoreService:
    """Records rounds into ``store`` and serves ``workloads`` until the job is done."""

    def __init__(self, config: StoreConfig, bus: Bus, store: RoundStore, *,
                 workloads: Workloads | None = None,
                 model: Mapping[str, np.ndarray] | None = None) -> None:
        """``model``: the job's initial model (the task's), when the store has the task:
        its size bounds what the aggregator and trainers may send before the first order."""
        self.config = config
        self.bus = bus
        self.store = store
        self.workloads = workloads or Workloads(store, seed=config.seed)
        self.sketcher = Sketcher(config.sketch_dim, config.seed)
        if config.feed not in ("updates", "sketches"):
            raise FedbusError(f"store feed {config.feed!r}: use updates or sketches")
        self._fed_sketches = config.feed == "sketches"
        self._record_limits = record_limits(self._max_early, self.sketcher.dim, config.limits)
        self.rejections = RoundRejections(config.node_id, self._latest_open)
        self.stats: Counter[str] = Counter()
        self.done = asyncio.Event()
        #: Set once the store is subscribed: what it records from then on is complete.
        self.started = asyncio.Event()
        #: Notified whenever a message has been handled: wait_for(lambda: ...) on counters.
        self.progress = asyncio.Condition()
        self._seen = SeenIds()
        self._open: dict[int, OpenRound] = {}
        self._closed_upto = max(store.rounds(), default=-1)  # async versions start at 0
        #: The aggregator run followed (``meta.epoch`` of its orders); None until one came.
        self._epoch: str | None = None
        #: The last order refused for jumping ahead (the next one after it is a real gap).
        self._jumped = -1
        #: Decode limits for the aggregator's messages once its model is known (from the
        #: task at once when the store has it, as a trainer does; else from the first order).
        self._order_limits: Limits | None = (
            None if model is None else model_limits(model, _ORDER_COPIES, config.limits))
        #: The same for trainers' updates before any round is open.
        self._update_limits = (config.limits if model is None
                               else model_limits(model, 2, config.limits))
        self._early: list[Message] = []
        # The front door: what the store accepts, from whom, within which limits.
        c, agg = config, frozenset({config.aggregator})
        self.door = Door(c.job, c.node_id, rejections=self.rejections, seen=self._seen,
                         offload=self._work)

        def from_agg(topic_filter: str, *kinds: str) -> Entry:
            return Entry(topic_filter, frozenset(kinds), senders=agg,
                         limits=self._aggregator_limits, dedupe=False)

        self.door.expect(Entry(topics.updates_for(c.job, c.aggregator),
                               frozenset({UPDATE, READY}), senders=Members(self._is_trainer),
                               limits=self._updates_limits, dedupe=False))
        self.door.expect(Entry(topics.sketch(c.job, c.aggregator), frozenset({SKETCHES}),
                               senders=agg, limits=self._record_limits))
        self.door.expect(from_agg(topics.model(c.job, c.aggregator), ROUND, DONE))
        self.door.expect(from_agg(topics.work_from(c.job, c.aggregator), ROUND))
        self.door.expect(from_agg(topics.metrics(c.job, c.aggregator), METRICS))
        self.door.expect(Entry(topics.queries_for(c.job, c.node_id), frozenset({QUERY}),
                               limits=QUERY_LIMITS, label="query_"))
        self.queries = QueryDesk(config, bus, self.door, self.workloads, self.stats,
                                 self.progress, lambda: self._handled)
        self._backlog: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()
        self._backlog_bytes = 0
        #: Bytes of models and reports in the backlog (kept even over budget, up to a bound).
        self._vital_bytes = 0
        #: The store's own queue gets what the subscription's half of the backlog leaves.
        self._own_backlog = config.backlog_bytes - config.backlog_bytes // 2
        #: Messages put into the backlog, and taken out and handled: a query waits until
        #: what arrived before it is recorded (what it asks about is in the store).
        self._enqueued = 0
        self._handled = 0
        #: Recording an asynchronous aggregator (its model broadcasts say mode: async).
        self._async = False
        self._log = log.bind(node=config.node_id, role="store", job=config.job)
        # Disk writes fsync at the round's record (its commit point), not per file.
        store.disk.deferred = True
        # One worker for the recording (in order, at lower priority), one for idle work.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"{config.node_id}-work",
                                        initializer=lower_priority, initargs=(config.work_nice,))

    def _is_trainer(self, sender: str) -> bool:
        """One of the recorded aggregator's trainers (or simulated clients)?"""
        if sender in self.config.trainers:
            return True
        pop = self.config.population
        if pop is None or not sender.startswith(pop[0]):
            return False
        tail = sender[len(pop[0]):]
        return tail.isdigit() and str(int(tail)) == tail and int(tail) < pop[1]

    def _updates_limits(self) -> Limits:
        """An update is no bigger than one of the open round's model (with SCAFFOLD's extra);
        before any round, one of the task's model (or the manifest's codec limits)."""
        latest = self._latest_open()
        return (model_limits(latest.model, 2, self.config.limits) if latest is not None
                else self._update_limits)

    def _aggregator_limits(self) -> Limits:
        # Once the model is known, nothing from the aggregator is bigger than a few models:
        # a frame declaring more (a zstd bomb on an open broker) is refused unopened.
        return self._order_limits or self.config.limits

    @property
    def _max_early(self) -> int:
        """Updates kept while their round's model has not arrived: one per trainer."""
        pop = self.config.population
        return len(self.config.trainers) + (pop[1] if pop is not None else 0)

    async def _work(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` on the store's own low-priority worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool,
                                                                functools.partial(fn, *args))

    # --- main loop ------------------------------------------------------------------------
    async def run(self) -> dict[str, int]:
        c = self.config
        # asynchronous work orders (the model of each version) go to one trainer each
        updates = (topics.sketch(c.job, c.aggregator) if self._fed_sketches
                   else topics.updates_for(c.job, c.aggregator))
        filters = (updates, topics.model(c.job, c.aggregator),
                   topics.work_from(c.job, c.aggregator),
                   topics.metrics(c.job, c.aggregator), topics.queries_for(c.job, c.node_id))
        # Half the backlog may wait in the subscription (the bus drops and counts beyond it),
        # half in the store's own queue: a store starved of CPU holds no more than the backlog.
        async with self.bus.subscribe(*filters, admit=self._admit, screen=self.door.screen,
                                      max_queued_bytes=c.backlog_bytes // 2) as sub:
            await self._publish_presence("online")
            self.started.set()
            self._log.info("store_started", dir=str(self.store.disk.root),
                           cache_bytes=self.store.cache.capacity, rounds=len(self.store.rounds()))
            receiver = asyncio.create_task(self._receive(sub), name=f"{c.node_id}.receive")
            writer = asyncio.create_task(self._write_loop(), name=f"{c.node_id}.write")
            try:
                finished, _ = await asyncio.wait({receiver, writer},
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # a crash in either loop surfaces here
            finally:
                tasks = [receiver, writer, *self.queries.tasks]
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                self._pool.shutdown(wait=False, cancel_futures=True)
                self.queries.close()
                with contextlib.suppress(FedbusError):
                    await self._publish_presence("offline")
                if self.store.redis is not None:
                    await self.store.redis.close()
        bus_stats = getattr(self.bus, "stats", {})
        if isinstance(bus_stats, dict):  # what the bus dropped before the store saw it
            self.stats["dropped_by_bus"] = int(bus_stats.get("dropped_queue_full", 0))
        self._log.info("store_stopped", **self.stats, **self.store.stats()["cache"])
        return dict(self.stats)

    def _admit(self, topic: str, total: int) -> bool:
        """Which chunked transfers the bus may buffer for the store: an update from one of the
        recorded aggregator's trainers (no bigger than an update of the open round's model
        can be) or that aggregator's model; never a query (they are small)."""
        c = self.config
        try:
            parsed = topics.parse(topic)
        except FedbusError:
            return False
        if parsed.channel == "update":
            return (parsed.levels[0] == c.aggregator and self._is_trainer(parsed.sender)
                    and total <= self._updates_limits().max_frame_bytes)
        if parsed.channel in ("model", "work"):
            return (parsed.sender == c.aggregator
                    and total <= self._aggregator_limits().max_frame_bytes)
        if parsed.channel == "sketch":  # a big population's record
            return (parsed.sender == c.aggregator
                    and total <= self._record_limits.max_frame_bytes)
        return False

    async def _receive(self, sub: Subscription) -> None:
        """Drain the subscription at once; the writer works from the bounded backlog."""
        async for msg in sub:
            size = len(msg.payload)
            self.stats["bytes_in"] += size
            try:
                channel = topics.parse(msg.topic).channel
            except FedbusError:
                channel = ""  # the writer rejects (and counts) the bad topic
            if channel == "work":
                channel = "model"  # an asynchronous order: the model of a version
            if channel == "query":
                self.queries.spawn(msg, self._enqueued)
                continue
            # A round's model, report and `done` are kept even over budget (one or two
            # messages a round, from the one aggregator the bus admits): losing one would
            # lose the whole round, losing an update loses one client of it.
            vital = channel in _VITAL and self._vital_bytes + size <= self._own_backlog
            over = self._backlog_bytes + size > self._own_backlog
            if over and vital:
                self.stats["kept_over_budget"] += 1
            if over and not vital:
                self.stats["dropped"] += 1
                self.stats["dropped_bytes"] += size
                if self.stats["dropped"] % 100 == 1:
                    self._log.warning("store_backlog_full", dropped=self.stats["dropped"],
                                      backlog_bytes=self._backlog_bytes)
                continue
            self._backlog_bytes += size
            if channel in _VITAL:
                self._vital_bytes += size
            self._enqueued += 1
            self._backlog.put_nowait((channel, msg))

    async def _write_loop(self) -> None:
        while True:
            channel, msg = await self._backlog.get()
            self._backlog_bytes -= len(msg.payload)
            if channel in _VITAL:
                self._vital_bytes -= len(msg.payload)
            try:
                await self._handle(msg)
            except FedbusError as exc:
                self._log.error("store_write_failed", topic=msg.topic, error=str(exc))
                self.stats["write_errors"] += 1
            self._handled += 1
            async with self.progress:
                self.progress.notify_all()
            if self.done.is_set() and self.config.exit_on_done:
                return

    @property
    def backlog(self) -> int:
        return self._backlog.qsize()

    # --- recording ------------------------------------------------------------------------
    async def _handle(self, msg: Message) -> None:
        adm = await self.door.open(msg)
        if adm is None:
            return
        channel, env = adm.topic.channel, adm.env
        if channel == "update":
            await self._on_update(adm, msg)
        elif channel == "sketch":
            await self._on_sketches(adm)
        elif env.kind == ROUND:
            await self._on_round(env)
        elif env.kind == DONE:
            if not self._plausible_done(env):
                return
            for number in sorted(self._open):
                old = self._open.pop(number)
                await self._close(old, old.next_model)
            self.done.set()
            self._log.info("store_job_done", rounds=len(self.store.rounds()))
        elif env.kind == METRICS:
            await self._on_metrics(env)

    def _plausible_done(self, env: Envelope) -> bool:
        """A ``done`` ends the store's job: on an anonymous broker anyone may send one, so it
        must come from the aggregator run the store follows (its epoch, as in its orders),
        for the job's last round, once that round was ordered; else it is refused and counted,
        as trainers do, instead of closing open rounds and ending the store mid-job. (A
        forger who learned the epoch can still end the last round early: only
        authentication stops that.)"""
        epoch = env.meta.get("epoch")
        newest = max(self._open, default=self._closed_upto)
        last = self.config.rounds if self.config.rounds is not None else env.round
        # An aggregator says `done` for its last round (async: its last version), once that
        # round has been ordered (async: the version before it), in the run it ordered it.
        if ((self._epoch is not None and epoch != self._epoch) or env.round != last
                or newest < last - 1):
            self.rejections.reject("unexpected_done", f"done for round {env.round} of run "
                                   f"{epoch!r}; following {self._epoch!r}, newest round "
                                   f"{newest} of {last}", sender=self.config.aggregator)
            return False
        return True

    async def _on_round(self, env: Envelope) -> None:
        number = env.round
        low = 0 if env.meta.get("mode") == "async" else 1  # async versions start at 0
        high = self.config.rounds if self.config.rounds is not None else number
        if not low <= number <= high:
            # as trainers do: a forged far-ahead order would close the open round early and
            # make every real round after it look like a replay
            self.rejections.reject("implausible_round", f"order for round {number}, the job "
                                   f"has {self.config.rounds}", sender=self.config.aggregator)
            return
        epoch = env.meta.get("epoch")
        asynchronous = env.meta.get("mode") == "async"
        if self.config.asynchronous is not None and asynchronous != self.config.asynchronous:
            # a synchronous job's aggregator never sends an asynchronous order (and the other
            # way round): one on its topics is a forgery, not the job's next model
            mode = "an asynchronous" if asynchronous else "a synchronous"
            self.rejections.reject("wrong_mode", f"{mode} order for round {number}",
                                   sender=self.config.aggregator)
            return
        if (not asynchronous and self._open and number > max(self._open) + 1
                and number != self._jumped + 1):
            # A synchronous run orders its rounds one after the other, and a restarted one
            # (a new epoch) resumes at most at the next round: a jump ahead while a round is
            # open is a forgery (it would close that round early and be taken for the real
            # one), unless the orders go on from it (a gap: the store missed one).
            self._jumped = number
            self.rejections.reject("implausible_round", f"order for round {number} while "
                                   f"round {max(self._open)} is open",
                                   sender=self.config.aggregator)
            return
        if isinstance(epoch, str):
            self._epoch = epoch  # the aggregator run whose `done` ends the job
        selected = env.meta.get("selected", [])
        selected = {s for s in selected if isinstance(s, str)} if isinstance(selected, list) \
            else set()
        if number in self._open:  # a round extension re-broadcasts with replacements
            self._open[number].selected |= selected
            return
        if number <= self._closed_upto:
            return  # a replay (an aggregator restarted from a checkpoint)
        try:
            weights, _ = split_model(env)
        except UpdateRejected as exc:
            self.rejections.reject(exc.reason, exc.detail, sender=self.config.aggregator)
            return
        weights = {k: v for k, v in weights.items()}
        if self._order_limits is None:  # the model plus strategy extras (FedDyn, SCAFFOLD)
            self._order_limits = model_limits(weights, _ORDER_COPIES, self.config.limits)
        model_digest = await self._work(digest, weights)
        if number - 1 in self._open:
            self._open[number - 1].next_model = weights
            self._open[number - 1].next_digest = model_digest
        self._async = self._async or env.meta.get("mode") == "async"
        for prev in sorted(self._open):
            old = self._open[prev]
            if self._fed_sketches and not old.fed:
                if prev == number - 1:
                    continue  # its record (sent just before this model) is late: closed on arrival
                self.stats["sketches_missing"] += 1  # two models on, it is not coming
            del self._open[prev]
            await self._close(old, old.next_model)
        state = OpenRound(number, weights, model_digest,
                      selected=selected)
        self._open[number] = state
        frames = await self._work(self.store.write_model, number, weights)
        await self.store.share(frames)
        early, self._early = self._early, []
        for msg in early:
            await self._handle(msg)

    async def _on_metrics(self, env: Envelope) -> None:
        report = {k: v for k, v in env.meta.items() if isinstance(k, str)}
        state = self._open.get(env.round)
        if state is not None:
            state.report = report
        elif env.round in self.store.records:  # late: the round's record is already written
            record = {**self.store.records[env.round], "report": report}
            await self._work(self.store.write_record, env.round, record)

    async def _on_sketches(self, adm: Admitted) -> None:
        """The aggregator's record of a round: the sketch and bookkeeping of every update it
        accepted. Checked like everything else; recorded once; the round closes when the
        model it produced is known too."""
        c, env, sender = self.config, adm.env, adm.sender
        reject = self.rejections.reject
        state = self._open.get(env.round)
        if state is None or state.fed:
            reason = "duplicate" if state is not None else "stale"
            reject(reason, f"sketch record for round {env.round}, not open or already "
                           "recorded", sender=sender)
            return
        try:
            rows = read_record(env, dim=self.sketcher.dim, seed=c.seed,
                               is_trainer=self._is_trainer, max_examples=c.max_examples)
        except UpdateRejected as exc:
            reject(exc.reason, exc.detail, sender=sender, round=env.round)
            return
        selected = env.meta.get("selected")
        if isinstance(selected, list):
            state.selected |= {s for s in selected if isinstance(s, str)}
        infos: dict[str, dict[str, Any]] = {}
        for arrival, (cid, fields, _) in enumerate(rows, start=1):
            infos[cid] = {**fields, "arrival": arrival, "selected": cid in state.selected,
                          "norm": round(fields["norm"], 8), "full": False,
                          "source": "aggregator"}
        frames = await self._work(self._write_sketches, state.number, rows, infos)
        await self.store.share(frames)
        state.clients.update(infos)
        state.sketches.update({cid: sk for cid, _, sk in rows})
        state.fed = True
        self.stats["updates"] += len(rows)
        self.stats["sketch_records"] += 1
        if state.next_model is not None:  # the model it produced is in: nothing else to wait
            del self._open[state.number]
            await self._close(state, state.next_model)

    def _write_sketches(self, r: int, rows: list[tuple[str, dict[str, Any], np.ndarray]],
                        infos: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
        frames: dict[str, bytes] = {}
        for cid, _, sketch in rows:
            frames.update(self.store.write_sketch(r, cid, sketch, {"norm": infos[cid]["norm"]}))
        return frames

    def _latest_open(self) -> OpenRound | None:
        return self._open[max(self._open)] if self._open else None

    async def _on_update(self, adm: Admitted, msg: Message) -> None:
        c = self.config
        reject = self.rejections.reject
        env, sender = adm.env, adm.sender
        if env.kind == READY:
            return  # a large update announces itself first; the upload itself follows
        state = self._open.get(env.round)
        if self._async and self._open and env.round < max(self._open):
            # Asynchronous (FedBuff, FedAsync): an update is applied to the version being
            # built when it arrives, whatever version it started from; it is filed there,
            # and its staleness says how far behind its start was.
            state = self._open[max(self._open)]
        if state is None:
            if env.round <= max(self._open, default=self._closed_upto):
                reject("stale", f"update for closed round {env.round}", sender=sender)
                return
            early_bytes = sum(len(m.payload) for m in self._early) + len(msg.payload)
            if len(self._early) < self._max_early and early_bytes <= self._own_backlog:
                self._early.append(msg)  # sent before the model broadcast reached us
            else:
                reject("early_overflow", f"update for round {env.round}, not open yet",
                       sender=sender)
            return
        # Message ids are remembered only once the round is known: an update that arrives
        # before its round's model is looked at again when the round opens.
        if not self.door.first_time(adm):
            return
        if sender in state.clients:
            if self._async:  # a fast trainer's second update while one version is built
                reject("repeat_in_version", f"second update in version {state.number}",
                       sender=sender)
            else:
                reject("duplicate", f"second update in round {env.round}", sender=sender)
            return
        try:
            # the aggregator's own checks, codec stages included (an int8 update is recorded
            # dense, as the aggregator folded it)
            checked = await self._work(functools.partial(check_update, env, state.model,
                                                         max_examples=c.max_examples))
        except UpdateRejected as exc:
            reject(exc.reason, exc.detail, sender=sender)
            return
        n, size, delta = checked.num_examples, checked.norm, checked.delta
        metrics = env.meta.get("metrics", {})
        info: dict[str, Any] = {
            "num_examples": n,
            "metrics": finite_metrics_capped(metrics if isinstance(metrics, dict) else {}),
            "duration_s": finite(env.meta.get("duration_s")),
            "arrival": len(state.clients) + 1,
            "arrival_s": round(time.monotonic() - state.started, 4),
            "staleness": max(self._open) - env.round,
            "base_round": env.round,
            "bytes": len(msg.payload),
            "selected": sender in state.selected,
        }
        info["norm"] = round(size, 8)
        sketch, frames = await self._work(self._sketch_and_write, state.number, sender,
                                                 delta, info)
        await self.store.share(frames)
        state.clients[sender] = info
        state.sketches[sender] = sketch
        self.stats["updates"] += 1
        self.stats["update_bytes"] += sum(len(f) for f in frames.values())

    def _sketch_and_write(self, r: int, sender: str, delta: dict[str, np.ndarray],
                          info: dict[str, Any]) -> tuple[np.ndarray, dict[str, bytes]]:
        sketch = self.sketcher.sketch(delta)
        info["full"] = self.config.full_updates
        frames: dict[str, bytes] = {}
        if self.config.full_updates:
            frames.update(self.store.write_update(r, sender, delta))
        frames.update(self.store.write_sketch(r, sender, sketch, {"norm": info["norm"]}))
        return sketch, frames

    async def _close(self, state: OpenRound, next_model: Mapping[str, np.ndarray] | None) -> None:
        """Finish a round's record: the aggregate (exact from the next model when known, else
        the example-weighted mean of what arrived) and each update's cosine to it."""
        r = state.number
        record = await round_record(state, next_model, store=self.store,
                                    sketcher=self.sketcher, work=self._work,
                                    feed=self.config.feed)
        source = record["aggregate"]["source"]
        await self._work(self.store.write_record, r, record)
        self._closed_upto = max(self._closed_upto, r)
        gone = await self._work(self.store.apply_retention, r)
        if self.store.redis is not None:
            for prefix in gone:
                await self.store.redis.delete_prefix(prefix)
        self.stats["rounds"] += 1
        self._log.info("store_round_recorded", round=r, clients=len(state.clients),
                       aggregate=source, backlog=self.backlog)
        if any(ci.get("full") for ci in state.clients.values()):
            self.queries.precompute(r)  # so that evaluating queries are lookups

    async def _publish_presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "store", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)
