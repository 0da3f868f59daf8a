"""A receive path for paho's client that copies each PUBLISH payload once, not seven times.

paho 2.2 reads a packet's body with ``sock.recv(remaining)`` in a loop and appends every
piece to a growing bytearray (a fresh bytes object per recv, plus the bytearray's regrowth),
then ``decode_publish`` peels the topic, packet id and properties off with ``struct.unpack``
and slices, each of which copies the whole remaining packet: about seven copies of every
1 MB chunk before fedbus sees it (FACTS.md, docs/benchmarks.md "The wire").

``install(paho_client)`` replaces three methods on one client instance (nothing global):

- ``_packet_read``: the fixed header as paho reads it, then the body ``recv_into`` one
  bytearray of exactly the announced length: the kernel's copy is the only one;
- ``_handle_publish``: parses topic, packet id and properties from a memoryview (copying
  only those few bytes) and hands the payload on as a read-only memoryview of the packet,
  no copy at all. Its consumer (``MqttBus._on_message``) owns turning it into bytes when it
  must; chunk frames are kept as views until the transfer is joined.

- ``_packet_queue``: queues every outgoing packet as a memoryview, so that paho's
  ``packet[pos:]`` after a partial send no longer copies the rest of a 1 MB packet;
- ``loop_read``: paho reads ONE packet each time the socket is readable (its burst is the
  number of QoS 1/2 messages in flight), so every small message cost an event-loop turn and
  an ``epoll``. Here a readable socket is drained up to ``_READ_BURST`` packets or
  ``_READ_BURST_BYTES`` bytes (so one busy connection cannot starve the loop's other work).

With ``deliver`` (``install(paho, deliver)``), a PUBLISH goes straight to the bus: no paho
``MQTTMessage`` (a ``threading.Condition`` each), no paho ``Properties`` object (its
``unpack`` was a sixth of the receive path's CPU under a flood; only the Subscription
Identifiers are read here), no aiomqtt ``Message`` and queue hop. A QoS 1 message is
acknowledged once ``deliver`` returns (the bus's manual acks). Measured with a 300,000
message QoS 0 flood on one connection (docs/security.md, "Floods"): see there.

What stays paho's: every other packet type's handler, QoS 2, keepalive bookkeeping, errors
(a malformed packet is the same ``MQTT_ERR_PROTOCOL``), and sockets without ``recv_into``
(websockets), which keep paho's reader.
"""

from __future__ import annotations

import ssl
import struct
import types
from collections.abc import Callable
from typing import Any, Final, cast

import structlog
from paho.mqtt.client import (
    MQTT_LOG_DEBUG,
    MQTT_LOG_ERR,
    PUBLISH,
    MQTTMessage,
    time_func,
)
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

# paho's properties module is unannotated: pin the two calls used here once.
_new_properties = cast(Callable[[int], Properties], Properties)
_decode_vbi = cast(Callable[[bytes], tuple[int, int]], VariableByteIntegers.decode)

__all__ = ["Deliver", "install"]

_log = structlog.get_logger(__name__)

_MAX_REMAINING_BYTES = 4  # MQTT's variable byte integer: at most 4 bytes
#: Packets (and bytes) read per readable-socket callback at most: see the module doc.
_READ_BURST = 256
_READ_BURST_BYTES = 4 << 20

#: What a PUBLISH is handed to: (topic, payload view, retain, subscription identifiers).
Deliver = Callable[[str, memoryview, bool, list[int]], None]

# PUBLISH properties (MQTT 5, 3.3.2.3): id -> the size of a fixed-size value; the others are
# a two-byte-length string/binary (0x03, 0x08, 0x09), a string pair (0x26) or a variable
# byte integer (0x0B, the Subscription Identifier, the one this module keeps).
_FIXED: Final = {0x01: 1, 0x02: 4, 0x23: 2}
_LENGTH_PREFIXED: Final = frozenset({0x03, 0x08, 0x09})
_USER_PROPERTY: Final = 0x26
_SUBSCRIPTION_ID: Final = 0x0B


def _fresh_in_packet() -> dict[str, Any]:
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(), "to_process": 0, "pos": 0}


def _recv(self: Any, size: int) -> bytes | None:
    """paho's ``_sock_recv``; None when the socket has nothing now."""
    try:
        data: bytes = self._sock_recv(size)
    except BlockingIOError:
        return None
    return data


def _packet_read(self: Any) -> MQTTErrorCode:
    """paho's ``Client._packet_read`` with the body read straight into its final buffer."""
    inp = self._in_packet
    try:
        if inp["command"] == 0:
            command = _recv(self, 1)
            if command is None:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            if not command:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            inp["command"] = command[0]
        if inp["have_remaining"] == 0:
            while True:
                byte = _recv(self, 1)
                if byte is None:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                if not byte:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                value = byte[0]
                inp["remaining_count"].append(value)
                if len(inp["remaining_count"]) > _MAX_REMAINING_BYTES:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
                inp["remaining_length"] += (value & 127) * inp["remaining_mult"]
                inp["remaining_mult"] *= 128
                if value & 128 == 0:
                    break
            inp["have_remaining"] = 1
            inp["to_process"] = inp["remaining_length"]
            # The whole body's buffer, once: recv_into fills it in place.
            inp["packet"] = bytearray(inp["remaining_length"])
        packet: bytearray = inp["packet"]
        if inp["to_process"] > 0:
            view = memoryview(packet)
            sock = self._sock
            while inp["to_process"] > 0:
                got = len(packet) - inp["to_process"]
                try:
                    n = sock.recv_into(view[got:], inp["to_process"])
                except (BlockingIOError, ssl.SSLWantReadError):
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except ssl.SSLWantWriteError:
                    self._call_socket_register_write()
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                if n == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                inp["to_process"] -= n
                with self._msgtime_mutex:
                    self._last_bytes_received = time_func()
            view.release()
    except (OSError, AttributeError) as err:  # AttributeError: the socket went None
        self._easy_log(MQTT_LOG_ERR, "failed to receive on socket: %s", err)
        return MQTTErrorCode.MQTT_ERR_CONN_LOST
    inp["pos"] = 0
    self._fedbus_last_size = inp["remaining_length"]
    try:
        rc: MQTTErrorCode = self._packet_handle()
    except (MQTTException, ValueError, IndexError, struct.error) as exc:
        # MalformedPacket from paho's decoders or ours; struct/index errors from a short one
        self._easy_log(MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
        rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
    self._in_packet = _fresh_in_packet()
    with self._msgtime_mutex:
        self._last_bytes_received = time_func()
    return rc


def _handle_publish(self: Any, original: Any) -> MQTTErrorCode:
    """paho's ``_handle_publish`` for QoS 0/1 without copying the payload."""
    header = self._in_packet["command"]
    qos = (header & 0x06) >> 1
    if qos == 2 or (header & 0xF0) != PUBLISH:
        result: MQTTErrorCode = original()
        return result
    packet = self._in_packet["packet"]
    view = memoryview(packet).toreadonly()
    size = len(view)
    if size < 2:
        raise MalformedPacket("publish shorter than its topic length")
    tlen = int.from_bytes(view[0:2], "big")
    pos = 2 + tlen
    if pos > size:
        raise MalformedPacket(f"topic length {tlen} beyond the packet ({size} bytes)")
    topic = bytes(view[2:pos])
    v5 = self._protocol == MQTTProtocolVersion.MQTTv5
    if not v5 and tlen == 0:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    mid = 0
    if qos > 0:
        if pos + 2 > size:
            raise MalformedPacket("publish ends before its packet id")
        mid = int.from_bytes(view[pos:pos + 2], "big")
        pos += 2
    deliver: Deliver | None = getattr(self, "_fedbus_deliver", None)
    if deliver is not None:
        ids: list[int] = []
        if v5:
            plen, vbi = _vbi(view, pos)
            end = pos + vbi + plen
            if end > size:
                raise MalformedPacket(f"properties of {plen} bytes beyond the packet")
            ids = _subscription_ids(view, pos + vbi, end)
            pos = end
        try:
            name = topic.decode("utf-8")
        except UnicodeDecodeError:
            # a broker checks topics; should one pass, it is not a topic we subscribed to
            self._easy_log(MQTT_LOG_ERR, "dropped a publish whose topic is not UTF-8")
        else:
            try:
                deliver(name, view[pos:], bool(header & 0x01), ids)
            except Exception as exc:  # a bug past the bus must not cost the connection
                # (paho would call it a protocol error) nor the acknowledgement
                _log.error("deliver_failed", topic=name, error=repr(exc))
        if qos == 1:
            sent: MQTTErrorCode = self._send_puback(mid)
            return sent
        return MQTTErrorCode.MQTT_ERR_SUCCESS
    properties = None
    if v5:
        head = bytes(view[pos:pos + _MAX_REMAINING_BYTES])
        plen, vbi = _decode_vbi(head)
        end = pos + vbi + plen
        if end > size:
            raise MalformedPacket(f"properties of {plen} bytes beyond the packet")
        properties = _new_properties(PacketTypes.PUBLISH)
        cast(Any, properties).unpack(bytes(view[pos:end]))
        pos = end
    message = MQTTMessage(mid=mid, topic=topic)
    message.dup = bool(header & 0x08)
    message.qos = qos
    message.retain = bool(header & 0x01)
    message.properties = properties
    message.payload = view[pos:]  # type: ignore[assignment]  # a view: see the module doc
    message.timestamp = time_func()
    self._handle_on_message(message)
    if qos == 1 and not self._manual_ack:
        rc: MQTTErrorCode = self._send_puback(mid)
        return rc
    return MQTTErrorCode.MQTT_ERR_SUCCESS


def _vbi(view: memoryview, pos: int) -> tuple[int, int]:
    """The variable byte integer at ``pos``: (value, its length in bytes)."""
    value, mult = 0, 1
    for i in range(_MAX_REMAINING_BYTES):
        if pos + i >= len(view):
            raise MalformedPacket("variable byte integer beyond the packet")
        byte = view[pos + i]
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, i + 1
        mult *= 128
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def _subscription_ids(view: memoryview, pos: int, end: int) -> list[int]:
    """The Subscription Identifiers among a PUBLISH's properties in ``view[pos:end]``;
    the other properties are checked for size and skipped."""
    ids: list[int] = []
    while pos < end:
        prop = view[pos]
        pos += 1
        if prop == _SUBSCRIPTION_ID:
            value, n = _vbi(view, pos)
            ids.append(value)
            pos += n
        elif prop in _FIXED:
            pos += _FIXED[prop]
        elif prop in _LENGTH_PREFIXED:
            pos += 2 + int.from_bytes(view[pos:pos + 2], "big")
        elif prop == _USER_PROPERTY:
            for _ in range(2):
                pos += 2 + int.from_bytes(view[pos:pos + 2], "big")
        else:
            raise MalformedPacket(f"property {prop:#x} is not a PUBLISH property")
    if pos != end:
        raise MalformedPacket("PUBLISH properties overrun their length")
    return ids


def _loop_read(self: Any, max_packets: int = 1) -> MQTTErrorCode:
    """paho's ``loop_read``, draining up to ``_READ_BURST`` packets a call (module doc)."""
    del max_packets  # paho ignores it too (its burst is the messages in flight)
    budget = _READ_BURST_BYTES
    for _ in range(_READ_BURST):
        if self._sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        rc: MQTTErrorCode = self._packet_read()
        if rc > 0:
            handled: MQTTErrorCode = self._loop_rc_handle(rc)
            return handled
        if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
            break
        budget -= self._fedbus_last_size
        if budget <= 0:
            break
    return MQTTErrorCode.MQTT_ERR_SUCCESS


def install(paho: Any, deliver: Deliver | None = None) -> bool:
    """Give one paho client the single-copy receive path (and, with ``deliver``, the direct
    hand-off of every PUBLISH: the module doc); False (and nothing changed) when its
    transport cannot ``recv_into``."""
    if getattr(paho, "_transport", "tcp") != "tcp":
        return False
    paho._fedbus_deliver = deliver
    paho._fedbus_last_size = 0
    paho.loop_read = types.MethodType(_loop_read, paho)
    original = paho._handle_publish
    queue = paho._packet_queue

    def packet_queue(self: Any, command: int, packet: bytes | bytearray, mid: int, qos: int,
                     info: Any = None) -> MQTTErrorCode:
        # paho sends ``packet[pos:]`` after each partial send: on a view that slice is free.
        rc: MQTTErrorCode = queue(command, memoryview(packet), mid, qos, info)
        return rc

    paho._packet_queue = types.MethodType(packet_queue, paho)
    paho._packet_read = types.MethodType(_packet_read, paho)
    paho._handle_publish = types.MethodType(
        lambda self: _handle_publish(self, original), paho)
    return True
