"""The store service on the memory bus with the numpy toy task: what it records, what it
refuses, and that it never holds up training."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from federation import connect, run_all

from fedbus import topics
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Compression, Envelope, decode, encode
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.services.store import StoreService
from fedbus.store import query as q
from fedbus.store.workloads import Workloads
from fedbus.wire import ROUND, UPDATE, join_tensors

SIZE = 32


def manifest(tmp: Path, n: int = 4, rounds: int = 3, size: int = SIZE,
             **store: Any) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 3, "strategy": "fedavg",
        "codec": {"level": 0},  # toy targets repeat: compressed, big models would be tiny
        "round": {"deadline_s": 10, "min_clients": n, "start_timeout_s": 10},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": size, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": n, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp / "store"), "sketch_dim": 64,
                  "full_update_rounds": 3, **store},
    })


async def start(m: Manifest, broker: MemoryBroker, node: str) -> Any:
    bus = make_bus(m, m.node(node), memory=broker)
    await bus.__aenter__()
    return build_node(m, node, bus)


async def federate(m: Manifest) -> tuple[Aggregator, StoreService]:
    svc = await connect(m, MemoryBroker())
    await run_all(svc)
    return svc["agg"], svc["store"]


@contextlib.asynccontextmanager
async def playing(m: Manifest, *peers: str
                  ) -> AsyncIterator[tuple[StoreService, asyncio.Task[Any], list[MemoryBus]]]:
    """``m``'s store alone on a memory broker, running, and a bus for each peer the test plays
    by hand, once the store has subscribed (it announces itself then); the store's task is
    cancelled on the way out."""
    broker = MemoryBroker()
    store: StoreService = await start(m, broker, "store")
    task = asyncio.create_task(store.run())
    try:
        async with contextlib.AsyncExitStack() as stack:
            buses = [await stack.enter_async_context(MemoryBus(broker, p)) for p in peers]
            async with buses[0].subscribe(topics.presence("toy", "store")) as presence:
                await presence.get(timeout=10)
            yield store, task, buses
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def after_the_job(m: Manifest, ready: Callable[[StoreService], bool], timeout: float
                        ) -> AsyncIterator[tuple[StoreService, MemoryBroker]]:
    """Run ``m`` to its end with its store kept up (``exit_on_done: false``), until
    ``ready(store)``; the store, still serving, and the broker. The store's task is cancelled
    on the way out."""
    broker = MemoryBroker()
    svc = await connect(m, broker)
    store: StoreService = svc.pop("store")
    task = asyncio.create_task(store.run())
    try:
        await run_all(svc)
        async with asyncio.timeout(timeout), store.progress:
            await store.progress.wait_for(lambda: ready(store))
        yield store, broker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_every_round_is_recorded_and_the_updates_rebuild_the_next_model(
        tmp_path: Path) -> None:
    # Prepare
    m = manifest(tmp_path, n=4, rounds=3)
    # Execute
    agg, store = await federate(m)
    # Assert: FedAvg of the stored updates on the stored model is the next stored model
    rs = store.store
    assert rs.rounds() == [1, 2, 3]
    for r in (1, 2):
        rec = rs.records[r]
        base, nxt = await rs.model(r), await rs.model(r + 1)
        assert base is not None and nxt is not None
        clients = rec["clients"]
        total = sum(c["num_examples"] for c in clients.values())
        mean = np.zeros(SIZE)
        agg_delta = nxt["w"].astype(np.float64) - base["w"]
        for cid, c in clients.items():
            upd = await rs.update(r, cid)
            assert upd is not None
            mean += c["num_examples"] * np.asarray(upd["w"], np.float64) / total
            u = upd["w"].astype(np.float64)
            cos = u @ agg_delta / np.linalg.norm(u) / np.linalg.norm(agg_delta)
            assert c["cos"] == pytest.approx(cos, abs=1e-5)
            assert c["norm"] == pytest.approx(np.linalg.norm(u), rel=1e-6)
        np.testing.assert_allclose(base["w"] + mean, nxt["w"], rtol=1e-5, atol=1e-6)
        assert rec["result_digest"] == rs.records[r + 1]["model_digest"]
        assert rec["aggregate"]["source"] == "model"
        assert sorted(c["arrival"] for c in clients.values()) == [1, 2, 3, 4]
        assert all(c["staleness"] == 0 and c["cos_source"] == "exact"
                   and c["metrics"]["train_loss"] > 0 for c in clients.values())
        assert rec["selected"] == ["t0", "t1", "t2", "t3"]
        assert rec["report"]["participants"] == 4 and rec["report"]["round"] == r
    assert rs.records[3]["aggregate"]["source"] == "fedavg_estimate"
    assert len(agg.history) == 3 and store.stats["dropped"] == 0


def _hostile(env: Envelope) -> list[bytes]:
    w = env.tensors["m/w"]

    def upd(sender: str, delta: np.ndarray, n: Any = 10) -> bytes:
        return encode(Envelope(kind=UPDATE, job="toy", sender=sender, round=env.round,
                               meta={"num_examples": n}, tensors=join_tensors({"w": delta})))

    small = encode(Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                            meta={"num_examples": 10}, tensors=join_tensors({"w": w})),
                   Compression(level=1, min_bytes=0))
    hlen = int.from_bytes(small[4:8], "little")
    bomb = small[: 8 + hlen] + zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    return [os.urandom(200), bomb, upd("t0", np.full_like(w, np.nan)),
            upd("t0", np.zeros(SIZE + 1, np.float32)), upd("t0", w, n=-1),
            upd("mallory", w)]


async def test_hostile_updates_are_refused_by_the_store_and_recorded_as_rejections(
        tmp_path: Path) -> None:
    # Prepare: an attacker publishes garbage on t0's update topic in round 1
    m = manifest(tmp_path, n=3, rounds=2)
    broker = MemoryBroker()
    svc = await connect(m, broker)

    async def attacker() -> None:
        async with MemoryBus(broker, "attacker") as bus, \
                bus.subscribe(topics.model("toy", "agg")) as sub:
            env = decode((await sub.get(timeout=10)).payload)
            assert env.kind == ROUND
            for payload in _hostile(env):
                await bus.publish(topics.update("toy", "agg", "t0"), payload)

    # Execute
    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        tg.create_task(attacker())
        for node_id, s in svc.items():
            tg.create_task(s.run(), name=node_id)
    # Assert: the store refused all of it, for the right reasons, and kept the honest rounds
    store: StoreService = svc["store"]
    reasons = set(store.rejections.counts)
    assert {"bad_magic", "non_finite", "wrong_shape", "bad_num_examples",
            "spoofed_sender"} <= reasons, reasons
    assert reasons & {"too_large", "bad_compression"}, reasons
    rec = store.store.records[1]
    assert sorted(rec["clients"]) == ["t0", "t1", "t2"]
    assert sum(rec["rejected"].values()) >= 6
    assert {r["reason"] for r in rec["rejections"]} >= {"non_finite", "spoofed_sender"}


async def test_a_stuck_store_drops_and_counts_and_training_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: 100k-parameter updates (400 KB); a 1 MiB backlog; the writer never finishes
    m = manifest(tmp_path, n=4, rounds=3, size=100_000, backlog_mb=1)
    broker = MemoryBroker()
    svc = await connect(m, broker)
    store: StoreService = svc.pop("store")
    stuck = asyncio.Event()

    async def never(msg: Any) -> None:
        await stuck.wait()

    monkeypatch.setattr(store, "_handle", never)
    store_task = asyncio.create_task(store.run())
    # Execute
    try:
        await run_all(svc)
    finally:
        store_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await store_task
    # Assert: every round ran; the store dropped (and counted) what did not fit
    assert [len(r.accepted) for r in svc["agg"].history] == [4, 4, 4]
    assert store.stats["dropped"] > 0 and store.stats["dropped_bytes"] > 0, store.stats
    assert store.stats["kept_over_budget"] >= 1  # a round's model is kept, updates go first
    assert store._backlog_bytes <= 1 << 20


async def test_the_store_dying_mid_job_never_blocks_a_round(tmp_path: Path) -> None:
    # Prepare
    m = manifest(tmp_path, n=3, rounds=4)
    broker = MemoryBroker()
    svc = await connect(m, broker)
    store: StoreService = svc.pop("store")

    async def die_after_round_one() -> None:
        task = asyncio.create_task(store.run())
        async with asyncio.timeout(30), store.progress:
            await store.progress.wait_for(lambda: store.stats["rounds"] >= 1)
        await store.bus.kill()  # type: ignore[attr-defined]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # Execute
    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        tg.create_task(die_after_round_one())
        for node_id, s in svc.items():
            tg.create_task(s.run(), name=node_id)
    # Assert
    assert len(svc["agg"].history) == 4 and all(r.aggregated for r in svc["agg"].history)
    assert 1 in store.store.rounds() and 4 not in store.store.rounds()


async def test_queries_are_answered_on_the_bus_and_bad_ones_refused(tmp_path: Path) -> None:
    # Prepare: a store that stays up after the job
    m = manifest(tmp_path, n=3, rounds=2, exit_on_done=False)
    async with after_the_job(m, lambda s: s.done.is_set() and not s.backlog, 30) as (
            store, broker):
        # Execute
        async with MemoryBus(broker, "asker") as bus:
            await bus.publish(topics.query("toy", "store", "asker"), b"not a frame")
            ok, _ = await q.ask(bus, m, "store", "lineage", {"round": 2}, 10)
            unknown, _ = await q.ask(bus, m, "store", "teleport", {}, 10)
            bad, _ = await q.ask(bus, m, "store", "clustering", {"k": "three"}, 10)
    # Assert
    assert ok["ok"] and ok["result"]["round"] == 2
    assert [s["round"] for s in ok["result"]["rounds"]] == [1, 2]
    assert ok["result"]["clients"]["t0"]["rounds"] == [1, 2]
    assert not unknown["ok"] and "known:" in unknown["error"]
    assert not bad["ok"] and "'k'" in bad["error"]
    assert store.rejections.counts["query_bad_magic"] == 1


async def test_an_update_ahead_of_its_model_is_kept_and_a_replay_is_a_duplicate(
        tmp_path: Path) -> None:
    # Prepare: the test plays the aggregator and one trainer by hand, out of order
    m = manifest(tmp_path, n=3, rounds=1)
    model = {"w": np.zeros(SIZE, np.float32)}
    delta = {"w": np.full(SIZE, 0.5, np.float32)}
    update = encode(Envelope(kind=UPDATE, job="toy", sender="t1", round=1,
                             meta={"num_examples": 7}, tensors=join_tensors(delta)))

    def from_agg(kind: str, **kw: Any) -> bytes:
        return encode(Envelope(kind=kind, job="toy", sender="agg", round=1, **kw))

    async with playing(m, "agg", "t1") as (store, task, (agg_bus, t1_bus)):
        # Execute: the update first, then the model, a replay, the report and done
        await t1_bus.publish(topics.update("toy", "agg", "t1"), update)
        await agg_bus.publish(topics.model("toy", "agg"), from_agg(
            ROUND, meta={"selected": ["t0", "t1", "t2"]}, tensors=join_tensors(model)))
        await t1_bus.publish(topics.update("toy", "agg", "t1"), update)
        await agg_bus.publish(topics.metrics("toy", "agg"), from_agg(
            "metrics", meta={"round": 1, "participants": 1}))
        await agg_bus.publish(topics.model("toy", "agg"), from_agg("done"))
        async with asyncio.timeout(10):
            await task
    # Assert
    rec = store.store.records[1]
    assert list(rec["clients"]) == ["t1"] and rec["clients"]["t1"]["num_examples"] == 7
    assert rec["missing"] == ["t0", "t2"] and rec["report"]["participants"] == 1
    assert store.rejections.counts["duplicate"] == 1
    assert rec["aggregate"]["source"] == "fedavg_estimate"


async def test_with_redis_a_second_process_reads_what_the_store_wrote(
        tmp_path: Path, redis_url: str) -> None:
    # Prepare
    from fedbus.store import RedisCache, RoundStore

    m = manifest(tmp_path, n=3, rounds=2, redis_url=redis_url)
    # Execute: the federation, then a store process with an empty folder of its own
    _, store = await federate(m)
    other_redis = RedisCache(redis_url, "fedbus:store:toy:agg:")
    other = RoundStore(tmp_path / "elsewhere", "toy", cache_bytes=0, redis=other_redis)
    other.records = dict(store.store.records)  # the records are small; the tensors are not
    try:
        upd = await other.update(2, "t1")
        model = await other.model(1)
    finally:
        await other_redis.close()
    # Assert: served from Redis, identical to the store's own copy on disk
    assert upd is not None and model is not None and other_redis.hits == 2
    mine = await store.store.update(2, "t1")
    assert mine is not None
    np.testing.assert_array_equal(upd["w"], mine["w"])


async def test_closed_rounds_are_valued_in_idle_time_and_queries_look_them_up(
        tmp_path: Path) -> None:
    # Prepare: a store that stays up after the job, precomputing 8 Shapley permutations
    m = manifest(tmp_path, n=4, rounds=3, exit_on_done=False, precompute_permutations=8)
    async with after_the_job(
            m, lambda s: s.done.is_set() and s.stats["precomputed"] >= 2, 60) as (store, _):
        # Execute: the same queries on the warm store, and on request by a fresh instance
        debug = (await store.workloads.run("debugging", {"round": 2})).data
        contrib = (await store.workloads.run("contribution", {"round": 2,
                                                               "permutations": 8})).data
        other = (await store.workloads.run("contribution", {"round": 2,
                                                             "permutations": 9})).data
        fresh = Workloads(store.store, store.workloads.utility, seed=m.seed)
        again = (await fresh.run("contribution", {"round": 2, "permutations": 8})).data
    # Assert: looked up (no model evaluated), and the same numbers as computed on request
    assert debug["values"] == "precomputed" and debug["evaluations"] == 0
    assert contrib["precomputed_rounds"] == 1 and contrib["evaluations"] == 0
    assert other["precomputed_rounds"] == 0 and other["evaluations"] > 0  # other parameters
    assert again["precomputed_rounds"] == 0 and again["evaluations"] > 0
    assert contrib["shapley"] == again["shapley"]
    assert contrib["leave_one_out"] == again["leave_one_out"]
    assert set(contrib["shapley"]) == {"t0", "t1", "t2", "t3"}


def order(number: int, *, epoch: str = "e1", selected: tuple[str, ...] = ("t0",),
          weights: dict[str, np.ndarray] | None = None,
          compression: Compression | None = None) -> bytes:
    """The aggregator "agg"'s order for round ``number`` of run ``epoch`` (a SIZE-zero model
    by default), as the tests that play it by hand send it."""
    env = Envelope(kind=ROUND, job="toy", sender="agg", round=number,
                   meta={"epoch": epoch, "selected": list(selected)},
                   tensors=join_tensors(weights or {"w": np.zeros(SIZE, np.float32)}))
    return encode(env, compression) if compression is not None else encode(env)


def done(number: int, epoch: str = "e1") -> bytes:
    return encode(Envelope(kind="done", job="toy", sender="agg", round=number,
                           meta={"epoch": epoch}))


async def test_a_forged_done_neither_closes_rounds_nor_ends_the_store(tmp_path: Path) -> None:
    # Prepare: the test plays the aggregator (run "e1") and an attacker on an open broker
    m = manifest(tmp_path, n=3, rounds=2)
    async with playing(m, "agg") as (store, task, (agg_bus,)):
        for number in (1, 2):
            await agg_bus.publish(topics.model("toy", "agg"),
                                  order(number, selected=("t0", "t1", "t2")))
        # Execute: done from another run, and from this run for rounds the job does not end at
        await agg_bus.publish(topics.model("toy", "agg"), done(2, "forged"))
        await agg_bus.publish(topics.model("toy", "agg"), done(1))
        await agg_bus.publish(topics.model("toy", "agg"), done(10**9))
        async with asyncio.timeout(10), store.progress:
            await store.progress.wait_for(
                lambda: store.rejections.counts["unexpected_done"] >= 3)
        # Assert: all three refused and counted; the store still serves, round 2 still open
        assert not task.done() and not store.done.is_set()
        assert 2 in store._open
        # ... and the aggregator's own done ends it
        await agg_bus.publish(topics.model("toy", "agg"), done(2))
        async with asyncio.timeout(10):
            await task
    assert store.done.is_set() and store.rejections.counts["unexpected_done"] == 3


async def test_an_order_beyond_the_jobs_rounds_is_refused_and_recording_goes_on(
        tmp_path: Path) -> None:
    # Prepare: a 2-round job; an attacker sends an order for round 10**9 during round 1
    m = manifest(tmp_path, n=1, rounds=2)

    async with playing(m, "agg") as (store, task, (agg_bus,)):
        await agg_bus.publish(topics.model("toy", "agg"), order(1))
        # Execute
        await agg_bus.publish(topics.model("toy", "agg"), order(10**9, epoch="forged"))
        await agg_bus.publish(topics.model("toy", "agg"), order(2))
        await agg_bus.publish(topics.model("toy", "agg"), done(2))
        async with asyncio.timeout(10):
            await task
    # Assert: refused and counted; both real rounds recorded, nothing for the forged one, and
    # the real done (its epoch unchanged by the forgery) ended the job
    assert store.rejections.counts["implausible_round"] == 1
    assert sorted(store.store.records) == [1, 2]


async def test_a_sync_order_jumping_ahead_is_refused_unless_the_orders_go_on_from_it(
        tmp_path: Path) -> None:
    # Prepare: a 5-round job, the test plays the aggregator (run "e1")
    m = manifest(tmp_path, n=1, rounds=5)

    async with playing(m, "agg") as (store, _task, (agg_bus,)):
        # Execute: round 1; a forged order for round 4 while it is open; the real round 2;
        # then round 3 never reaches the store, and rounds 4 and 5 follow
        for number in (1, 4, 2, 4, 5):
            await agg_bus.publish(topics.model("toy", "agg"), order(number))
        async with asyncio.timeout(10), store.progress:
            await store.progress.wait_for(lambda: 5 in store._open)
    # Assert: the forged jump and the first order after the gap refused; round 1 closed by
    # the real round 2, and the orders went on from 5
    assert store.rejections.counts["implausible_round"] == 2
    assert sorted(store.store.records) == [1, 2]


async def test_once_the_model_is_known_an_order_declaring_more_is_refused_unopened(
        tmp_path: Path) -> None:
    # Prepare: round 1's order, then a forged one whose header honestly declares 64 MiB of
    # tensors (compressed to a few kB): the manifest's codec limits alone would let it inflate
    m = manifest(tmp_path, n=1, rounds=2)
    big = {"w": np.zeros(16 << 20, np.float32)}  # 64 MiB of zeros
    zstd = Compression(level=1, min_bytes=0)

    async with playing(m, "agg") as (store, _task, (agg_bus,)):
        await agg_bus.publish(topics.model("toy", "agg"), order(1, compression=zstd))
        # Execute
        await agg_bus.publish(topics.model("toy", "agg"), order(2, weights=big, compression=zstd))
        async with asyncio.timeout(10), store.progress:
            await store.progress.wait_for(lambda: store.rejections.total >= 1)
    # Assert: refused before decompression (too_large), round 2 never opened
    assert store.rejections.counts["too_large"] == 1
    assert 2 not in store._open


async def test_before_the_first_order_the_tasks_model_bounds_what_is_decoded(
        tmp_path: Path) -> None:
    # Prepare: the store has the task (store.evaluate, the default), so it knows the model's
    # size before any order; a forged order declaring 64 MiB (a few kB compressed) comes first
    m = manifest(tmp_path, n=1, rounds=2)
    big = {"w": np.zeros(16 << 20, np.float32)}
    zstd = Compression(level=1, min_bytes=0)

    async with playing(m, "agg") as (store, _task, (agg_bus,)):
        # Execute
        await agg_bus.publish(topics.model("toy", "agg"), order(1, weights=big, compression=zstd))
        await agg_bus.publish(topics.model("toy", "agg"), order(1))
        async with asyncio.timeout(10), store.progress:
            await store.progress.wait_for(lambda: 1 in store._open)
    # Assert: the forgery refused before decompression; the real round 1 opened
    assert store.rejections.counts["too_large"] == 1
