"""Run a whole manifest in this process: every node on its own bus, until the aggregator ends.

Shared by the tests that run a federation on the memory broker, compare a topology's model
with the one-bus model or spy on what services subscribe to; ``bus_for`` says how each node
connects (memory, a broker, a spy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

from fedbus.bus import Bus
from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, NodeSpec
from fedbus.node import build_node


async def connect(m: Manifest, broker: MemoryBroker, *, skip: Collection[str] = (),
                  bus_for: Callable[[NodeSpec], Bus | None] | None = None) -> dict[str, Any]:
    """Build every node of ``m`` but ``skip`` on its own open bus: ``bus_for(node)`` where
    that gives one, else the node's bus on ``broker``. The services by node id."""
    services: dict[str, Any] = {}
    for n in m.nodes:
        if n.id in skip:
            continue
        bus = (bus_for(n) if bus_for else None) or make_bus(m, n, memory=broker)
        await bus.__aenter__()
        services[n.id] = build_node(m, n.id, bus)
    return services


async def run_all(services: Mapping[str, Any], *beside: Coroutine[Any, Any, None],
                  timeout: float = 60) -> None:
    """Run every service, and the ``beside`` coroutines (spies, attackers), until all end."""
    async with asyncio.timeout(timeout), asyncio.TaskGroup() as tg:
        for node_id, s in services.items():
            tg.create_task(s.run(), name=node_id)
        for coro in beside:
            tg.create_task(coro)


async def run_root(services: Mapping[str, Any], root: str = "agg",
                   timeout: float = 30) -> tuple[Any, dict[str, Any]]:
    """Run ``root`` until it ends with the other services beside it, then cancel those; the
    root service and the others by node id."""
    others = dict(services)
    agg = others.pop(root)
    async with asyncio.timeout(timeout):
        tasks = [asyncio.create_task(s.run(), name=i) for i, s in others.items()]
        await agg.run()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return agg, others


async def federate(m: Manifest, bus_for: Callable[[NodeSpec], Bus], *, agg: str = "agg",
                   timeout: float = 60) -> Any:
    """Build every node of ``m`` on ``bus_for(node)``, run them until ``agg`` finishes, stop
    the others and close every bus; the aggregator service."""
    buses = {n.id: bus_for(n) for n in m.nodes}
    services = {i: build_node(m, i, bus) for i, bus in buses.items()}
    for bus in buses.values():
        await bus.__aenter__()
    try:
        root, _ = await run_root(services, agg, timeout)
    finally:
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    return root
