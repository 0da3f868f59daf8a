"""The issue's table of forgeries on an anonymous broker, one test a row, with
``security.sign: required``: each forgery is refused and counted, and the job ends with the
clean run's model, bit for bit.

Mallory reads everything (the broker has no ACLs) and forges in three ways: unsigned, signed
with the key of another real node of the job (stolen, or that node turned hostile), and as a
real message replayed (tampered with where a plain replay would be harmless). Restarts are
driven by the job's progress (a round report), as in tests/test_checkpoint.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.bus.signed import SignedBus
from fedbus.checkpoint import AggregatorState, state_envelope, state_from
from fedbus.codec import Envelope, decode, encode
from fedbus.connect import make_bus
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node
from fedbus.services.checkpointer import CHECKPOINT_ACK, RESTORE, RESTORE_REQUEST
from fedbus.signing import Signer, read_key, split_signed, write_key_pair
from fedbus.wire import ROUND

pytest.importorskip("cryptography")
pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

SIZE = 64
HOW = ["unsigned", "other_node_key", "replay"]
#: The clean run's model by row (independent of the broker and the keys).
_CLEAN: dict[str, bytes] = {}


def manifest(broker: MosquittoProcess, keys: Path, *, checkpoint: Path | None = None,
             ring: bool = False, wait_s: float = 5) -> Manifest:
    data: dict[str, Any] = {
        "version": 1, "job": "rows", "rounds": 3, "seed": 4, "strategy": "fedavg",
        "broker": {"host": broker.host, "port": broker.port},
        "round": {"deadline_s": 30, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 30},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": SIZE, "lr": 0.5, "delay_s": 0.05}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
        "security": {"sign": "required", "keys": str(keys)},
    }
    if checkpoint is not None:
        data["nodes"].append({"id": "ckpt", "role": "checkpointer"})
        data["checkpoint"] = {"dir": str(checkpoint), "wait_s": wait_s,
                              "restore_timeout_s": 10}
    if ring:
        data["groups"] = [{"id": "ring-a", "members": ["t0", "t1", "t2"],
                           "step_timeout_s": 20}]
    m = parse_manifest(data)
    for node in m.nodes:
        if not (keys / f"{node.id}.key").exists():
            write_key_pair(keys, node.id)
    return m


async def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for a condition another task or process brings about (no event to await)."""
    deadline = time.monotonic() + timeout
    while not check():  # counters have no event to await
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


class Federation:
    """Every node of a manifest in this loop, each on its own signed connection to the
    broker; nodes can be crashed (no goodbye: the will fires) and started again."""

    def __init__(self, m: Manifest) -> None:
        self.m = m
        self.buses: dict[str, Any] = {}
        self.services: dict[str, Any] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        #: Every bus a node had, crashed ones too, to count what they refused.
        self.all_buses: dict[str, list[Any]] = {}

    async def start(self, node: str) -> Any:
        bus = make_bus(self.m, self.m.node(node))
        assert isinstance(bus, SignedBus)
        await bus.__aenter__()
        self.buses[node] = bus
        self.all_buses.setdefault(node, []).append(bus)
        self.services[node] = svc = build_node(self.m, node, bus)
        self.tasks[node] = asyncio.create_task(svc.run(), name=node)
        return svc

    async def start_all(self, *, first: tuple[str, ...] = ()) -> None:
        for node in (*first, *(n.id for n in self.m.nodes if n.id not in first)):
            await self.start(node)

    async def crash(self, node: str) -> None:
        task = self.tasks.pop(node)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self.buses.pop(node).kill()

    async def finish(self, agg: str = "agg") -> Any:
        """Wait for the aggregator's job to end; stop everything else."""
        await self.tasks[agg]
        return self.services[agg]

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for bus in self.buses.values():
            with contextlib.suppress(Exception):
                await bus.__aexit__(None, None, None)

    def refused(self, node: str, reason: str) -> int:
        return sum(b.refused[reason] for b in self.all_buses.get(node, []))


class Mallory:
    """An anonymous client that reads every message of the job and publishes forgeries."""

    def __init__(self, m: Manifest, keys: Path, how: str) -> None:
        assert m.broker is not None
        self.m = m
        self.how = how
        self.keys = keys
        self.bus = MqttBus("mallory", m.broker.host, m.broker.port, options=MqttOptions())
        self.sent = 0

    def sign(self, payload: bytes, as_node: str) -> bytes:
        """The forgery as sent: unsigned, or signed by another real node than ``as_node``."""
        if self.how == "unsigned":
            return payload
        thief = next(n.id for n in self.m.nodes if n.id not in (as_node, "agg"))
        return Signer(thief, read_key(self.keys / f"{thief}.key")).sign(payload)

    async def send(self, topic: str, payload: bytes) -> None:
        await self.bus.publish(topic, payload)
        self.sent += 1


def opened(payload: bytes) -> Envelope:
    """A real (signed) message as Mallory reads it: the trailer is not encrypted."""
    parts = split_signed(payload)
    return decode(bytes(parts[0]) if parts else payload)


def tampered(real: bytes, env: Envelope) -> bytes:
    """A real signed message with its envelope replaced by ``env``, the trailer kept."""
    parts = split_signed(real)
    assert parts is not None
    return encode(env) + real[len(parts[0]):]


async def run(m: Manifest, keys: Path, how: str | None,
              scenario: Callable[[Federation, Mallory | None], Awaitable[Any]],
              attack: Callable[[Mallory, Any], Awaitable[None]] | None) -> tuple[Any, Federation]:
    """The scenario with Mallory's attack beside it (reading from the first message on)."""
    fed = Federation(m)
    mallory = Mallory(m, keys, how) if how is not None else None
    try:
        async with asyncio.timeout(120), contextlib.AsyncExitStack() as stack:
            attacker: asyncio.Task[None] | None = None
            if mallory is not None and attack is not None:
                await stack.enter_async_context(mallory.bus)
                spy = await stack.enter_async_context(
                    mallory.bus.subscribe(f"fedbus/v1/{m.job}/#"))
                attacker = asyncio.create_task(attack(mallory, spy))
            agg = await scenario(fed, mallory)
            if attacker is not None:
                if attacker.done():
                    attacker.result()  # surface a bug in the attack
                attacker.cancel()
                await asyncio.gather(attacker, return_exceptions=True)
    finally:
        await fed.close()
    return agg, fed


async def clean(row: str, m: Manifest, keys: Path,
                scenario: Callable[[Federation, Mallory | None], Awaitable[Any]]) -> bytes:
    if row not in _CLEAN:
        agg, _ = await run(m, keys, None, scenario, None)
        _CLEAN[row] = agg.weights["w"].tobytes()
    return _CLEAN[row]


async def plain(fed: Federation, _: Mallory | None) -> Any:
    await fed.start_all()
    return await fed.finish()


def rejected(svc: Any, suffix: str) -> int:
    """Rejections whose reason ends with ``suffix`` (the door labels them by entry)."""
    return sum(v for k, v in svc.rejections.counts.items() if k.endswith(suffix))


def same_model(agg: Any, expected: bytes) -> None:
    assert agg.weights["w"].tobytes() == expected, (agg.weights["w"][:4],
                                                   np.frombuffer(expected, np.float32)[:4])


# --- row 1: one `mode: async` order on work/t0/<aggregator> ----------------------------------

@pytest.mark.parametrize("how", HOW)
async def test_a_forged_async_work_order_is_refused(
        mosquitto: MosquittoProcess, tmp_path: Path, how: str) -> None:
    # Prepare: on every real order, Mallory sends t0 an asynchronous order of her own
    keys = tmp_path / "keys"
    m = manifest(mosquitto, keys)
    expected = await clean("work", m, keys, plain)

    async def attack(mallory: Mallory, spy: Any) -> None:
        async for msg in spy:
            if msg.topic != topics.model(m.job, "agg") or opened(msg.payload).kind != ROUND:
                continue
            order = opened(msg.payload)
            if how == "replay":  # the real order, signed by the aggregator, on t0's work topic
                payload = msg.payload
            else:
                forged = Envelope(kind=ROUND, job=m.job, sender="agg", round=order.round,
                                  meta={**order.meta, "mode": "async", "selected": ["t0"]},
                                  tensors={"m/w": np.full(SIZE, 1e3, np.float32)})
                payload = mallory.sign(encode(forged), "agg")
            await mallory.send(topics.work(m.job, "t0", "agg"), payload)

    # Execute
    agg, fed = await run(m, keys, how, plain, attack)
    # Assert: refused by t0 (its bus, or its front door), counted; the clean model
    t0 = fed.services["t0"]
    if how == "unsigned":
        assert fed.refused("t0", "unsigned") >= 1
    elif how == "other_node_key":
        assert rejected(t0, "wrong_signer") >= 1, t0.rejections.counts
    else:  # the order was acted on once, whichever copy came first
        assert t0.rejections.counts["duplicate"] + t0.rejections.counts["old_round"] >= 1, \
            t0.rejections.counts
    assert t0.rounds_trained == 3
    assert [len(r.accepted) for r in agg.history] == [3, 3, 3]
    same_model(agg, expected)


# --- row 2: four ring/ chunks a round --------------------------------------------------------

@pytest.mark.parametrize("how", HOW)
async def test_forged_ring_chunks_are_refused(
        mosquitto: MosquittoProcess, tmp_path: Path, how: str) -> None:
    # Prepare: one ring of three; on every order, four first-step chunks into every inbox
    keys = tmp_path / "keys"
    m = manifest(mosquitto, keys, ring=True)
    expected = await clean("ring", m, keys, plain)
    members = ["t0", "t1", "t2"]
    seen: list[tuple[str, bytes]] = []  # real ring traffic, replayed a round later

    async def attack(mallory: Mallory, spy: Any) -> None:
        async for msg in spy:
            if "/ring/" in msg.topic:
                seen.append((msg.topic, msg.payload))
                continue
            if msg.topic != topics.model(m.job, "agg") or opened(msg.payload).kind != ROUND:
                continue
            order = opened(msg.payload)
            if how == "replay":
                old = [(t, p) for t, p in seen if opened(p).round < order.round]
                for topic, payload in old[-4:]:
                    await mallory.send(topic, payload)
                continue
            for chunk in range(4):
                to = members[chunk % 3]
                frm = members[(chunk + 2) % 3]  # the member before it in the ring
                env = Envelope(kind="ring", job=m.job, sender=frm, round=order.round,
                               meta={"epoch": order.meta["epoch"], "group": "ring-a",
                                     "phase": "rs", "step": 0, "chunk": chunk},
                               tensors={"c": np.full(SIZE // 3, 1e9, np.float32)})
                await mallory.send(topics.ring(m.job, "ring-a", to, frm),
                                   mallory.sign(encode(env), frm))

    # Execute
    agg, fed = await run(m, keys, how, plain, attack)
    # Assert
    if how == "unsigned":
        assert sum(fed.refused(t, "unsigned") for t in members) >= 4
    elif how == "other_node_key":
        assert sum(rejected(fed.services[t], "wrong_signer") for t in members) >= 4
    else:
        stale = sum(rejected(fed.services[t], s) for t in members
                    for s in ("ring_stale", "ring_duplicate"))
        assert stale >= 1, [fed.services[t].rejections.counts for t in members]
    assert all(fed.services[t].outcomes["fallback"] == 0 for t in members)
    same_model(agg, expected)


# --- rows 3 and 4: restarts ------------------------------------------------------------------

async def restart_after(fed: Federation, rounds: int,
                        before: Callable[[], Awaitable[None]] | None = None) -> Any:
    """The aggregator crashes once it has reported ``rounds`` rounds (checkpoints acked);
    a new one with the same manifest takes over. Returns the one that finished."""
    await fed.start_all(first=("ckpt", "t0", "t1", "t2"))
    agg = fed.services["agg"]
    for _ in range(rounds):
        await agg.reports.get()
    if before is not None:
        await before()
    await fed.crash("agg")
    await fed.start("agg")
    return await fed.finish()


@pytest.mark.parametrize("how", HOW)
async def test_a_forged_restore_reply_loses_the_race(
        mosquitto: MosquittoProcess, tmp_path: Path, how: str) -> None:
    # Prepare: Mallory answers every restore request at once, as the checkpointer, with a
    # state of her own (or, replaying, with the checkpointer's real answer to an earlier one)
    keys = tmp_path / "keys"
    m = manifest(mosquitto, keys, checkpoint=tmp_path / "clean")

    async def restart(fed: Federation, _: Mallory | None) -> Any:
        return await restart_after(fed, 1)

    expected = await clean("restore", m, keys, restart)
    m = manifest(mosquitto, keys, checkpoint=tmp_path / "ckpt")
    answers: list[bytes] = []

    async def attack(mallory: Mallory, spy: Any) -> None:
        async for msg in spy:
            if msg.topic == topics.state(m.job, "ckpt") and opened(msg.payload).kind == RESTORE:
                answers.append(msg.payload)
            if msg.topic != topics.control(m.job, "ckpt"):
                continue
            request = opened(msg.payload)
            if request.kind != RESTORE_REQUEST:
                continue
            if how == "replay":
                if answers:
                    await mallory.send(topics.state(m.job, "ckpt"), answers[-1])
                continue
            state = AggregatorState(m.job, "agg", 2, {"w": np.full(SIZE, 1e3, np.float32)})
            inner = state_envelope(state)
            reply = Envelope(kind=RESTORE, job=m.job, sender="ckpt", round=2,
                             meta={"node": "agg", "request": request.msg_id,
                                   "state": dict(inner.meta)}, tensors=inner.tensors)
            await mallory.send(topics.state(m.job, "ckpt"), mallory.sign(encode(reply), "ckpt"))

    # Execute
    agg, fed = await run(m, keys, how, restart, attack)
    # Assert: the new aggregator restored the real round 1 and ended with the clean model
    assert agg.start_round == 2
    if how == "unsigned":
        assert fed.refused("agg", "unsigned") >= 1
    elif how == "other_node_key":
        assert rejected(agg, "checkpointer_wrong_signer") >= 1, agg.rejections.counts
    else:  # the first run's answer, to a request the new aggregator never made
        assert agg.rejections.counts["checkpointer_unexpected"] >= 1, agg.rejections.counts
    same_model(agg, expected)


@pytest.mark.parametrize("how", HOW)
async def test_a_forged_far_ahead_checkpoint_is_refused_and_a_restart_resumes(
        mosquitto: MosquittoProcess, tmp_path: Path, how: str) -> None:
    # Prepare: on the first real checkpoint, Mallory publishes one for round 999999998 as the
    # aggregator (replaying: the real one, its round changed, its signature kept)
    keys = tmp_path / "keys"
    m = manifest(mosquitto, keys, checkpoint=tmp_path / "clean")

    async def restart(fed: Federation, _: Mallory | None) -> Any:
        return await restart_after(fed, 2)

    expected = await clean("ahead", m, keys, restart)
    m = manifest(mosquitto, keys, checkpoint=tmp_path / "ckpt")
    forged_sent = asyncio.Event()

    async def attack(mallory: Mallory, spy: Any) -> None:
        async for msg in spy:
            if msg.topic != topics.state(m.job, "agg"):
                continue
            real = opened(msg.payload)
            ahead = AggregatorState(m.job, "agg", 999_999_998, state_from(real).weights)
            env = state_envelope(ahead)
            payload = (tampered(msg.payload, env) if how == "replay"
                       else mallory.sign(encode(env), "agg"))
            await mallory.send(topics.state(m.job, "agg"), payload)
            forged_sent.set()
            return

    fed_ref: list[Federation] = []

    async def restart_once_refused(fed: Federation, _: Mallory | None) -> Any:
        fed_ref.append(fed)

        async def refused() -> None:
            # the restart comes after the forgery reached the checkpointer (and was refused)
            await forged_sent.wait()
            await until(lambda: counted(fed) >= 1, "the forged checkpoint was not counted")

        return await restart_after(fed, 2, refused)

    def counted(fed: Federation) -> int:
        ckpt = fed.services["ckpt"]
        return {"unsigned": fed.refused("ckpt", "unsigned"),
                "other_node_key": rejected(ckpt, "wrong_signer"),
                "replay": fed.refused("ckpt", "bad_signature")}[how]

    # Execute
    agg, fed = await run(m, keys, how, restart_once_refused, attack)
    # Assert: nothing far ahead was stored; the restart resumed after round 2
    assert counted(fed) == 1
    assert max(r for _, r in fed.services["ckpt"].stored) == 3
    assert agg.start_round == 3
    assert [r.round for r in agg.history] == [3]
    same_model(agg, expected)


# --- row 5: acks after the checkpointer died -------------------------------------------------

@pytest.mark.parametrize("how", HOW)
async def test_forged_acks_after_the_checkpointer_died_do_not_make_rounds_durable(
        mosquitto: MosquittoProcess, tmp_path: Path, how: str) -> None:
    # Prepare: the checkpointer crashes after round 1; Mallory acks every later checkpoint
    # as the checkpointer, naming its real message id (replaying: the real ack of round 1,
    # changed to the new round and id, its signature kept)
    keys = tmp_path / "keys"
    m = manifest(mosquitto, keys, checkpoint=tmp_path / "clean", wait_s=2)
    expected = await clean("acks", m, keys, plain)
    m = manifest(mosquitto, keys, checkpoint=tmp_path / "ckpt", wait_s=2)
    real_acks: list[bytes] = []

    async def attack(mallory: Mallory, spy: Any) -> None:
        async for msg in spy:
            if msg.topic == topics.state(m.job, "ckpt"):
                if opened(msg.payload).kind == CHECKPOINT_ACK:
                    real_acks.append(msg.payload)
                continue
            if msg.topic != topics.state(m.job, "agg"):
                continue
            checkpoint = opened(msg.payload)
            if checkpoint.round < 2:
                continue
            ack = Envelope(kind=CHECKPOINT_ACK, job=m.job, sender="ckpt", round=checkpoint.round,
                           meta={"node": "agg", "of": checkpoint.msg_id, "seconds": 0.001,
                                 "bytes": len(msg.payload)})
            payload = (tampered(real_acks[0], ack) if how == "replay"
                       else mallory.sign(encode(ack), "ckpt"))
            await mallory.send(topics.state(m.job, "ckpt"), payload)

    async def checkpointer_dies(fed: Federation, _: Mallory | None) -> Any:
        await fed.start_all(first=("ckpt", "t0", "t1", "t2"))
        await fed.services["agg"].reports.get()
        await fed.crash("ckpt")
        return await fed.finish()

    # Execute
    agg, fed = await run(m, keys, how, checkpointer_dies, attack)
    # Assert: round 1 durable (the real ack), rounds 2 and 3 not; the forged acks counted
    assert [r.durable for r in agg.history] == [True, False, False]
    if how == "unsigned":
        assert fed.refused("agg", "unsigned") >= 2
    elif how == "other_node_key":
        assert rejected(agg, "checkpointer_wrong_signer") >= 2, agg.rejections.counts
    else:
        assert fed.refused("agg", "bad_signature") >= 2
    assert len(list((tmp_path / "ckpt").rglob("*.ckpt"))) == 1
    same_model(agg, expected)
