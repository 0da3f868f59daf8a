"""A store fed sketches (store.full_update_rounds: 0): the aggregator sketches each update it
accepts and publishes one record a round on sketch/<agg>; the store never sees an update.
Same sketches as a store that sketches the updates itself; forged records refused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation import connect, run_all
from spies import spy_buses

from fedbus import topics
from fedbus.bus import Bus
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Envelope, decode, encode
from fedbus.connect import make_bus
from fedbus.errors import ManifestError, PublishDenied
from fedbus.manifest import Manifest, compile_wiring, parse_manifest, store_feed
from fedbus.services.aggregator import Aggregator
from fedbus.services.store import StoreConfig, StoreService
from fedbus.store import RoundStore, StoreError
from fedbus.store.feed import MAX_PENDING, SKETCHES, FeedSettings, SketchFeed
from fedbus.store.repository import Retention
from fedbus.wire import ROUND
from strategies import ClientUpdate
from tests.conftest import SecureBrokerFactory
from tests.store.mqtt_federation import store_federation

SIZE = 32


def doc(tmp: Path, n: int = 3, rounds: int = 3, **store: Any) -> dict[str, Any]:
    return {
        "version": 1, "job": "toy", "rounds": rounds, "seed": 3, "strategy": "fedavg",
        "codec": {"level": 0},
        "round": {"deadline_s": 10, "min_clients": n, "start_timeout_s": 10},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": SIZE, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": n, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp / "store"), "sketch_dim": 64, "full_update_rounds": 0,
                  **store},
    }


def reference_store(m: Manifest, bus: Bus, root: Path) -> StoreService:
    """A second store on the same bus that is sent every update and sketches it itself."""
    config = StoreConfig(job=m.job, node_id="ref", aggregator="agg",
                         trainers=frozenset(t.id for t in m.trainers_of("agg")), seed=m.seed,
                         sketch_dim=m.store.sketch_dim, feed="updates")
    store = RoundStore(root, m.job, cache_bytes=1 << 20, retention=Retention(1))
    return StoreService(config, bus, store)


async def test_fed_sketches_equal_the_stores_own_and_no_update_reaches_it(
        tmp_path: Path) -> None:
    # Prepare: every node on a spying bus, and a reference store sent the updates
    m = parse_manifest(doc(tmp_path, n=4, rounds=3))
    broker = MemoryBroker()
    spies, spy = spy_buses(m, broker)
    services = await connect(m, broker, bus_for=spy)
    ref_bus = MemoryBus(broker, "ref")
    await ref_bus.__aenter__()
    services["ref"] = reference_store(m, ref_bus, tmp_path / "ref")
    # Execute
    await run_all(services)
    # Assert: what the store subscribes to and the aggregator publishes is the wiring
    store: StoreService = services["store"]
    ref: StoreService = services["ref"]
    wiring = compile_wiring(m)
    assert store_feed(m) == "sketches"
    assert spies["store"].subscribed == set(wiring["store"].subscribe)
    assert topics.updates_for("toy", "agg") not in spies["store"].subscribed
    assert topics.sketch("toy", "agg") in spies["agg"].published
    assert spies["agg"].published <= set(wiring["agg"].publish)
    assert all(spies[t].published <= set(wiring[t].publish) for t in ("t0", "t1", "t2", "t3"))
    # ...the same rounds, clients, counts and sketches as the store that saw every update
    assert store.store.rounds() == ref.store.rounds() == [1, 2, 3]
    assert store.stats["updates"] == ref.stats["updates"] == 12
    for r in (1, 2, 3):
        mine, theirs = store.store.records[r], ref.store.records[r]
        assert mine["feed"] == "sketches" and theirs["feed"] == "updates"
        assert mine["clients"].keys() == theirs["clients"].keys()
        assert mine["aggregate"] == theirs["aggregate"]
        for cid, c in mine["clients"].items():
            t = theirs["clients"][cid]
            for key in ("num_examples", "metrics", "staleness", "arrival", "bytes"):
                assert c[key] == t[key], (r, cid, key)
            assert c["norm"] == pytest.approx(t["norm"], rel=1e-6)
            assert c["full"] is False and c["source"] == "aggregator"
            # p = 61 > 32 coordinates: no two share a bucket, so even the cosine is exact
            assert c["cos_source"] == "sketch" and c["cos"] == pytest.approx(t["cos"], abs=1e-5)
            a, b = await store.store.sketch(r, cid), await ref.store.sketch(r, cid)
            assert a is not None and b is not None
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # ...and the workloads that need full updates say so
    with pytest.raises(StoreError, match="keeps sketches only"):
        await store.workloads.run("personalization", {"k": 2})
    ranked = (await store.workloads.run("scheduling", {})).data
    assert len(ranked["ranking"]) == 4


async def test_forged_sketch_records_are_refused_and_counted(tmp_path: Path) -> None:
    # Prepare: mallory publishes on sketch/agg as soon as round 1 starts
    m = parse_manifest(doc(tmp_path, n=3, rounds=2))
    broker = MemoryBroker()
    services = await connect(m, broker)
    store: StoreService = services["store"]
    p = store.sketcher.dim

    def record(sender: str = "agg", r: int = 1, dim: int = p, who: str = "t0",
               value: float = 0.1) -> bytes:
        return encode(Envelope(
            kind=SKETCHES, job="toy", sender=sender, round=r,
            meta={"dim": dim, "seed": m.seed, "clients": [{
                "sender": who, "num_examples": 5, "metrics": {}, "duration_s": 0.1,
                "arrival_s": 0.1, "staleness": 0, "base_round": r, "bytes": 10,
                "norm": 1.0}]},
            tensors={"sketches": np.full((1, dim), value, np.float32)}))

    async def mallory() -> None:
        async with MemoryBus(broker, "mallory") as bus, \
                bus.subscribe(topics.model("toy", "agg")) as sub:
            env = decode((await sub.get(timeout=10)).payload)
            assert env.kind == ROUND and env.round == 1
            for payload in (os.urandom(200), record(sender="mallory"), record(dim=p - 2),
                            record(who="mallory"), record(value=float("nan")),
                            record(r=7)):
                await bus.publish(topics.sketch("toy", "agg"), payload)

    # Execute
    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        tg.create_task(mallory())
        for node_id, s in services.items():
            tg.create_task(s.run(), name=node_id)
    # Assert: each refused for its reason; the aggregator's own records kept both rounds
    assert {"bad_magic", "spoofed_sender", "sketch_mismatch", "unknown_sender", "non_finite",
            "stale"} <= set(store.rejections.counts), store.rejections.counts
    assert store.stats["sketch_records"] == 2
    rec = store.store.records[1]
    assert sorted(rec["clients"]) == ["t0", "t1", "t2"]
    assert sum(rec["rejected"].values()) >= 5
    agg: Aggregator = services["agg"]
    assert [len(h.accepted) for h in agg.history] == [3, 3]


def test_the_aggregators_feed_stays_bounded_and_leaves_out_a_failed_sketch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a sketch thread held up until released, and one update it cannot sketch
    import threading

    feed = SketchFeed(FeedSettings(64, 0))
    release = threading.Event()
    real = feed.sketcher.sketch

    def held(delta: Any) -> np.ndarray:
        if "bad" in delta:
            raise ValueError("cannot sketch")
        if threading.current_thread().name.startswith("sketch"):
            release.wait(10)
        return real(delta)

    monkeypatch.setattr(feed.sketcher, "sketch", held)
    n = MAX_PENDING + 3
    # Execute: more updates than may wait, then the bad one, then the round's end
    for i in range(n):
        feed.add(1, ClientUpdate(f"t{i}", {"w": np.full(8, i, np.float32)}, 5), {}, 1.0, 10,
                 0.1)
    feed.add(1, ClientUpdate("tx", {"bad": np.zeros(8, np.float32)}, 5), {}, 1.0, 10, 0.1)
    release.set()
    rows, _ = feed.take(1)
    feed.close()
    # Assert: never more than MAX_PENDING waiting (the rest sketched inline), all in order
    assert feed.inline == n - MAX_PENDING + 1 and feed.failed == 1  # tx too, inline
    assert [info["sender"] for info, _ in rows] == [f"t{i}" for i in range(n)]
    np.testing.assert_array_equal(rows[3][1], real({"w": np.full(8, 3, np.float32)}))


def test_the_feed_follows_the_policy_and_the_wiring_follows_the_feed(tmp_path: Path) -> None:
    # Execute
    fed = parse_manifest(doc(tmp_path))
    full = parse_manifest(doc(tmp_path, full_update_rounds=2))
    forced = parse_manifest(doc(tmp_path, feed="updates"))
    asynchronous = parse_manifest({**doc(tmp_path), "strategy": "fedbuff"})
    # Assert
    assert [store_feed(x) for x in (fed, full, forced, asynchronous)] == \
        ["sketches", "updates", "updates", "updates"]
    w = compile_wiring(fed)
    assert topics.sketch("toy", "agg") in w["agg"].publish
    assert topics.sketch("toy", "agg") in w["store"].subscribe
    assert topics.updates_for("toy", "agg") not in w["store"].subscribe
    assert not any(topics.matches(f, topics.sketch("toy", "agg"))
                   for f in (*w["t0"].subscribe, *w["t0"].publish))
    w = compile_wiring(full)
    assert topics.sketch("toy", "agg") not in (*w["agg"].publish, *w["store"].subscribe)
    with pytest.raises(ManifestError, match="full_update_rounds"):
        parse_manifest(doc(tmp_path, feed="sketches", full_update_rounds=1))
    with pytest.raises(ManifestError, match="asynchronous"):
        parse_manifest({**doc(tmp_path, feed="sketches"), "strategy": "fedbuff"})


@pytest.mark.broker
async def test_only_the_aggregator_may_publish_sketch_records(
        secure_mosquitto: SecureBrokerFactory, tmp_path: Path) -> None:
    # Prepare: the generated ACLs; mallory holds a trainer's rights
    sb = await secure_mosquitto(parse_manifest(doc(tmp_path)), aliases={"mallory": "t0"})
    agg = make_bus(sb.manifest, sb.manifest.node("agg"))
    store = make_bus(sb.manifest, sb.manifest.node("store"))
    from fedbus.bus import MqttOptions
    from fedbus.bus.mqtt import MqttBus

    mallory = MqttBus("mallory", sb.host, sb.port,
                      options=MqttOptions(username="mallory", password=sb.password("mallory")))
    async with agg, store, mallory, store.subscribe(topics.sketch("toy", "agg")) as sub:
        # Execute
        with pytest.raises(PublishDenied):
            await mallory.publish(topics.sketch("toy", "agg"), b"forged record")
        await agg.publish(topics.sketch("toy", "agg"), b"the aggregator's")
        got = await sub.get(timeout=10)
    # Assert: only the aggregator's reached the store
    assert got.payload == b"the aggregator's"


@pytest.mark.broker
async def test_over_mosquitto_the_fed_store_gets_a_record_not_the_updates(
        mosquitto: Any, tmp_path: Path) -> None:
    # Prepare: 1.2 MB updates (chunked, through the upload gate), a store fed sketches

    size = 300_000
    m = parse_manifest({**doc(tmp_path, n=3, rounds=2, sketch_dim=256),
                        "broker": {"host": mosquitto.host, "port": mosquitto.port},
                        "task": {"ref": "examples.toy.task:make_task",
                                 "params": {"size": size, "lr": 0.5}}})
    # Execute
    async with store_federation(m, ("t0", "t1", "t2")) as run, asyncio.timeout(120):
        await run.agg.run()
        await run.store_task  # the store ends with the job (exit_on_done)
    agg, store = run.agg, run.store
    # Assert: both rounds recorded from the aggregator's records; the store received the
    # two models and two small records, not the six 1.2 MB updates
    assert [len(r.accepted) for r in agg.history] == [3, 3]
    assert store.store.rounds() == [1, 2] and store.stats["sketch_records"] == 2
    for r in (1, 2):
        clients = store.store.records[r]["clients"]
        assert sorted(clients) == ["t0", "t1", "t2"]
        assert all(c["bytes"] > 1_000_000 and not c["full"] for c in clients.values())
    models = 2 * size * 4
    assert store.stats["bytes_in"] < models + 100_000, store.stats
