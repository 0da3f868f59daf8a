"""Asynchronous federations through relays (issue #9): exact staleness across levels, fast
trainers never held back by slow ones, bounded forwarding, the upload gate at every level,
liveness of a relay's subtree and late joiners, and the wiring the services really use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
from federation import connect
from federation import federate as on_buses
from spies import RecordingFedBuff, assert_follows_wiring, spy_buses, watch
from structlog.testing import capture_logs

from fedbus import topics
from fedbus.bus import Message
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Envelope, encode
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.services.async_aggregator import AsyncAggregator
from fedbus.services.relay import AsyncRelay
from fedbus.wire import GRANT, presence
from strategies import ClientUpdate, FedBuff

SIZE = 32
LR = 0.5
FAST, SLOW = 0.005, 0.05  # seconds a fit takes: ten times apart
GROUPS = {"r0": ("t0", "t1"), "r1": ("t2", "t3")}


def async_tree(rounds: int = 12, *, speeds: Sequence[float] = (FAST, SLOW, FAST, SLOW),
               size: int = SIZE, **round_kw: Any) -> Manifest:
    """agg (FedBuff, buffer 2) -> r0 (t0 fast, t1 slow), r1 (t2 fast, t3 slow)."""
    spec = {"deadline_s": 10, "min_clients": 2, "start_timeout_s": 10, **round_kw}
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 5,
        "strategy": {"name": "fedbuff", "params": {"buffer_size": 2}},
        "round": spec, "codec": {"level": 0},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": size, "lr": LR, "speeds": list(speeds)}},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  *({"id": r, "role": "relay"} for r in GROUPS),
                  *({"id": t, "role": "trainer", "parent": r, "partition": int(t[1:])}
                    for r, ts in GROUPS.items() for t in ts)],
    })


def targets(m: Manifest) -> np.ndarray:
    from examples.toy.task import make_task
    return np.stack([make_task(partition=i, num_partitions=4, seed=m.seed, size=SIZE).target
                     for i in range(4)])


Hook = Callable[[MemoryBroker, AsyncAggregator, dict[str, Any], dict[str, asyncio.Task[Any]]],
                Coroutine[Any, Any, None]]


async def federate(m: Manifest, *, hook: Hook | None = None, skip: Sequence[str] = (),
                   strategy: FedBuff | None = None) -> tuple[AsyncAggregator, dict[str, Any]]:
    """Every node of ``m`` but ``skip`` on one memory broker until the root is done."""
    broker = MemoryBroker()
    services = await connect(m, broker, skip=skip)
    agg = services.pop("agg")
    assert isinstance(agg, AsyncAggregator)
    if strategy is not None:
        agg = AsyncAggregator(agg.config, agg.bus, strategy, agg.selector, agg.weights)
    async with asyncio.timeout(40):
        tasks = {i: asyncio.create_task(s.run(), name=i) for i, s in services.items()}
        extra = asyncio.create_task(hook(broker, agg, services, tasks)) if hook else None
        await agg.run()
        if extra is not None:
            await extra
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return agg, services


def origin_of(update: ClientUpdate, base: np.ndarray, t: np.ndarray) -> int:
    """Which trainer made ``update`` from model ``base``: the one whose step it is exactly."""
    hits = [i for i in range(len(t))
            if np.allclose(update.delta["w"], LR * (t[i] - base), rtol=1e-5, atol=1e-6)]
    assert len(hits) == 1, hits
    return hits[0]


async def test_staleness_is_exact_through_relays_and_fast_trainers_are_never_held_back() -> None:
    # Prepare
    m = async_tree()
    strategy = RecordingFedBuff(buffer_size=2)
    # Execute
    agg, services = await federate(m, strategy=strategy)
    # Assert: the job produced its versions from updates forwarded one by one by the relays
    assert agg.version == 12
    t = targets(m)
    for version, update in strategy.submitted:
        assert update.sender in GROUPS
        # the tagged base version is the model the trainer really trained from, and the
        # staleness the root used is its version then minus that base: exact across levels
        i = origin_of(update, strategy.models[update.base_round], t)
        assert f"t{i}" in GROUPS[update.sender]
        assert update.staleness == version - update.base_round
    # the root counts work by the trainer that did it
    assert sum(agg.contributions.values()) == len(strategy.submitted)
    assert set(agg.contributions) <= {"t0", "t1", "t2", "t3"}
    # fast trainers (10x) were restarted as soon as their update was in, never waiting for
    # their slow siblings: they did several times the work
    for fast, slow in (("t0", "t1"), ("t2", "t3")):
        assert agg.contributions[fast] >= 3 * max(1, agg.contributions[slow]), agg.contributions
    for relay in ("r0", "r1"):
        r = services[relay]
        assert isinstance(r, AsyncRelay) and r.forwarded >= 1
        assert not r.forward.queue  # nothing left behind, nothing piled up


async def test_large_updates_pass_the_upload_gate_at_every_level() -> None:
    # Prepare: 1.2 MB updates, above the 1 MB chunk size: each level grants uploads
    m = async_tree(rounds=4, size=300_000, speeds=(0.0, 0.0, 0.0, 0.0), max_uploads=1)
    grants: set[tuple[str, str]] = set()  # (granting node, granted node)

    async def watch_grants(broker: MemoryBroker, agg: AsyncAggregator, services: dict[str, Any],
                           tasks: dict[str, asyncio.Task[Any]]) -> None:
        def see(msg: Message, env: Envelope) -> None:
            if env.kind == GRANT:
                grants.add((env.sender, topics.parse(msg.topic).sender))

        await watch(broker, ["fedbus/v1/toy/control/+", topics.model("toy", "agg")], see)

    # Execute
    with capture_logs() as logs:
        agg, services = await federate(m, hook=watch_grants)
    # Assert: every version was made of gated uploads (ready -> grant -> upload) both from
    # the trainers to their relay and from the relays to the root
    assert {("agg", "r0"), ("agg", "r1"), ("r0", "t0"), ("r1", "t2")} <= grants, grants
    assert agg.version == 4
    assert sum(agg.contributions.values()) >= 8
    assert not any(e["event"] == "message_rejected" and e.get("reason") == "unexpected_grant"
                   for e in logs), [e for e in logs if e["event"] == "message_rejected"]
    assert sum(s.forwarded for s in services.values() if isinstance(s, AsyncRelay)) >= 8


async def test_a_dead_relay_drops_its_subtree_and_rejoins_with_the_newest_model() -> None:
    # Prepare: r1 is killed once a few versions exist, and restarted a few versions later
    m = async_tree(rounds=30, speeds=(0.01,))
    marks: dict[str, int] = {}

    async def kill_and_restart(broker: MemoryBroker, agg: AsyncAggregator,
                               services: dict[str, Any],
                               tasks: dict[str, asyncio.Task[Any]]) -> None:
        while agg.version < 5:
            await agg.reports.get()
        tasks["r1"].cancel()
        await services["r1"].bus.kill()  # its will: the root drops the whole group at once
        marks["killed"] = agg.version
        while agg.version < marks["killed"] + 5:
            await agg.reports.get()
        marks["restarted"] = agg.version
        bus = make_bus(m, m.node("r1"), memory=broker)
        await bus.__aenter__()
        services["r1"] = build_node(m, "r1", bus)
        tasks["r1"] = asyncio.create_task(services["r1"].run())

    # Execute
    with capture_logs() as logs:
        agg, _ = await federate(m, hook=kill_and_restart)
    # Assert
    assert agg.version == 30
    assert any(e["event"] == "node_lost" and e.get("peer") == "r1" for e in logs)
    assert any("r1" in r.lost for r in agg.history)  # reported in the version it was lost
    by_version = {r.round: r.accepted for r in agg.history}
    # while r1 was gone only r0's trainers fed the root (one version of slack for
    # updates already on their way)
    gone = range(marks["killed"] + 2, marks["restarted"] + 1)
    assert all(set(by_version[v]) <= {"t0", "t1"} for v in gone if v in by_version)
    # and after the restart r1's trainers took part again
    after = {who for v, acc in by_version.items() if v > marks["restarted"] for who in acc}
    assert after & {"t2", "t3"}, by_version


async def test_a_late_joiner_under_a_relay_gets_the_current_model_and_contributes() -> None:
    # Prepare: t3 starts only once the job has made a few versions
    m = async_tree(rounds=20, speeds=(0.01,))
    strategy = RecordingFedBuff(buffer_size=2)
    joined: list[int] = []

    async def late_t3(broker: MemoryBroker, agg: AsyncAggregator, services: dict[str, Any],
                      tasks: dict[str, asyncio.Task[Any]]) -> None:
        while agg.version < 5:
            await agg.reports.get()
        joined.append(strategy.version)
        bus = make_bus(m, m.node("t3"), memory=broker)
        await bus.__aenter__()
        tasks["t3"] = asyncio.create_task(build_node(m, "t3", bus).run())

    # Execute
    agg, _ = await federate(m, hook=late_t3, skip=["t3"], strategy=strategy)
    # Assert: t3 trained from a model at least as new as the one current when it joined
    t = targets(m)
    from_t3 = [u.base_round for _, u in strategy.submitted
               if origin_of(u, strategy.models[u.base_round], t) == 3]
    assert from_t3, agg.contributions
    assert min(from_t3) >= joined[0]


async def test_async_relays_subscribe_and_publish_exactly_what_the_wiring_says() -> None:
    # Prepare: big updates, so grants and readies flow at both levels
    m = async_tree(rounds=3, size=300_000, speeds=(0.0,), max_uploads=1)
    spies, spy = spy_buses(m, MemoryBroker())
    # Execute
    await on_buses(m, spy, timeout=30)
    # Assert
    assert_follows_wiring(m, spies, ("agg", "r0", "r1", "t0", "t3"))
    # work orders went to one node each: the shared model topics carried only `done`
    assert "fedbus/v1/toy/work/t0/r0" in spies["r0"].published
    assert "fedbus/v1/toy/work/r0/agg" in spies["agg"].published


async def test_three_levels_keep_staleness_exact_and_name_the_trainer() -> None:
    # Prepare: agg -> region -> site (relay of a relay) -> t0, t1; t2 straight under region
    m = parse_manifest({
        "version": 1, "job": "toy", "rounds": 10, "seed": 5,
        "strategy": {"name": "fedbuff", "params": {"buffer_size": 2}},
        "round": {"deadline_s": 10, "min_clients": 1, "start_timeout_s": 10},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": SIZE, "lr": LR, "speeds": [FAST, SLOW, FAST]}},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  {"id": "region", "role": "relay"},
                  {"id": "site", "role": "relay", "parent": "region"},
                  {"id": "t0", "role": "trainer", "parent": "site", "partition": 0},
                  {"id": "t1", "role": "trainer", "parent": "site", "partition": 1},
                  {"id": "t2", "role": "trainer", "parent": "region", "partition": 2}],
    })
    strategy = RecordingFedBuff(buffer_size=2)
    # Execute
    agg, _ = await federate(m, strategy=strategy)
    # Assert: every update came up through region, from the model version it names
    from examples.toy.task import make_task
    t = np.stack([make_task(partition=i, num_partitions=3, seed=5, size=SIZE).target
                  for i in range(3)])
    assert agg.version == 10
    for version, update in strategy.submitted:
        assert update.sender == "region"
        origin_of(update, strategy.models[update.base_round], t)
        assert update.staleness == version - update.base_round
    assert set(agg.contributions) <= {"t0", "t1", "t2"} and agg.contributions["t0"] >= 1


async def test_relays_follow_a_restarted_root() -> None:
    # Prepare: the root dies after a few versions and a fresh one (no checkpoint) takes over
    m = async_tree(rounds=10, speeds=(0.01,))
    broker = MemoryBroker()
    services = await connect(m, broker)
    first = services.pop("agg")
    # Execute
    with capture_logs() as logs:
        async with asyncio.timeout(30):
            tasks = [asyncio.create_task(s.run()) for s in services.values()]
            run1 = asyncio.create_task(first.run())
            while first.version < 3:
                await first.reports.get()
            run1.cancel()
            await first.bus.kill()
            bus = make_bus(m, m.node("agg"), memory=broker)
            await bus.__aenter__()
            second = build_node(m, "agg", bus)
            await second.run()
            for t in tasks:
                t.cancel()
            await asyncio.gather(run1, *tasks, return_exceptions=True)
    # Assert: the new run finished its versions with both groups; the relays started over
    assert second.version == 10
    assert {"t0", "t2"} <= set(second.contributions)
    assert {e.get("node") for e in logs if e["event"] == "parent_restarted"} == {"r0", "r1"}


async def test_compressed_updates_stay_compressed_on_the_way_up() -> None:
    # Prepare: trainers send int8 updates (codec.update); watch what the relays forward
    m = async_tree(rounds=4, size=20_000, speeds=(0.0,))
    m = parse_manifest({**raw(m), "codec": {"level": 0, "update": "int8"}})
    sizes: dict[str, list[int]] = {}

    async def watch_updates(broker: MemoryBroker, agg: AsyncAggregator,
                            services: dict[str, Any],
                            tasks: dict[str, asyncio.Task[Any]]) -> None:
        def see(msg: Message, env: Envelope) -> None:
            sizes.setdefault(topics.parse(msg.topic).levels[0], []).append(len(msg.payload))

        await watch(broker, ["fedbus/v1/toy/update/+/+", topics.model("toy", "agg")], see)

    # Execute
    agg, _ = await federate(m, hook=watch_updates)
    # Assert: a float32 update would be 80 kB; int8 ones are about a quarter, at both levels
    assert agg.version == 4 and sum(agg.contributions.values()) >= 8
    for level in ("r0", "r1", "agg"):
        assert sizes[level] and max(sizes[level]) < 30_000, (level, sizes[level])


def raw(m: Manifest) -> dict[str, Any]:
    """The manifest's data again (to change a section)."""
    return {
        "version": 1, "job": m.job, "rounds": m.rounds, "seed": m.seed,
        "strategy": {"name": m.strategy.name, "params": dict(m.strategy.params)},
        "round": {"deadline_s": m.round.deadline_s, "min_clients": m.round.min_clients,
                  "start_timeout_s": m.round.start_timeout_s},
        "task": {"ref": m.task.ref, "params": {k: list(v) if isinstance(v, tuple) else v
                                                for k, v in m.task.params.items()}},
        "nodes": [{"id": n.id, "role": n.role,
                   **({"parent": n.parent} if n.parent else {}),
                   **({"partition": n.partition} if n.partition is not None else {})}
                  for n in m.nodes],
    }


async def test_a_relay_that_missed_its_model_is_sent_it_again() -> None:
    # Prepare: only r1's group can train (r0 has no trainers running); r1 is online but
    # starts listening only after the root sent it the model, which is lost
    m = async_tree(rounds=6, speeds=(0.01,), deadline_s=0.5, min_clients=1)
    broker = MemoryBroker()
    services: dict[str, Any] = {}
    for n in m.nodes:
        if n.id in ("t0", "t1", "r0"):
            continue
        bus = make_bus(m, n, memory=broker)
        await bus.__aenter__()
        services[n.id] = build_node(m, n.id, bus)
    agg = services.pop("agg")
    r1 = services.pop("r1")
    await r1.bus.publish(topics.presence("toy", "r1"),
                         encode(presence("toy", "r1", "relay", "online")), retain=True)
    # Execute
    with capture_logs() as logs:
        async with asyncio.timeout(30), MemoryBus(broker, "ear") as ear, \
                ear.subscribe(topics.work("toy", "r1", "agg")) as orders:
            tasks = [asyncio.create_task(s.run()) for s in services.values()]
            run = asyncio.create_task(agg.run())
            await orders.get(timeout=10)  # the root sent r1 its model: nobody there heard it
            tasks.append(asyncio.create_task(r1.run()))
            await run
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # Assert: silent for a deadline, r1 was sent the model again and its group did the job
    assert agg.version == 6
    assert agg.contributions["t2"] >= 1, agg.contributions
    sent = [e for e in logs if e["event"] == "work_dispatched" and e.get("relays") == ["r1"]]
    assert sent[1]["version"] == 0  # the same version, once more
