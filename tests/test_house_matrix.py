"""The features compose: every ``codec.update`` mode x {star, relay, async root} with a store
that keeps full updates. Every update the root aggregator folds is recorded by the store,
dense and equal to what was folded (the store opens updates through the same front door and
codec stages as the aggregator), and every consumer counts a forgery of its own input."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus import topics
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Envelope, encode
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.wire import ROUND, UPDATE

CODECS = ["none", "fp16", "int8", "topk"]
TOPOLOGIES = ["star", "relay", "async"]
ROUNDS = 3


def manifest(tmp: Path, topology: str, codec: str) -> Manifest:
    nodes: list[dict[str, Any]] = [{"id": "agg", "role": "aggregator"},
                                   {"id": "store", "role": "store"}]
    if topology == "relay":
        nodes += [{"id": "r0", "role": "relay", "parent": "agg"},
                  {"id": "r1", "role": "relay", "parent": "agg"}]
        nodes += [{"id": f"t{i}", "role": "trainer", "parent": f"r{i % 2}", "partition": i}
                  for i in range(4)]
    else:
        nodes += [{"id": f"t{i}", "role": "trainer", "parent": "agg", "partition": i}
                  for i in range(4)]
    strategy: dict[str, Any] = {"name": "fedavg"}
    if topology == "async":
        strategy = {"name": "fedbuff", "params": {"buffer_size": 2}}
    update: Any = {"mode": "topk", "fraction": 0.2} if codec == "topk" else codec
    return parse_manifest({
        "version": 1, "job": "mx", "seed": 5, "rounds": ROUNDS, "strategy": strategy,
        "codec": {"update": update},
        "round": {"deadline_s": 20, "min_clients": 2 if topology == "relay" else 4,
                  "start_timeout_s": 20},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 300}},
        "nodes": nodes,
        "store": {"dir": str(tmp / "store"), "sketch_dim": 64,
                  "full_update_rounds": ROUNDS + 1, "precompute": False},
    })


async def until(condition: Any, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - presence state has no event to await
            await asyncio.sleep(0.005)


def forged_update(m: Manifest, to: str, as_: str, really: str) -> tuple[str, bytes]:
    """An update on ``as_``'s topic whose envelope names ``really``: a spoofed sender."""
    env = Envelope(kind=UPDATE, job=m.job, sender=really, round=1,
                   meta={"num_examples": 1}, tensors={"m/w": np.zeros(300, np.float32)})
    return topics.update(m.job, to, as_), encode(env)


async def run(m: Manifest) -> dict[str, Any]:
    broker = MemoryBroker()
    services: dict[str, Any] = {}
    buses = []
    for node in m.nodes:
        bus = make_bus(m, node, memory=broker)
        await bus.__aenter__()
        buses.append(bus)
        services[node.id] = build_node(m, node.id, bus)
    try:
        async with asyncio.timeout(90), MemoryBus(broker, "mallory") as evil:
            tasks = {i: asyncio.create_task(s.run(), name=i) for i, s in services.items()}
            # every consumer listening (its children's presence came in) before the forgeries
            await services["store"].started.wait()
            groups = [s.group if hasattr(s, "group") else s for i, s in services.items()
                      if m.node(i).role in ("aggregator", "relay")]
            await until(lambda: all(g.online for g in groups))
            # one forgery per consumer, before the job starts: updates whose envelope lies
            # about their sender (aggregator, relays and the store all receive them)
            parents = {n.parent for n in m.nodes if n.role in ("trainer", "relay")}
            for parent in sorted(p for p in parents if p is not None):
                child = next(n.id for n in m.nodes
                             if n.parent == parent and n.role in ("trainer", "relay"))
                await evil.publish(*forged_update(m, parent, child, "mallory"))
            # and a round order to a trainer from someone who is not its parent
            trainer = next(n for n in m.nodes if n.role == "trainer")
            order = Envelope(kind=ROUND, job=m.job, sender="mallory", round=1,
                             meta={"selected": [trainer.id], "config": {}},
                             tensors={"m/w": np.zeros(300, np.float32)})
            assert trainer.parent is not None
            await evil.publish(topics.model(m.job, trainer.parent), encode(order))
            await tasks["agg"]
            await asyncio.wait_for(tasks["store"], 30)
            for t in tasks.values():
                t.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
    finally:
        for bus in buses:
            await bus.__aexit__(None, None, None)
    return services


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_every_folded_update_is_recorded_and_every_consumer_counts_forgeries(
        tmp_path: Path, topology: str, codec: str) -> None:
    # Prepare
    m = manifest(tmp_path, topology, codec)
    # Execute
    services = await run(m)
    agg, store = services["agg"], services["store"]
    # Assert: what the root folded, the store recorded, version by version
    folded = Counter(c for r in agg.history for c in r.accepted)
    recorded = {r: rec.get("clients", {}) for r, rec in store.store.records.items()}
    assert folded
    if topology == "async":
        # a version is filed by arrival, and updates still in flight when the job ends are
        # recorded too: at least every folded update, client by client
        got = Counter(c for clients in recorded.values() for c in clients)
        assert all(got[c] >= n for c, n in folded.items()), (folded, got)
    else:  # a synchronous round: exactly the folded senders, round by round
        for report in agg.history:
            assert sorted(recorded[report.round]) == sorted(report.accepted), report.round
    # ... dense, in the model's dtype, as the aggregator folded it
    r, clients = next((r, c) for r, c in recorded.items() if c)
    delta = await store.store.update(r, next(iter(clients)))
    assert delta is not None and delta["w"].dtype == np.float32 and delta["w"].shape == (300,)
    bad = {"wrong_dtype", "wrong_shape", "wrong_tensors", "bad_update_codec"}
    assert not bad & set(store.rejections.counts), store.rejections.counts
    # every consumer counted the forgery of its own input
    assert agg.rejections.counts["spoofed_sender"] >= 1
    assert store.rejections.counts["spoofed_sender"] >= 1
    for relay in ("r0", "r1") if topology == "relay" else ():
        assert services[relay].group.rejections.counts["spoofed_sender"] >= 1
    trainer = next(s for i, s in services.items() if i.startswith("t"))
    assert trainer.rejections.counts["spoofed_sender"] >= 1
