"""Generated broker configs refuse packets larger than the job ever sends.

fedbus chunks every payload above ``broker.chunk_bytes``, so the largest packet a job's
nodes send is one chunk plus headers (``fedbus.broker.packet_limit``). Configs written for
a job (``fedbus acl``'s broker.conf, ``fedbus compose``'s brokers, the broker ``fedbus run``
starts) set mosquitto's ``max_packet_size`` to that: a forged 64 MiB publish is dropped by
the broker, its sender disconnected, and it never costs a node anything.
"""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from benchmarks.flood import connect_packet, publish_packet
from fedbus.broker import PACKET_HEADROOM, packet_limit, packet_limit_conf, spawn_mosquitto
from fedbus.bus import MqttOptions
from fedbus.bus._chunking import HEADER
from fedbus.bus.mqtt import MqttBus
from fedbus.bus.options import PACKET_HEADROOM as BUS_HEADROOM
from fedbus.deploy.compose import broker_conf
from fedbus.deploy.security import write_broker_security
from fedbus.manifest import Manifest, parse_manifest

CHUNK = 64_000
TOPIC = "fedbus/v1/toy/update/agg/t0"


def manifest(chunk_bytes: int = CHUNK) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": 1,
        "broker": {"host": "127.0.0.1", "port": 1883, "chunk_bytes": chunk_bytes},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 16}},
        "nodes": [{"id": "agg", "role": "aggregator"}],
        "trainers": {"count": 2, "prefix": "t", "parent": "agg"},
    })


def limit_in(text: str) -> int:
    found = re.findall(r"^max_packet_size\s+(\d+)", text, re.M)
    assert len(found) == 1, text
    return int(found[0])


def test_the_limit_is_one_chunk_plus_what_a_node_itself_allows() -> None:
    # the broker's limit and each node's own (CONNECT Maximum Packet Size) are the same
    assert PACKET_HEADROOM == BUS_HEADROOM
    assert packet_limit(CHUNK) == MqttOptions(chunk_bytes=CHUNK).max_packet
    # and a node's chunks fit (the check a node makes on the broker's CONNACK)
    assert packet_limit(CHUNK) >= CHUNK + HEADER.size + 512
    # a model smaller than a chunk: its largest whole message
    assert packet_limit(CHUNK, 5_000) == 5_000 + PACKET_HEADROOM


def test_generated_broker_configs_set_the_jobs_packet_limit(tmp_path: Path) -> None:
    # Prepare / Execute: `fedbus acl`'s whole config, and `fedbus compose`'s
    m = manifest()
    files = write_broker_security(m, tmp_path / "acl", backend="acl_file",
                                  world_readable=True)
    compose = broker_conf("0.0.0.0", 1883, chunk_bytes=CHUNK)
    # Assert
    assert limit_in(files.broker_conf.read_text()) == packet_limit(CHUNK)
    assert limit_in(compose) == packet_limit(CHUNK)
    assert "max_packet_size" not in files.conf.read_text()  # lines to append: no duplicate


def _forge(port: int, payload: bytes) -> bytes:
    """Publish ``payload`` at QoS 0 from a raw socket, as an attacker would (no client
    library to refuse it first); what the broker answered after it (b"": it hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(connect_packet("mallory"))
        assert sock.recv(4)[:1] == b"\x20"  # CONNACK
        try:
            sock.sendall(publish_packet(TOPIC, payload))
            sock.sendall(b"\xc0\x00")  # PINGREQ: answered only if the connection survived
            return sock.recv(16)
        except (ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.broker
@pytest.mark.parametrize("limited", [True, False], ids=["job_limit", "no_limit"])
async def test_the_broker_drops_an_oversize_publish_and_passes_the_jobs_chunks(
        limited: bool) -> None:
    # Prepare: a receiver that would take anything (its own packet limit raised), a node
    # that chunks at 64 kB, and the broker with or without the job's limit
    proc = await spawn_mosquitto(config_extra=packet_limit_conf(CHUNK) if limited else "")
    try:
        async with MqttBus("agg", proc.host, proc.port, options=MqttOptions(
                chunk_bytes=CHUNK, max_packet_bytes=16 << 20)) as agg, \
                agg.subscribe(TOPIC) as sub, \
                MqttBus("t0", proc.host, proc.port,
                        options=MqttOptions(chunk_bytes=CHUNK)) as t0:
            # Execute: a real chunked update, then the oversize forgery, then a small one
            update = bytes(range(256)) * 1200  # 300 kB: 5 chunks
            await t0.publish(TOPIC, update)
            answer = await asyncio.to_thread(_forge, proc.port, b"\xff" * 512_000)
            await t0.publish(TOPIC, b"small")
            got = [(await sub.get(timeout=30)).payload for _ in range(2)]
            if not limited:
                got.append((await sub.get(timeout=30)).payload)
    finally:
        await proc.stop()
    # Assert: with the job's limit the forgery never crossed and its sender was cut off;
    # without it (the control) it reached the node
    if limited:
        assert got == [update, b"small"]
        assert answer == b""
    else:
        assert sorted(map(len, got)) == [5, 300 * 1024, 512_000]
        assert answer.startswith(b"\xd0")  # PINGRESP: still connected
