"""Aggregator ingest vs what raw mosquitto moves with its C clients, same messages.

    .venv/bin/python -m benchmarks.bench_ingest                  # 1M x 10, 1M x 50, 11M x 10
    .venv/bin/python -m benchmarks.bench_ingest --sizes 1M:10 --trials 3

The messages: N fedbus updates of P float32 parameters (codec level 0, ``codec.update`` none),
each cut into 1 MB chunk frames as a trainer sends them, on the N update topics of one
aggregator. Both consumers drain the very same frames from a broker that already holds them,
so no publisher is in the timed part:

1. the consumer's persistent session subscribes, then goes offline;
2. this script publishes every frame at QoS 1 and waits for every PUBACK (mosquitto now queues
   them all for the offline session);
3. the consumer comes back and is timed until it has everything.

- raw: ``mosquitto_sub -V 5 -c -i ID -q 1 -C M`` (C client, payloads to /dev/null); timed from
  its start to its exit after M messages.
- fedbus: a process with an ``MqttBus`` whose connection is held down
  (``_drop_connection(hold=True)``) while the broker fills, then resumed: each reassembled
  update goes through the aggregator's ``Intake`` (decode within the model's limits, checks,
  norm) into FedAvg's running sum, exactly as in a round; timed from the resume to the N-th
  fold. MB/s = N x P x 4 bytes / seconds.

Every process started here (mosquitto, mosquitto_sub, the consumer) is stopped by pid in a
``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbus import topics
from fedbus.broker import spawn_mosquitto
from fedbus.bus._chunking import plan
from fedbus.codec import Compression, Envelope, Limits, encode
from fedbus.log import configure_logging

REPO = Path(__file__).resolve().parent.parent
JOB, AGG = "bench", "aggregator"
CHUNK = 1_000_000
SIZES: tuple[tuple[int, int], ...] = ((1_000_000, 10), (1_000_000, 50), (11_000_000, 10))


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def frames_for(params: int, clients: int) -> list[tuple[str, bytes]]:
    """(topic, frame) for N updates as trainers publish them (chunked, in order)."""
    from fedbus.wire import UPDATE

    # random values: nothing for any compressor to find, as with a real update
    delta = np.random.default_rng(0).standard_normal(params, dtype=np.float32)
    out: list[tuple[str, bytes]] = []
    for i in range(clients):
        sender = f"t{i}"
        env = Envelope(kind=UPDATE, job=JOB, sender=sender, round=1, tensors={"m/w": delta},
                       meta={"num_examples": 1})
        payload = encode(env, Compression(level=0))  # codec.level 0, as bench_wire runs
        topic = topics.update(JOB, AGG, sender)
        transfer = plan(payload, CHUNK)
        if transfer is None:
            out.append((topic, payload))
        else:
            out.extend((topic, transfer.frame(k)) for k in range(transfer.count))
    return out


async def preload(host: str, port: int, frames: Sequence[tuple[str, bytes]]) -> None:
    """Publish every frame at QoS 1 and wait for every PUBACK."""
    import aiomqtt

    async with aiomqtt.Client(host, port, identifier="ingest-loader",
                              protocol=aiomqtt.ProtocolVersion.V5,
                              max_inflight_messages=200, timeout=120) as client:
        client.pending_calls_threshold = 1 << 30  # a burst of publishes is the point here
        window: list[asyncio.Task[None]] = []
        for topic, frame in frames:
            window.append(asyncio.create_task(client.publish(topic, frame, qos=1,
                                                             timeout=120)))
            if len(window) >= 100:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)


def run_raw(host: str, port: int, frames: Sequence[tuple[str, bytes]], timeout_s: float) -> float:
    sub = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    base = [sub, "-h", host, "-p", str(port), "-V", "5", "-c", "-i", "raw-sink", "-x", "3600",
            "-q", "1", "-t", topics.updates_for(JOB, AGG)]
    subprocess.run([*base, "-E"], check=True, timeout=30, stdout=subprocess.DEVNULL)
    asyncio.run(preload(host, port, frames))
    started = time.perf_counter()
    proc = subprocess.Popen([*base, "-C", str(len(frames)), "-N"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    if rc != 0:
        raise RuntimeError(f"mosquitto_sub exited with {rc}")
    return time.perf_counter() - started


# --- the fedbus consumer (its own process) ---------------------------------------------------

class _Host:
    """The aggregator's side of the intake, minus rounds: every update is admitted and folded
    into FedAvg's running sum."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        from strategies import FedAvg

        self._weights = dict(weights)
        self.strategy = FedAvg()
        self.strategy.begin(self._weights, 1)
        self.folded = 0
        self.done = asyncio.Event()
        self.expected = 0
        self._loop = asyncio.get_running_loop()

    @property
    def weights(self) -> Mapping[str, np.ndarray]:
        return self._weights

    def expects_ready(self, sender: str, number: int) -> bool:
        return False

    def admit(self, env: Envelope, sender: str) -> int:
        return 0

    def fold(self, update: Any, env: Envelope) -> None:
        self.strategy.accumulate(update)
        self.folded += 1
        if self.folded >= self.expected:
            self._loop.call_soon_threadsafe(self.done.set)

    def node_online(self, node: str) -> None: ...

    def node_offline(self, node: str) -> None: ...

    def upload_done(self, node: str) -> None: ...

    def ready(self, node: str) -> None: ...


async def consume(host: str, port: int, params: int, clients: int, timeout_s: float, *,
                  paho_reader: bool = False) -> dict[str, Any]:
    from fedbus.bus import MqttOptions, _paho_fast
    from fedbus.bus._chunking import ChunkLimits
    from fedbus.bus.mqtt import MqttBus
    from fedbus.door import model_limits
    from fedbus.services.intake import Intake, IntakeSettings

    if paho_reader:  # before/after: paho's own receive path (fedbus before _paho_fast)
        _paho_fast.install = lambda paho: False  # type: ignore[assignment]
    weights = {"w": np.zeros(params, dtype=np.float32)}
    ingest = _Host(weights)
    ingest.expected = clients
    settings = IntakeSettings(job=JOB, node_id=AGG,
                              children=frozenset(f"t{i}" for i in range(clients)),
                              limits=model_limits(weights, 1, Limits()))
    intake = Intake(ingest, settings)
    size = params * 4 + (1 << 20)
    bus = MqttBus(AGG, host, port, client_id="fedbus-sink",
                  options=MqttOptions(keepalive=30, limits=ChunkLimits(
                      max_message_bytes=size, max_buffered_bytes=4 * size,
                      max_partial_transfers=max(64, clients + 1))))
    async with bus, bus.subscribe(topics.updates_for(JOB, AGG)) as sub:
        await bus._drop_connection(hold=True)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the broker holds every frame now
        started = time.perf_counter()
        cpu0 = time.process_time()
        bus._resume()

        async def drain() -> None:
            while not ingest.done.is_set():
                msg = await sub.get()
                await intake.handle(msg)

        async with asyncio.timeout(timeout_s):
            await drain()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    return {"seconds": seconds, "cpu_s": cpu, "folded": ingest.folded,
            "rejected": dict(intake.rejections.counts)}


def run_fedbus(host: str, port: int, params: int, clients: int,
               frames: Sequence[tuple[str, bytes]], timeout_s: float, *,
               paho_reader: bool = False) -> tuple[float, float]:
    """(seconds, consumer CPU seconds) to drain and fold every update."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_ingest", "--consume", f"{host}:{port}",
         "--params", str(params), "--clients", str(clients), "--timeout", str(timeout_s),
         *(["--paho-reader"] if paho_reader else [])],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"consumer did not start: {line!r} {proc.stderr.read()[-2000:]!r}"
                               if proc.stderr else line)
        asyncio.run(preload(host, port, frames))
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=timeout_s + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"consumer exited with {proc.returncode}: {err[-2000:]!r}")
        result = json.loads(out.decode().strip().splitlines()[-1])
        if result["folded"] != clients:
            raise RuntimeError(f"folded {result['folded']} of {clients}: {result}")
        return float(result["seconds"]), float(result["cpu_s"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def measure(params: int, clients: int, trials: int, timeout_s: float, *,
            paho_reader: bool = False) -> dict[str, Any]:
    frames = frames_for(params, clients)
    raw_s: list[float] = []
    fb_s: list[float] = []
    fb_cpu: list[float] = []
    old_s: list[float] = []
    old_cpu: list[float] = []
    engines = ("raw", "fedbus", "paho") if paho_reader else ("raw", "fedbus")
    for _ in range(trials):
        for engine in engines:
            broker = asyncio.run(spawn_mosquitto())
            try:
                if engine == "raw":
                    raw_s.append(run_raw(broker.host, broker.port, frames, timeout_s))
                else:
                    s, cpu = run_fedbus(broker.host, broker.port, params, clients, frames,
                                        timeout_s, paho_reader=engine == "paho")
                    (fb_s if engine == "fedbus" else old_s).append(s)
                    (fb_cpu if engine == "fedbus" else old_cpu).append(cpu)
            finally:
                asyncio.run(broker.stop())
    mb = clients * params * 4 / 1e6
    raw, fb = statistics.median(raw_s), statistics.median(fb_s)
    row = {"params": params, "clients": clients, "messages": len(frames),
           "frame_bytes": max(len(f) for _, f in frames), "update_mb": mb,
           "raw_s": raw_s, "fedbus_s": fb_s, "fedbus_cpu_s": fb_cpu, "raw_mb_s": mb / raw,
           "fedbus_mb_s": mb / fb, "fedbus_mb_per_cpu_s": mb / statistics.median(fb_cpu),
           "ratio": raw / fb}
    if old_s:
        row |= {"paho_s": old_s, "paho_cpu_s": old_cpu,
                "paho_mb_s": mb / statistics.median(old_s),
                "paho_mb_per_cpu_s": mb / statistics.median(old_cpu)}
    return row


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| P x N | messages (bytes each) | update MB | mosquitto_sub MB/s "
             "| fedbus aggregator ingest MB/s | fedbus / raw | fedbus MB per CPU s "
             "| paho's reader: MB/s, MB per CPU s | trials |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        old = (f"{r['paho_mb_s']:,.0f}, {r['paho_mb_per_cpu_s']:,.0f}" if "paho_s" in r
               else "")
        lines.append(
            f"| {r['params'] / 1e6:g}M x {r['clients']} | {r['messages']} "
            f"({r['frame_bytes']:,}) | {r['update_mb']:,.0f} | {r['raw_mb_s']:,.0f} "
            f"| {r['fedbus_mb_s']:,.0f} | **{r['ratio']:.0%}** "
            f"| {r['fedbus_mb_per_cpu_s']:,.0f} | {old} | {len(r['raw_s'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="P:N pairs, e.g. 1M:10,11M:10")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path)
    p.add_argument("--paho-reader", action="store_true",
                   help="also run the consumer on paho's own receive path (before/after)")
    p.add_argument("--consume", help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    configure_logging(level="warning")
    if args.consume:
        host, port = args.consume.rsplit(":", 1)
        result = asyncio.run(consume(host, int(port), args.params, args.clients, args.timeout,
                                     paho_reader=args.paho_reader))
        print(json.dumps(result), flush=True)
        return 0
    from benchmarks.bench_wire import parse_sizes

    sizes = parse_sizes(args.sizes) if args.sizes else SIZES
    rows = []
    for params, clients in sizes:
        row = measure(params, clients, args.trials, args.timeout,
                      paho_reader=args.paho_reader)
        _eprint(f"P={params / 1e6:g}M N={clients}: raw {row['raw_s']} s, fedbus "
                f"{row['fedbus_s']} s -> {row['ratio']:.0%}")
        rows.append(row)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
