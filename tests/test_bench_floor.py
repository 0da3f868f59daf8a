"""The transport-floor benchmark's plumbing (benchmarks/bench_floor.py): its raw-socket MQTT
reader parses packets split anywhere, and a tiny brokered + direct floor runs end to end. No
timing is asserted: speed lives in the benchmark and docs/benchmarks.md."""

from __future__ import annotations

import socket
import threading

import pytest

from benchmarks import _lean_mqtt as mqtt
from benchmarks import bench_floor
from tests.conftest import _need_mosquitto


def _publish_packet(topic: str, pid: int, payload: bytes, props: bytes = b"") -> bytes:
    body = (len(topic).to_bytes(2, "big") + topic.encode() + pid.to_bytes(2, "big")
            + bytes([len(props)]) + props + payload)
    return bytes([0x32]) + mqtt._varint(len(body)) + body


@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
def test_receive_parses_packets_split_anywhere_and_pubacks_each(piece: int) -> None:
    # Prepare: three QoS 1 PUBLISH packets (one with a property), written `piece` bytes at a
    # time, so that headers straddle the reader's reads
    payloads = [b"a" * 300, b"b" * 200_000, b""]
    stream = (_publish_packet("model", 1, payloads[0])
              + _publish_packet("up/7", 2, payloads[1], props=b"\x01\x01")
              + _publish_packet("model", 300, payloads[2]))
    ours, theirs = socket.socketpair()

    def write() -> None:
        for i in range(0, len(stream), piece):
            theirs.sendall(stream[i:i + piece])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        # Execute
        _, received = mqtt.receive(ours, 3, bytearray(64 * 1024))
        writer.join(10)
        theirs.settimeout(5)
        acks = b""
        while len(acks) < 12:
            acks += theirs.recv(64)
    finally:
        ours.close()
        theirs.close()
    # Assert: every payload byte counted, one PUBACK per packet id, in order
    assert received == sum(len(p) for p in payloads)
    assert acks == bytes((0x40, 2, 0, 1, 0x40, 2, 0, 2, 0x40, 2, 1, 44))


def test_varint_matches_the_mqtt_examples() -> None:
    assert mqtt._varint(0) == b"\x00"
    assert mqtt._varint(127) == b"\x7f"
    assert mqtt._varint(128) == b"\x80\x01"
    assert mqtt._varint(16_383) == b"\xff\x7f"
    assert mqtt._varint(2_097_152) == b"\x80\x80\x80\x01"


@pytest.mark.broker
def test_a_tiny_floor_runs_through_the_broker_and_direct() -> None:
    _need_mosquitto()
    # 250k params = one 1 MB message each way per client, two clients, one trial
    row = bench_floor.measure(250_000, 2, 1, timeout_s=60)
    assert row.messages == 1
    for series in (row.broker_down, row.broker_up, row.direct_down, row.direct_up):
        assert len(series) == 1 and 0 < series[0] < 60
    assert "| 0.25M x 2 | 2 |" in bench_floor.table([row])
