"""Hybrid ring groups on the memory bus: the star's model, the manifest and the wiring, and
hostile ring messages."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from federation import connect, run_root
from spies import assert_follows_wiring, stand_in

from fedbus import topics
from fedbus.bus import Message
from fedbus.bus.memory import MemoryBroker, MemoryBus
from fedbus.codec import Envelope, Limits, decode, encode
from fedbus.connect import make_bus
from fedbus.errors import BusError, ManifestError, UpdateRejected
from fedbus.manifest import Manifest, compile_wiring, parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator, _Round
from fedbus.services.ring import RING, RingMember, check_covers, covered
from fedbus.services.ring import _Round as RingRound

TASK = {"ref": "examples.toy.task:make_task", "params": {"size": 64, "lr": 0.4}}
GROUPS = [{"id": "ring-a", "members": ["t0", "t1", "t2"]},
          {"id": "ring-b", "mode": "ring", "members": ["t4", "t3"], "step_timeout_s": 5}]


def manifest(groups: list[dict[str, Any]] | None = None, rounds: int = 3,
             task: dict[str, Any] | None = None, **extra: Any) -> Manifest:
    data: dict[str, Any] = {
        "version": 1, "job": "toy", "rounds": rounds, "seed": 9, "task": task or TASK,
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 6, "start_timeout_s": 10},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 6, "prefix": "t"}, **extra,
    }
    if groups is not None:
        data["groups"] = groups
    return parse_manifest(data)


async def federate(m: Manifest, *, broker: MemoryBroker | None = None,
                   buses: dict[str, Any] | None = None) -> tuple[Aggregator, dict[str, Any]]:
    services = await connect(m, broker or MemoryBroker(),
                             bus_for=lambda n: (buses or {}).get(n.id))
    return await run_root(services)


async def test_fedavg_with_ring_groups_gives_the_flat_stars_model() -> None:
    # Prepare / Execute: the same six trainers, flat and with two ring groups
    star, _ = await federate(manifest())
    hybrid, services = await federate(manifest(GROUPS))
    # Assert: the groups' summed updates are FedAvg's (to float rounding)
    np.testing.assert_allclose(hybrid.weights["w"], star.weights["w"], rtol=1e-6, atol=1e-6)
    assert [r.accepted for r in hybrid.history] == [[f"t{i}" for i in range(6)]] * 3
    assert [r.examples for r in hybrid.history] == [r.examples for r in star.history]
    # every ring committed by its first member, the others covered, nobody fell back
    a0, a1, b4 = services["t0"], services["t1"], services["t4"]
    assert isinstance(a0, RingMember) and isinstance(a1, RingMember)
    assert a0.outcomes == {"committed": 3} and a1.outcomes == {"covered": 3}
    assert b4.outcomes == {"committed": 3}  # rank is the manifest's order, not the id's
    assert all(s.rejections.total == 0 for s in services.values())
    assert hybrid.rejections.total == 0


async def test_a_ring_group_under_a_relay_gives_the_flat_stars_model() -> None:
    # Prepare: t0..t2 in a ring under relay r0, t3..t5 plain under relay r1
    m = parse_manifest({
        "version": 1, "job": "toy", "rounds": 3, "seed": 9, "task": TASK,
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 2, "start_timeout_s": 10},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "r0", "role": "relay"},
                  {"id": "r1", "role": "relay"},
                  *({"id": f"t{i}", "role": "trainer", "parent": f"r{i // 3}", "partition": i}
                    for i in range(6))],
        "groups": [{"id": "ring-a", "members": ["t0", "t1", "t2"]}],
    })
    # Execute
    star, _ = await federate(manifest())
    tree, services = await federate(m)
    # Assert: the relay counted the covered members and the root's model is the star's
    np.testing.assert_allclose(tree.weights["w"], star.weights["w"], rtol=1e-6, atol=1e-6)
    assert [r.accepted for r in services["r0"].history] == [["t0", "t1", "t2"]] * 3
    assert services["t0"].outcomes == {"committed": 3}


async def test_a_member_lost_mid_ring_makes_its_group_fall_back_and_the_round_completes()\
        -> None:
    # Prepare: t1 trains slowly; t2 (after t1 in the ring) dies after its first ring step
    m = manifest(GROUPS, rounds=2, task={**TASK, "params": {
        **TASK["params"], "speeds": [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]}},
        round={"deadline_s": 10, "quorum": 0.5, "min_clients": 6, "start_timeout_s": 10})
    broker = MemoryBroker()
    buses = {n.id: make_bus(m, n, memory=broker) for n in m.nodes}

    async def kill_t2_after_its_first_step() -> None:
        async with MemoryBus(broker, "watcher") as watch, watch.subscribe(
                topics.ring("toy", "ring-a", "t0", "t2")) as sub:
            await sub.get(timeout=20)
            await buses["t2"].kill()  # its will: t0 and t1 hear it at once

    # Execute
    killer = asyncio.create_task(kill_t2_after_its_first_step())
    agg, services = await federate(m, broker=broker, buses=buses)
    await killer
    # Assert: round 1 completed with the survivors uploading one by one, well before the
    # deadline, and nobody counted twice
    first = agg.history[0]
    assert first.accepted == ["t0", "t1", "t3", "t4", "t5"] and first.lost == ["t2"]
    assert first.seconds < 5
    assert services["t0"].outcomes == {"fallback": 1, "committed": 1}  # then a ring of two
    assert services["t1"].outcomes == {"fallback": 1, "covered": 1}
    assert services["t4"].outcomes["committed"] == 2  # the other group was untouched
    assert agg.history[1].accepted == ["t0", "t1", "t3", "t4", "t5"]


class DiesBeforeUploading(MemoryBus):
    """A node that crashes the moment it would upload (its will fires)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if "/update/" in topic:
            await self.kill()
            raise BusError("crashed")
        await super().publish(topic, payload, retain=retain)


async def test_a_committer_lost_after_the_ring_is_replaced_by_the_next_member_by_rank() -> None:
    # Prepare: t0 (ring-a's committer) crashes once the ring is done, before it uploads
    m = manifest(GROUPS, rounds=1)
    broker = MemoryBroker()
    buses = {"t0": stand_in(DiesBeforeUploading, m, broker, "t0")}
    # Execute
    star, _ = await federate(manifest(rounds=1))
    agg, services = await federate(m, broker=broker, buses=buses)
    # Assert: t1 held the whole sum too and committed it, t0's contribution included
    assert agg.history[0].accepted == [f"t{i}" for i in range(6)]
    assert services["t1"].outcomes == {"committed": 1}
    assert services["t2"].outcomes == {"covered": 1}
    np.testing.assert_allclose(agg.weights["w"], star.weights["w"], rtol=1e-6, atol=1e-6)


class LosesItsFirstUpload(MemoryBus):
    """A node whose first update vanishes on the way (a broker restart, a lost message)."""

    lost = 0

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if "/update/" in topic and not self.lost:
            self.lost += 1
            return
        await super().publish(topic, payload, retain=retain)


async def test_a_lost_group_update_is_repaired_by_the_members_own_updates() -> None:
    # Prepare: t0's committed update for ring-a is lost; the deadline is short
    groups = [{"id": "ring-a", "members": ["t0", "t1", "t2"]}]
    m = manifest(groups, rounds=2, round={"deadline_s": 1.5, "quorum": 1.0, "min_clients": 6,
                                          "start_timeout_s": 10, "loss_grace_s": 0})
    broker = MemoryBroker()
    buses = {"t0": stand_in(LosesItsFirstUpload, m, broker, "t0")}
    # Execute
    star, _ = await federate(manifest(rounds=2))
    agg, services = await federate(m, broker=broker, buses=buses)
    # Assert: at the deadline the round re-asked the missing members, each sent its own
    # update, and the round ended with everyone and the star's model
    assert agg.history[0].accepted == [f"t{i}" for i in range(6)]
    assert agg.history[0].seconds > 1.5
    np.testing.assert_allclose(agg.weights["w"], star.weights["w"], rtol=1e-6, atol=1e-6)
    assert services["t0"].outcomes == {"committed": 2}


class CutsOffItsSuccessor(MemoryBus):
    """Ring-a's committer t0 in round 1: its last all-gather step to t1 is lost (and its
    commit too when ``commit_lost``), and its group update reaches the aggregator only
    after ``overtaken`` is set (the aggregator has t1's own update by then)."""

    def __init__(self, *args: Any, commit_lost: bool, overtaken: asyncio.Event,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_lost = commit_lost
        self.overtaken = overtaken
        self.held: asyncio.Task[None] | None = None
        self.cut = 0

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if topic == topics.ring("toy", "ring-a", "t1", "t0"):
            env = decode(payload, Limits())
            lost = {("ag", 1)} | ({("commit", None)} if self.commit_lost else set())
            if env.round == 1 and (env.meta["phase"], env.meta.get("step")) in lost:
                self.cut += 1
                return
        if "/update/" in topic and self.held is None and self.commit_lost:
            # the group update is on its way, slowly: t0 goes on (it tells the commit)
            async def later() -> None:
                await self.overtaken.wait()
                await super(CutsOffItsSuccessor, self).publish(topic, payload)

            self.held = asyncio.create_task(later())
            return
        await super().publish(topic, payload, retain=retain)


class SaysWhenItUploads(MemoryBus):
    def __init__(self, *args: Any, uploaded: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uploaded = uploaded

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await super().publish(topic, payload, retain=retain)
        if "/update/" in topic:
            self.uploaded.set()  # routed: the aggregator's queue holds it


async def test_a_fallback_that_overtakes_its_groups_update_is_repaired_at_once() -> None:
    # Prepare: in round 1 t1 never hears t0's last step nor its commit, times out and
    # uploads its own update, which reaches the aggregator before the group's update that
    # covers it; the deadline is far
    m = manifest([{"id": "ring-a", "members": ["t0", "t1", "t2"], "step_timeout_s": 0.5}],
                 rounds=2)
    broker, uploaded = MemoryBroker(), asyncio.Event()
    t0 = stand_in(CutsOffItsSuccessor, m, broker, "t0", commit_lost=True, overtaken=uploaded)
    t1 = stand_in(SaysWhenItUploads, m, broker, "t1", uploaded=uploaded)
    # Execute
    star, _ = await federate(manifest(rounds=2))
    agg, services = await federate(m, broker=broker, buses={"t0": t0, "t1": t1})
    # Assert: the group update was refused once as double_count, the members it covered
    # were re-asked at once and sent their own updates: everyone counted, the star's model,
    # long before the deadline (10 s)
    assert t0.cut == 2 and t0.held is not None and t0.held.done()
    first = agg.history[0]
    assert first.accepted == [f"t{i}" for i in range(6)] and first.lost == []
    assert first.rejected == {"double_count": 1}
    assert first.seconds < 5
    assert [r.examples for r in agg.history] == [r.examples for r in star.history]
    np.testing.assert_allclose(agg.weights["w"], star.weights["w"], rtol=1e-6, atol=1e-6)
    assert services["t0"].outcomes == {"committed": 2}
    assert services["t1"].outcomes == {"fallback": 1, "covered": 1}
    assert services["t2"].outcomes == {"covered": 2}
    assert agg.history[1].rejected == {}


async def test_a_member_that_heard_the_commit_does_not_fall_back() -> None:
    # Prepare: t1 never gets t0's last all-gather step, but hears t0's commit; t5 trains
    # slowly, so the round is still open when t1's step times out
    m = manifest([{"id": "ring-a", "members": ["t0", "t1", "t2"], "step_timeout_s": 0.5}],
                 rounds=1, task={**TASK, "params": {**TASK["params"],
                                                    "speeds": [0, 0, 0, 0, 0, 2.0]}})
    broker = MemoryBroker()
    t0 = stand_in(CutsOffItsSuccessor, m, broker, "t0", commit_lost=False,
                  overtaken=asyncio.Event())
    # Execute
    star, _ = await federate(manifest(rounds=1))
    agg, services = await federate(m, broker=broker, buses={"t0": t0})
    # Assert: the group's update covered t1, which uploaded nothing of its own: no race
    assert t0.cut == 1
    assert agg.history[0].accepted == [f"t{i}" for i in range(6)]
    assert agg.rejections.total == 0
    assert services["t1"].outcomes == {"covered": 1}
    np.testing.assert_allclose(agg.weights["w"], star.weights["w"], rtol=1e-6, atol=1e-6)


def test_group_updates_refused_as_double_count_reask_each_member_once_a_round() -> None:
    # Prepare: round 1 of an aggregator with ring-a; t1's own update is in
    m = manifest(GROUPS)
    agg = build_node(m, "agg", make_bus(m, m.node("agg"), memory=MemoryBroker()))
    assert isinstance(agg, Aggregator)
    selected = {f"t{i}" for i in range(6)}
    state = _Round(1, selected=set(selected), pending=selected - {"t1"}, accepted={"t1"})
    agg._state = state

    def group_update(sender: str, covers: dict[str, int]) -> Envelope:
        return Envelope(kind="update", job="toy", sender=sender, round=1,
                        meta={"covers": covers, "num_examples": sum(covers.values())})

    # Execute: the committer's update, then more (forged or replayed) from each member
    reasons, due = [], []
    for sender in ("t0", "t0", "t2", "t0"):
        with pytest.raises(UpdateRejected) as err:
            agg.admit(group_update(sender, {"t0": 10, "t1": 15, "t2": 20}), sender)
        reasons.append(err.value.reason)
        due.append(set(state.overlap_due))
        state.overlap_due.clear()  # what the round's loop does when it re-asks them
    # Assert: every one refused whole; only the first asks, for the members still owed
    assert reasons == ["double_count"] * 4
    assert due == [{"t0", "t2"}, set(), set(), set()]


async def test_forged_and_stale_ring_messages_are_rejected_and_counted() -> None:
    # Prepare: one member's ring intake; a stranger (t5) and a member (t1) send garbage
    m = manifest(GROUPS)
    t0 = build_node(m, "t0", make_bus(m, m.node("t0"), memory=MemoryBroker()))
    assert isinstance(t0, RingMember)

    def ring_msg(sender: str, round: int = 1, size: int = 32, **meta: Any) -> bytes:
        return encode(Envelope(kind=RING, job="toy", sender=sender, round=round,
                               meta={"epoch": "e1", "group": "ring-a", "phase": "rs",
                                     "step": 0, "chunk": 0, **meta},
                               tensors={"c": np.ones(size, np.float32)}))

    from_t1 = topics.ring("toy", "ring-a", "t0", "t1")
    forged = [
        (topics.ring("toy", "ring-a", "t0", "t5"), ring_msg("t5")),  # not a member
        (from_t1, ring_msg("t2")),  # the envelope says another member
        (from_t1, ring_msg("t1", group="ring-b")),  # another group
        (from_t1, b"\x00garbage"),
        (from_t1, ring_msg("t1", phase="steal")),
        (topics.ring("toy", "ring-a", "t2", "t1"), ring_msg("t1")),  # another member's inbox
        (from_t1, ring_msg("t1", round=99)),  # beyond the job's rounds
        (from_t1, ring_msg("t1", size=1 << 20)),  # bigger than half the model: never a chunk
    ]
    # Execute
    for topic, payload in forged:
        await t0._on_ring(Message(topic, payload))
    held = ring_msg("t1", round=2)  # a real-looking step of a ring not started yet: held
    await t0._on_ring(Message(from_t1, held))
    await t0._on_ring(Message(from_t1, held))  # ... once
    t0._last = ("e1", 2)  # once this member's ring of round 2 is over, it is stale
    await t0._on_ring(Message(from_t1, ring_msg("t1", round=2)))
    # Assert: each refused and counted by reason; only the one plausible message is held
    counts = t0.rejections.counts
    assert counts["ring_unknown_sender"] == 1 and counts["ring_spoofed_sender"] == 2
    assert counts["ring_bad_kind"] == 1 and counts["unexpected_topic"] == 1
    assert counts["ring_stale"] == 2 and counts["ring_duplicate"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("ring_too")) == 1, counts
    assert t0.rejections.total == len(forged) + 2
    assert len(t0._early) == 1


def test_ring_groups_are_wired_to_exactly_their_members() -> None:
    w = compile_wiring(manifest(GROUPS))
    assert topics.ring_inbox("toy", "ring-a", "t1") in w["t1"].subscribe
    assert {topics.presence("toy", "t0"), topics.presence("toy", "t2")} <= set(w["t1"].subscribe)
    ring_pub = {t for t in w["t1"].publish if "/ring/" in t}
    assert ring_pub == {topics.ring("toy", "ring-a", "t0", "t1"),
                        topics.ring("toy", "ring-a", "t2", "t1")}
    assert not any("/ring/" in t for t in w["t5"].subscribe + w["t5"].publish)


async def test_ring_members_subscribe_and_publish_exactly_what_the_wiring_says() -> None:
    from test_hostile import SpyBus

    m = manifest(GROUPS, rounds=2)
    broker = MemoryBroker()
    spies = {n.id: stand_in(SpyBus, m, broker, n.id) for n in m.nodes}
    await federate(m, broker=broker, buses=spies)
    assert_follows_wiring(m, spies, spies)
    assert topics.ring("toy", "ring-a", "t1", "t0") in spies["t0"].published


@pytest.mark.parametrize(("groups", "extra", "field"), [
    ([{"id": "g", "members": ["t0"]}], {}, "groups[0].members"),
    ([{"id": "g", "members": ["t0", "agg"]}], {}, "groups[0].members[1]"),
    ([{"id": "g", "members": ["t0", "t9"]}], {}, "groups[0].members[1]"),
    ([{"id": "g", "members": ["t0", "t1"]}, {"id": "h", "members": ["t2", "t1"]}], {},
     "groups[1].members[1]"),
    ([{"id": "t3", "members": ["t0", "t1"]}], {}, "groups[0].id"),
    ([{"id": "g", "members": ["t0", "t1"], "mode": "tree"}], {}, "groups[0].mode"),
    ([{"id": "g", "members": ["t0", "t1"], "step_timeout_s": 10}], {}, "groups[0].step_timeout_s"),
    ([{"id": "g", "members": ["t0", "t1"]}], {"strategy": "median"}, "groups"),
    ([{"id": "g", "members": ["t0", "t1"]}],
     {"strategy": {"name": "fedavg", "params": {"weighted": False}}}, "groups"),
    ([{"id": "g", "members": ["t0", "t1"]}],
     {"strategy": {"name": "dp_client", "params": {
         "strategy": {"name": "trimmed_mean", "params": {}}, "noise_multiplier": 0.1,
         "clipping_norm": 1.0}}}, "groups"),
    ([{"id": "g", "members": ["t0", "t1"]}], {"codec": {"update": {"mode": "fp16"}}}, "groups"),
])
def test_bad_ring_groups_are_refused_by_field(groups: list[dict[str, Any]],
                                              extra: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as err:
        manifest(groups, **extra)
    assert err.value.field == field, err.value


GROUPS_OF_AGG = {m: frozenset({"t0", "t1", "t2"}) for m in ("t0", "t1", "t2")}


@pytest.mark.parametrize(("sender", "meta", "accepted", "reason"), [
    ("t5", {"covers": {"t5": 10}, "num_examples": 10}, set(), "not_in_group"),
    ("t0", {"covers": {"t0": 10, "t3": 5}, "num_examples": 15}, set(), "ring_not_member"),
    ("t0", {"covers": {"t1": 10}, "num_examples": 10}, set(), "bad_covers"),
    ("t0", {"covers": {"t0": 10, "t1": 5}, "num_examples": 99}, set(), "bad_covers"),
    ("t0", {"covers": {"t0": 10, "t1": -5}, "num_examples": 5}, set(), "bad_covers"),
    ("t0", {"covers": ["t0"], "num_examples": 10}, set(), "bad_covers"),
    ("t0", {"covers": {"t0": 10, "t1": 5}, "num_examples": 15}, {"t1"}, "double_count"),
    ("t0", {"covers": {"t0": 10, "t2": 5}, "num_examples": 15}, set(), "not_selected"),
])
def test_the_aggregator_refuses_a_group_update_that_covers_wrongly(
        sender: str, meta: dict[str, Any], accepted: set[str], reason: str) -> None:
    # Execute / Assert: selected this round are t0, t1 (t2 was not), t5
    with pytest.raises(UpdateRejected) as err:
        check_covers(meta, sender, GROUPS_OF_AGG, {"t0", "t1", "t5"}, accepted)
    assert err.value.reason == reason


def test_a_right_group_update_covers_its_members() -> None:
    meta = {"covers": {"t0": 10, "t1": 5}, "num_examples": 15}
    check_covers(meta, "t0", GROUPS_OF_AGG, {"t0", "t1"}, set())
    assert covered(meta, "t0", 15) == {"t0": 10, "t1": 5}
    assert covered({"num_examples": 7}, "t5", 7) == {"t5": 7}


@pytest.mark.parametrize("in_ring", [True, False])
async def test_asked_again_while_summing_a_member_resends_its_own_update(in_ring: bool) -> None:
    # Prepare: t1 delivered round 1 into its ring (its own update kept as the last sent)
    # and is still summing when its parent asks it again: the group's update was refused
    m = manifest(GROUPS)
    broker = MemoryBroker()
    bus = make_bus(m, m.node("t1"), memory=broker)
    member = build_node(m, "t1", bus)
    assert isinstance(member, RingMember)
    trainer = member.trainer
    own = b"t1's own update"
    trainer._current, trainer._last_sent = ("e1", 1), ("e1", 1, own)
    if in_ring:
        member._round = RingRound("e1", 1, ("t0", "t1", "t2"))
    order = Envelope(kind="round", job="toy", sender="agg", round=1,
                     meta={"selected": ["t1"], "epoch": "e1", "upload_gate_bytes": 1 << 20})
    async with bus, MemoryBus(broker, "spy") as spy, \
            spy.subscribe(topics.update("toy", "agg", "t1")) as sub:
        # Execute
        await trainer._on_round(order, "e1")
        # Assert: inside its ring it sends its own update again; otherwise the order is for
        # the round it is still training, and refused
        if in_ring:
            assert (await sub.get(timeout=5)).payload == own
            assert trainer.rejections.total == 0
        else:
            assert trainer.rejections.counts["old_round"] == 1
