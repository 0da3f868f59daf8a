"""Two instances of one aggregator started at the same instant settle on one leader.

Before: both found nobody active, both connected as the node and took the MQTT session from
each other on every reconnect, for good. Now each stands as a candidate first (a ticket,
announced for a second) and the one that started first leads; the other waits as a standby
and takes over when the leader's presence goes offline (fedbus.failover).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.bus import Bus
from fedbus.bus.mqtt import MqttBus
from fedbus.codec import encode
from fedbus.connect import make_bus
from fedbus.failover import JobAlreadyRunning, await_leadership, refuse_if_running, stand_down
from fedbus.manifest import BrokerSpec, Manifest, SecuritySpec, parse_manifest, with_broker
from fedbus.signing import write_key_pair
from fedbus.wire import presence

pytestmark = [pytest.mark.broker]


def _manifest(proc: MosquittoProcess) -> Manifest:
    m = parse_manifest({
        "version": 1, "job": "lead", "rounds": 1,
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 4}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 1, "prefix": "t", "parent": "agg"},
    })
    return with_broker(m, dataclasses.replace(BrokerSpec(), host=proc.host, port=proc.port))


async def _say(bus: Bus, status: str) -> None:
    """What the winning instance's node does once it runs (and its will when it dies)."""
    await bus.publish(topics.presence("lead", "agg"),
                      encode(presence("lead", "agg", "aggregator", status)), retain=True)


async def test_two_instances_started_together_settle_on_one_leader_every_time(
        mosquitto: MosquittoProcess) -> None:
    m = _manifest(mosquitto)
    async with MqttBus("agg", mosquitto.host, mosquitto.port) as node:
        for trial in range(10):
            # Prepare: nobody active (a stopped leader says offline)
            await _say(node, "offline")
            started = time.monotonic()
            # Execute: two instances at the same instant
            a = asyncio.create_task(await_leadership(m, "agg"))
            b = asyncio.create_task(await_leadership(m, "agg"))
            done, pending = await asyncio.wait({a, b}, timeout=30,
                                               return_when=asyncio.FIRST_COMPLETED)
            elected_s = time.monotonic() - started
            # Assert: exactly one leads, within 5 s; the other is still a standby once the
            # leader's node is online (it heard the leader's ticket)
            assert len(done) == 1, f"trial {trial}: {len(done)} leaders"
            assert elected_s < 5, f"trial {trial}: {elected_s:.1f} s"
            await _say(node, "online")
            await asyncio.sleep(0)
            loser = pending.pop()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(loser), 3)
            # and when the leader dies, the standby takes over
            await _say(node, "offline")
            await asyncio.wait_for(loser, 30)
            await stand_down()


async def test_an_instance_that_starts_after_the_leader_won_waits(
        mosquitto: MosquittoProcess) -> None:
    # Prepare: a leader elected, its node not online yet (still connecting)
    m = _manifest(mosquitto)
    async with MqttBus("agg", mosquitto.host, mosquitto.port) as node:
        await _say(node, "offline")
        await asyncio.wait_for(await_leadership(m, "agg"), 30)
        # Execute: a second instance starts in that gap
        late = asyncio.create_task(await_leadership(m, "agg"))
        # Assert: it defers to the leader's ticket, then waits behind its presence
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(late), 4)
        await _say(node, "online")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(late), 2)
        late.cancel()
        await stand_down()


async def test_in_a_signed_job_a_standby_sees_the_active_instance_and_no_forgery(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    """The watcher checks signatures like the node does. Before, it read the signed presence
    as a frame with 79 bytes too many (`truncated`): a standby took over from a live active
    instance, a second `fedbus run` was not refused, and a leader announced itself for 120 s."""
    # Prepare: a signing job (anonymous broker, signatures required)
    for node in ("agg", "t0"):
        write_key_pair(tmp_path / "keys", node)
    m = dataclasses.replace(_manifest(mosquitto), security=SecuritySpec(
        sign="required", keys=str(tmp_path / "keys")))
    node = make_bus(m, m.node("agg"))
    async with node, MqttBus("mallory", mosquitto.host, mosquitto.port) as forger:
        await _say(node, "offline")
        await asyncio.wait_for(await_leadership(m, "agg"), 30)
        await _say(node, "online")
        # Execute + assert: a second instance waits behind the signed presence
        late = asyncio.create_task(await_leadership(m, "agg"))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(late), 4)
        with pytest.raises(JobAlreadyRunning):
            await refuse_if_running(m, "agg")
        # an unsigned "offline" (anyone on this broker can publish it) wakes nobody
        await _say(forger, "offline")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(late), 3)
        # the node's own signed "offline" (its will) does
        await _say(node, "offline")
        await asyncio.wait_for(late, 30)
        await stand_down()
