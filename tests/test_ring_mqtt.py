"""Hybrid ring groups over a real mosquitto: a member killed mid-ring makes its group fall
back, and the round completes with the survivors (no hang)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from federation import run_all

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.connect import make_bus
from fedbus.errors import PublishDenied, SubscribeDenied
from fedbus.manifest import BrokerSpec, parse_manifest, with_broker
from fedbus.node import build_node
from tests.conftest import SecureBrokerFactory

pytestmark = pytest.mark.broker

# 300k float32 parameters: the committer's group update (1.2 MB) goes through the upload gate
# and the ring's chunks (400 KB) through the broker like any message.
TASK = {"ref": "examples.toy.task:make_task",
        "params": {"size": 300_000, "lr": 0.4, "speeds": [0.0, 1.0, 0.0, 0.0]}}


async def test_a_member_killed_mid_ring_over_mosquitto_and_the_round_completes(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: a ring of three (t1 trains slowly) and one trainer alone; t2 is killed
    # right after its first reduce step, while t0 and t1 are inside the ring
    m = with_broker(parse_manifest({
        "version": 1, "job": "ringmq", "rounds": 2, "seed": 3, "task": TASK,
        "round": {"deadline_s": 20, "quorum": 0.5, "min_clients": 4, "start_timeout_s": 20},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 4, "prefix": "t"},
        "groups": [{"id": "ring-a", "members": ["t0", "t1", "t2"], "step_timeout_s": 4}],
    }), BrokerSpec(host=mosquitto.host, port=mosquitto.port))
    buses = {n.id: make_bus(m, n) for n in m.nodes}
    services: dict[str, Any] = {}
    for node, bus in buses.items():
        services[node] = build_node(m, node, bus)
        await bus.__aenter__()
    agg = services.pop("agg")
    watcher = MqttBus("watcher", mosquitto.host, mosquitto.port)

    async def kill_t2_after_its_first_step() -> None:
        async with watcher, watcher.subscribe(topics.ring("ringmq", "ring-a", "t0", "t2")) as sub:
            await sub.get(timeout=60)
            await buses["t2"].kill()  # TCP gone, no goodbye: the broker sends its will

    # Execute
    try:
        async with asyncio.timeout(90):
            tasks = [asyncio.create_task(s.run(), name=i) for i, s in services.items()]
            killer = asyncio.create_task(kill_t2_after_its_first_step())
            await agg.run()
            await killer
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    # Assert: round 1 ended with the survivors' own updates, long before its deadline
    first = agg.history[0]
    assert first.accepted == ["t0", "t1", "t3"] and first.lost == ["t2"], first
    assert first.aggregated and first.seconds < 15
    assert services["t0"].outcomes["fallback"] == 1
    assert services["t1"].outcomes["fallback"] == 1
    # round 2: the two survivors ring again and t0 commits for both
    assert agg.history[1].accepted == ["t0", "t1", "t3"]
    assert services["t0"].outcomes["committed"] == 1
    assert agg.rejections.total == 0


async def test_rings_run_behind_a_broker_that_allows_only_the_wiring(
        secure_mosquitto: SecureBrokerFactory) -> None:
    # Prepare: a broker that knows only the manifest's nodes and their wiring (dynsec);
    # 1 KB chunks, so every ring step and the committed update travel in chunks
    sb = await secure_mosquitto(parse_manifest({
        "version": 1, "job": "ringsec", "rounds": 2, "seed": 1,
        "broker": {"host": "127.0.0.1", "port": 1883, "chunk_bytes": 1024},
        "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 4, "start_timeout_s": 20},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 4000, "lr": 0.5}},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
        "trainers": {"count": 4, "prefix": "t"},
        "groups": [{"id": "ring-a", "members": ["t0", "t1", "t2"]}],
    }))
    m = sb.manifest
    buses = {n.id: make_bus(m, n) for n in m.nodes}
    services = {n: build_node(m, n, bus) for n, bus in buses.items()}
    # Execute: the job (trainers trust `done` on an authenticated broker and end), then a
    # stranger (t3) and a member (t1) try ring topics that are not theirs
    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        await run_all(services)
    refused: list[str] = []
    for user, topic in [("t3", topics.ring("ringsec", "ring-a", "t0", "t3")),
                        ("t1", topics.ring("ringsec", "ring-a", "t0", "t2"))]:
        async with MqttBus(user, sb.host, sb.port,
                           options=MqttOptions(username=user, password=sb.password(user))) as bus:
            with contextlib.suppress(PublishDenied):
                await bus.publish(topic, b"forged")
                refused.append(f"{user} published")
            with contextlib.suppress(SubscribeDenied):
                async with bus.subscribe(topics.ring_inbox("ringsec", "ring-a", "t0")):
                    refused.append(f"{user} read t0's ring inbox")
    # Assert: every round's ring committed through the ACL, nothing of ours was refused,
    # and the ring topics were closed to everyone but their member
    agg = services["aggregator"]
    assert [r.accepted for r in agg.history] == [["t0", "t1", "t2", "t3"]] * 2
    # (t1 and t2 only ever sent to the ring: their acceptance is the ring's commit.) t0
    # counts its last commit once it has told the ring, and the job's `done` can end it
    # first: the aggregator folds the commit as soon as it lands.
    assert set(services["t0"].outcomes) == {"committed"}
    assert services["t0"].outcomes["committed"] in (1, 2)
    assert all(services[n].outcomes.get("fallback", 0) == 0 for n in ("t0", "t1", "t2"))
    assert all(b.stats["publish_denied"] == 0 for b in buses.values())
    assert refused == []
