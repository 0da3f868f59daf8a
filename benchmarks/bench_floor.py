"""A round's transport floor: how long one round's bytes take to move with no computing at all,
through fedbus's mosquitto and over direct TCP, by clients that do not measure themselves.

    .venv/bin/python -m benchmarks.bench_floor                   # 1M x 10, 1M x 50, 11M x 10
    .venv/bin/python -m benchmarks.bench_floor --sizes 1M:10 --trials 5 --json floor.json
    .venv/bin/python -m benchmarks.bench_floor --compare         # + fedbus's and Flower's round

A lossless round of P float32 parameters and N clients moves the model to every client and an
update of the same size back from each: M = ceil(4 P / 1 MB) messages of 1 MB each way per
client (fedbus's default chunk size).

- **brokered**: one mosquitto with fedbus's own config (``fedbus.broker.spawn_mosquitto``),
  minimal MQTT 5 clients on raw sockets (``benchmarks/_lean_mqtt.py``), one forked process
  each, connected and subscribed before the clock starts. Publishers ``sendall()`` one
  prebuilt QoS 1 PUBLISH packet M times (a fresh packet id each, at most ``--window``
  unacknowledged); subscribers ``recv_into()`` one preallocated buffer and PUBACK each message.
  Downlink: one publisher to N subscribers of one topic; uplink: N publishers to one
  subscriber of ``up/+``. Timed from the parent's "go" to the last message's last byte.
- **direct**: the same bytes over loopback TCP with no broker, one hop as Flower's gRPC makes
  it: a server process with N accepted connections (one ``selectors`` loop, as one server
  process serves all its clients) sends M MB to each (downlink) and receives M MB from each
  (uplink); each client is a forked process too.

round = downlink + uplink (a trainer cannot upload before it has the model). With
``--compare``, each trial also runs one lossless fedbus job (``bench_wire``'s, 5 rounds) and
one Flower 1.42 legacy-gRPC job, and reports their round time (median of rounds 2..5) against
the floors. Trials interleave every kind; the 1-minute load average is recorded per trial.

The previous version of this benchmark fed 1 MB lines through pipes into ``mosquitto_pub -l``
and read each ``mosquitto_sub`` with a Python thread: it measured Python feeding pipes (2.0-2.5x
these figures on a quiet box, up to 3.7x under load), not the broker.

Every process started here (broker, clients) is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import selectors
import signal
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import _lean_mqtt as mqtt
from benchmarks.bench_rounds import machine
from benchmarks.bench_wire import FLOWER_PY, parse_sizes
from fedbus.broker import spawn_mosquitto
from fedbus.log import configure_logging

CHUNK = 1_000_000
WINDOW = 500
RECV_BUF = 4 << 20
SIZES: tuple[tuple[int, int], ...] = ((1_000_000, 10), (1_000_000, 50), (11_000_000, 10))


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- forked children ---------------------------------------------------------------------------

@dataclass
class _Child:
    """A forked process: ``go`` (parent -> child) and ``status`` (child -> parent) pipes."""

    pid: int
    go_fd: int
    status_fd: int
    _pending: bytes = b""

    def line(self, deadline: float) -> str:
        """The child's next status line; TimeoutError past ``deadline`` (monotonic)."""
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.status_fd], [], [], left)[0]:
                raise TimeoutError(f"child {self.pid}: no status line in time")
            part = os.read(self.status_fd, 4096)
            if not part:
                raise RuntimeError(f"child {self.pid} exited without a status line")
            self._pending += part
        text, _, self._pending = self._pending.partition(b"\n")
        return text.decode()

    def expect(self, word: str, deadline: float) -> str:
        text = self.line(deadline)
        if not text.startswith(word):
            raise RuntimeError(f"child {self.pid}: expected {word!r}, got {text!r}")
        return text[len(word):].strip()


class _Signal:
    """The child's end of the pipes."""

    def __init__(self, go_fd: int, status_fd: int) -> None:
        self._go, self._status = go_fd, status_fd

    def say(self, text: str) -> None:
        os.write(self._status, text.encode() + b"\n")

    def ready_then_wait(self) -> None:
        """Tell the parent we are set up, then block until it says go."""
        self.say("ready")
        if os.read(self._go, 1) != b"g":
            raise RuntimeError("parent went away")


#: The parent's ends of its children's pipes: a later child closes them, so that an earlier
#: child sees end-of-file when the parent goes away.
_PARENT_FDS: set[int] = set()


def _fork(body: Callable[[_Signal], float | None]) -> _Child:
    """Run ``body`` in a forked process; it reports ``done <monotonic time>`` (or ``error``)."""
    go_r, go_w = os.pipe()
    st_r, st_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        code = 1
        try:
            for fd in (go_w, st_r, *_PARENT_FDS):
                with contextlib.suppress(OSError):
                    os.close(fd)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sig = _Signal(go_r, st_w)
            try:
                stamp = body(sig)
                sig.say(f"done {stamp if stamp is not None else ''}")
                code = 0
            except BaseException as exc:
                sig.say(f"error {exc!r}")
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(st_w)
    _PARENT_FDS.update((go_w, st_r))
    return _Child(pid, go_w, st_r)


def _stop(children: Sequence[_Child], grace_s: float = 5.0) -> None:
    """Reap every child, killing (by pid) those still running after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    for child in children:
        while True:
            with contextlib.suppress(ChildProcessError):
                pid, _ = os.waitpid(child.pid, os.WNOHANG)
                if pid == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)  # polling a child's exit, bounded by the deadline
                    continue
                if pid == 0:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
            break
        for fd in (child.go_fd, child.status_fd):
            _PARENT_FDS.discard(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


def _go(children: Sequence[_Child]) -> float:
    started = time.monotonic()
    for child in children:
        os.write(child.go_fd, b"g")
    return started


def _done(children: Sequence[_Child], deadline: float) -> list[float]:
    out = []
    for child in children:
        text = child.line(deadline)
        if not text.startswith("done"):
            raise RuntimeError(f"child {child.pid}: {text}")
        value = text[4:].strip()
        if value:
            out.append(float(value))
    return out


# --- brokered: lean MQTT clients through mosquitto ---------------------------------------------

def _subscriber(port: int, cid: str, topic: str, messages: int) -> Callable[[_Signal], float]:
    def body(sig: _Signal) -> float:
        buf = bytearray(RECV_BUF)
        sock = mqtt.connect("127.0.0.1", port, cid)
        mqtt.subscribe(sock, topic)
        sig.say("ready")
        done, payload = mqtt.receive(sock, messages, buf)
        if payload != messages * CHUNK:
            raise RuntimeError(f"{payload} payload bytes, expected {messages * CHUNK}")
        return done
    return body


def _publisher(port: int, cid: str, topic: str, messages: int,
               window: int) -> Callable[[_Signal], None]:
    def body(sig: _Signal) -> None:
        sock = mqtt.connect("127.0.0.1", port, cid)
        send = mqtt.publish(sock, topic, CHUNK, messages, window)
        sig.ready_then_wait()
        send()
    return body


def _transfer(subs: list[Callable[[_Signal], float]], pubs: list[Callable[[_Signal], None]],
              timeout_s: float) -> float:
    """Start the subscribers, then the publishers; once all are set up, say go; seconds from
    go to the last subscriber's last message."""
    children: list[_Child] = []
    try:
        deadline = time.monotonic() + timeout_s
        receivers = [_fork(b) for b in subs]
        children += receivers
        for c in receivers:
            c.expect("ready", deadline)
        senders = [_fork(b) for b in pubs]
        children += senders
        for c in senders:
            c.expect("ready", deadline)
        started = _go(senders)
        deadline = time.monotonic() + timeout_s
        stamps = _done(receivers, deadline)
        _done(senders, deadline)
        return max(stamps) - started
    finally:
        _stop(children)


def brokered(port: int, clients: int, messages: int, window: int,
             timeout_s: float) -> tuple[float, float]:
    """(downlink s, uplink s) through the broker on ``port``."""
    down = _transfer(
        [_subscriber(port, f"s{i}", "model", messages) for i in range(clients)],
        [_publisher(port, "agg", "model", messages, window)], timeout_s)
    up = _transfer(
        [_subscriber(port, "agg", "up/+", clients * messages)],
        [_publisher(port, f"p{i}", f"up/{i}", messages, window) for i in range(clients)],
        timeout_s)
    return down, up


# --- direct: one hop over loopback TCP ---------------------------------------------------------

def _serve_direct(listener: socket.socket, clients: int, nbytes: int,
                  sending: bool) -> Callable[[_Signal], float | None]:
    """The server: accept ``clients`` connections, then send ``nbytes`` to each (downlink) or
    receive ``nbytes`` from each (uplink) in one selectors loop."""
    def body(sig: _Signal) -> float | None:
        conns = [listener.accept()[0] for _ in range(clients)]
        listener.close()
        for c in conns:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.setblocking(False)
        buf = bytearray(RECV_BUF if not sending else CHUNK)
        view = memoryview(buf)
        left = {c.fileno(): nbytes for c in conns}
        by_fd = {c.fileno(): c for c in conns}
        sel = selectors.DefaultSelector()
        for c in conns:
            sel.register(c, selectors.EVENT_WRITE if sending else selectors.EVENT_READ)
        if sending:
            sig.ready_then_wait()
        else:
            sig.say("ready")
        while left:
            for key, _ in sel.select():
                fd = key.fd
                conn = by_fd[fd]
                if sending:
                    pos = (nbytes - left[fd]) % CHUNK
                    n = conn.send(view[pos:min(CHUNK, pos + left[fd])])
                else:
                    n = conn.recv_into(view)
                    if n == 0:
                        raise ConnectionError("client closed early")
                left[fd] -= n
                if left[fd] == 0:
                    sel.unregister(conn)
                    del left[fd]
        done = time.monotonic()
        if sending:  # let the clients read to the end before closing
            for c in conns:
                c.setblocking(True)
                c.recv(1)
        return None if sending else done
    return body


def _direct_client(port: int, nbytes: int, sending: bool) -> Callable[[_Signal], float | None]:
    def body(sig: _Signal) -> float | None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sending:
            chunk = bytearray(CHUNK)
            sig.ready_then_wait()
            for _ in range(nbytes // CHUNK):
                sock.sendall(chunk)
            sock.recv(1)  # the server's close: every byte is in
            return None
        buf = bytearray(RECV_BUF)
        view = memoryview(buf)
        sig.say("ready")
        left = nbytes
        while left:
            n = sock.recv_into(view[:min(left, RECV_BUF)])
            if n == 0:
                raise ConnectionError("server closed early")
            left -= n
        done = time.monotonic()
        sock.close()
        return done
    return body


def _direct_one(clients: int, nbytes: int, downlink: bool, timeout_s: float) -> float:
    children: list[_Child] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=clients + 8)
    try:
        port = listener.getsockname()[1]
        deadline = time.monotonic() + timeout_s
        server = _fork(_serve_direct(listener, clients, nbytes, sending=downlink))
        children.append(server)
        listener.close()
        peers = [_fork(_direct_client(port, nbytes, sending=not downlink))
                 for _ in range(clients)]
        children += peers
        for c in [server, *peers]:
            c.expect("ready", deadline)
        started = _go([server] if downlink else peers)
        deadline = time.monotonic() + timeout_s
        if downlink:
            stamps = _done(peers, deadline)
            _done([server], deadline)
        else:
            stamps = _done([server], deadline)
            _done(peers, deadline)
        return max(stamps) - started
    finally:
        listener.close()
        _stop(children)


def direct(clients: int, messages: int, timeout_s: float) -> tuple[float, float]:
    """(downlink s, uplink s) over direct loopback TCP, one server and ``clients`` peers."""
    nbytes = messages * CHUNK
    return (_direct_one(clients, nbytes, True, timeout_s),
            _direct_one(clients, nbytes, False, timeout_s))


# --- trials and report -------------------------------------------------------------------------

@dataclass
class Floor:
    params: int
    clients: int
    messages: int  # per client each way
    broker_down: list[float] = field(default_factory=list)
    broker_up: list[float] = field(default_factory=list)
    direct_down: list[float] = field(default_factory=list)
    direct_up: list[float] = field(default_factory=list)
    fedbus_round: list[float] = field(default_factory=list)  # --compare only
    flower_round: list[float] = field(default_factory=list)  # --compare only
    fedbus_cpu: list[float] = field(default_factory=list)  # CPU s a round, all processes
    flower_cpu: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)  # 1-minute load average at each trial

    @property
    def broker_round(self) -> list[float]:
        return [a + b for a, b in zip(self.broker_down, self.broker_up, strict=True)]

    @property
    def direct_round(self) -> list[float]:
        return [a + b for a, b in zip(self.direct_down, self.direct_up, strict=True)]


def measure(params: int, clients: int, trials: int, *, window: int = WINDOW,
            timeout_s: float = 120.0, compare: bool = False) -> Floor:
    """``trials`` rounds of each kind, interleaved and in a rotating order; a fresh broker for
    each brokered trial."""
    from benchmarks import bench_wire

    row = Floor(params, clients, -(-4 * params // CHUNK))
    kinds = ["broker", "direct"] + (["fedbus", "flower"] if compare else [])
    idle = 0
    if compare:
        from benchmarks.bench_rounds import idle_rss
        idle = idle_rss()
    for trial in range(trials):
        row.load.append(os.getloadavg()[0])
        order = kinds[trial % len(kinds):] + kinds[:trial % len(kinds)]
        for kind in order:
            if kind == "broker":
                broker = asyncio.run(spawn_mosquitto())
                try:
                    down, up = brokered(broker.port, clients, row.messages, window, timeout_s)
                finally:
                    asyncio.run(broker.stop())
                row.broker_down.append(down)
                row.broker_up.append(up)
            elif kind == "direct":
                down, up = direct(clients, row.messages, timeout_s)
                row.direct_down.append(down)
                row.direct_up.append(up)
            elif kind == "fedbus":
                run = bench_wire.run_fedbus(params, clients, 5, lossy="none", trial=trial,
                                            idle=idle, timeout_s=10 * timeout_s)
                row.fedbus_round.append(run.median_s)
                row.fedbus_cpu.append(run.cpu_s)
            else:
                run = bench_wire.run_flower(params, clients, 5, trial=trial,
                                            timeout_s=10 * timeout_s)
                row.flower_round.append(run.median_s)
                row.flower_cpu.append(run.cpu_s)
        extra = ""
        if compare:
            extra = (f"; fedbus round {row.fedbus_round[-1]:.3f} (CPU "
                     f"{row.fedbus_cpu[-1]:.2f}), Flower round {row.flower_round[-1]:.3f} "
                     f"(CPU {row.flower_cpu[-1]:.2f})")
        _eprint(f"P={params / 1e6:g}M N={clients} trial {trial + 1}/{trials} (load "
                f"{row.load[-1]:.1f}): brokered down {row.broker_down[-1]:.3f} up "
                f"{row.broker_up[-1]:.3f}; direct down {row.direct_down[-1]:.3f} up "
                f"{row.direct_up[-1]:.3f}{extra}")
    return row


def _med(xs: Sequence[float], digits: int = 3) -> str:
    return f"{statistics.median(xs):.{digits}f}" if xs else "–"


def _spread(xs: Sequence[float]) -> str:
    return f"{min(xs):.3f}–{max(xs):.3f}" if xs else "–"


def table(rows: Sequence[Floor]) -> str:
    med = statistics.median
    out = ["| P x N | MB each way | brokered down / up s | **brokered round s** "
           "| direct down / up s | **direct round s** | brokered / direct "
           "| fedbus round s (CPU s) | Flower round s (CPU s) | brokered / Flower "
           "| direct / Flower | fedbus / brokered | load |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b, d = med(r.broker_round), med(r.direct_round)
        fl = med(r.flower_round) if r.flower_round else None
        fb = med(r.fedbus_round) if r.fedbus_round else None
        out.append(
            f"| {r.params / 1e6:g}M x {r.clients} | {r.clients * r.messages * CHUNK / 1e6:,.0f} "
            f"| {_med(r.broker_down)} / {_med(r.broker_up)} | **{b:.3f}** "
            f"| {_med(r.direct_down)} / {_med(r.direct_up)} | **{d:.3f}** | {b / d:.2f} "
            f"| {_med(r.fedbus_round)} ({_med(r.fedbus_cpu, 2)}) "
            f"| {_med(r.flower_round)} ({_med(r.flower_cpu, 2)}) "
            f"| {f'{b / fl:.2f}' if fl else '–'} | {f'{d / fl:.2f}' if fl else '–'} "
            f"| {f'{fb / b:.2f}' if fb else '–'} "
            f"| {min(r.load):.1f}–{max(r.load):.1f} |")
    out.append("")
    out.append("Spread over trials (min–max, s): " + "; ".join(
        f"{r.params / 1e6:g}M x {r.clients}: brokered {_spread(r.broker_round)}, direct "
        f"{_spread(r.direct_round)}"
        + (f", fedbus {_spread(r.fedbus_round)}, Flower {_spread(r.flower_round)}"
           if r.flower_round else "") for r in rows))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    global CHUNK
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="P:N pairs, e.g. 1M:10,11M:10")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--window", type=int, default=WINDOW,
                   help="a publisher's most unacknowledged messages")
    p.add_argument("--compare", action="store_true",
                   help="also run fedbus (lossless) and Flower's legacy gRPC round each trial")
    p.add_argument("--chunk-bytes", type=int, default=1_000_000,
                   help="bytes a message (default 1,000,000; 4,000,000 sends a 1M-parameter "
                        "model or update whole, as fedbus's 4 MiB chunks do)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per transfer")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    CHUNK = args.chunk_bytes  # read by the forked clients and the direct floor
    sizes = parse_sizes(args.sizes) if args.sizes else SIZES
    if args.compare and not FLOWER_PY.exists():
        raise SystemExit("Flower's venv is missing: bash benchmarks/flower/setup.sh grpc")
    configure_logging(level="warning")
    info = machine()
    _eprint(f"machine: {info['nproc']} cores, load {info['loadavg'][0]:.2f}")
    rows = [measure(params, clients, args.trials, window=args.window, timeout_s=args.timeout,
                    compare=args.compare) for params, clients in sizes]
    info["loadavg_after"] = os.getloadavg()
    print(table(rows))
    if args.json:
        doc: dict[str, Any] = {"machine": info, "chunk": CHUNK, "window": args.window,
                               "rows": [asdict(r) | {"broker_round": r.broker_round,
                                                     "direct_round": r.direct_round}
                                        for r in rows]}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
