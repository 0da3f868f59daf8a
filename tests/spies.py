"""Test doubles that watch a federation on the memory broker: a FedBuff that records every
model version, a watcher of topics until the job is done, spying buses and their wiring check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from fedbus import topics
from fedbus.bus import Message
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Envelope, decode
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, NodeSpec, compile_wiring
from fedbus.wire import DONE, GRANT, UPDATE
from strategies import ClientUpdate, FedBuff, Weights

B = TypeVar("B", bound=MemoryBus)


class RecordingFedBuff(FedBuff):
    """FedBuff that keeps every model version and every update with the version it met."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.models: dict[int, np.ndarray] = {}
        self.submitted: list[tuple[int, ClientUpdate]] = []

    def init(self, weights: Weights, version: int = 0) -> None:
        super().init(weights, version)
        self.models[version] = np.array(weights["w"], copy=True)

    def submit(self, update: ClientUpdate) -> Weights | None:
        self.submitted.append((self.version, update))
        moved = super().submit(update)
        if moved is not None:
            self.models[self.version] = moved["w"].copy()
        return moved


async def watch(broker: MemoryBroker, filters: Iterable[str],
                see: Callable[[Message, Envelope], None]) -> None:
    """Hand ``see`` every message on ``filters`` (decoded) until the job's ``done``; include
    the root's model topic in ``filters``, which carries it."""
    async with MemoryBus(broker, "watcher") as bus, bus.subscribe(*filters) as sub:
        async for msg in sub:
            env = decode(msg.payload)
            if env.kind == DONE:
                return
            see(msg, env)


def gated(base: Manifest, size: int, lr: float, burst_mb: float = 0.0) -> Manifest:
    """``base`` with toy updates of ``size`` floats (above the 1 MB chunk size from 300,000)
    uncompressed, and two upload slots; the orders grant ``burst_mb`` of uploads (default
    none: every update goes through the slots)."""
    return dataclasses.replace(
        base,
        round=dataclasses.replace(base.round, max_uploads=2, upload_burst_mb=burst_mb),
        task=dataclasses.replace(base.task, params={"size": size, "lr": lr}),
        codec=dataclasses.replace(base.codec, level=0),  # toy deltas would compress away
    )


class GrantSpy:
    """Counts the uploads the root ``agg`` of job ``toy`` has granted and not yet received;
    ``peak``: the most at once. Run it beside the federation until the job is done."""

    def __init__(self) -> None:
        self.granted: set[str] = set()
        self.peak = 0

    async def __call__(self, broker: MemoryBroker, m: Manifest) -> None:
        await watch(broker, [topics.updates_for("toy", "agg"), "fedbus/v1/toy/control/+",
                             topics.model("toy", "agg")], self._see)

    def _see(self, msg: Message, env: Envelope) -> None:
        if env.kind == GRANT:
            self.granted.add(topics.parse(msg.topic).sender)
            self.peak = max(self.peak, len(self.granted))
        elif env.kind == UPDATE:
            self.granted.discard(env.sender)


def stand_in(cls: type[B], m: Manifest, broker: MemoryBroker, node: str, **kw: Any) -> B:
    """A ``cls`` bus (a ``MemoryBus`` that misbehaves or spies) for ``node`` on ``broker``,
    with the will and birth its real bus would have."""
    real = make_bus(m, m.node(node), memory=broker)
    return cls(broker, node, will=real.will, birth=real.birth, **kw)


def spy_buses(m: Manifest, broker: MemoryBroker
              ) -> tuple[dict[str, Any], Callable[[NodeSpec], Any]]:
    """Spying buses (test_hostile's ``SpyBus``): the spies by node id, filled in as
    ``bus_for(node)`` makes them."""
    from test_hostile import SpyBus

    spies: dict[str, SpyBus] = {}

    def bus_for(n: NodeSpec) -> SpyBus:
        spies[n.id] = stand_in(SpyBus, m, broker, n.id)
        return spies[n.id]

    return spies, bus_for


def assert_follows_wiring(m: Manifest, spies: Mapping[str, Any], nodes: Iterable[str]) -> None:
    """Each of ``nodes`` subscribed to what its wiring says and published nowhere else."""
    wiring = compile_wiring(m)
    for node in nodes:
        # NACK filters are the bus's own, taken once it sends a chunked payload
        expected = {f for f in wiring[node].subscribe if "/nack/" not in f}
        assert spies[node].subscribed - set(wiring[node].subscribe) == set(), node
        assert spies[node].subscribed >= expected, node
        assert spies[node].published <= set(wiring[node].publish), (
            node, spies[node].published - set(wiring[node].publish))
