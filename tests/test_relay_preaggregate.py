"""Async relays that pre-aggregate (issue #23): a relay with ``pre_aggregate: N`` forwards one
counted update per N child updates. The window's math against the members sent one by one,
the count honoured at the root, the bounded wait, and nothing dropped without being counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from spies import RecordingFedBuff
from structlog.testing import capture_logs
from test_relay_async import FAST, GROUPS, LR, async_tree, federate, targets

from fedbus import topics
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Envelope, decode, encode
from fedbus.connect import make_bus
from fedbus.errors import FedbusError
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.services.async_aggregator import AsyncAggregator
from fedbus.services.preaggregate import Window
from fedbus.services.relay import ANNOUNCE_TRIES, AsyncRelay
from fedbus.wire import DONE, GRANT, READY, ROUND, UPDATE, join_tensors, split_tensors
from strategies import ClientUpdate, FedBuff

SHAPES = {"w": (3, 4), "b": (4,)}


def _deltas(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(n)]


def _fedbuff(k: int = 10) -> FedBuff:
    s = FedBuff(buffer_size=k, server_lr=0.8)
    s.init({k: np.zeros(s_, np.float32) for k, s_ in SHAPES.items()}, version=7)
    return s


def _window(members: list[tuple[int, dict[str, np.ndarray]]]) -> Window:
    w = Window()
    for i, (base, d) in enumerate(members):
        w.add(f"t{i}", base, d, count=1, num_examples=10 + i, metrics={"train_loss": 1.0 + i},
              origins={}, bases={})
    return w


def test_a_window_of_one_base_version_is_exact_against_its_members_sent_one_by_one() -> None:
    # Prepare: five updates trained from version 5, landing at the root's version 7
    members = _deltas(5, 1)
    dtypes = {k: np.dtype(np.float32) for k in SHAPES}
    flat, counted = _fedbuff(), _fedbuff()
    # Execute
    for i, d in enumerate(members):
        flat.submit(ClientUpdate(f"t{i}", d, 10, base_round=5, staleness=2))
    c = _window([(5, d) for d in members]).combine(7, counted.staleness_scale, dtypes)
    counted.submit(ClientUpdate("relay", c.delta, c.num_examples, base_round=c.base,
                                staleness=7 - c.base, count=c.count))
    # Assert: the same buffer (float32 rounding of the forwarded mean apart), the same count
    assert (c.base, c.count, c.num_examples) == (5, 5, 60)
    assert c.metrics["train_loss"] == pytest.approx(sum((10 + i) * (1.0 + i)
                                                        for i in range(5)) / 60)
    assert c.origins == {f"t{i}": 1 for i in range(5)} and c.bases == {5: 5}
    assert counted.num_buffered == flat.num_buffered == 5
    for k in SHAPES:
        assert c.delta[k].dtype == np.float32
        np.testing.assert_allclose(counted.state_dict()["buffer_sum"][k],
                                   flat.state_dict()["buffer_sum"][k], rtol=1e-6, atol=1e-8)


def test_a_window_of_several_versions_carries_the_roots_weighting() -> None:
    # Prepare: two members from version 4, three from version 6; the relay holds version 6
    members = _deltas(5, 2)
    bases = [4, 4, 6, 6, 6]
    dtypes = {k: np.dtype(np.float32) for k in SHAPES}
    flat, counted = _fedbuff(), _fedbuff()
    # Execute: the root is still at 6 when it lands (r = h)
    for i, (b, d) in enumerate(zip(bases, members, strict=True)):
        flat.submit(ClientUpdate(f"t{i}", d, 10, base_round=b, staleness=6 - b))
    c = _window(list(zip(bases, members, strict=True))).combine(6, counted.staleness_scale,
                                                                 dtypes)
    counted.submit(ClientUpdate("relay", c.delta, 50, base_round=c.base, staleness=0,
                                count=c.count))
    # Assert: tagged with the newest base; the older members weighted 1/sqrt(1 + 2) as the
    # root would have: FedBuff's buffer is the flat one's
    assert (c.base, c.count, c.bases) == (6, 5, {4: 2, 6: 3})
    for k in SHAPES:
        expected = (sum(members[i][k] for i in (2, 3, 4)).astype(np.float64)
                    + sum(members[i][k] for i in (0, 1)) / math.sqrt(3)) / 5
        np.testing.assert_allclose(c.delta[k], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(counted.state_dict()["buffer_sum"][k],
                                   flat.state_dict()["buffer_sum"][k], rtol=1e-5, atol=1e-7)


def pre_aggregating(m: Manifest, n: int) -> Manifest:
    return dataclasses.replace(m, nodes=tuple(
        dataclasses.replace(x, pre_aggregate=n) if x.role == "relay" else x for x in m.nodes))


async def test_the_root_honours_counts_and_one_version_windows_are_exact() -> None:
    # Prepare: FedBuff buffer 4 at the root; each relay forwards one update per 2
    m = pre_aggregating(async_tree(rounds=10, speeds=(FAST,)), 2)
    strategy = RecordingFedBuff(buffer_size=4)
    seen: list[tuple[ClientUpdate, dict[str, Any], int]] = []

    async def spy(broker: MemoryBroker, agg: AsyncAggregator, services: dict[str, Any],
                  tasks: dict[str, asyncio.Task[Any]]) -> None:
        fold = agg.fold

        def recording(update: ClientUpdate, env: Envelope) -> None:
            seen.append((update, dict(env.meta), agg.version))
            fold(update, env)

        agg.fold = recording  # type: ignore[method-assign]

    # Execute
    agg, services = await federate(m, strategy=strategy, hook=spy)
    # Assert: the root counted every member: 4 per version, what is left in its buffer
    assert agg.version == 10
    counts = [u.count for _, u in strategy.submitted]
    assert sum(counts) == 4 * 10 + strategy.num_buffered
    assert sum(agg.contributions.values()) == sum(counts)
    assert set(agg.contributions) <= {"t0", "t1", "t2", "t3"}
    assert max(counts) == 2 and counts.count(2) >= len(counts) // 2, counts
    # every update that stood for members of one version is their exact mean
    t = targets(m)
    exact = 0
    for update, meta, version in seen:
        assert update.staleness == version - update.base_round
        count = meta.get("count", 1)
        if count == 1 or meta.get("bases") != [[update.base_round, count]]:
            continue
        base = strategy.models[update.base_round]
        mean = sum(n * t[int(o[1:])] for o, n in meta["origins"].items()) / count
        np.testing.assert_allclose(update.delta["w"], LR * (mean - base), rtol=1e-5, atol=1e-6)
        assert set(meta["origins"]) <= set(GROUPS[update.sender])
        exact += 1
    assert exact >= 1, [meta.get("bases") for _, meta, _ in seen]
    relays = [s for s in services.values() if isinstance(s, AsyncRelay)]
    assert sum(r.forwarded_updates for r in relays) >= sum(counts)
    assert sum(r.forwarded for r in relays) < sum(r.forwarded_updates for r in relays)


async def test_a_window_that_does_not_fill_goes_up_after_a_deadline() -> None:
    # Prepare: windows of 1000 never fill; a deadline of 0.4 s bounds the wait
    m = pre_aggregating(async_tree(rounds=3, deadline_s=0.4), 1000)
    strategy = RecordingFedBuff(buffer_size=2)
    # Execute
    with capture_logs() as logs:
        agg, _ = await federate(m, strategy=strategy)
    # Assert: the job finished from windows sent when their deadline came
    assert agg.version == 3
    flushed = [e for e in logs if e["event"] == "window_flushed"]
    assert flushed and all(e["reason"] == "deadline" for e in flushed)
    assert all(1 <= u.count < 1000 for _, u in strategy.submitted)
    assert sum(u.count for _, u in strategy.submitted) >= 6


def test_pre_aggregate_is_a_relay_setting_under_an_asynchronous_root() -> None:
    m = async_tree()
    raw: dict[str, Any] = {
        "version": 1, "job": "toy", "rounds": 3, "strategy": {"name": "fedbuff"},
        "task": {"ref": "examples.toy.task:make_task"},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  {"id": "r0", "role": "relay", "pre_aggregate": 10},
                  {"id": "t0", "role": "trainer", "parent": "r0", "partition": 0}]}
    assert parse_manifest(raw).node("r0").pre_aggregate == 10
    assert m.node("r0").pre_aggregate == 1  # off unless asked for
    with pytest.raises(FedbusError, match="synchronous"):
        parse_manifest({**raw, "strategy": {"name": "fedavg"}})
    with pytest.raises(FedbusError, match="only a relay"):
        parse_manifest({**raw, "nodes": [*raw["nodes"][:2],
                                         {**raw["nodes"][2], "pre_aggregate": 2}]})


# --- nothing lost without a trace: a parent that withholds its grants --------------------


async def test_ungranted_uploads_are_announced_again_and_what_is_dropped_is_counted() -> None:
    # Prepare: r0 and its two trainers under a stand-in parent; updates of 1.2 MB need a
    # grant, windows of 2; the parent ignores the first ready, grants the second
    m = pre_aggregating(async_tree(rounds=5, size=300_000, speeds=(0.0,), deadline_s=0.5), 2)
    broker = MemoryBroker()
    services: dict[str, Any] = {}
    for node in ("r0", "t0", "t1"):
        bus = make_bus(m, m.node(node), memory=broker)
        await bus.__aenter__()
        services[node] = build_node(m, node, bus)
    relay = services["r0"]
    assert isinstance(relay, AsyncRelay)
    weights = {"w": np.zeros(300_000, np.float32)}

    def envelope(kind: str, version: int, **meta: Any) -> bytes:
        return encode(Envelope(kind=kind, job="toy", sender="agg", round=version,
                               meta={"epoch": "e1", **meta},
                               tensors=join_tensors(weights) if kind == ROUND else {}))

    # Execute
    with capture_logs() as logs:
        async with asyncio.timeout(30), MemoryBus(broker, "agg") as parent, \
                parent.subscribe(topics.updates_for("toy", "agg")) as ups:
            async with parent.subscribe(topics.presence("toy", "r0")) as presence:
                tasks = [asyncio.create_task(s.run()) for s in services.values()]
                await presence.get(timeout=10)  # r0 listens: its order will be heard
            await parent.publish(topics.work("toy", "r0", "agg"), envelope(
                ROUND, 0, selected=["r0"], mode="async", config={"round": 1, "version": 0},
                deadline_s=0.5, upload_gate_bytes=1_000_000))
            readies: list[float] = []
            got: Envelope | None = None
            while got is None:
                env = decode((await ups.get(timeout=10)).payload)
                if env.kind == READY:
                    readies.append(asyncio.get_running_loop().time())
                    if len(readies) == 2:  # the first went unanswered
                        await parent.publish(topics.control("toy", "r0"), envelope(GRANT, 0))
                elif env.kind == UPDATE:
                    got = env
            # from now on nothing is granted: the next upload is given up on, counted
            while relay.lost["no_grant"] == 0:  # its readies, unanswered
                with contextlib.suppress(TimeoutError):
                    await ups.get(timeout=0.1)
            await parent.publish(topics.model("toy", "agg"), envelope(DONE, 0))
            await asyncio.wait_for(tasks[0], 10)
            for t in tasks[1:]:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # Assert: the announced-again upload went up, standing for its window of 2 ...
    assert readies[1] - readies[0] >= 0.4
    assert got.meta["count"] == 2 and sum(got.meta["origins"].values()) == 2
    assert split_tensors(got.tensors)[0]["w"].shape == (300_000,)
    assert relay.forwarded == 1 and relay.forwarded_updates == 2
    # ... the next one, never granted, was announced ANNOUNCE_TRIES times, then given up on
    # and counted; what waited at the end of the job was counted too: nothing vanished
    assert relay.lost["no_grant"] == 2
    events = [e["event"] for e in logs if e.get("node") == "r0"]
    assert events.count("upload_reannounced") >= ANNOUNCE_TRIES
    assert "upload_abandoned" in events
    accepted = sum(relay.contributions.values())
    assert accepted == relay.forwarded_updates + sum(relay.lost.values()), (
        accepted, relay.forwarded_updates, relay.lost)
