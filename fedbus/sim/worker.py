"""A simulation worker: one task, one model, running virtual clients one after another.

Work items come from the coordinator on the worker's own ``task/<coordinator>/<worker>``: the
coordinator hands each to one worker with room for it (a few items ahead of its training), in
one process on the memory bus or in many processes and machines through the broker, and gives
a worker's unfinished items to the others when its presence goes offline. The global model
comes from the aggregator's own ``model/<agg>`` broadcast (asynchronous: the per-client
``work/<client>/<agg>`` orders), exactly as a trainer receives it. For each item the worker
loads the client's data partition and saved state, trains from the round's model, saves the
state and sends the delta back to the coordinator, which hands it to the aggregator in a fixed
order.

Training is deterministic per client and round (the task seeds from its partition and the
round), never from which worker runs it, so any number of workers gives the same model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from fedbus import topics
from fedbus.bus import Bus, Message, Subscription
from fedbus.clientside import ClientSide, split_state
from fedbus.codec import Compression, Envelope, Limits, encode
from fedbus.compress import UpdateCodec
from fedbus.door import Door, Entry
from fedbus.errors import FedbusError, UpdateRejected
from fedbus.sim.population import Population
from fedbus.sim.store import ClientStateStore
from fedbus.sim.tasks import ClientTasks, StatefulTask
from fedbus.wire import DONE, PRESENCE, ROUND, UPDATE, join_tensors, presence, split_model

__all__ = ["TASK", "VirtualWorker", "WorkerConfig"]

log = structlog.get_logger(__name__)

#: Coordinator -> a worker: train one client from one round order.
TASK = "sim_task"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    job: str
    node_id: str
    aggregator: str
    coordinator: str
    compression: Compression = Compression()
    limits: Limits = Limits()
    #: Round orders kept for work items that arrive later (async: one order per dispatch).
    order_cache: int = 256
    #: The manifest's ``codec.update``: applied by every virtual client, as by a trainer.
    update_codec: UpdateCodec = UpdateCodec()
    #: How long the coordinator may stay offline (a reconnect) before this worker stops: a
    #: simulation that failed or was stopped sends no `done`, and its workers must not wait
    #: forever.
    coordinator_grace_s: float = 10.0


class VirtualWorker:
    """Runs work items until the aggregator says the job is done; returns items trained."""

    def __init__(self, config: WorkerConfig, bus: Bus, tasks: ClientTasks,
                 population: Population) -> None:
        self.config = config
        self.bus = bus
        self.tasks = tasks
        self.population = population
        #: Opened on the first work item, at the folder the coordinator names in it (shared by
        #: every worker of the run, whatever process it is in).
        self.store: ClientStateStore | None = None
        self.trained = 0
        self.busy_s = 0.0
        self._orders: OrderedDict[str, Envelope] = OrderedDict()
        self._parked: dict[str, list[Envelope]] = {}
        self._coordinator_seen = False
        self._coordinator_gone: float | None = None  # monotonic time it went offline
        #: The client-side chain (DP, update compression) every virtual client runs.
        self._client = ClientSide(config.update_codec)
        self._log = log.bind(node=config.node_id, role="sim_worker", job=config.job)
        # The front door: round orders and `done` from the aggregator (asynchronous ones on
        # the clients' work topics), work items from the coordinator.
        c, agg = config, frozenset({config.aggregator})
        self.door = Door(c.job, c.node_id)
        self.rejections = self.door.rejections
        self.door.expect(Entry(topics.model(c.job, c.aggregator), frozenset({ROUND, DONE}),
                               senders=agg, limits=c.limits, dedupe=False))
        self.door.expect(Entry(topics.work_from(c.job, c.aggregator), frozenset({ROUND}),
                               senders=agg, limits=c.limits, dedupe=False))
        self.door.expect(Entry(topics.sim_tasks(c.job, c.coordinator, c.node_id),
                               frozenset({TASK}),
                               senders=frozenset({c.coordinator}), limits=c.limits))
        self.door.expect(Entry(topics.presence(c.job, c.coordinator), frozenset({PRESENCE}),
                               senders=frozenset({c.coordinator}), dedupe=False))

    async def run(self) -> int:
        c = self.config
        work = topics.sim_tasks(c.job, c.coordinator, c.node_id)
        # asynchronous orders come one per client on work/<client>/<agg>; workers serve them all
        async with self.bus.subscribe(topics.model(c.job, c.aggregator),
                                      topics.work_from(c.job, c.aggregator), work,
                                      topics.presence(c.job, c.coordinator)) as sub:
            await self._presence("online")
            try:
                while True:
                    msg = await self._next(sub)
                    if not msg.payload:
                        continue  # a retained message cleared
                    adm = await self.door.open(msg)
                    if adm is None:
                        continue
                    env = adm.env
                    if env.kind == DONE:
                        break
                    if env.kind == PRESENCE:
                        self._on_coordinator(env.meta.get("status") == "online")
                        continue
                    if env.kind == ROUND:
                        self._remember(env)
                        for item in self._parked.pop(env.msg_id, []):
                            await self._train(item)
                    else:
                        await self._train(env)
            finally:
                with contextlib.suppress(FedbusError):
                    await self._presence("offline")
        self._log.info("worker_done", trained=self.trained, busy_s=round(self.busy_s, 3))
        return self.trained

    async def _next(self, sub: Subscription) -> Message:
        """The next message; FedbusError once the coordinator has been offline (after it was
        online) for ``coordinator_grace_s``."""
        if self._coordinator_gone is None:
            return await sub.get()
        left = self._coordinator_gone + self.config.coordinator_grace_s - time.monotonic()
        try:
            return await sub.get(timeout=max(0.0, left))
        except TimeoutError:
            raise FedbusError(
                f"the simulation's coordinator {self.config.coordinator} went offline before "
                f"the job was done and did not come back in {self.config.coordinator_grace_s:g}"
                f"s; worker {self.config.node_id} stops (trained {self.trained} clients)"
            ) from None

    def _on_coordinator(self, online: bool) -> None:
        if online:
            self._coordinator_seen, self._coordinator_gone = True, None
        elif self._coordinator_seen and self._coordinator_gone is None:
            # An earlier run's coordinator left an "offline" behind: only a coordinator seen
            # online in this worker's life can go away.
            self._coordinator_gone = time.monotonic()
            self._log.info("coordinator_offline", coordinator=self.config.coordinator,
                              grace_s=self.config.coordinator_grace_s)

    def _remember(self, order: Envelope) -> None:
        self._orders[order.msg_id] = order
        while len(self._orders) > self.config.order_cache:
            self._orders.popitem(last=False)

    async def _train(self, item: Envelope) -> None:
        order_id = str(item.meta.get("order", ""))
        client = str(item.meta.get("client", ""))
        number = item.meta.get("item")
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            self.rejections.reject("bad_work_item", f"item={number!r}"[:80], sender=client[:64])
            return
        order = self._orders.get(order_id)
        if order is None:
            # The item overtook its round order (they come from different publishers).
            self._parked.setdefault(order_id, []).append(item)
            return
        state_dir = item.meta.get("state_dir")
        if isinstance(state_dir, str) and (self.store is None or
                                           str(self.store.root) != state_dir):
            self.store = ClientStateStore(state_dir, limits=self.config.limits)
        started = time.monotonic()
        try:
            update = await asyncio.to_thread(self._fit, order, client, item.round)
        except Exception as exc:  # often the user's task: report it, go on with the next
            if isinstance(exc, FedbusError):
                self._log.error("client_failed", client=client, error=str(exc))
            else:
                self._log.exception("task_raised", client=client, error=repr(exc))
            update = b""  # an empty result: the coordinator counts the client as dropped
        else:
            self.trained += 1
            self._log.debug("client_trained", client=client, round=item.round, item=number)
        self.busy_s += time.monotonic() - started
        c = self.config
        await self.bus.publish(topics.sim_result(c.job, c.coordinator, client, number), update)

    def _fit(self, order: Envelope, client: str, round: int) -> bytes:
        """Train ``client`` from the order's model; answer as its update for ``round`` (the
        order's own round, or a later one for a stale update)."""
        c = self.config
        index = self.population.index(client)
        config: Mapping[str, Any] = order.meta.get("config", {})
        if not isinstance(config, Mapping):
            raise FedbusError(f"round order {order.msg_id} has no config mapping")
        try:
            weights, extra = split_model(order)
        except UpdateRejected as exc:
            raise FedbusError(f"round order {order.msg_id}: {exc}") from None
        task = self.tasks.for_client(index)
        task.set_weights(weights)
        saved = self.store.get(client) if self.store is not None else {}
        task_state, chain_state = split_state(saved)
        stateful = self.store is not None and isinstance(task, StatefulTask)
        if stateful:
            assert isinstance(task, StatefulTask)
            task.load_client_state(task_state)
        result = task.fit(config, extra)
        if result.num_examples <= 0:
            raise FedbusError(f"client {client} trained on 0 examples")
        local = task.get_weights()
        delta = {k: (local[k] - weights[k]).astype(weights[k].dtype, copy=False) for k in weights}
        self._client.load_state(chain_state)
        prepared = self._client.prepare(delta, result.metrics, config, client)
        if self.store is not None and (stateful or self._client.stateful):
            own = task.client_state() if isinstance(task, StatefulTask) and stateful else {}
            self.store.put(client, {**own, **self._client.state()})
        env = Envelope(
            kind=UPDATE, job=c.job, sender=client, round=round,
            meta={"num_examples": int(result.num_examples), "metrics": prepared.metrics,
                  "worker": c.node_id, "work": order.msg_id, **prepared.meta},
            tensors=join_tensors(prepared.tensors, result.aux),
        )
        return encode(env, c.compression)

    async def _presence(self, status: str) -> None:
        c = self.config
        env = presence(c.job, c.node_id, "sim_worker", status)
        await self.bus.publish(topics.presence(c.job, c.node_id), encode(env), retain=True)


