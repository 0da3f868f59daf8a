"""Minimal MQTT 5 clients on raw sockets for the transport floor (``bench_floor``): enough of
the protocol to connect, subscribe at QoS 1, publish prebuilt QoS 1 packets with a bounded
number unacknowledged, and receive into one preallocated buffer, PUBACKing each message.

Nothing here touches a payload byte in Python: a publisher patches the two packet-id bytes of
one prebuilt packet and ``sendall()``s it; a subscriber ``recv_into()``s one buffer and only
parses each packet's header, skipping the payload by count.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

__all__ = ["connect", "publish", "receive", "subscribe"]

_CONNACK, _PUBLISH, _PUBACK, _SUBACK = 2, 3, 4, 9


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionError("broker closed the connection")
        out += part
    return bytes(out)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One whole small packet (setup only): (type, body)."""
    first = _read_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read_exact(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first >> 4, _read_exact(sock, length)


def connect(host: str, port: int, client_id: str, timeout_s: float = 30.0) -> socket.socket:
    """A connected MQTT 5 session (clean start, no keepalive), TCP_NODELAY as fedbus sets it."""
    sock = socket.create_connection((host, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # protocol name, level 5, flags: clean start; keepalive 0; no properties; the client id
    body = _text("MQTT") + bytes([5, 0x02]) + (0).to_bytes(2, "big") + b"\x00" + _text(client_id)
    sock.sendall(_packet(0x10, body))
    kind, ack = _read_packet(sock)
    if kind != _CONNACK or len(ack) < 2 or ack[1] != 0:
        raise ConnectionError(f"CONNACK refused: type {kind}, body {ack[:4]!r}")
    sock.settimeout(None)
    return sock


def subscribe(sock: socket.socket, topic: str) -> None:
    """SUBSCRIBE at QoS 1 and wait for the SUBACK granting it."""
    sock.sendall(_packet(0x82, (1).to_bytes(2, "big") + b"\x00" + _text(topic) + b"\x01"))
    kind, ack = _read_packet(sock)
    if kind != _SUBACK or ack[-1] != 1:
        raise ConnectionError(f"SUBACK refused: type {kind}, body {ack!r}")


def publish(sock: socket.socket, topic: str, payload_bytes: int, messages: int,
            window: int) -> Callable[[], None]:
    """Build one QoS 1 PUBLISH packet of ``payload_bytes`` now; return the sender that, when
    called, sends it ``messages`` times (a fresh packet id each) with at most ``window``
    unacknowledged, and returns once every PUBACK arrived."""
    head = _text(topic)
    pid_at_body = len(head)
    body_len = len(head) + 2 + 1 + payload_bytes  # topic, packet id, no properties, payload
    fixed = bytes([0x32]) + _varint(body_len)
    packet = bytearray(len(fixed) + body_len)  # zeros: the payload is never written
    packet[:len(fixed)] = fixed
    packet[len(fixed):len(fixed) + len(head)] = head
    pid_at = len(fixed) + pid_at_body
    acks = bytearray(1 << 16)
    ack_view = memoryview(acks)
    carry = 0  # bytes of a partial PUBACK kept at the start of acks

    def drain(block: bool) -> int:
        """PUBACKs read now (all are 4-byte success acks from mosquitto, or 5-6 with a reason
        code); returns how many."""
        nonlocal carry
        try:
            n = sock.recv_into(ack_view[carry:], 0, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        if n == 0:
            raise ConnectionError("broker closed the connection")
        end, i, count = carry + n, 0, 0
        while i + 2 <= end:
            size = 2 + acks[i + 1]  # PUBACK bodies are < 128 bytes: a one-byte length
            if i + size > end:
                break
            if acks[i] >> 4 != _PUBACK:
                raise ConnectionError(f"unexpected packet type {acks[i] >> 4}")
            if size > 4 and acks[i + 4] >= 0x80:
                raise ConnectionError(f"PUBACK reason code {acks[i + 4]:#x}")
            count += 1
            i += size
        carry = end - i
        acks[:carry] = acks[i:end]
        return count

    def send() -> None:
        inflight = 0
        for k in range(messages):
            while inflight >= window:
                inflight -= drain(block=True)
            pid = k % 65535 + 1
            packet[pid_at] = pid >> 8
            packet[pid_at + 1] = pid & 0xFF
            sock.sendall(packet)
            inflight += 1 - drain(block=False)
        while inflight > 0:
            inflight -= drain(block=True)

    return send


def receive(sock: socket.socket, messages: int, buf: bytearray) -> tuple[float, int]:
    """Receive ``messages`` PUBLISH packets into ``buf`` (reused for every read), PUBACK each
    as its header arrives; return ``time.monotonic()`` when the last one was complete, and the
    payload bytes received."""
    view = memoryview(buf)
    kept = 0  # bytes of an incomplete header carried over to the start of buf
    skip = 0  # bytes of the current packet still to come (a payload is skipped, not read)
    in_publish = False
    got = payload = 0
    while True:
        n = sock.recv_into(view[kept:])
        if n == 0:
            raise ConnectionError(f"broker closed the connection after {got} messages")
        end, i, kept = kept + n, 0, 0
        acks = bytearray()
        while i < end:
            if skip:
                take = min(skip, end - i)
                skip -= take
                i += take
            else:
                header = _header(buf, i, end)
                if header is None:  # split across reads: keep it for the next one
                    kept = end - i
                    buf[:kept] = buf[i:end]
                    break
                kind, header_len, rest, pid = header
                i += header_len
                skip = rest
                in_publish = kind == _PUBLISH
                if in_publish:
                    payload += rest
                if pid is not None:
                    acks += bytes((0x40, 2, pid >> 8, pid & 0xFF))
            if not skip and in_publish:  # the publish is complete (its payload may be empty)
                in_publish = False
                got += 1
                if got == messages:
                    done = time.monotonic()
                    if acks:
                        sock.sendall(acks)
                    return done, payload
        if acks:
            sock.sendall(acks)


def _read_varint(buf: bytearray, j: int, end: int) -> tuple[int, int] | None:
    """The variable byte integer at ``buf[j]`` and the index after it; None when it is not
    all in ``buf[j:end]`` yet."""
    value, shift = 0, 0
    while True:
        if j >= end:
            return None
        byte = buf[j]
        j += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, j


def _header(buf: bytearray, i: int, end: int) -> tuple[int, int, int, int | None] | None:
    """(type, header bytes, bytes after the header, QoS 1 packet id) of the packet at ``i``;
    None when its header is not all in ``buf[i:end]`` yet."""
    if i + 2 > end:
        return None
    first = buf[i]
    got = _read_varint(buf, i + 1, end)
    if got is None:
        return None
    length, j = got
    body_start = j
    if first >> 4 != _PUBLISH:
        return first >> 4, j - i, length, None
    if j + 2 > end:
        return None
    j += 2 + (buf[j] << 8 | buf[j + 1])  # topic
    pid: int | None = None
    if (first >> 1) & 3:
        if j + 2 > end:
            return None
        pid = buf[j] << 8 | buf[j + 1]
        j += 2
    got = _read_varint(buf, j, end)  # MQTT 5 properties: a varint length, then the properties
    if got is None:
        return None
    props, j = got
    j += props
    if j > end:
        return None
    return _PUBLISH, j - i, length - (j - body_start), pid
