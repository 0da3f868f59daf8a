"""Lost chunks are re-requested (NACK) and resent, within bounds (fedbus.bus._repair)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import numpy as np
from spies import stand_in

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.bus import ChunkLimits, MemoryBroker, MemoryBus, MqttOptions
from fedbus.bus._chunking import Reassembler, frames, is_chunk_frame, plan
from fedbus.bus._repair import Repair, RepairLimits, decode_nack, encode_nack
from fedbus.bus.mqtt import MqttBus
from fedbus.manifest import parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator

FAST = ChunkLimits(nack_after_s=0.05)
MODEL = topics.model("j", "agg")


class EveryNth:
    """Loses every ``nth`` frame it is shown, retransmissions included; counts both."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.frames = 0
        self.lost = 0

    def loses(self) -> bool:
        self.frames += 1
        if self.frames % self.nth == 0:
            self.lost += 1
            return True
        return False


class LossyBus(MemoryBus):
    """Drops every ``nth`` chunk frame it hands to the broker."""

    def __init__(self, *args: Any, nth: int = 7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss = EveryNth(nth)

    def _send_frame(self, topic: str, frame: bytes, retain: bool) -> None:
        if not (is_chunk_frame(frame) and self.loss.loses()):
            super()._send_frame(topic, frame, retain)


class LossyMqttBus(MqttBus):
    """The same loss on a real broker: every ``nth`` chunk frame never leaves."""

    def __init__(self, *args: Any, nth: int = 7, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss = EveryNth(nth)

    def _frame_out(self, frame: bytes) -> bytes | None:
        return None if self.loss.loses() else frame


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stalled_transfers_name_their_missing_chunks_a_bounded_number_of_times() -> None:
    # Prepare: chunks 0, 2 and 4 of five arrive
    clock = Clock()
    r = Reassembler(ChunkLimits(nack_after_s=1, max_nacks=2), clock=clock)
    parts = list(frames(os.urandom(5000), 1000))
    for p in parts[::2]:
        r.feed("t", p)
    # Execute / Assert: nothing before the stall, then twice, then never again
    assert r.stalled() == []
    clock.now = 1.5
    [(topic, _transfer, missing)] = r.stalled()
    assert topic == "t" and missing == [1, 3]
    assert r.stalled() == []  # the next one waits as long again
    clock.now = 3
    assert len(r.stalled()) == 1
    clock.now = 10
    assert r.stalled() == []


def test_nack_encoding_round_trips_and_refuses_garbage() -> None:
    t = os.urandom(16)
    assert decode_nack(encode_nack(t, [0, 5, 9])) == (t, [0, 5, 9])
    assert decode_nack(b"FN") is None
    assert decode_nack(encode_nack(t, [1])[:-1]) is None
    assert decode_nack(b"XX" + encode_nack(t, [1])[2:]) is None


async def test_lost_chunks_are_resent_and_every_payload_arrives() -> None:
    # Prepare: the aggregator's bus loses every 7th chunk frame of its model broadcasts
    broker = MemoryBroker()
    payloads = [os.urandom(30_000 + i) for i in range(5)]
    async with LossyBus(broker, "agg", chunk_bytes=1000, limits=FAST) as agg, \
            MemoryBus(broker, "t0", limits=FAST) as t0, t0.subscribe(MODEL) as sub:
        # Execute: one broadcast at a time, as rounds go (a sender's newer transfers on a
        # topic evict its older partial ones: ChunkLimits.max_partials_per_topic)
        got = []
        for p in payloads:
            await agg.publish(MODEL, p)
            got.append((await sub.get(timeout=5)).payload)
    # Assert: all complete, each exactly once, by resending about what was lost
    assert sorted(got) == sorted(payloads)
    assert agg.loss.lost >= 20
    assert agg.stats["chunks_resent"] >= agg.loss.lost - 5
    assert t0.stats["nacks_sent"] >= 5 and t0.stats.get("transfers_expired", 0) == 0


async def test_lost_chunks_are_repaired_over_mosquitto(mosquitto: MosquittoProcess) -> None:
    # Prepare: an update topic (owned by t0), chunks of 64 kB, every 7th lost by t0's bus
    topic = topics.update("j", "agg", "t0")
    payloads = [os.urandom(1_000_000 + i) for i in range(3)]
    async with LossyMqttBus("t0", mosquitto.host, mosquitto.port,
                            options=MqttOptions(chunk_bytes=64_000, limits=FAST)) as t0, \
            MqttBus("agg", mosquitto.host, mosquitto.port,
                    options=MqttOptions(limits=FAST)) as agg, \
            agg.subscribe(topic) as sub:
        # Execute
        got = []
        for p in payloads:
            await t0.publish(topic, p)
            got.append((await sub.get(timeout=10)).payload)
    # Assert
    assert got == payloads and t0.loss.lost >= 6
    assert t0.stats["chunks_resent"] >= t0.loss.lost - 3 and agg.stats["nacks_sent"] >= 3


async def test_forged_nacks_cannot_make_a_node_resend_unbounded_data() -> None:
    # Prepare: a node keeps one chunked transfer of 10 chunks it published
    sent: list[bytes] = []

    async def send(topic: str, frame: bytes) -> None:
        sent.append(frame)

    async def publish(topic: str, payload: bytes) -> None:
        raise AssertionError("no NACK expected")

    broker = MemoryBroker()
    async with MemoryBus(broker, "agg") as bus:
        repair = Repair("agg", Reassembler(), send_frame=send, publish=publish,
                        subscribe=bus.subscribe, limits=RepairLimits(resend_factor=2.0))
        repair.start()
        transfer = plan(os.urandom(10_000), 1000)
        assert transfer is not None
        repair.sent(MODEL, transfer)
        nack_topic = topics.nack("j", "agg", "mallory")
        # Execute: a flood of NACKs for everything, one for nothing kept, one malformed
        for _ in range(50):
            await repair.answer(nack_topic, encode_nack(transfer.transfer, list(range(10))))
        unknown = await repair.answer(nack_topic, encode_nack(os.urandom(16), [0]))
        malformed = await repair.answer(nack_topic, b"FN\x01junk")
        repair.stop()
    # Assert: at most 2x the transfer's chunks were ever resent
    assert len(sent) == 20 and unknown == 0 and malformed == 0
    assert repair.counters["nacks_over_budget"] == 48  # the first two were served
    assert repair.counters["nacks_unknown"] == 1 and repair.counters["nacks_malformed"] == 1


async def test_a_big_payload_on_a_nack_topic_is_refused_before_buffering() -> None:
    # Prepare: the aggregator serves NACKs (it published a chunked model)
    broker = MemoryBroker()
    async with MemoryBus(broker, "agg", chunk_bytes=1000) as agg, \
            MemoryBus(broker, "mallory", chunk_bytes=1000) as mallory:
        await agg.publish(MODEL, os.urandom(5000))
        async with asyncio.timeout(2):  # the NACK server subscribes in its own task
            while topics.nacks_for("j", "agg") not in agg._dispatch.filters:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        # Execute: 1 MB "NACK" in 1 kB chunks
        await mallory.publish(topics.nack("j", "agg", "mallory"), os.urandom(1_000_000))
        stats = agg.stats
    # Assert
    assert stats["rejected_not_admitted"] == 1 and stats["buffered_bytes"] == 0


async def test_a_node_keeps_only_its_own_recent_transfers() -> None:
    async def noop(topic: str, frame: bytes) -> None:
        return None

    clock = Clock()
    repair = Repair("t0", Reassembler(), send_frame=noop, publish=noop,
                    subscribe=MemoryBus(MemoryBroker(), "x").subscribe,
                    limits=RepairLimits(keep_transfers=2, keep_s=10), clock=clock)
    repair.start()
    try:
        mine = topics.update("j", "agg", "t0")
        ts = [plan(os.urandom(3000), 1000) for _ in range(4)]
        repair.sent(MODEL, ts[0])  # not this node's topic: not kept
        repair.sent(topics.metrics("j", "t0"), ts[0])  # not a repaired channel
        for t in ts[1:]:
            repair.sent(mine, t)
        assert await repair.answer(topics.nack("j", "t0", "agg"),
                                   encode_nack(ts[2].transfer, [0])) == 0  # newest per topic
        assert await repair.answer(topics.nack("j", "t0", "agg"),
                                   encode_nack(ts[3].transfer, [0])) == 1
        clock.now = 11
        assert await repair.answer(topics.nack("j", "t0", "agg"),
                                   encode_nack(ts[3].transfer, [1])) == 0  # too old
    finally:
        repair.stop()


def _toy(size: int) -> Any:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": 3, "seed": 1, "strategy": "fedavg",
        "codec": {"level": 0},
        "round": {"deadline_s": 20, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 20},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": size, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
    })


async def _federate(lossy: bool) -> tuple[dict[str, np.ndarray], dict[str, LossyBus]]:
    # 1.2 MB models and updates: above the upload gate (1 MB), in 13 chunks of 100 kB
    m = _toy(300_000)
    broker = MemoryBroker()
    buses = {n.id: stand_in(LossyBus, m, broker, n.id, chunk_bytes=100_000, limits=FAST,
                            nth=7 if lossy else 1 << 30) for n in m.nodes}
    services = {i: build_node(m, i, b) for i, b in buses.items()}
    agg = services.pop("agg")
    assert isinstance(agg, Aggregator)
    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(s.run()) for s in services.values()]
            await agg.run()
            for t in tasks:
                t.cancel()
    assert len(agg.history) == 3
    return agg.weights, buses


async def test_a_round_that_loses_every_7th_chunk_completes_with_the_same_model() -> None:
    # Prepare / Execute: the same job twice, once with every bus losing every 7th chunk
    clean, _ = await _federate(lossy=False)
    repaired, buses = await _federate(lossy=True)
    # Assert: chunks were lost and resent on both sides, and the model is the clean one
    assert sum(b.loss.lost for b in buses.values()) >= 5
    assert buses["agg"].stats["chunks_resent"] > 0
    assert sum(buses[t].stats.get("chunks_resent", 0) for t in ("t0", "t1", "t2")) > 0
    assert clean.keys() == repaired.keys()
    for k in clean:
        np.testing.assert_allclose(repaired[k], clean[k], rtol=1e-6)
