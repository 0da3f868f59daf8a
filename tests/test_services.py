"""The aggregator and trainer services end to end on the memory bus, with a numpy task."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import zstandard
from federation import connect, run_all
from spies import GrantSpy, gated, watch
from structlog.testing import capture_logs

from fedbus import topics
from fedbus.bus import Message
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Compression, Envelope, decode, encode
from fedbus.compress import MODEL_META_KEY, UpdateCodec
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.services._gate import UploadGate
from fedbus.services.aggregator import Aggregator
from fedbus.wire import GRANT, READY, ROUND, UPDATE, join_tensors, presence

SIZE = 32
LR = 0.5


def manifest(n: int = 4, rounds: int = 3, **round_kw: Any) -> Manifest:
    round_spec = {"deadline_s": 5, "quorum": 1.0, "min_clients": n, "start_timeout_s": 5}
    round_spec.update(round_kw)
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 3,
        "strategy": "fedavg", "round": round_spec,
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": SIZE, "lr": LR}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": n, "prefix": "t", "parent": "agg"},
    })


def expected(m: Manifest, rounds: int) -> np.ndarray:
    from examples.toy.task import make_task

    target = make_task(partition=None, num_partitions=m.num_partitions, seed=m.seed,
                       size=SIZE).global_target
    return target * (1 - (1 - LR) ** rounds)


Hook = Callable[[MemoryBroker, Manifest], Awaitable[None]]


async def federate(m: Manifest, *hooks: Hook, skip: set[str] = frozenset()) -> Aggregator:
    """Run every node of ``m`` (but ``skip``) plus ``hooks`` on one memory broker."""
    broker = MemoryBroker()
    services = await connect(m, broker, skip=skip)
    await run_all(services, *(hook(broker, m) for hook in hooks), timeout=60)
    agg = services["agg"]
    assert isinstance(agg, Aggregator)
    return agg


async def test_fedavg_rounds_reach_the_analytic_model() -> None:
    # Prepare
    m = manifest(n=4, rounds=3)
    # Execute
    agg = await federate(m)
    # Assert
    np.testing.assert_allclose(agg.weights["w"], expected(m, 3), rtol=1e-5, atol=1e-6)
    assert [len(r.accepted) for r in agg.history] == [4, 4, 4]
    assert agg.rejections.total == 0


async def _on_round(broker: MemoryBroker, m: Manifest, node: str,
                    act: Callable[[MemoryBus, Envelope], Awaitable[bool]],
                    *, announce: bool = False) -> None:
    """Listen to the model topic as ``node`` and call ``act`` per round until it says stop.
    With ``announce`` the node says it is online, as a trainer does, with its last will."""
    will = make_bus(m, m.node(node), memory=broker).will if announce else None
    async with MemoryBus(broker, node, will=will) as bus, \
            bus.subscribe(topics.model(m.job, "agg")) as sub:
        if announce:
            await bus.publish(topics.presence(m.job, node),
                              encode(presence(m.job, node, "trainer", "online")), retain=True)
        async for msg in sub:
            env = decode(msg.payload)
            if env.kind != ROUND or await act(bus, env):
                return


async def mute_t0(broker: MemoryBroker, m: Manifest) -> None:
    """t0 says it is online, as a trainer does, and never answers."""

    async def silent(bus: MemoryBus, env: Envelope) -> bool:
        return True

    await _on_round(broker, m, "t0", silent, announce=True)


def bad_payloads(env: Envelope) -> list[bytes]:
    w = env.tensors["m/w"]
    good = Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                    meta={"num_examples": 10}, tensors=join_tensors({"w": np.zeros_like(w)}))
    nan = np.full_like(w, np.nan)
    # the header claims a bigger shape than the bytes that follow
    lying = encode(good, Compression(level=0)).replace(b"\x91\x20", b"\x91\x40", 1)
    # a real header for 128 bytes, followed by a zstd frame that inflates to 64 MiB
    small = encode(good, Compression(level=1, min_bytes=0))
    hlen = int.from_bytes(small[4:8], "little")
    bomb = small[: 8 + hlen] + zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    return [
        os.urandom(300),
        bomb,
        bytes(lying),
        encode(Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                        meta={"num_examples": 10}, tensors=join_tensors({"w": nan}))),
        encode(Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                        meta={"num_examples": 10},
                        tensors=join_tensors({"w": np.zeros(SIZE + 1, np.float32)}))),
        encode(Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                        meta={"num_examples": 10},
                        tensors=join_tensors({"w": np.zeros((1, SIZE), np.float32)}))),
        encode(Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                        meta={"num_examples": -5}, tensors=join_tensors({"w": w}))),
        encode(Envelope(kind=UPDATE, job="toy", sender="mallory", round=env.round,
                        meta={"num_examples": 10}, tensors=join_tensors({"w": w}))),
    ]


async def test_garbage_updates_are_rejected_counted_and_do_not_change_the_model() -> None:
    # Prepare: an attacker publishes garbage on t0's update topic in every round
    m = manifest(n=3, rounds=2)

    async def attack(bus: MemoryBus, env: Envelope) -> bool:
        for payload in bad_payloads(env):
            await bus.publish(topics.update("toy", "agg", "t0"), payload)
        return env.round >= 2

    async def attacker(broker: MemoryBroker, m: Manifest) -> None:
        await _on_round(broker, m, "attacker", attack)

    # Execute
    with capture_logs() as logs:
        agg = await federate(m, attacker)
    # Assert
    np.testing.assert_allclose(agg.weights["w"], expected(m, 2), rtol=1e-5, atol=1e-6)
    reasons = set(agg.rejections.counts)
    assert {"bad_magic", "non_finite", "wrong_shape", "bad_num_examples",
            "spoofed_sender", "too_large"} <= reasons, reasons
    assert reasons & {"too_large", "bad_compression"}, reasons  # the bomb
    # the lying shape: refused by the model-derived limits before its bytes are looked at
    assert reasons & {"shape_mismatch", "bad_header", "truncated", "bad_shape"}, reasons
    assert any(e["event"] == "message_rejected" for e in logs)


async def test_duplicate_and_stale_updates_are_not_double_counted() -> None:
    # Prepare: t0 is replaced by a node that sends its update twice and a stale copy
    m = manifest(n=3, rounds=2)
    sent: dict[int, bytes] = {}

    async def duplicate(bus: MemoryBus, env: Envelope) -> bool:
        delta = {"w": (LR * (np.asarray(_target(m, 0)) - env.tensors["m/w"])).astype(np.float32)}
        payload = encode(Envelope(kind=UPDATE, job="toy", sender="t0", round=env.round,
                                  meta={"num_examples": 10}, tensors=join_tensors(delta)))
        sent[env.round] = payload
        topic = topics.update("toy", "agg", "t0")
        await bus.publish(topic, payload)
        await bus.publish(topic, payload)  # replay: same msg id
        if env.round > 1:
            await bus.publish(topic, sent[env.round - 1])  # stale replay
        return env.round >= 2

    async def fake_t0(broker: MemoryBroker, m: Manifest) -> None:
        await _on_round(broker, m, "t0", duplicate, announce=True)

    # Execute
    agg = await federate(m, fake_t0, skip={"t0"})
    # Assert
    np.testing.assert_allclose(agg.weights["w"], expected(m, 2), rtol=1e-5, atol=1e-6)
    assert agg.rejections.counts["duplicate"] >= 3
    assert [len(r.accepted) for r in agg.history] == [3, 3]


def _target(m: Manifest, partition: int) -> np.ndarray:
    from examples.toy.task import make_task

    return make_task(partition=partition, num_partitions=m.num_partitions, seed=m.seed,
                     size=SIZE).target


async def test_a_lost_trainer_does_not_stall_the_round() -> None:
    # Prepare: t0 comes online, then dies abruptly when the first round starts
    m = manifest(n=3, rounds=2, deadline_s=30, quorum=0.6, min_clients=3)

    async def die(bus: MemoryBus, env: Envelope) -> bool:
        await bus.kill()
        return True

    async def doomed(broker: MemoryBroker, m: Manifest) -> None:
        await _on_round(broker, m, "t0", die, announce=True)

    # Execute
    with capture_logs() as logs:
        agg = await asyncio.wait_for(federate(m, doomed, skip={"t0"}), 20)
    # Assert: finished long before the 30 s deadline, with t0 reported lost
    assert agg.history[0].lost == ["t0"]
    assert all(r.aggregated for r in agg.history)
    assert any(e["event"] == "node_lost" and e.get("peer") == "t0" for e in logs)
    assert all(r.seconds < 10 for r in agg.history)


async def test_deadline_with_quorum_closes_a_round_with_a_silent_trainer() -> None:
    # Prepare: t0 is online but never answers
    m = manifest(n=3, rounds=1, deadline_s=0.5, quorum=0.6, min_clients=3)

    # Execute
    with capture_logs() as logs:
        agg = await federate(m, mute_t0, skip={"t0"})
    # Assert
    report = agg.history[0]
    assert report.aggregated and report.accepted == ["t1", "t2"]
    assert any(e["event"] == "update_missing" and e.get("node") == "t0" for e in logs)


async def test_below_quorum_round_keeps_the_model() -> None:
    # Prepare: quorum 1.0 and one of two trainers silent
    m = manifest(n=2, rounds=1, deadline_s=0.3, quorum=1.0, min_clients=2)

    # Execute
    agg = await federate(m, mute_t0, skip={"t0"})
    # Assert
    assert not agg.history[0].aggregated
    np.testing.assert_array_equal(agg.weights["w"], np.zeros(SIZE, np.float32))



async def test_client_side_dp_clips_and_noises_in_the_trainer() -> None:
    # Prepare: the dp_client wrapper asks trainers to clip to C and add their own noise
    def dp_manifest(noise: float) -> Manifest:
        base = manifest(n=3, rounds=1)
        strategy = parse_manifest({
            "version": 1, "job": "toy", "rounds": 1,
            "strategy": {"name": "dp_client", "params": {
                "strategy": {"name": "fedavg"}, "noise_multiplier": noise,
                "clipping_norm": 0.01}},
            "task": {"ref": "examples.toy.task:make_task"},
            "nodes": [{"id": "agg", "role": "aggregator"}],
            "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
        }).strategy
        return dataclasses.replace(base, strategy=strategy)

    # Execute
    clipped = await federate(dp_manifest(0.0))
    noisy = await federate(dp_manifest(1.0))
    noisy_again = await federate(dp_manifest(1.0))
    # Assert: each delta is clipped to 0.01, so their mean is too; noise is seeded per node
    assert float(np.linalg.norm(clipped.weights["w"])) <= 0.01 + 1e-6
    assert not np.allclose(noisy.weights["w"], clipped.weights["w"])
    np.testing.assert_array_equal(noisy.weights["w"], noisy_again.weights["w"])


def test_upload_gate_grants_at_most_slots_and_takes_back_stale_grants() -> None:
    # Prepare
    gate = UploadGate(slots=2, timeout_s=10)
    for node in ("a", "b", "c"):
        gate.request(node)
    # Execute / Assert: two granted, the third waits for a release
    assert gate.due(now=0.0) == (["a", "b"], [])
    assert gate.due(now=1.0) == ([], [])
    gate.release("a")
    assert gate.due(now=2.0) == (["c"], [])
    # b never uploads: its grant is taken back after timeout_s
    assert gate.due(now=11.0) == ([], ["b"])
    assert gate.granted == ["c"]


def test_upload_gate_grants_again_to_a_node_that_asks_again() -> None:
    # Prepare: c holds a grant it never saw (lost, or sent before c was ready)
    gate = UploadGate(slots=1, timeout_s=10)
    gate.request("c")
    assert gate.due(now=0.0) == (["c"], [])
    # Execute: c says it is ready (again)
    gate.request("c")
    # Assert: its grant is sent again at once, not after the 10 s expiry
    assert gate.due(now=1.0) == (["c"], [])
    assert gate.granted == ["c"]


def test_upload_gate_keeps_the_slot_of_a_node_whose_ready_crossed_its_grant() -> None:
    # Prepare: under a flood c re-announced its `ready` while its grant was on the way, and
    # began uploading on that grant
    gate = UploadGate(slots=1, timeout_s=10)
    gate.request("c")
    assert gate.due(now=0.0) == (["c"], [])
    # Execute: the re-announcement arrives while c's chunks are in flight
    gate.request("c")
    # Assert: c's upload is still admitted, and a copy of the grant goes out (c ignores it);
    # nobody else takes c's slot meanwhile
    assert gate.is_granted("c")
    gate.request("d")
    assert gate.due(now=1.0) == (["c"], [])
    assert gate.granted == ["c"]
    gate.release("c")
    assert gate.due(now=2.0) == (["d"], [])


async def test_large_updates_upload_through_the_gate_a_few_at_a_time() -> None:
    # Prepare: 1.2 MB updates (above the 1 MB chunk size) from 5 trainers, 2 upload slots
    size = 300_000
    m = gated(manifest(n=5, rounds=2), size, LR)
    spy = GrantSpy()

    # Execute
    agg = await federate(m, spy)
    # Assert: same model as without the gate, never more than 2 uploads granted at once
    from examples.toy.task import make_task

    target = make_task(partition=None, num_partitions=5, seed=m.seed, size=size).global_target
    np.testing.assert_allclose(agg.weights["w"], target * (1 - (1 - LR) ** 2), rtol=1e-5,
                               atol=1e-6)
    assert [len(r.accepted) for r in agg.history] == [5, 5]
    # the bound is what matters; whether two overlapped at all depends on the clock
    assert 1 <= spy.peak <= 2


async def test_the_order_grants_the_first_uploads_up_to_the_burst() -> None:
    # Prepare: 5 trainers with 1.2 MB updates; the orders grant 3 MiB of uploads (two
    # updates' worth), the other three ask for one of the 2 slots
    size = 300_000
    m = gated(manifest(n=5, rounds=2), size, LR, burst_mb=3.0)
    seen: dict[str, list[Any]] = {"granted": [], "ready": [], "grant": []}

    def see(msg: Message, env: Envelope) -> None:
        if env.kind == ROUND:
            seen["granted"].append((env.round, env.meta.get("granted")))
        elif env.kind in (READY, GRANT):
            seen[env.kind].append((env.round, env.sender if env.kind == READY
                                   else topics.parse(msg.topic).sender))

    async def spy(broker: MemoryBroker, m: Manifest) -> None:
        await watch(broker, [topics.updates_for("toy", "agg"), "fedbus/v1/toy/control/+",
                             topics.model("toy", "agg")], see)

    # Execute
    agg = await federate(m, spy)
    # Assert: the same model as through the slots alone; each order named its first two
    # trainers, who uploaded without asking, and the three others asked and were granted
    from examples.toy.task import make_task

    target = make_task(partition=None, num_partitions=5, seed=m.seed, size=size).global_target
    np.testing.assert_allclose(agg.weights["w"], target * (1 - (1 - LR) ** 2), rtol=1e-5,
                               atol=1e-6)
    assert [len(r.accepted) for r in agg.history] == [5, 5]
    assert seen["granted"] == [(1, ["t0", "t1"]), (2, ["t0", "t1"])]
    for kind in ("ready", "grant"):
        assert sorted(seen[kind]) == [(r, f"t{i}") for r in (1, 2) for i in (2, 3, 4)]


def test_a_granted_update_larger_than_the_order_allowed_is_refused_until_it_asks() -> None:
    # Prepare: an order granted t0 a transfer of 1,000 bytes
    gate = UploadGate(slots=1, timeout_s=10)
    gate.pregrant(["t0"], 1000)
    # Execute / Assert: no larger transfer, nor one from anybody else; once t0 asks (its
    # update is larger), it waits for a slot like everyone else
    assert gate.admits("t0", 1000) and not gate.admits("t0", 1001)
    assert not gate.admits("t1", 10)
    gate.request("t0")
    assert not gate.admits("t0", 1000)
    assert gate.due(now=0.0) == (["t0"], [])
    assert gate.admits("t0", 10**9)
    # a used grant is gone with the upload
    gate.pregrant(["t1"], 1000)
    gate.release("t1")
    assert not gate.admits("t1", 10) and gate.pregranted == 0


def test_upload_gate_readmits_a_late_upload_when_a_slot_is_free() -> None:
    # Prepare: a's grant expires unused; b takes the only slot meanwhile
    gate = UploadGate(slots=1, timeout_s=10)
    gate.request("a")
    assert gate.due(now=0.0) == (["a"], [])
    gate.request("b")
    assert gate.due(now=11.0) == (["b"], ["a"])
    # Execute / Assert: a's upload starts now: no slot while b holds it, then a gets it back
    assert gate.readmit("a", now=12.0) is False
    gate.release("b")
    assert gate.readmit("a", now=13.0) is True
    assert gate.granted == ["a"]
    # only a grant taken back is readmitted: a stranger, or a twice, is not
    gate.release("a")
    assert gate.readmit("a", now=14.0) is False
    assert gate.readmit("stranger", now=14.0) is False


def test_aggregator_admits_a_late_upload_whose_grant_expired_into_a_free_slot() -> None:
    # Prepare: t0 was granted, did not start in time, and its grant was taken back
    m = manifest(n=2)
    agg = build_node(m, "agg", MemoryBus("agg", MemoryBroker()))
    assert isinstance(agg, Aggregator)
    agg.ready("t0")
    assert agg._gate.due(now=0.0) == (["t0"], [])
    assert agg._gate.due(now=agg._gate.timeout_s + 1) == ([], ["t0"])
    topic = topics.update(m.job, "agg", "t0")
    # Execute: its first chunk arrives now
    with capture_logs() as logs:
        admitted = agg._admit_chunks(topic, 4096)
    # Assert: buffered in the free slot (not refused and lost), and said so; a trainer that
    # never held a grant is still refused
    assert admitted
    assert agg._gate.is_granted("t0")
    assert any(e["event"] == "upload_regranted" for e in logs)
    assert not agg._admit_chunks(topics.update(m.job, "agg", "t1"), 4096)


@pytest.mark.parametrize("mode", ["fp16", "int8"])
async def test_a_compressed_broadcast_trains_to_the_model_within_its_precision(
        mode: str) -> None:
    # Prepare: codec.model on; a spy records every broadcast as it crossed the broker
    m = manifest(n=4, rounds=3)
    m = dataclasses.replace(m, codec=dataclasses.replace(
        m.codec, model=UpdateCodec(mode=mode, stochastic=False)))
    sent: list[Envelope] = []

    async def spy(bus: MemoryBus, env: Envelope) -> bool:
        sent.append(env)
        return env.round == 3

    # Execute
    agg = await federate(m, lambda broker, m: _on_round(broker, m, "spy", spy))
    # Assert: every broadcast was packed; the aggregator's own model stays exact up to what
    # one lossy view can move it (the error of a round does not carry into the next)
    packed = np.float16 if mode == "fp16" else np.uint8
    assert [e.round for e in sent] == [1, 2, 3]
    assert all(e.meta[MODEL_META_KEY]["mode"] == mode and e.tensors["m/w"].dtype == packed
               for e in sent)
    target = expected(m, 3)
    np.testing.assert_allclose(agg.weights["w"], target, rtol=0,
                               atol=0.01 * float(np.abs(target).max()))
    assert agg.weights["w"].dtype == np.float32 and agg.rejections.total == 0


def test_a_trainer_skips_the_handshake_only_when_its_order_names_it() -> None:
    from fedbus.services._gate import upload_threshold

    order = {"upload_gate_bytes": 1_000_000, "granted": ["t0"], "granted_bytes": 4_100_000}
    # named: up to the granted size (less room for a signature trailer); others: the gate
    assert 4_000_000 < upload_threshold(order, "t0") < 4_100_000
    assert upload_threshold(order, "t1") == 1_000_000
    # an order from an aggregator that grants nothing (or sends garbage) leaves the gate
    assert upload_threshold({"upload_gate_bytes": 1_000_000}, "t0") == 1_000_000
    assert upload_threshold({**order, "granted": "t0"}, "t0") == 1_000_000
    assert upload_threshold({**order, "granted_bytes": "big"}, "t0") == 1_000_000
