"""The dashboard's web server: stdlib asyncio, loopback only, four routes.

``/`` the page, ``/state`` a JSON snapshot, ``/events`` server-sent events (one snapshot per
change), ``/metrics`` the same numbers in Prometheus' text format. Requests whose Host is not a
loopback name are refused, so a web page elsewhere cannot read the job via DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from importlib import resources
from typing import Any, Final

import structlog

from fedbus import topics
from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.credentials import observer_id
from fedbus.dashboard.state import JobState
from fedbus.errors import FedbusError
from fedbus.manifest import Manifest, NodeSpec

__all__ = ["dashboard_socket", "serve_dashboard"]

log = structlog.get_logger("fedbus.dashboard")

HOST: Final = "127.0.0.1"
_LOOPBACK: Final = frozenset({"127.0.0.1", "localhost", "[::1]"})
_PING_S: Final = 15.0
_MAX_REQUEST: Final = 16 * 1024


class _Hub:
    """The state plus a condition the SSE streams wait on."""

    def __init__(self, state: JobState) -> None:
        self.state = state
        self.changed = asyncio.Condition()

    async def feed(self, m: Manifest, memory: MemoryBroker | None) -> None:
        watcher = NodeSpec(id=self.state.observer_id, role="trainer")
        filters = (topics.presence_all(m.job), topics.metrics(m.job, m.aggregator.id))
        async with make_bus(m, watcher, memory=memory) as bus, bus.subscribe(*filters) as sub:
            async for msg in sub:
                if self.state.on_message(msg.topic, msg.payload):
                    async with self.changed:
                        self.changed.notify_all()


def _page() -> bytes:
    return (resources.files("fedbus") / "dashboard" / "page.html").read_bytes()


def _prometheus(snap: dict[str, Any]) -> str:
    job = snap["job"]
    last = snap["rounds"][-1] if snap["rounds"] else {}
    lines = []

    def gauge(name: str, value: Any, help: str, labels: str = "") -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.extend([f"# HELP fedbus_{name} {help}", f"# TYPE fedbus_{name} gauge",
                          f'fedbus_{name}{{job="{job}"{labels}}} {value}'])

    gauge("round", snap["round"], "last finished round (model version when async)")
    gauge("rounds_planned", snap["rounds_planned"], "rounds the manifest asks for")
    gauge("participants", last.get("participants"), "updates aggregated in the last round")
    gauge("round_seconds", last.get("seconds"), "duration of the last round")
    gauge("accuracy", last.get("accuracy"), "accuracy of the global model, last evaluation")
    gauge("loss", last.get("loss"), "loss of the global model, last evaluation")
    online = sum(1 for n in snap["nodes"] if n["status"] == "online")
    gauge("nodes_online", online, "nodes whose presence is online")
    lines += ["# HELP fedbus_rejections_total messages rejected by the aggregator, by reason",
              "# TYPE fedbus_rejections_total counter"]
    for reason, count in sorted(snap["rejected"].items()):
        lines.append(f'fedbus_rejections_total{{job="{job}",reason="{reason}"}} {count}')
    return "\n".join(lines) + "\n"


async def _respond(writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes) -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                 "\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()


async def _events(hub: _Hub, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Cache-Control: no-store\r\nConnection: keep-alive\r\n\r\n")
    seen = -1
    while True:
        if hub.state.version != seen:
            seen = hub.state.version
            data = json.dumps(hub.state.snapshot(), separators=(",", ":"))
            writer.write(f"event: state\ndata: {data}\n\n".encode())
        else:
            writer.write(b": ping\n\n")
        await writer.drain()
        async with hub.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hub.changed.wait(), _PING_S)


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.split(":", 1)[0]


async def _handle(hub: _Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if len(head) > _MAX_REQUEST:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = [*lines[0].split(" "), "", "", ""][:3]
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if _hostname(headers.get("host", "")) not in _LOOPBACK:
            await _respond(writer, "403 Forbidden", "text/plain", b"loopback only\n")
            return
        if method != "GET":
            await _respond(writer, "405 Method Not Allowed", "text/plain", b"GET only\n")
            return
        route = path.split("?", 1)[0]
        if route == "/":
            await _respond(writer, "200 OK", "text/html; charset=utf-8", _page())
        elif route == "/state":
            await _respond(writer, "200 OK", "application/json",
                           json.dumps(hub.state.snapshot()).encode())
        elif route == "/metrics":
            await _respond(writer, "200 OK", "text/plain; version=0.0.4",
                           _prometheus(hub.state.snapshot()).encode())
        elif route == "/events":
            await _events(hub, writer)
        else:
            await _respond(writer, "404 Not Found", "text/plain", b"not found\n")
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def dashboard_socket(port: int) -> socket.socket:
    """The dashboard's listening socket on 127.0.0.1:``port`` (0: a free port), bound before
    anything else starts, so a busy port is one clear error and nothing to unwind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(100)
    except OSError as exc:
        sock.close()
        raise FedbusError(f"dashboard: cannot listen on {HOST}:{port}: {exc.strerror or exc}; "
                          "pick another port (0: any free one)") from None
    sock.setblocking(False)
    return sock


async def serve_dashboard(m: Manifest, port: int, *, memory: MemoryBroker | None = None,
                          until_done: bool = False, user: str | None = None,
                          sock: socket.socket | None = None) -> int:
    """Serve the dashboard for ``m`` on 127.0.0.1:``port`` (0: a free port).

    ``until_done=False`` (``fedbus dashboard``): until SIGINT/SIGTERM. ``True`` (``fedbus run
    --dashboard``): until cancelled by the run when its nodes are done. ``user``: the operator
    it logs in as on a secured broker (``fedbus acl --operator``). ``sock``: a socket from
    ``dashboard_socket`` to serve on instead of binding ``port`` here.
    """
    observer = f"dashboard-{os.getpid()}" if memory is not None else \
        observer_id(m, user, "dashboard")
    hub = _Hub(JobState(m, observer))
    server = await asyncio.start_server(lambda r, w: _handle(hub, r, w),
                                        sock=sock or dashboard_socket(port), limit=_MAX_REQUEST)
    bound = server.sockets[0].getsockname()[1]
    print(f"fedbus: dashboard on http://{HOST}:{bound}/", file=sys.stderr, flush=True)
    log.info("dashboard_started", url=f"http://{HOST}:{bound}/")
    stop = asyncio.Event()
    if not until_done:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
    async with server:
        feed = asyncio.create_task(hub.feed(m, memory), name="dashboard-feed")
        try:
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({feed, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if feed in done:
                feed.result()  # the bus failed: say why
        finally:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feed
    return 0
