"""Broker limits that cannot work with fedbus's chunking are refused at start, by name.

Before: a broker whose ``max_packet_size`` is below the chunk size sent a node into a
reconnect loop and then a crash; a queue too short for a model's chunks lost them silently
and every round ended 0/N with only "expired transfer" in the logs.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest
import yaml

from fedbus.broker import MosquittoProcess, spawn_mosquitto
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.connect import make_bus
from fedbus.errors import BrokerLimitError
from fedbus.manifest import load_manifest, parse_manifest
from fedbus.node import build_node

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.broker
async def test_a_packet_limit_below_the_chunk_size_is_refused_at_connect() -> None:
    # Prepare: a broker that takes packets of at most 100 kB; the bus chunks at 1 MB
    proc = await spawn_mosquitto(config_extra="max_packet_size 100000")
    try:
        bus = MqttBus("t0", proc.host, proc.port, options=MqttOptions(chunk_bytes=1_000_000))
        # Execute / Assert: one clear error naming both settings, no reconnect loop
        with pytest.raises(BrokerLimitError) as err:
            async with bus:
                pass
        assert "max_packet_size" in str(err.value) and "chunk_bytes" in str(err.value)
        assert bus.stats["connects"] == 0
        # and a chunk size that fits is fine
        async with MqttBus("t1", proc.host, proc.port,
                           options=MqttOptions(chunk_bytes=50_000)) as ok:
            await ok.publish("fedbus/v1/toy/metrics/t1", b"x" * 120_000)
    finally:
        await proc.stop()


def _toy(size: int, **broker: object) -> dict[str, object]:
    return {
        "version": 1, "job": "toy", "rounds": 1,
        "broker": {"host": "127.0.0.1", "port": 1883, **broker},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": size}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 2, "prefix": "t", "parent": "agg"},
    }


@pytest.mark.parametrize("node", ["agg", "t0"])
def test_a_queue_too_short_for_a_models_chunks_is_refused_at_start(node: str) -> None:
    # Prepare: 11M float32 params in 32 KB chunks = 1,343 chunks; mosquitto's default queue
    m = parse_manifest(_toy(11_000_000, chunk_bytes=32_768, max_queued_messages=1000))
    # Execute / Assert
    with pytest.raises(BrokerLimitError) as err:
        build_node(m, node, make_bus(m, m.node(node)))
    assert "max_queued_messages" in str(err.value) and "chunk_bytes" in str(err.value)


def test_a_queue_that_fits_is_accepted() -> None:
    m = parse_manifest(_toy(1_000_000, chunk_bytes=1_000_000, max_queued_messages=1000))
    assert build_node(m, "agg", make_bus(m, m.node("agg"))) is not None


@pytest.mark.parametrize(("manifest", "conf"), [
    ("examples/digits/compose-manifest.yaml", "brokers/compose.conf"),
    ("examples/digits/edge-manifest.yaml", "brokers/edge.conf"),
])
def test_example_manifests_declare_what_their_broker_config_allows(
        manifest: str, conf: str) -> None:
    # The manifest's declared queue limit must not exceed what the shipped config sets.
    m = load_manifest(ROOT / manifest, env={"FEDBUS_BROKER_HOST": "broker.lan"})
    text = (ROOT / conf).read_text()
    found = re.search(r"^max_queued_messages\s+(\d+)", text, re.M)
    assert found and m.broker is not None
    assert m.broker.max_queued_messages <= int(found.group(1))
    assert "max_packet_size" not in re.sub(r"#.*", "", text) or m.broker.chunk_bytes < int(
        re.search(r"^max_packet_size\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]


@pytest.mark.broker
async def test_the_cli_reports_an_error_inside_a_task_group_as_one_line(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    # Prepare: an aggregator whose trainers never come (start timeout 1 s)
    data = _toy(16, host=mosquitto.host, port=mosquitto.port)
    data["round"] = {"min_clients": 2, "start_timeout_s": 1}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    # Execute
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedbus.cli", "serve", str(path), "--node", "agg",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    # Assert: exit 1 and the one-line message, not an ExceptionGroup traceback
    text = err.decode()
    assert proc.returncode == 1
    assert "Traceback" not in text and "ExceptionGroup" not in text, text
    assert "fedbus: only 0 of the 2 trainers needed" in text
    assert "anonymous_broker" in text  # and it said loudly that anyone could publish


@pytest.mark.broker
async def test_a_broker_with_a_small_receive_maximum_is_followed_not_fatal() -> None:
    # Prepare: mosquitto's stock in-flight limit (20) below the bus's window (200)
    proc = await spawn_mosquitto(config_extra="max_inflight_messages 20")
    try:
        async with MqttBus("pub", proc.host, proc.port,
                           options=MqttOptions(chunk_bytes=64_000)) as pub, \
                MqttBus("sub", proc.host, proc.port,
                        options=MqttOptions(chunk_bytes=64_000)) as sub_bus, \
                sub_bus.subscribe("fedbus/v1/toy/model/agg") as sub:
            payload = bytes(range(256)) * 12_000  # 3 MB: 48 chunks in flight at once
            # Execute
            await pub.publish("fedbus/v1/toy/model/agg", payload)
            got = await sub.get(timeout=30)
        # Assert: the window followed the broker's limit and the payload arrived whole
        assert got.payload == payload
        assert pub.stats["connection_losses"] == 0
    finally:
        await proc.stop()


@pytest.mark.broker
async def test_the_broker_never_sends_a_node_a_packet_over_its_declared_maximum() -> None:
    # Prepare: the node chunks at 64 kB, so it declares (MQTT 5 Maximum Packet Size in
    # CONNECT) one chunk plus headroom; another client publishes 512 kB in one packet
    proc = await spawn_mosquitto()
    topic = "fedbus/v1/toy/update/agg/t0"
    try:
        node_options = MqttOptions(chunk_bytes=64_000)
        assert node_options.max_packet < 512_000
        async with MqttBus("agg", proc.host, proc.port, options=node_options) as node, \
                node.subscribe(topic) as sub, \
                MqttBus("t0", proc.host, proc.port,
                        options=MqttOptions(chunk_bytes=1_000_000)) as forger:
            # Execute: the oversize packet, then a small one behind it
            await forger.publish(topic, b"\xff" * 512_000)
            await forger.publish(topic, b"small")
            got = await sub.get(timeout=30)
        # Assert: the broker dropped the big one before sending it; the node never saw it,
        # kept its connection, and the next message arrived
        assert got.payload == b"small"
        assert node.stats["connection_losses"] == 0
    finally:
        await proc.stop()
