"""A flood publisher: tiny messages on many topics, as fast as one process can write them.

    .venv/bin/python -m benchmarks.flood HOST PORT PLAN --seconds 20 --max 1000000

``PLAN`` is a msgpack list of ``[topic, payload]`` pairs (``write_plan``); the flood cycles
through them. It speaks raw MQTT 3.1.1 over one socket, QoS 0, packets pre-encoded and
written in batches: no client library between the loop and the socket, so what limits the
rate is this one process and the broker. Bounded by ``--seconds`` and ``--max``, whichever
comes first. ``--progress FILE`` keeps "done total" (per mille of the bound reached) for a
harness that paces a job by it (benchmarks/bench_fuzz.py); ``--report FILE`` gets
``{"sent": n, "seconds": s, "rate": n/s}`` as JSON at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack

__all__ = ["connect_packet", "flood", "publish_packet", "read_plan", "write_plan"]

_BATCH = 256


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def connect_packet(client_id: str, username: str | None = None,
                   password: str | None = None) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no keepalive (the flood never idles)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _str("MQTT") + bytes([4, flags]) + (0).to_bytes(2, "big") + _str(client_id)
    body += (_str(username) if username is not None else b"") + (
        _str(password) if password is not None else b"")
    return b"\x10" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """PUBLISH, QoS 0, not retained."""
    body = _str(topic) + payload
    return b"\x30" + _length(len(body)) + body


def write_plan(path: Path, plan: Sequence[tuple[str, bytes]]) -> None:
    path.write_bytes(msgpack.packb([[t, p] for t, p in plan], use_bin_type=True))


def read_plan(path: Path) -> list[tuple[str, bytes]]:
    return [(str(t), bytes(p)) for t, p in msgpack.unpackb(path.read_bytes(), raw=False)]


def _progress(path: Path | None, share: float) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{min(int(share * 1000), 1000)} 1000\n")
    tmp.replace(path)


def flood(host: str, port: int, plan: Sequence[tuple[str, bytes]], *, seconds: float,
          max_messages: int, progress: Path | None = None, client_id: str = "flood",
          username: str | None = None, password: str | None = None) -> tuple[int, float]:
    """Publish ``plan`` round and round until ``seconds`` or ``max_messages``; (sent, secs)."""
    packets = [publish_packet(t, p) for t, p in plan]
    batches = [b"".join(packets[(i + j) % len(packets)] for j in range(_BATCH))
               for i in range(0, len(packets), _BATCH)] or [b""]
    sock = socket.create_connection((host, port), timeout=10)
    try:
        sock.sendall(connect_packet(client_id, username, password))
        connack = sock.recv(4)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"broker refused the flood's CONNECT: {connack!r}")
        sent = 0
        started = time.monotonic()
        deadline = started + seconds
        i = 0
        while sent < max_messages:
            now = time.monotonic()
            if now >= deadline:
                break
            k = i % len(batches)
            take = min(_BATCH, max_messages - sent)
            sock.sendall(batches[k] if take == _BATCH else b"".join(
                packets[(k * _BATCH + j) % len(packets)] for j in range(take)))
            i += 1
            sent += take
            if i % 16 == 0:
                _progress(progress, max(sent / max_messages, (now - started) / seconds))
        elapsed = time.monotonic() - started
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    finally:
        sock.close()
        _progress(progress, 1.0)
    return sent, elapsed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flood",
                                description=__doc__.splitlines()[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("plan", type=Path)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max", type=int, default=1_000_000, dest="max_messages")
    p.add_argument("--progress", type=Path)
    p.add_argument("--report", type=Path)
    p.add_argument("--username")
    p.add_argument("--password-env", metavar="VAR",
                   help="the password from this environment variable (not the command line)")
    args = p.parse_args(argv)
    password = os.environ.get(args.password_env) if args.password_env else None
    sent, elapsed = flood(args.host, args.port, read_plan(args.plan), seconds=args.seconds,
                          max_messages=args.max_messages, progress=args.progress,
                          username=args.username, password=password)
    report = {"sent": sent, "seconds": round(elapsed, 3),
              "rate": round(sent / elapsed) if elapsed else 0}
    if args.report is not None:
        args.report.write_text(json.dumps(report))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
