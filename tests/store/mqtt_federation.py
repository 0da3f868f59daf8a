"""A store federation over a real broker, each node on its own connection (shared by the
store tests that run one over mosquitto)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fedbus import topics
from fedbus.bus import Bus
from fedbus.connect import make_bus
from fedbus.manifest import Manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.services.store import StoreService


@dataclass
class Running:
    agg: Aggregator
    store: StoreService
    #: the store's run(); it ends with the job when ``exit_on_done``
    store_task: asyncio.Task[Any]
    buses: dict[str, Bus]


@contextlib.asynccontextmanager
async def store_federation(m: Manifest, trainers: tuple[str, ...]) -> AsyncIterator[Running]:
    """The store first (subscribed once it says it is online), then ``trainers``; the test
    runs the aggregator. Every task is cancelled on the way out (trainers on an anonymous
    broker do not trust `done`)."""
    buses = {n.id: make_bus(m, n) for n in m.nodes}
    services: dict[str, Any] = {n: build_node(m, n, bus) for n, bus in buses.items()}
    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        tasks: list[asyncio.Task[Any]] = []
        try:
            async with buses["agg"].subscribe(topics.presence(m.job, "store")) as presence:
                tasks.append(asyncio.create_task(services["store"].run()))
                await presence.get(timeout=30)
            tasks += [asyncio.create_task(services[t].run()) for t in trainers]
            yield Running(services["agg"], services["store"], tasks[0], buses)
        finally:
            await cancelled(tasks)


async def cancelled(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
