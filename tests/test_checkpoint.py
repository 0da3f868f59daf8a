"""Checkpoints: stores that survive damage, and an aggregator killed at any moment resuming to
exactly the model of a run that was never interrupted."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from fedbus.bus.memory import MemoryBroker
from fedbus.checkpoint import AggregatorState, DiskStore, RedisStore, TieredStore
from fedbus.checkpoint.state import state_envelope, state_from
from fedbus.codec import decode, encode
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.services.async_aggregator import AsyncAggregator


def frame(round: int, value: float = 1.0) -> bytes:
    state = AggregatorState(job="toy", node="agg", round=round,
                            weights={"w": np.full(8, value, np.float32)},
                            strategy={"m": np.arange(3.0), "t": 2 ** 70}, selector={})
    return encode(state_envelope(state))


# --- stores ------------------------------------------------------------------------------------


def test_a_state_round_trips_through_the_codec() -> None:
    state = state_from(decode(frame(4, 2.5)))
    assert state.round == 4 and state.node == "agg"
    np.testing.assert_array_equal(state.weights["w"], np.full(8, 2.5, np.float32))
    np.testing.assert_array_equal(state.strategy["m"], np.arange(3.0))
    assert state.strategy["t"] == 2 ** 70  # numpy RNG states hold such ints


def test_disk_store_keeps_the_last_k_and_skips_a_damaged_one(tmp_path: Path) -> None:
    # Prepare
    store = DiskStore(tmp_path, keep=3)
    for r in range(1, 6):
        store.save("toy", "agg", r, frame(r, float(r)))
    files = sorted(p.name for p in (tmp_path / "toy" / "agg").iterdir())
    assert files == ["round-000000003.ckpt", "round-000000004.ckpt", "round-000000005.ckpt"]
    # Execute: flip a byte of the newest, truncate the one before
    newest = tmp_path / "toy" / "agg" / "round-000000005.ckpt"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    second = tmp_path / "toy" / "agg" / "round-000000004.ckpt"
    second.write_bytes(second.read_bytes()[:100])
    with capture_logs() as logs:
        found = store.latest("toy", "agg")
    # Assert: the newest good one, and a log line naming each damaged file
    assert found is not None and found[0] == 3
    assert state_from(decode(found[1])).weights["w"][0] == 3.0
    skipped = [e["path"] for e in logs if e["event"] == "skip_checkpoint"]
    assert skipped == [str(newest), str(second)]
    assert store.latest("toy", "other") is None


def test_redis_store_and_disk_behind_it(redis_url: str, tmp_path: Path) -> None:
    # Prepare
    fast = RedisStore(redis_url, keep=2)
    store = TieredStore(fast, DiskStore(tmp_path / "disk", keep=2))
    for r in (1, 2, 3):
        store.save("toy", "agg", r, frame(r, float(r)))
    assert fast.latest("toy", "agg") is not None
    assert fast.redis.zcard("fedbus:toy:agg:rounds") == 2  # the last K only
    # Execute: Redis loses everything (restart without persistence, or a flush)
    fast.redis.flushall()
    with capture_logs() as logs:
        found = store.latest("toy", "agg")
    # Assert: the disk copy takes over
    assert found is not None and found[0] == 3
    assert any(e["event"] == "checkpoint_from_disk" for e in logs)
    store.close()


# --- crash and resume ---------------------------------------------------------------------------


def manifest(tmp: Path, strategy: Any, rounds: int = 6, selector: Any = "all") -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 5, "strategy": strategy,
        "selector": selector,
        "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 20},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": 64, "lr": 0.3, "delay_s": 0.05}},
        "checkpoint": {"dir": str(tmp), "wait_s": 5, "restore_timeout_s": 5},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "ckpt", "role": "checkpointer"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
    })


async def run_job(m: Manifest, *, kill_after_rounds: int | None = None, kill_delay_s: float = 0.0,
                  seed: int = 0, while_down: Any = None) -> tuple[Any, int]:
    """Every node on one memory broker. With ``kill_after_rounds``, the aggregator vanishes
    ``kill_delay_s`` after reporting that many rounds (its will fires, nothing said goodbye)
    and a new one with the same manifest takes over: the moment is set by the job's progress,
    not the clock, so a busy machine moves it no earlier or later in the job. Returns the
    aggregator that finished and how many aggregators it took."""
    broker = MemoryBroker()
    others: list[asyncio.Task[Any]] = []

    async def start(node: str) -> tuple[Any, Any]:
        bus = make_bus(m, m.node(node), memory=broker)
        await bus.__aenter__()
        return build_node(m, node, bus), bus

    async with asyncio.timeout(300):  # a bound on a hang; generous for a busy machine
        for node in ("ckpt", "t0", "t1", "t2"):
            svc, _ = await start(node)
            others.append(asyncio.create_task(svc.run(), name=node))
        agg, bus = await start("agg")
        task = asyncio.create_task(agg.run())
        starts = 1
        if kill_after_rounds is not None:
            for _ in range(kill_after_rounds):
                await agg.reports.get()  # nothing else reads them here
            await asyncio.sleep(kill_delay_s)  # a moment inside the next round, not a wait
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await bus.kill()
                if while_down is not None:
                    while_down()
                agg, bus = await start("agg")
                task = asyncio.create_task(agg.run())
                starts = 2
        await task
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)
    assert isinstance(agg, (Aggregator, AsyncAggregator))
    return agg, starts


@pytest.mark.parametrize("strategy", ["fedavg", {"name": "fedadam", "params": {"eta": 0.1}}])
async def test_an_aggregator_killed_at_random_moments_resumes_to_the_same_model(
        tmp_path: Path, strategy: Any) -> None:
    # Prepare: the uninterrupted run
    clean, _ = await run_job(manifest(tmp_path / "clean", strategy))
    rng = random.Random(7)
    kills = resumed = 0
    for trial in range(4):
        # Execute: kill the aggregator at a random moment of the job (after a random number of
        # rounds, some way into the next), start a new one
        m = manifest(tmp_path / f"trial{trial}", strategy)
        agg, starts = await run_job(m, kill_after_rounds=rng.randint(1, 4),
                                    kill_delay_s=rng.uniform(0.0, 0.06), seed=trial)
        kills += starts - 1
        resumed += agg.start_round > 1  # it continued from a checkpoint, not from round 1
        # Assert: the same final model, bit for bit; every round was made durable
        np.testing.assert_array_equal(agg.weights["w"], clean.weights["w"])
        assert all(r.durable for r in agg.history)
        assert agg.history[0].round == agg.start_round
    assert kills >= 3 and resumed >= 2  # most kills landed inside the job, after a checkpoint


async def test_an_async_fedbuff_aggregator_resumes_to_the_same_model(tmp_path: Path) -> None:
    # Prepare: FedBuff (K=2) with one trainer in flight at a time, so arrival order is fixed
    strategy = {"name": "fedbuff", "params": {"buffer_size": 2}}
    selector = {"name": "inflight", "params": {"concurrency": 1}}
    clean, _ = await run_job(manifest(tmp_path / "clean", strategy, 6, selector))
    rng = random.Random(3)
    resumed = 0
    for trial in range(4):
        # Execute
        m = manifest(tmp_path / f"trial{trial}", strategy, 6, selector)
        agg, starts = await run_job(m, kill_after_rounds=rng.randint(2, 4),
                                    kill_delay_s=rng.uniform(0.0, 0.06))
        resumed += starts > 1 and agg.history[0].round > 1
        # Assert: the same model; each version made durable
        np.testing.assert_array_equal(agg.weights["w"], clean.weights["w"])
        assert agg.version == 6
        assert all(r.durable for r in agg.history)
    assert resumed >= 2


async def test_redis_flushed_while_the_aggregator_is_down_recovers_from_disk(
        tmp_path: Path, redis_url: str) -> None:
    # Prepare: checkpoints in Redis with the disk behind it
    import redis

    clean, _ = await run_job(manifest(tmp_path / "clean", "fedavg"))
    raw = {**_raw(manifest(tmp_path, "fedavg")),
           "checkpoint": {"dir": str(tmp_path / "disk"), "redis": redis_url, "wait_s": 5}}
    m = parse_manifest(raw)
    flushed: list[bool] = []

    def flush() -> None:
        redis.Redis.from_url(redis_url).flushall()
        flushed.append(True)

    # Execute: kill the aggregator mid-job, flush Redis while it is down, restart it
    with capture_logs() as logs:
        agg, starts = await run_job(m, kill_after_rounds=2, kill_delay_s=0.02, while_down=flush)
    # Assert: it resumed from the disk copy and ended with the uninterrupted run's model
    assert starts == 2 and flushed
    assert agg.start_round > 1
    assert any(e["event"] == "checkpoint_from_disk" for e in logs)
    np.testing.assert_array_equal(agg.weights["w"], clean.weights["w"])


async def test_rounds_report_the_checkpoint_latency(tmp_path: Path) -> None:
    agg, _ = await run_job(manifest(tmp_path, "fedavg", rounds=2))
    metas = [r.as_meta() for r in agg.history]
    assert all(m["durable"] and m["checkpoint_s"] >= 0 for m in metas)
    assert len(list((tmp_path / "toy" / "agg").iterdir())) == 2


async def test_without_a_checkpointer_the_aggregator_says_so_and_goes_on(
        tmp_path: Path) -> None:
    # Prepare: a job whose checkpointer never runs
    m = manifest(tmp_path, "fedavg", rounds=2)
    m = parse_manifest({**_raw(m), "checkpoint": {"dir": str(tmp_path), "wait_s": 0.2,
                                                  "restore_timeout_s": 0.2}})
    broker = MemoryBroker()
    buses = {n: make_bus(m, m.node(n), memory=broker) for n in ("agg", "t0", "t1", "t2")}
    for b in buses.values():
        await b.__aenter__()
    services = {n: build_node(m, n, b) for n, b in buses.items()}
    # Execute
    with capture_logs() as logs:
        async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
            for n in ("t0", "t1", "t2"):
                tg.create_task(services[n].run())
            await services["agg"].run()
    # Assert: the job finished, each round marked not durable, and it was said loudly
    agg = services["agg"]
    assert [r.durable for r in agg.history] == [False, False]
    events = {e["event"] for e in logs}
    assert {"restore_unanswered", "checkpoint_unacked"} <= events


def _raw(m: Manifest) -> dict[str, Any]:
    return {"version": 1, "job": m.job, "rounds": m.rounds, "seed": m.seed,
            "strategy": m.strategy.name, "selector": m.selector.name,
            "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 3,
                      "start_timeout_s": 20},
            "task": {"ref": m.task.ref, "params": dict(m.task.params)},
            "nodes": [{"id": "agg", "role": "aggregator"},
                      {"id": "ckpt", "role": "checkpointer"}],
            "trainers": {"count": 3, "prefix": "t", "parent": "agg"}}


async def test_a_forged_far_ahead_checkpoint_and_forged_acks_are_refused(tmp_path: Path) -> None:
    # Prepare: a job with a checkpointer, and mallory on the same (open) bus
    from fedbus import topics
    from fedbus.bus.memory import MemoryBus
    from fedbus.codec import Envelope
    from fedbus.services.checkpointer import CHECKPOINT_ACK

    m = manifest(tmp_path, "fedavg", rounds=3)
    broker = MemoryBroker()
    buses = {n: make_bus(m, m.node(n), memory=broker) for n in ("agg", "ckpt", "t0", "t1", "t2")}
    for b in buses.values():
        await b.__aenter__()
    services = {n: build_node(m, n, b) for n, b in buses.items()}

    async def mallory() -> None:
        async with MemoryBus(broker, "mallory") as bus, \
                bus.subscribe(topics.state(m.job, "agg")) as sub:
            real = decode((await sub.get(timeout=30)).payload)  # the first real checkpoint
            # a checkpoint far beyond the job, as the aggregator: kept, it would be the
            # newest and end every later restart at once
            ahead = AggregatorState(m.job, "agg", 999_999_998, state_from(real).weights)
            await bus.publish(topics.state(m.job, "agg"), encode(state_envelope(ahead)))
            # acks for rounds the checkpointer never stored, as the checkpointer
            for r in (2, 3):
                ack = Envelope(kind=CHECKPOINT_ACK, job=m.job, sender="ckpt", round=r,
                               meta={"node": "agg", "of": "not-the-checkpoint"})
                await bus.publish(topics.state(m.job, "ckpt"), encode(ack))

    # Execute
    async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
        others = [tg.create_task(services[n].run()) for n in ("ckpt", "t0", "t1", "t2")]
        attacker = tg.create_task(mallory())
        agg = services["agg"]
        await agg.run()
        await attacker
        for t in others:
            t.cancel()
    # Assert: refused and counted; every round durable by the real acks; nothing far ahead
    assert services["ckpt"].rejections.counts["implausible_round"] == 1
    assert agg.rejections.counts["checkpointer_unexpected_ack"] == 2
    assert all(r.durable for r in agg.history)
    assert max(r for _, r in services["ckpt"].stored) == 3
