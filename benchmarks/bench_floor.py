"""A round's transport floor: how long mosquitto and its C clients take to move one round's
bytes with no computing at all, next to which a round time target can be judged.

    .venv/bin/python -m benchmarks.bench_floor                  # 1M x 10, 1M x 50, 11M x 10
    .venv/bin/python -m benchmarks.bench_floor --sizes 1M:10 --trials 5 --json floor.json

A lossless round of P float32 parameters and N clients moves the model to every client and
one update of the same size back from each: M = ceil(4 P / 1 MB) messages of 1 MB each way
per client (fedbus's default chunk size), at QoS 1, through one mosquitto on loopback.

- downlink: N ``mosquitto_sub`` on the model topic and one ``mosquitto_pub -l``, all
  connected and subscribed before the clock starts (a retained message and a first 1-byte
  message prove it); timed from writing the first message
  into the publisher to the last subscriber's M-th message.
- uplink: one ``mosquitto_sub`` on the N update topics and N publishers, timed to the
  subscriber's N x M-th message, two ways: N ``mosquitto_pub -l`` connected first and fed
  through pipes (one thread each) once the clock starts, and N ``mosquitto_pub -f --repeat M``
  started when the clock starts (no pipes, but their start is timed).

floor = downlink + the faster uplink: a round also decodes, trains, checks, folds and encodes, so no
system on this broker and box can take less. The payload is text (``-l`` sends one line per
message), which changes nothing for a broker that does not look inside.

Every process started here is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from benchmarks.bench_rounds import machine
from benchmarks.bench_wire import parse_sizes
from fedbus.broker import MosquittoProcess, spawn_mosquitto

CHUNK = 1_000_000
SIZES: tuple[tuple[int, int], ...] = ((1_000_000, 10), (1_000_000, 50), (11_000_000, 10))
_LINE = b"f" * (CHUNK - 1) + b"\n"  # one 1 MB message for mosquitto_pub -l


class _Lines:
    """Counts a client's output lines in a thread, stamping when the ``n``-th arrived."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.count = 0
        self.stamps: list[float] = []
        self._stream = stream
        self._changed = threading.Condition()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        for _ in self._stream:
            now = time.monotonic()
            with self._changed:
                self.count += 1
                self.stamps.append(now)
                self._changed.notify_all()

    def wait(self, n: int, timeout_s: float) -> float:
        """When the ``n``-th line arrived; raises TimeoutError past ``timeout_s``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= n, timeout=timeout_s):
                raise TimeoutError(f"{self.count} of {n} lines")
            return self.stamps[n - 1]


def _client(tool: str, port: int, *args: str) -> subprocess.Popen[bytes]:
    exe = shutil.which(tool) or f"/usr/bin/{tool}"
    return subprocess.Popen([exe, "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-q", "1",
                             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def _retain(port: int, topic: str) -> None:
    """A retained 1-byte message: a subscriber's first line says it is subscribed."""
    subprocess.run([shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub", "-h",
                    "127.0.0.1", "-p", str(port), "-V", "5", "-q", "1", "-r", "-t", topic,
                    "-m", "w"], check=True, timeout=30)


def _write(pub: subprocess.Popen[bytes], messages: int) -> None:
    assert pub.stdin is not None
    for _ in range(messages):
        pub.stdin.write(_LINE)
    pub.stdin.flush()


def _warm(pub: subprocess.Popen[bytes]) -> None:
    """A 1-byte message: once it arrived, the publisher is connected."""
    assert pub.stdin is not None
    pub.stdin.write(b"w\n")
    pub.stdin.flush()


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)


def downlink(port: int, clients: int, messages: int, timeout_s: float) -> float:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _retain(port, "model")
        subs = [_client("mosquitto_sub", port, "-t", "model", "-C", str(messages + 2),
                        "-F", "%l") for _ in range(clients)]
        procs += subs
        lines = [_Lines(s.stdout) for s in subs if s.stdout is not None]
        pub = _client("mosquitto_pub", port, "-t", "model", "-l")
        procs.append(pub)
        for ln in lines:
            ln.wait(1, timeout_s)  # the retained message: subscribed
        _warm(pub)
        for ln in lines:
            ln.wait(2, timeout_s)  # the publisher's first message: connected
        started = time.monotonic()
        _write(pub, messages)
        return max(ln.wait(messages + 2, timeout_s) for ln in lines) - started
    finally:
        _stop(procs)


def uplink(port: int, clients: int, messages: int, timeout_s: float) -> float:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _retain(port, "up/warm")
        sub = _client("mosquitto_sub", port, "-t", "up/+", "-C",
                      str(clients * (messages + 1) + 1), "-F", "%l")
        procs.append(sub)
        assert sub.stdout is not None
        lines = _Lines(sub.stdout)
        pubs = [_client("mosquitto_pub", port, "-t", f"up/{i}", "-l") for i in range(clients)]
        procs += pubs
        lines.wait(1, timeout_s)  # the retained message: subscribed
        for pub in pubs:
            _warm(pub)
        lines.wait(clients + 1, timeout_s)  # every publisher's first message: connected
        writers = [threading.Thread(target=_write, args=(pub, messages)) for pub in pubs]
        started = time.monotonic()
        for w in writers:
            w.start()
        done = lines.wait(clients * (messages + 1) + 1, timeout_s)
        for w in writers:
            w.join(timeout_s)
        return done - started
    finally:
        _stop(procs)


def uplink_files(port: int, clients: int, messages: int, timeout_s: float,
                 chunk: Path) -> float:
    """The uplink with each publisher sending ``chunk`` ``messages`` times from a file
    (``-f --repeat``): no pipe to feed, but each publisher's start is inside the timing."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _retain(port, "up/warm")
        sub = _client("mosquitto_sub", port, "-t", "up/+", "-C",
                      str(clients * messages + 1), "-F", "%l")
        procs.append(sub)
        assert sub.stdout is not None
        lines = _Lines(sub.stdout)
        lines.wait(1, timeout_s)  # the retained message: subscribed
        started = time.monotonic()
        procs += [_client("mosquitto_pub", port, "-t", f"up/{i}", "-f", str(chunk),
                          "--repeat", str(messages)) for i in range(clients)]
        return lines.wait(clients * messages + 1, timeout_s) - started
    finally:
        _stop(procs)


@dataclass
class Floor:
    params: int
    clients: int
    messages: int  # per client each way
    down_trials: list[float]
    up_pipe_trials: list[float]
    up_files_trials: list[float]

    @property
    def floor_s(self) -> float:
        return statistics.median(self.down_trials) + min(
            statistics.median(self.up_pipe_trials), statistics.median(self.up_files_trials))


def measure(params: int, clients: int, trials: int, timeout_s: float, chunk: Path) -> Floor:
    messages = -(-4 * params // CHUNK)
    down: list[float] = []
    up_pipe: list[float] = []
    up_files: list[float] = []
    for trial in range(trials):
        broker: MosquittoProcess = asyncio.run(spawn_mosquitto())
        try:
            down.append(downlink(broker.port, clients, messages, timeout_s))
            up_pipe.append(uplink(broker.port, clients, messages, timeout_s))
            up_files.append(uplink_files(broker.port, clients, messages, timeout_s, chunk))
        finally:
            asyncio.run(broker.stop())
        print(f"P={params / 1e6:g}M N={clients} trial {trial + 1}/{trials}: down "
              f"{down[-1]:.3f} s, up {up_pipe[-1]:.3f} s (pipes) / {up_files[-1]:.3f} s (files)",
              file=sys.stderr, flush=True)
    return Floor(params, clients, messages, down, up_pipe, up_files)


def table(rows: Sequence[Floor]) -> str:
    med = statistics.median
    out = ["| P x N | MB each way | downlink s | uplink s (pipes / files) "
           "| floor s (down + faster up) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.params / 1e6:g}M x {r.clients} "
                   f"| {r.clients * r.messages * CHUNK / 1e6:,.0f} | {med(r.down_trials):.3f} "
                   f"| {med(r.up_pipe_trials):.3f} / {med(r.up_files_trials):.3f} "
                   f"| **{r.floor_s:.3f}** |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="P:N pairs, e.g. 1M:10,11M:10")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per direction")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    sizes = parse_sizes(args.sizes) if args.sizes else SIZES
    info = machine()
    with tempfile.TemporaryDirectory(prefix="fedbus-floor-") as tmp:
        chunk = Path(tmp) / "chunk"
        chunk.write_bytes(_LINE)
        rows = [measure(params, clients, args.trials, args.timeout, chunk)
                for params, clients in sizes]
    info["loadavg_after"] = os.getloadavg()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": info, "rows": [{**asdict(r), "floor_s": r.floor_s} for r in rows]},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
