"""The single-copy MQTT receive path (fedbus.bus._paho_fast) against paho's own parser.

A paho client reads from one end of a socketpair; the test writes packets into the other
end: whole, split across reads, and malformed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from paho.mqtt import _packet
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedbus.bus import _paho_fast


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes, *, mid: int = 7, sub_id: int = 3) -> bytes:
    props = _varint(0x0B) + _varint(sub_id)  # Subscription Identifier
    body = (len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")
            + _varint(len(props)) + props + payload)
    return bytes([0x32]) + _varint(len(body)) + body  # PUBLISH, QoS 1


@pytest.fixture
def wired() -> Iterator[tuple[Any, socket.socket, list[MQTTMessage]]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    got: list[MQTTMessage] = []
    client.on_message = lambda _c, _u, m: got.append(m)
    client.manual_ack_set(True)  # no PUBACK written back into the pair
    assert _paho_fast.install(client)
    client._sock = ours  # type: ignore[assignment]
    try:
        yield client, theirs, got
    finally:
        client._sock = None
        ours.close()
        theirs.close()


def test_publish_payload_matches_paho_and_is_not_copied(
    wired: tuple[Any, socket.socket, list[MQTTMessage]],
) -> None:
    # Prepare
    client, peer, got = wired
    payload = bytes(range(256)) * 4096  # 1 MiB
    packet = publish_packet(b"fedbus/j/update/agg/t1", payload)
    # Execute: the packet arrives in pieces; each read takes what is there
    rcs = []
    for start in range(0, len(packet), 50_000):  # well under the socketpair's buffer
        peer.sendall(packet[start:start + 50_000])
        rcs.append(client._packet_read())
    # Assert
    assert rcs[:-1] == [MQTTErrorCode.MQTT_ERR_AGAIN] * (len(rcs) - 1)
    assert rcs[-1] == MQTTErrorCode.MQTT_ERR_SUCCESS
    (m,) = got
    assert isinstance(m.payload, memoryview) and m.payload.readonly
    assert bytes(m.payload) == payload
    assert m.topic == "fedbus/j/update/agg/t1"
    assert (m.mid, m.qos, m.retain) == (7, 1, False)
    assert m.properties.SubscriptionIdentifier == [3]


def test_parse_agrees_with_paho_decode_publish(
    wired: tuple[Any, socket.socket, list[MQTTMessage]],
) -> None:
    # Prepare
    client, peer, got = wired
    packet = publish_packet(b"a/b", b"hello", mid=513, sub_id=200)
    body = packet[2:]  # one-byte remaining length here
    ref = _packet.decode_publish(packet[0], body, MQTTProtocolVersion.MQTTv5)
    # Execute
    peer.sendall(packet)
    rc = client._packet_read()
    # Assert
    assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS
    (m,) = got
    assert (bytes(m.payload), m.mid, m.topic.encode()) == (ref.payload, ref.mid, ref.topic)
    ref_props = ref.properties
    assert isinstance(ref_props, Properties)
    assert m.properties.SubscriptionIdentifier == ref_props.SubscriptionIdentifier
    assert m.properties.packetType == PacketTypes.PUBLISH


@pytest.mark.parametrize("body", [
    b"\x00",  # shorter than the topic length
    b"\x00\x09abc",  # topic length beyond the packet
    b"\x00\x03abc\x00",  # ends inside the packet id
    b"\x00\x03abc\x00\x01\x05\x0b",  # properties longer than the packet
])
def test_malformed_publish_is_a_protocol_error(
    wired: tuple[Any, socket.socket, list[MQTTMessage]], body: bytes,
) -> None:
    # Prepare
    client, peer, got = wired
    # Execute
    peer.sendall(bytes([0x32]) + _varint(len(body)) + body)
    rc = client._packet_read()
    # Assert: paho's answer to a malformed packet, nothing delivered, reader reset
    assert rc == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert got == []
    assert client._in_packet["command"] == 0


def test_connection_closed_mid_packet_is_conn_lost(
    wired: tuple[Any, socket.socket, list[MQTTMessage]],
) -> None:
    # Prepare
    client, peer, got = wired
    packet = publish_packet(b"a/b", b"x" * 1000)
    # Execute
    peer.sendall(packet[:500])
    first = client._packet_read()
    peer.shutdown(socket.SHUT_WR)
    second = client._packet_read()
    # Assert
    assert first == MQTTErrorCode.MQTT_ERR_AGAIN
    assert second == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert got == []
