"""The simulation's coordinator: hosts the virtual clients toward the real aggregator.

It announces the population's presence, turns each round order into one work item per client,
hands each item to a live worker with room for it (``window`` items ahead, so a worker never
waits for the next and a slow one holds few), and hands the workers' updates to the aggregator
on each client's own ``update/<agg>/<client>`` topic, in an order that depends only on the seed:

* synchronous rounds: the order's clients sorted by id. Dropouts go first, announced as the
  client going offline (the aggregator stops waiting for it); it is announced online again
  once the round's metrics are out, so it is back for the round after next whatever the
  timing (the aggregator reads presence only inside a round, after selecting);
* asynchronous training: a virtual clock. Each work item finishes at its start time plus the
  client's drawn duration; the earliest finishing one is released once it is trained, and the
  next only after the aggregator has answered (its next work orders, one per client on
  ``work/<client>/<agg>``, all of one dispatch taken together), so every model version sees
  the same arrivals, whatever the wall-clock speed of workers or processes.

Floating-point sums depend on the order of their terms, so this ordering is what makes a seeded
simulation bit-identical run to run and with any number of workers.

A worker whose presence goes offline (its last will: killed, or cut off) is dropped at once and
its unfinished items are given to the others; an item's first result counts, a second one (from
a worker that was only cut off) is ignored. Items of a synchronous round the aggregator has
closed are dropped when the next round's order comes, so one lost result never holds up the
rounds after it. With no worker left, the simulation stops with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.codec import Envelope, Limits, encode
from fedbus.door import Door, Entry
from fedbus.errors import FedbusError, SubscribeDenied
from fedbus.sim.population import Population
from fedbus.sim.worker import TASK
from fedbus.wire import DONE, PRESENCE, ROUND, presence

__all__ = ["Coordinator", "CoordinatorConfig", "SimStats"]

#: Rounds of order ids kept for stale synchronous updates (workers cache as many orders).
_ORDER_HISTORY = 32
#: mosquitto's count of messages it dropped at a client's queue limit (retained, refreshed
#: every sys_interval, 10 s by default); other brokers simply never send it.
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    job: str
    node_id: str
    aggregator: str
    #: Workers (in any process) that must be listening before the clients are announced.
    workers: int
    #: Shared folder for per-client state, named in every work item.
    state_dir: str
    limits: Limits = Limits()
    start_timeout_s: float = 120.0
    #: Asynchronous: how long to wait for the aggregator's answer to a released update
    #: before releasing the next one anyway (it answers with a work order unless done).
    response_timeout_s: float = 60.0
    #: Work items a worker holds at once (training one, the rest waiting): enough that it
    #: never waits for the next, few enough that the last items of a round spread out.
    window: int = 4


@dataclass(slots=True)
class SimStats:
    items: int = 0
    updates: int = 0
    dropouts: int = 0
    #: Virtual seconds: the sum of each synchronous round's slowest client, or the
    #: asynchronous clock at the end.
    virtual_time: float = 0.0
    no_response: int = 0
    #: Synchronous updates trained from an older round's model (stale_prob).
    stale: int = 0
    #: Work items whose training raised on a worker (counted as dropouts of that work).
    failures: int = 0
    workers: list[str] = field(default_factory=list)
    #: Workers that went offline during the simulation, and their items given to others.
    workers_lost: list[str] = field(default_factory=list)
    redispatched: int = 0
    #: Results that came too late to count: a second result of a re-dispatched item, or one
    #: for a synchronous round the aggregator had already closed.
    late: int = 0


@dataclass(order=True, slots=True)
class _Event:
    at: float
    seq: int  # the work item's number (no item is sent for a dropout)
    client: str = field(compare=False)
    drop: bool = field(compare=False)


@dataclass(slots=True)
class _Item:
    """A work item not yet answered: kept to give it to another worker if its own is lost."""

    client: str
    round: int
    payload: bytes
    worker: str | None = None


class _Outbox:
    """Publishes in call order without waiting for each broker acknowledgement: a QoS 1
    round trip per message (tens of ms on loopback MQTT) would otherwise pace the simulation.
    Tasks are created in order and the bus sends in creation order (as its chunk pipeline
    does), so the aggregator still sees the fixed order."""

    def __init__(self, bus: Bus, window: int = 256) -> None:
        self.bus = bus
        self.window = window
        self._pending: deque[asyncio.Task[None]] = deque()

    async def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._pending.append(asyncio.create_task(self.bus.publish(topic, payload,
                                                                  retain=retain)))
        while self._pending and (len(self._pending) >= self.window or self._pending[0].done()):
            await self._pending.popleft()

    async def flush(self) -> None:
        while self._pending:
            await self._pending.popleft()

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()
        self._pending.clear()


class Coordinator:
    def __init__(self, config: CoordinatorConfig, bus: Bus, population: Population) -> None:
        self.config = config
        self.bus = bus
        self.out = _Outbox(bus)
        self.population = population
        self.stats = SimStats()
        #: Results by work item number, waiting for their turn to be released.
        self._results: dict[int, bytes] = {}
        #: Synchronous: (item, client, round) in release order.
        self._sync_queue: deque[tuple[int, str, int]] = deque()
        #: Unanswered work items by number; those not yet given to a worker, in order.
        self._items: dict[int, _Item] = {}
        self._waiting: deque[int] = deque()
        #: Live workers and the items each holds.
        self._live: dict[str, set[int]] = {}
        self._events: list[_Event] = []
        self._seq = 0
        self._awaiting: float | None = None  # monotonic time of the last async release
        #: Asynchronous orders of the dispatch being received (one per client), by client.
        self._batch: dict[str, Envelope] = {}
        self._batch_key: tuple[str, int] | None = None
        #: Synchronous dropouts, announced online again after their round's metrics.
        self._dropped: list[str] = []
        #: Synchronous: the first order's id of recent rounds, for stale updates.
        self._round_orders: dict[int, str] = {}
        #: The broker's dropped-message count when this simulation began, and whether the
        #: aggregator has started (after that, the count is no longer watched).
        self._dropped_base: int | None = None
        self._started = False
        self._log = log.bind(node=config.node_id, role="sim_coordinator", job=config.job)
        # The front door: the aggregator's orders and `done`, the workers' presence (the
        # workers are not manifest nodes: any sender, role checked on arrival).
        c, agg = config, frozenset({config.aggregator})
        self.door = Door(c.job, c.node_id)
        self.rejections = self.door.rejections
        self.door.expect(Entry(topics.model(c.job, c.aggregator), frozenset({ROUND, DONE}),
                               senders=agg, limits=c.limits, dedupe=False))
        self.door.expect(Entry(topics.work_from(c.job, c.aggregator), frozenset({ROUND}),
                               senders=agg, limits=c.limits, dedupe=False))
        self.door.expect(Entry(topics.presence_all(c.job), frozenset({PRESENCE}),
                               label="presence_", dedupe=False))

    async def run(self) -> SimStats:
        c = self.config
        # asynchronous orders come one per client: the coordinator hosts them all
        filters = (topics.model(c.job, c.aggregator), topics.work_from(c.job, c.aggregator),
                   topics.sim_results(c.job, c.node_id), topics.presence_all(c.job),
                   topics.metrics(c.job, c.aggregator))
        async with contextlib.AsyncExitStack() as stack:
            try:
                sub = await stack.enter_async_context(self.bus.subscribe(*filters,
                                                                         SYS_DROPPED))
            except SubscribeDenied:  # a broker (or ACL) without $SYS: no drop check
                self._log.info("broker_drops_unwatched", topic=SYS_DROPPED)
                sub = await stack.enter_async_context(self.bus.subscribe(*filters))
            try:
                await self._own_presence("online")
                await self._wait_for_workers(sub)
                await self._announce_clients("online")
                await self._serve(sub)
                await self._announce_clients("")  # clear the clients' retained presence
                await self.out.flush()
            finally:
                self.out.cancel()
                # Said on every way out (a closing bus sends no will): workers of a simulation
                # that failed or was stopped get no `done`, and stop on this instead.
                with contextlib.suppress(FedbusError):
                    await self._own_presence("offline")
        self._log.info("simulation_done", items=self.stats.items, updates=self.stats.updates,
                       dropouts=self.stats.dropouts, virtual_time=self.stats.virtual_time,
                       workers_lost=len(self.stats.workers_lost),
                       redispatched=self.stats.redispatched, late=self.stats.late)
        return self.stats

    async def _own_presence(self, status: str) -> None:
        """Workers stop when the coordinator they saw online goes offline without `done`."""
        c = self.config
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(
            presence(c.job, c.node_id, "sim_coordinator", status)), retain=True)

    def _worker_presence(self, adm_env: Envelope | None) -> tuple[str, bool] | None:
        """(worker, online) for a simulation worker's presence, else None."""
        if adm_env is None or adm_env.meta.get("role") != "sim_worker":
            return None
        return adm_env.sender, adm_env.meta.get("status") == "online"

    async def _open_presence(self, msg: Message) -> tuple[str, bool] | None:
        # The population's own presence (thousands of clients, announced here) is not opened.
        sender = topics.parse(msg.topic).sender
        if not msg.payload or self.population.is_client(sender):
            return None
        adm = await self.door.open(msg)
        return self._worker_presence(adm.env if adm is not None else None)

    async def _wait_for_workers(self, sub: Subscription) -> None:
        c = self.config
        deadline = time.monotonic() + c.start_timeout_s
        while len(self._live) < c.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FedbusError(f"only {len(self._live)} of {c.workers} simulation workers "
                                  f"came online within {c.start_timeout_s}s: "
                                  f"{_few(sorted(self._live))}; start them with "
                                  "`fedbus worker MANIFEST --broker HOST:PORT`")
            try:
                msg = await sub.get(timeout=left)
            except TimeoutError:
                continue
            if msg.topic == SYS_DROPPED:
                self._on_broker_drops(msg.payload)
            if not topics.matches(topics.presence_all(c.job), msg.topic):
                continue  # nothing else matters before the workers are here
            seen = await self._open_presence(msg)
            if seen is not None:
                worker, online = seen
                if online:
                    self._live.setdefault(worker, set())
                else:
                    self._live.pop(worker, None)
        self.stats.workers = sorted(self._live)
        self._log.info("workers_ready", workers=len(self._live), first=_few(sorted(self._live)))

    async def _announce_clients(self, status: str) -> None:
        for i in range(len(self.population)):
            client = self.population.client_id(i)
            await self._presence(client, status)
        if status:
            self._log.info("clients_announced", clients=len(self.population))

    async def _presence(self, client: str, status: str) -> None:
        c = self.config
        payload = encode(presence(c.job, client, "trainer", status)) if status else b""
        await self.out.send(topics.presence(c.job, client), payload, retain=True)

    async def _serve(self, sub: Subscription) -> None:
        c = self.config
        model_topic = topics.model(c.job, c.aggregator)
        work_topics = topics.work_from(c.job, c.aggregator)
        metrics_topic = topics.metrics(c.job, c.aggregator)
        results = topics.sim_results(c.job, c.node_id)
        presences = topics.presence_all(c.job)
        while True:
            timeout = None
            if self._awaiting is not None:
                timeout = max(0.0, self._awaiting + c.response_timeout_s - time.monotonic())
            try:
                msg = await sub.get(timeout=timeout)
            except TimeoutError:
                self.stats.no_response += 1
                self._log.warning("aggregator_silent", waited_s=c.response_timeout_s)
                self._awaiting = None
                await self._release_async()
                continue
            if msg.topic == model_topic or topics.matches(work_topics, msg.topic):
                adm = await self.door.open(msg)
                if adm is None:
                    continue
                env = adm.env
                if env.kind == DONE:
                    return
                if env.kind == ROUND:
                    await self._on_order(env)
            elif msg.topic == metrics_topic:
                # A synchronous round is over: its dropouts may be picked again (the
                # aggregator reads this after it has selected the next round).
                for client in self._dropped:
                    await self._presence(client, "online")
                self._dropped.clear()
            elif topics.matches(results, msg.topic):
                await self._on_result(msg)
            elif topics.matches(presences, msg.topic):
                seen = await self._open_presence(msg)
                if seen is not None:
                    await self._on_worker(*seen)
            elif msg.topic == SYS_DROPPED:
                self._on_broker_drops(msg.payload)

    def _on_broker_drops(self, payload: bytes) -> None:
        """Stop at once, in one line, when the broker drops messages before round 1: the
        population's presence announcements overflowed a client's queue (the aggregator's),
        and the aggregator would wait ``start_timeout_s`` for clients it never hears of."""
        try:
            count = int(payload.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            self.rejections.reject("bad_broker_stat", repr(payload[:40]), sender=SYS_DROPPED)
            return
        if self._dropped_base is None or count < self._dropped_base:
            self._dropped_base = count  # the first value seen, or the broker restarted
            return
        if self._started or count == self._dropped_base:
            return
        n = len(self.population)
        raise FedbusError(
            f"the broker dropped {count - self._dropped_base} messages as this simulation "
            f"announced its {n} clients ({SYS_DROPPED}): a client's message queue there is "
            f"too small for the population; set max_queued_messages above {n} in its "
            "mosquitto.conf (brokers/local.conf has 100000) and start it again")

    # --- workers ------------------------------------------------------------------------
    async def _on_worker(self, worker: str, online: bool) -> None:
        if online:
            if worker not in self._live:
                self._live[worker] = set()
                self._log.info("worker_joined", worker=worker, workers=len(self._live))
                await self._dispatch()
            return
        held = self._live.pop(worker, None)
        if held is None:
            return
        self.stats.workers_lost.append(worker)
        for number in sorted(held, reverse=True):  # back to the front, in their order
            item = self._items.get(number)
            if item is not None:
                item.worker = None
                self._waiting.appendleft(number)
        self.stats.redispatched += len(held)
        self._log.warning("worker_lost", worker=worker, items_redispatched=len(held),
                          workers_left=len(self._live))
        if not self._live:
            raise FedbusError(f"simulation worker {worker} went offline and no worker is left "
                              f"({len(self._items)} work items undone); start workers with "
                              "`fedbus worker MANIFEST --broker HOST:PORT` and run the job again")
        await self._dispatch()

    async def _dispatch(self) -> None:
        """Give waiting items to the live workers with room, the least loaded first."""
        c = self.config
        while self._waiting and self._live:
            worker = min(self._live, key=lambda w: (len(self._live[w]), w))
            held = self._live[worker]
            if len(held) >= c.window:
                return
            number = self._waiting.popleft()
            item = self._items.get(number)
            if item is None:
                continue  # answered or dropped meanwhile
            item.worker = worker
            held.add(number)
            await self.out.send(topics.sim_tasks(c.job, c.node_id, worker), item.payload)

    async def _on_result(self, msg: Message) -> None:
        levels = topics.parse(msg.topic).levels
        tail = levels[1] if len(levels) == 3 else ""
        if not tail.isdigit():
            self.rejections.reject("bad_result_topic", msg.topic[-80:])
            return
        number = int(tail)
        item = self._items.get(number)
        if item is None or item.client != levels[2]:
            self.stats.late += 1  # a re-dispatched item's second result, or a closed round's
            return
        del self._items[number]
        if item.worker is not None and item.worker in self._live:
            self._live[item.worker].discard(number)
        self._results[number] = msg.payload
        if not msg.payload:
            self.stats.failures += 1
        await self._dispatch()
        await self._release_sync()
        await self._release_async()

    # --- orders -------------------------------------------------------------------------
    async def _on_order(self, env: Envelope) -> None:
        selected = env.meta.get("selected", [])
        if not isinstance(selected, list):
            return
        self._started = True
        if env.meta.get("mode") == "async":
            await self._on_async_order(env, selected)
            return
        await self._drop_closed_rounds(env.round)
        slowest = 0.0
        self._round_orders.setdefault(env.round, env.msg_id)
        for old in [r for r in self._round_orders if r < env.round - _ORDER_HISTORY]:
            del self._round_orders[old]
        for client in sorted(selected):
            index = self.population.index(client)
            if self.population.drops_out(index, env.round):
                # Offline only: an "online" inside the round would make the aggregator count
                # the client as pending again (it takes a quick return for a reconnect).
                await self._presence(client, "offline")
                self._dropped.append(client)
                self.stats.dropouts += 1
                continue
            slowest = max(slowest, self.population.duration(index, env.round))
            # A stale update: trained from the model of `lag` rounds ago (the oldest kept
            # if the job is younger), delivered in this round.
            lag = self.population.stale_rounds(index, env.round)
            base = min(r for r in self._round_orders if r >= env.round - lag)
            if base != env.round:
                self.stats.stale += 1
            number = await self._send_item(env, client, order_id=self._round_orders.get(base))
            self._sync_queue.append((number, client, env.round))
        self.stats.virtual_time += slowest
        await self._dispatch()

    async def _drop_closed_rounds(self, round_: int) -> None:
        """A new round began: what is still queued of earlier rounds can no longer count."""
        dropped = 0
        while self._sync_queue and self._sync_queue[0][2] < round_:
            number, _, _ = self._sync_queue.popleft()
            item = self._items.pop(number, None)
            if item is not None and item.worker in self._live:
                self._live[item.worker].discard(number)
            self._results.pop(number, None)
            dropped += 1
        if dropped:
            self.stats.late += dropped
            self._log.warning("round_closed_before_results", items=dropped, next_round=round_)

    async def _on_async_order(self, env: Envelope, selected: list[str]) -> None:
        """Collect one dispatch's orders (one a client), then start them in client order."""
        config = env.meta.get("config", {})
        work = int(config.get("round", env.round)) if isinstance(config, Mapping) else 0
        batch = env.meta.get("batch", 1)
        key = (str(env.meta.get("epoch", "")), work)
        if key != self._batch_key and self._batch:
            # a dispatch whose orders did not all come: start what did rather than lose it
            self._log.warning("orders_missing", dispatch=self._batch_key, got=len(self._batch))
            await self._start_async(self._batch, self._batch_key)
        if key != self._batch_key:
            self._batch, self._batch_key = {}, key
        for client in selected:
            if isinstance(client, str):
                self._batch[client] = env
        if isinstance(batch, int) and len(self._batch) < batch:
            return  # more orders of this dispatch are on their way
        await self._start_async(self._batch, key)
        await self._release_async()

    async def _start_async(self, orders: dict[str, Envelope],
                           key: tuple[str, int] | None) -> None:
        self._batch, self._batch_key = {}, None
        work = key[1] if key is not None else 0
        self._awaiting = None  # the aggregator answered: the next arrival may go
        now = self.stats.virtual_time
        for client in sorted(orders):
            index = self.population.index(client)
            drop = self.population.drops_out(index, work)
            at = now + self.population.duration(index, work)
            if drop:
                self._seq += 1
                number = self._seq
            else:
                number = await self._send_item(orders[client], client)
            heapq.heappush(self._events, _Event(at, number, client, drop))
        await self._dispatch()

    async def _send_item(self, order: Envelope, client: str, *,
                         order_id: str | None = None) -> int:
        """Queue one work item: train ``client`` from order ``order_id`` (default: this
        order) and answer as an update for ``order.round``. Returns the item's number."""
        c = self.config
        self._seq += 1
        number = self._seq
        item = Envelope(kind=TASK, job=c.job, sender=c.node_id, round=order.round,
                        meta={"order": order_id or order.msg_id, "client": client,
                              "state_dir": c.state_dir, "item": number})
        self._items[number] = _Item(client, order.round, encode(item))
        self._waiting.append(number)
        self.stats.items += 1
        return number

    # --- releasing updates to the aggregator ---------------------------------------------
    async def _drop(self, client: str) -> None:
        # Asynchronous: offline then online again. The async aggregator frees the client's
        # slot (its refill answers the release) and may pick it again later, as with a phone
        # that lost its connection for a while.
        await self._presence(client, "offline")
        await self._presence(client, "online")
        self.stats.dropouts += 1

    async def _deliver(self, client: str, payload: bytes) -> None:
        c = self.config
        await self.out.send(topics.update(c.job, c.aggregator, client), payload)
        self.stats.updates += 1

    async def _release_sync(self) -> None:
        while self._sync_queue and self._sync_queue[0][0] in self._results:
            number, client, _ = self._sync_queue.popleft()
            payload = self._results.pop(number)
            if payload:
                await self._deliver(client, payload)
            else:
                # Its training failed on the worker: lost for the round, like a dropout.
                await self._presence(client, "offline")
                self._dropped.append(client)

    async def _release_async(self) -> None:
        if self._awaiting is not None or not self._events:
            return
        head = self._events[0]
        if not head.drop and head.seq not in self._results:
            return  # the earliest arrival is still training
        heapq.heappop(self._events)
        self.stats.virtual_time = head.at
        payload = b"" if head.drop else self._results.pop(head.seq)
        if not payload:  # a dropout, or its training failed: a dropout at that time
            await self._drop(head.client)
        else:
            await self._deliver(head.client, payload)
        self._awaiting = time.monotonic()


def _few(names: list[str], limit: int = 5) -> str:
    """A short list for a message: the first few names and how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") or "none"
