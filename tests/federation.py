"""Run a whole manifest in this process: every node on its own bus, until the aggregator ends.

Shared by the tests that compare a topology's model with the one-bus model or spy on what
services subscribe to; ``bus_for`` says how each node connects (memory, a broker, a spy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fedbus.bus import Bus
from fedbus.manifest import Manifest, NodeSpec
from fedbus.node import build_node


async def federate(m: Manifest, bus_for: Callable[[NodeSpec], Bus], *, agg: str = "agg",
                   timeout: float = 60) -> Any:
    """Build every node of ``m`` on ``bus_for(node)``, run them until ``agg`` finishes, stop
    the others and close every bus; the aggregator service."""
    buses = {n.id: bus_for(n) for n in m.nodes}
    services = {i: build_node(m, i, bus) for i, bus in buses.items()}
    root = services.pop(agg)
    for bus in buses.values():
        await bus.__aenter__()
    try:
        async with asyncio.timeout(timeout):
            tasks = [asyncio.create_task(s.run(), name=i) for i, s in services.items()]
            await root.run()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    return root
