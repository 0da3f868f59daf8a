"""Run a simulation: the real aggregator (``build_node``: same strategy, selector, checks) plus
a coordinator and K workers hosting the population's virtual clients.

On the in-process memory bus (the default: no broker, nothing to set up) the workers are K
objects in this process; against a broker, ``run_workers`` starts more in other processes or
machines, and they share the work through the broker's ``$share`` group.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import structlog

from fedbus._malloc import tune_for_rounds
from fedbus.bus import Bus
from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.errors import FedbusError, ManifestError
from fedbus.manifest import Manifest, NodeSpec
from fedbus.node import build_node, codec_compression, codec_limits
from fedbus.services.aggregator import Aggregator, RoundReport
from fedbus.services.async_aggregator import AsyncAggregator
from fedbus.sim.coordinator import Coordinator, CoordinatorConfig, SimStats
from fedbus.sim.population import Population
from fedbus.sim.rehearsal import AsyncRehearsal, Rehearsal
from fedbus.sim.tasks import ClientTasks, open_population_task
from fedbus.sim.worker import VirtualWorker, WorkerConfig
from strategies import StrategyError, Weights

__all__ = ["SimResult", "default_workers", "run_simulation", "run_workers"]

log = structlog.get_logger(__name__)

#: Called with each round's report and the aggregator, before the next report is read.
OnReport = Callable[[RoundReport, Aggregator | AsyncAggregator], Awaitable[None]]


@dataclass(slots=True)
class SimResult:
    weights: Weights
    history: list[RoundReport]
    stats: SimStats
    #: The best model by the periodic evaluation (accuracy, else lowest loss), if kept.
    best_weights: Weights | None = None
    best_round: int | None = None
    best_score: float | None = None
    worker_items: dict[str, int] = field(default_factory=dict)


def default_workers(m: Manifest) -> int:
    assert m.population is not None
    return m.population.workers or os.cpu_count() or 1


def _population(m: Manifest) -> Population:
    if m.population is None:
        raise ManifestError(m.source, "population", "this manifest declares no population; "
                            "add population: {clients: N, per_round: K} to simulate")
    return Population(m.population, m.seed)


def coordinator_id(m: Manifest) -> str:
    return f"{m.aggregator.id}-sim"


def _bus(m: Manifest, node_id: str, role: str, memory: MemoryBroker | None) -> Bus:
    # make_bus only uses the role to label the presence messages (will and birth).
    return make_bus(m, NodeSpec(id=node_id, role=cast(Any, role)), memory=memory)


def _quiet_torch() -> None:
    # One intra-op thread: several workers train at once, and a fixed thread count keeps
    # torch's reductions in the same order, run to run.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _workers(m: Manifest, count: int, memory: MemoryBroker | None,
             prefix: str) -> list[tuple[Bus, VirtualWorker]]:
    population = _population(m)
    agg = m.aggregator.id
    out = []
    for k in range(count):
        node_id = f"{prefix}{k}"
        bus = _bus(m, node_id, "sim_worker", memory)
        config = WorkerConfig(job=m.job, node_id=node_id, aggregator=agg,
                              coordinator=coordinator_id(m), compression=codec_compression(m),
                              limits=codec_limits(m), update_codec=m.codec.update,
                              order_cache=max(64, 2 * population.spec.per_round + 8))
        out.append((bus, VirtualWorker(config, bus, ClientTasks(m), population)))
    _quiet_torch()
    return out


def _score(report: RoundReport) -> float | None:
    if report.eval is None:
        return None
    if "accuracy" in report.eval.metrics:
        return float(report.eval.metrics["accuracy"])
    return -float(report.eval.loss)


async def run_simulation(
    m: Manifest,
    *,
    workers: int | None = None,
    remote_workers: int = 0,
    memory: MemoryBroker | None = None,
    on_report: OnReport | None = None,
) -> SimResult:
    """Run the whole simulation in this process (plus ``remote_workers`` elsewhere).

    The memory bus is used when ``memory`` is given or the manifest names no broker;
    otherwise every connection goes to the manifest's broker.
    """
    population = _population(m)
    spec = population.spec
    if memory is None and m.broker is None:
        memory = MemoryBroker()
    local = default_workers(m) if workers is None else workers
    if local + remote_workers < 1:
        raise ManifestError(m.source, "population.workers", "a simulation needs at least one "
                            "worker (local or remote)")
    own_dir = spec.state_dir is None
    state_dir = tempfile.mkdtemp(prefix=f"fedbus-sim-{m.job}-") if own_dir else spec.state_dir
    assert state_dir is not None
    try:
        return await _run(m, population, local, remote_workers, memory, state_dir, on_report)
    finally:
        if own_dir:
            shutil.rmtree(state_dir, ignore_errors=True)


async def _run(m: Manifest, population: Population, local: int, remote: int,
               memory: MemoryBroker | None, state_dir: str,
               on_report: OnReport | None) -> SimResult:
    spec = population.spec
    agg_id = m.aggregator.id
    server_task = open_population_task(m, None)
    agg_bus = make_bus(m, m.aggregator, memory=memory)
    agg: Aggregator | AsyncAggregator = build_node(m, agg_id, agg_bus, task=server_task)
    if spec.rehearsal:
        rehearse = getattr(server_task, "rehearse", None)
        if not callable(rehearse):
            raise ManifestError(m.source, "population.rehearsal",
                                f"task {m.task.ref} has no rehearse(weights) method")
        if isinstance(agg, Aggregator):
            agg.strategy = Rehearsal(agg.strategy, rehearse)
        else:
            try:
                agg.strategy = AsyncRehearsal(agg.strategy, rehearse)
            except StrategyError as exc:
                raise ManifestError(m.source, "population.rehearsal", str(exc)) from None
    pool = _workers(m, local, memory, prefix=f"w{os.getpid()}-")
    coord_bus = _bus(m, coordinator_id(m), "sim_coordinator", memory)
    coordinator = Coordinator(
        CoordinatorConfig(job=m.job, node_id=coordinator_id(m), aggregator=agg_id,
                          workers=local + remote, state_dir=state_dir, limits=codec_limits(m),
                          start_timeout_s=m.round.start_timeout_s),
        coord_bus, population)
    best: dict[str, Any] = {}

    async def follow() -> None:
        while True:
            report = await agg.reports.get()
            if on_report is not None:
                await on_report(report, agg)
            score = _score(report)
            # An async aggregator may have moved on already; only snapshot the model the
            # report is about.
            current = not isinstance(agg, AsyncAggregator) or agg.version == report.round
            if (spec.keep_best and score is not None and current
                    and (not best or score > best["score"])):
                best.update(score=score, round=report.round,
                            weights={k: np.array(v, copy=True) for k, v in agg.weights.items()})
            if report.round >= m.rounds:
                return

    # The manifest's metadata stores record the simulation as they would a deployment.
    store_buses = {n.id: make_bus(m, n, memory=memory) for n in m.nodes if n.role == "store"}
    stores = {i: build_node(m, i, bus) for i, bus in store_buses.items()}

    async with contextlib.AsyncExitStack() as stack:
        for bus, _ in pool:
            await stack.enter_async_context(bus)
        for bus in store_buses.values():
            await stack.enter_async_context(bus)
        await stack.enter_async_context(coord_bus)
        await stack.enter_async_context(agg_bus)
        store_jobs = await _start_stores(stores, m.round.start_timeout_s)
        try:
            async with asyncio.TaskGroup() as tg:
                jobs = [tg.create_task(w.run(), name=w.config.node_id) for _, w in pool]
                coord_job = tg.create_task(coordinator.run(), name="sim-coordinator")
                agg_job = tg.create_task(agg.run(), name=agg_id)
                tg.create_task(follow(), name="sim-reports")
            if store_jobs:  # the aggregator's `done` ends them; a bounded wait for their flush
                await asyncio.wait(store_jobs, timeout=_STORE_FLUSH_S)
        finally:
            await _stop(store_jobs)
    return SimResult(
        weights=agg_job.result(),
        history=list(agg.history),
        stats=coord_job.result(),
        best_weights=best.get("weights"),
        best_round=best.get("round"),
        best_score=best.get("score"),
        worker_items={w.config.node_id: j.result() for (_, w), j in zip(pool, jobs, strict=True)},
    )


#: How long a store may take to write its last round once the simulation is done.
_STORE_FLUSH_S = 30.0


async def _start_stores(stores: dict[str, Any], timeout: float) -> list[asyncio.Task[Any]]:
    """Run the stores and wait until each is subscribed (else it would miss round 1)."""
    jobs = [asyncio.create_task(s.run(), name=i) for i, s in stores.items()]
    try:
        for job, store in zip(jobs, stores.values(), strict=True):
            started = asyncio.ensure_future(store.started.wait())
            await asyncio.wait({started, job}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if job.done():
                job.result()  # it failed to start: say why
                raise FedbusError(f"store {job.get_name()!r} stopped as it started")
            if not store.started.is_set():
                raise TimeoutError(f"store {job.get_name()!r} did not start in {timeout:g}s")
    except BaseException:
        await _stop(jobs)
        raise
    return jobs


async def _stop(jobs: list[asyncio.Task[Any]]) -> None:
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


async def run_workers(m: Manifest, count: int, *, prefix: str | None = None) -> dict[str, int]:
    """Serve as ``count`` workers against the manifest's broker until the job is done."""
    if m.broker is None:
        raise ManifestError(m.source, "broker", "simulation workers in their own process need "
                            "a broker: pass --broker HOST:PORT")
    tune_for_rounds()  # a worker process only trains: reuse model-sized buffers
    pool = _workers(m, count, None, prefix=prefix or f"w{os.getpid()}-")
    async with contextlib.AsyncExitStack() as stack:
        for bus, _ in pool:
            await stack.enter_async_context(bus)
        async with asyncio.TaskGroup() as tg:
            jobs = [tg.create_task(w.run(), name=w.config.node_id) for _, w in pool]
    return {w.config.node_id: j.result() for (_, w), j in zip(pool, jobs, strict=True)}

