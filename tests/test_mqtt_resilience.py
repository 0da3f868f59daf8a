"""MqttBus under faults: broker restarts, dropped connections, offline queuing."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fedbus.broker import MosquittoProcess, spawn_mosquitto
from fedbus.bus import MqttOptions, Will
from fedbus.bus.mqtt import MqttBus
from fedbus.errors import BusError, ConnectError

pytestmark = [pytest.mark.broker, pytest.mark.slow]
WAIT = 10.0


def make(proc: MosquittoProcess, **kw: float) -> MqttBus:
    opts: dict[str, float] = {
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": WAIT,
        "publish_timeout_s": WAIT,
        **kw,
    }
    return MqttBus(f"n{uuid.uuid4().hex[:10]}", proc.host, proc.port,
                   options=MqttOptions(**opts))  # type: ignore[arg-type]


async def test_broker_restart_reconnects_and_resubscribes(mosquitto: MosquittoProcess) -> None:
    topic = f"test/{uuid.uuid4().hex[:8]}/restart"
    sub_bus = make(mosquitto)
    pub_bus = make(mosquitto)
    second: MosquittoProcess | None = None
    try:
        async with sub_bus, pub_bus, sub_bus.subscribe(topic) as sub:
            await mosquitto.stop()
            second = await spawn_mosquitto(mosquitto.port)
            async with asyncio.timeout(WAIT):
                await sub_bus.wait_connected(2)
                await pub_bus.wait_connected(2)
            await pub_bus.publish(topic, b"after restart")
            msg = await sub.get(timeout=WAIT)
            assert msg.payload == b"after restart"
            assert sub_bus.stats["reconnects"] == 1
    finally:
        if second is not None:
            await second.stop()


async def test_message_published_while_offline_arrives_after_reconnect(
    mosquitto: MosquittoProcess,
) -> None:
    topic = f"test/{uuid.uuid4().hex[:8]}/offline"
    async with make(mosquitto) as sub_bus, make(mosquitto, chunk_bytes=256 * 1024) as pub_bus:
        async with sub_bus.subscribe(topic) as sub:
            await sub_bus._drop_connection(hold=True)
            assert not sub_bus.connected
            await pub_bus.publish(topic, b"queued while offline")
            big = bytes(range(256)) * 4000  # chunked: 1 MB in 4 chunks of 256 KB
            await pub_bus.publish(topic, big)
            sub_bus._resume()
            assert (await sub.get(timeout=WAIT)).payload == b"queued while offline"
            assert (await sub.get(timeout=WAIT)).payload == big
            # messages are handed on as they arrive, even while the new connection is still
            # being set up (re-subscribing): the reconnect is counted once that is done
            await asyncio.wait_for(sub_bus.wait_connected(2), WAIT)
        assert sub_bus.stats["reconnects"] == 1


async def test_publish_waits_for_reconnect(mosquitto: MosquittoProcess) -> None:
    topic = f"test/{uuid.uuid4().hex[:8]}/wait"
    async with make(mosquitto) as sub_bus, make(mosquitto) as pub_bus:
        async with sub_bus.subscribe(topic) as sub:
            await pub_bus._drop_connection(hold=True)
            pending = asyncio.create_task(pub_bus.publish(topic, b"late"))
            await asyncio.sleep(0)  # let it start and block on the missing connection
            assert not pending.done()
            pub_bus._resume()
            async with asyncio.timeout(WAIT):
                await pending
            assert (await sub.get(timeout=WAIT)).payload == b"late"


async def test_publish_times_out_with_bus_error(mosquitto: MosquittoProcess) -> None:
    async with make(mosquitto, publish_timeout_s=0.3) as bus:
        await bus._drop_connection(hold=True)
        with pytest.raises(BusError, match="no connection"):
            await bus.publish("test/x", b"x")


async def test_unreachable_broker_raises_connect_error() -> None:
    from fedbus.broker import free_port

    bus = MqttBus("nobody", "127.0.0.1", free_port(), options=MqttOptions(connect_timeout_s=0.5))
    with pytest.raises(ConnectError) as info:
        async with bus:
            pass
    assert info.value.endpoint.startswith("127.0.0.1:")


async def test_a_node_started_before_its_broker_waits_for_it() -> None:
    # Prepare: nothing listens yet; one attempt's timeout is short, the wait for the first
    # connection long (broker.connect_wait_s: systemd starts a node and its broker in any order)
    from fedbus.broker import free_port

    port = free_port()
    bus = MqttBus("early", "127.0.0.1", port, options=MqttOptions(
        connect_timeout_s=0.5, connect_wait_s=30.0, reconnect_min_s=0.05, reconnect_max_s=0.5))
    # Execute: the broker comes up 2 s after the node began connecting
    opening = asyncio.create_task(bus.__aenter__())
    await asyncio.sleep(2.0)
    assert not opening.done()
    broker = await spawn_mosquitto(port)
    try:
        await asyncio.wait_for(opening, WAIT)
        # Assert: connected, after several failed attempts, and usable
        assert bus.connected and bus.stats["connect_failures"] >= 1
        await bus.publish("test/early", b"x")
    finally:
        await bus.__aexit__(None, None, None)
        await broker.stop()


async def test_refused_credentials_fail_fast() -> None:
    async with await spawn_mosquitto(config_extra="allow_anonymous false\n") as proc:
        bus = MqttBus("anon", proc.host, proc.port, options=MqttOptions(connect_timeout_s=WAIT))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectError, match="Not authorized"):
            async with bus:
                pass
        assert loop.time() - started < WAIT / 2


async def test_birth_announces_a_node_again_after_its_will_fired(
    mosquitto: MosquittoProcess,
) -> None:
    # Prepare: a node with a retained will (offline) and birth (online), and an observer
    topic = f"test/{uuid.uuid4().hex[:8]}/presence"
    node = MqttBus(f"n{uuid.uuid4().hex[:10]}", mosquitto.host, mosquitto.port,
                   will=Will(topic, b"offline"), birth=Will(topic, b"online"),
                   options=MqttOptions(reconnect_min_s=0.05, reconnect_max_s=0.5,
                                       connect_timeout_s=WAIT))
    async with make(mosquitto) as observer, observer.subscribe(topic) as sub, node:
        # Execute: the connection drops abruptly; the broker fires the will, the bus reconnects
        await node._drop_connection()
        # Assert
        assert (await sub.get(timeout=WAIT)).payload == b"offline"
        assert (await sub.get(timeout=WAIT)).payload == b"online"
