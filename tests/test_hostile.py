"""One forged message must not hurt a federation (issue: hostile input).

Each forgery that once ended, froze or poisoned a federation is replayed here against a real
mosquitto with no authentication (anyone may publish anything): no node may exit, hang or
die, the forgery must be counted and logged, and where the protocol can tell it apart the
final model must equal the clean run's. The authenticated variants (the broker refuses the
forgery outright) live with the ACL tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.bus import Bus, MemoryBroker, MemoryBus
from fedbus.bus.mqtt import MqttBus
from fedbus.codec import Envelope, decode, encode
from fedbus.compress import MODEL_META_KEY
from fedbus.connect import make_bus
from fedbus.manifest import BrokerSpec, Manifest, compile_wiring, parse_manifest, with_broker
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.services.trainer import Trainer
from fedbus.wire import DONE, METRICS, ROUND, UPDATE, join_tensors, presence

SIZE = 64


def manifest(rounds: int = 3, delay_s: float = 0.2, **round_kw: Any) -> Manifest:
    spec = {"deadline_s": 20, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 20}
    spec.update(round_kw)
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 1, "strategy": "fedavg",
        "round": spec,
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": SIZE, "lr": 0.5, "delay_s": delay_s}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
    })


Attack = Callable[[Bus, Envelope], Awaitable[None]]


async def federate(
    m: Manifest, attack: Attack | None = None, *, bus_for: Callable[[str], Bus] | None = None,
) -> tuple[Aggregator, dict[str, Trainer], dict[str, asyncio.Task[int]]]:
    """Every node of ``m`` in this loop; ``attack`` runs once, on the first round order.
    Returns the aggregator, the trainers and their tasks as they were when the job ended."""
    buses = {n.id: (bus_for or (lambda i: make_bus(m, m.node(i))))(n.id) for n in m.nodes}
    services = {i: build_node(m, i, b) for i, b in buses.items()}
    agg = services.pop("agg")
    assert isinstance(agg, Aggregator)
    snapshot: dict[str, asyncio.Task[int]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        attacker = bus_for("mallory") if bus_for else MqttBus("mallory", m.broker.host,
                                                             m.broker.port)  # type: ignore[union-attr]
        await stack.enter_async_context(attacker)
        async with asyncio.timeout(90), asyncio.TaskGroup() as tg:
            tasks = {i: tg.create_task(s.run(), name=i) for i, s in services.items()}
            if attack is not None:
                tg.create_task(_first_order(attacker, m, attack))
            await agg.run()
            snapshot = dict(tasks)
            alive = {i: not t.done() for i, t in tasks.items()}
            for t in tasks.values():
                t.cancel()
    # no trainer died: each either still serves or ended cleanly on an authenticated `done`
    for i, t in snapshot.items():
        assert alive[i] or (not t.cancelled() and t.exception() is None), i
    return agg, services, snapshot  # type: ignore[return-value]


async def _first_order(bus: Bus, m: Manifest, attack: Attack) -> None:
    async with bus.subscribe(topics.model(m.job, "agg")) as sub:
        while True:
            env = decode((await sub.get()).payload)
            if env.kind == ROUND:
                await attack(bus, env)
                return


async def clean_weights(m: Manifest) -> np.ndarray:
    broker = MemoryBroker()
    agg, _, _ = await federate(
        m, bus_for=lambda i: make_bus(m, m.node(i), memory=broker) if i != "mallory"
        else MemoryBus(broker, "mallory"))
    return agg.weights["w"]


def on(proc: MosquittoProcess, m: Manifest) -> Manifest:
    return with_broker(m, BrokerSpec(host=proc.host, port=proc.port))


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- the forgeries, on an open broker ---------------------------------------------------------

pytestmark_broker = [pytest.mark.broker]


@pytest.mark.broker
async def test_a_forged_done_neither_ends_trainers_nor_the_job(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: `done` as the aggregator would send it, epoch and all, after round 1's order
    m = on(mosquitto, manifest())
    expected = await clean_weights(m)

    async def forge_done(bus: Bus, order: Envelope) -> None:
        env = Envelope(kind=DONE, job="toy", sender="agg", round=order.round,
                       meta={"epoch": order.meta["epoch"], "rounds": 3})
        await bus.publish(topics.model("toy", "agg"), encode(env))

    # Execute
    with capture_logs() as logs:
        agg, trainers, _ = await federate(m, forge_done)
    # Assert: nobody left; every round ran with all three; the model is the clean one
    assert [len(r.accepted) for r in agg.history] == [3, 3, 3]
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)
    assert len(events(logs, "job_done_untrusted")) >= 3  # logged by each trainer
    assert all(t.rounds_trained == 3 for t in trainers.values())


@pytest.mark.broker
async def test_a_forged_far_ahead_round_is_refused_and_nobody_freezes(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: an order for round 10**9 naming every trainer
    m = on(mosquitto, manifest())
    expected = await clean_weights(m)

    async def forge_round(bus: Bus, order: Envelope) -> None:
        env = Envelope(kind=ROUND, job="toy", sender="agg", round=10**9,
                       meta={**order.meta, "selected": ["t0", "t1", "t2"]},
                       tensors=order.tensors)
        await bus.publish(topics.model("toy", "agg"), encode(env))

    # Execute
    with capture_logs() as logs:
        agg, trainers, _ = await federate(m, forge_round)
    # Assert
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)
    assert all(t.rejections.counts["implausible_round"] == 1 for t in trainers.values())
    assert len([e for e in events(logs, "message_rejected")
                if e["reason"] == "implausible_round"]) == 3


async def test_a_broadcast_whose_model_codec_lies_is_refused_and_counted() -> None:
    # Prepare: the next round's order, well timed, declaring int8-packed tensors of 1 GiB
    # each (codec.model) around the dense float32 model
    m = manifest()
    expected = await clean_weights(m)
    broker = MemoryBroker()

    async def forge(bus: Bus, order: Envelope) -> None:
        lie = {"mode": "int8", "block": 256, "tensors": {"w": ["<f4", [1 << 28]]}}
        env = Envelope(kind=ROUND, job="toy", sender="agg", round=order.round + 1,
                       meta={**order.meta, MODEL_META_KEY: lie}, tensors=order.tensors)
        await bus.publish(topics.model("toy", "agg"), encode(env))

    # Execute
    agg, trainers, _ = await federate(
        m, forge, bus_for=lambda i: make_bus(m, m.node(i), memory=broker) if i != "mallory"
        else MemoryBus(broker, "mallory"))
    # Assert: refused before anything was allocated, counted by every trainer, no harm done
    assert all(t.rejections.counts["bad_model_codec"] == 1 for t in trainers.values())
    assert [len(r.accepted) for r in agg.history] == [3, 3, 3]
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)


@pytest.mark.broker
async def test_forged_retained_offline_presence_is_contradicted_and_rounds_stay_full(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: mid-round, a retained "offline" for every trainer
    m = on(mosquitto, manifest())
    expected = await clean_weights(m)

    async def forge_offline(bus: Bus, order: Envelope) -> None:
        for t in ("t0", "t1", "t2"):
            await bus.publish(topics.presence("toy", t),
                              encode(presence("toy", t, "trainer", "offline")), retain=True)

    # Execute
    with capture_logs() as logs:
        agg, trainers, _ = await federate(m, forge_offline)
    # Assert: the trainers said they are alive, the aggregator counted them back in
    assert [len(r.accepted) for r in agg.history] == [3, 3, 3]
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)
    assert all(t.rejections.counts["presence_contradicted"] >= 1 for t in trainers.values())
    assert agg.online == {"t0", "t1", "t2"}
    assert events(logs, "node_lost")  # the forgery was seen, and logged


@pytest.mark.broker
async def test_a_flood_of_forged_offlines_gets_a_bounded_answer_and_ends_online(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: mid-job, 300 retained "offline"s for t0 as fast as one client sends them; a
    # watcher reads t0's presence topic in the broker's order until t0 has the last word
    from fedbus.services.trainer import REANNOUNCE_S

    m = on(mosquitto, manifest(rounds=15))
    forged: set[str] = set()
    answers: list[float] = []
    took: list[float] = []

    async def flood(bus: Bus, order: Envelope) -> None:
        loop = asyncio.get_running_loop()
        async with bus.subscribe(topics.presence("toy", "t0")) as sub:
            start = loop.time()
            for _ in range(300):
                env = presence("toy", "t0", "trainer", "offline")
                forged.add(env.msg_id)
                await bus.publish(topics.presence("toy", "t0"), encode(env), retain=True)
            seen, last_online = 0, False
            async with asyncio.timeout(30):
                while seen < len(forged) or not last_online:
                    env = decode((await sub.get()).payload)
                    last_online = env.msg_id not in forged
                    if last_online:
                        answers.append(loop.time())
                    else:
                        seen += 1
            took.append(loop.time() - start)

    # Execute
    agg, trainers, _ = await federate(m, flood)
    # Assert: one answer an interval at most (it answered each forgery before), yet t0's own
    # "online" came after the last forgery; t1 and t2 never missed a round
    assert 1 <= len(answers) <= took[0] / REANNOUNCE_S + 2
    assert trainers["t0"].rejections.counts["presence_contradicted"] >= 100
    assert all(len(r.accepted) >= 2 for r in agg.history) and len(agg.history) == 15


@pytest.mark.broker
async def test_a_poisoned_update_is_refused_and_the_real_one_counts(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: 1e30s claiming a million examples, on t0's topic, before t0 answers
    m = on(mosquitto, manifest())
    expected = await clean_weights(m)

    async def poison(bus: Bus, order: Envelope) -> None:
        env = Envelope(kind=UPDATE, job="toy", sender="t0", round=order.round,
                       meta={"num_examples": 10**6},
                       tensors=join_tensors({"w": np.full(SIZE, 1e30, np.float32)}))
        await bus.publish(topics.update("toy", "agg", "t0"), encode(env))

    # Execute
    agg, _, _ = await federate(m, poison)
    # Assert
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)
    assert agg.rejections.counts["norm_exceeded"] == 1
    assert agg.history[0].rejected == {"norm_exceeded": 1}


async def test_an_update_norm_bound_refuses_large_but_finite_updates() -> None:
    # Prepare: a bound below what the toy trainers send in round 1
    m = manifest(rounds=1, delay_s=0.0, max_update_norm=1e-3, deadline_s=0.5)
    broker = MemoryBroker()
    # Execute
    agg, _, _ = await federate(
        m, bus_for=lambda i: make_bus(m, m.node(i), memory=broker) if i != "mallory"
        else MemoryBus(broker, "mallory"))
    # Assert: every update refused by reason, the round not aggregated, nothing crashed
    assert agg.rejections.counts["norm_exceeded"] == 3
    assert not agg.history[0].aggregated


async def test_rejections_between_rounds_land_in_the_next_report() -> None:
    # Prepare: garbage sent right after each round's metrics, i.e. between rounds
    m = manifest(rounds=3, delay_s=0.0)
    broker = MemoryBroker()

    async def garbage_after_metrics() -> None:
        async with MemoryBus(broker, "mallory") as bus, \
                bus.subscribe(topics.metrics("toy", "agg")) as sub:
            for _ in range(2):
                env = decode((await sub.get()).payload)
                assert env.kind == METRICS
                await bus.publish(topics.update("toy", "agg", "t1"), b"garbage")

    # Execute
    async with asyncio.TaskGroup() as tg:
        tg.create_task(garbage_after_metrics())
        agg, _, _ = await federate(
            m, bus_for=lambda i: make_bus(m, m.node(i), memory=broker) if i != "mallory"
            else MemoryBus(broker, "mallory-idle"))
    # Assert: every rejection is in exactly one round's report
    assert agg.rejections.total == 2
    assert sum(sum(r.rejected.values()) for r in agg.history) == 2


# --- the wiring is what the services really do ------------------------------------------------


class SpyBus(MemoryBus):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscribed: set[str] = set()
        self.published: set[str] = set()

    def subscribe(self, *filters: str, **options: Any) -> Any:
        self.subscribed.update(filters)
        return super().subscribe(*filters, **options)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.published.add(topic)
        await super().publish(topic, payload, retain=retain)


async def test_services_subscribe_and_publish_exactly_what_the_wiring_says() -> None:
    # Prepare: spy on every node's bus; updates bigger than a chunk so grants flow too
    m = manifest(rounds=2, delay_s=0.0, max_uploads=1, upload_burst_mb=0)
    m = parse_manifest({**_raw(m), "task": {"ref": "examples.toy.task:make_task",
                                            "params": {"size": 300_000, "lr": 0.5}}})
    broker = MemoryBroker()
    spies: dict[str, SpyBus] = {}

    def bus_for(node: str) -> Bus:
        if node == "mallory":
            return MemoryBus(broker, node)
        real = make_bus(m, m.node(node), memory=broker)
        spies[node] = SpyBus(broker, node, will=real.will, birth=real.birth,
                             chunk_bytes=100_000)
        return spies[node]

    # Execute
    await federate(m, bus_for=bus_for)
    # Assert
    wiring = compile_wiring(m)
    for node, spy in spies.items():
        assert spy.subscribed == set(wiring[node].subscribe), node
        assert spy.published <= set(wiring[node].publish), node
    assert topics.control("toy", "t0") in spies["agg"].published  # grants did flow


def _raw(m: Manifest) -> dict[str, Any]:
    r = m.round
    return {"version": 1, "job": m.job, "rounds": m.rounds, "seed": m.seed,
            "strategy": m.strategy.name, "codec": {"level": 0},
            "round": {"deadline_s": r.deadline_s, "quorum": r.quorum,
                      "min_clients": r.min_clients, "start_timeout_s": r.start_timeout_s,
                      "max_uploads": r.max_uploads, "upload_burst_mb": r.upload_burst_mb},
            "nodes": [{"id": "agg", "role": "aggregator"}],
            "trainers": {"count": 3, "prefix": "t", "parent": "agg"}}


async def test_a_bounded_subscription_drops_and_counts_what_it_cannot_hold() -> None:
    # Prepare: room for two 50-byte messages waiting unread
    broker = MemoryBroker()
    async with MemoryBus(broker, "reader") as reader, MemoryBus(broker, "flood") as flood, \
            reader.subscribe("fedbus/v1/toy/model/agg", max_queued_bytes=100) as sub:
        # Execute
        for i in range(5):
            await flood.publish("fedbus/v1/toy/model/agg", bytes([i]) * 50)
        # Assert: the first two wait, three were dropped and counted; reading frees room
        assert reader.stats["dropped_queue_full"] == 3
        assert (await sub.get(timeout=1)).payload == bytes([0]) * 50
        await flood.publish("fedbus/v1/toy/model/agg", b"x" * 50)
        assert (await sub.get(timeout=1)).payload == bytes([1]) * 50
        assert (await sub.get(timeout=1)).payload == b"x" * 50


def test_loss_grace_is_a_checked_manifest_setting() -> None:
    from fedbus.errors import ManifestError

    assert manifest(loss_grace_s=0).round.loss_grace_s == 0.0
    with pytest.raises(ManifestError, match=r"round\.loss_grace_s"):
        manifest(loss_grace_s=-1)


class LossyBus(MemoryBus):
    """Loses the first update each listed trainer sends (a broker restart, a dropped chunk)."""

    def __init__(self, *args: Any, lose: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose = set(lose)
        self.lost: list[str] = []

    def _receive(self, topic: str, payload: bytes, via: str) -> None:
        sender = topic.rsplit("/", 1)[1]
        if "/update/" in topic and sender in self.lose:
            self.lose.discard(sender)
            self.lost.append(sender)
            return
        super()._receive(topic, payload, via)


async def test_a_lost_update_is_asked_for_again_and_the_round_completes() -> None:
    # Prepare: the aggregator never sees t0's first update; a short deadline to notice
    m = manifest(rounds=2, delay_s=0.0, deadline_s=0.5)
    expected = await clean_weights(m)
    broker = MemoryBroker()
    lossy: list[LossyBus] = []

    def bus_for(node: str) -> Bus:
        if node == "mallory":
            return MemoryBus(broker, node)
        real = make_bus(m, m.node(node), memory=broker)
        if node != "agg":
            return real
        lossy.append(LossyBus(broker, node, will=real.will, birth=real.birth, lose={"t0"}))
        return lossy[0]

    # Execute
    with capture_logs() as logs:
        agg, _, _ = await federate(m, bus_for=bus_for)
    # Assert: the update was lost, asked for again at the deadline, sent again, and counted
    assert lossy[0].lost == ["t0"]
    assert [len(r.accepted) for r in agg.history] == [3, 3]
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)
    assert any(e["event"] == "update_resent" and e.get("node") == "t0" for e in logs)


@pytest.mark.broker
async def test_a_broker_killed_and_restarted_mid_round_loses_nothing() -> None:
    # Prepare: a broker without persistence (what `fedbus run` starts), long deadlines so
    # that only the reconnect can repair the round in time
    import os
    import signal

    from fedbus.broker import spawn_mosquitto

    first = await spawn_mosquitto()
    port = first.port
    brokers = [first]
    m = with_broker(manifest(rounds=3, delay_s=0.3, deadline_s=30),
                    BrokerSpec(host="127.0.0.1", port=port, keepalive_s=5))
    expected = await clean_weights(m)

    async def restart_broker(bus: Bus, order: Envelope) -> None:
        await asyncio.sleep(0.1)  # the trainers are training round 1 now
        os.kill(first.pid, signal.SIGKILL)
        brokers.append(await spawn_mosquitto(port))

    try:
        # Execute
        with capture_logs() as logs:
            agg, _, _ = await federate(m, restart_broker)
    finally:
        for b in brokers:
            await b.stop()
    # Assert: every round complete with everyone, the clean model, well before any deadline
    assert [len(r.accepted) for r in agg.history] == [3, 3, 3]
    np.testing.assert_allclose(agg.weights["w"], expected, rtol=1e-6)
    assert agg.history[0].seconds < 15, agg.history[0].seconds
    events = [e["event"] for e in logs]
    assert "lose_broker" in events  # the broker really went away
    assert "round_reasked" in events  # and the aggregator asked its pending trainers again
