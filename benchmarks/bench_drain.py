"""How fast one node's connection drains a flood of small messages, and how long its own
publishes wait for their PUBACK meanwhile.

    .venv/bin/python -m benchmarks.bench_drain               # 300,000 messages, 3 trials each
    .venv/bin/python -m benchmarks.bench_drain --quick       # 50,000 messages, 1 trial each

A private mosquitto; one ``MqttBus`` subscribed to ``x/#`` with a reader that takes every
message; ``benchmarks.flood`` writes QoS 0 messages of 100 bytes on 8 topics under ``x/`` as
fast as one process can (bounded at 10 s). Each trial runs twice, interleaved: with fedbus's
receive path (``fedbus.bus._paho_fast``: bursts of reads, the direct hand-off) and with
paho's and aiomqtt's (one packet a wake-up, paho ``Properties``/``MQTTMessage``, aiomqtt's
queue). Reported: messages received (the broker drops QoS 0 beyond a client's queue), the
seconds until the last one, the drain rate, and the probe publishes' PUBACK wait (one every
0.5 s during the flood).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.flood import write_plan  # noqa: E402
from fedbus.broker import spawn_mosquitto  # noqa: E402
from fedbus.bus import _mqtt_client  # noqa: E402
from fedbus.bus.mqtt import MqttBus  # noqa: E402
from fedbus.log import configure_logging  # noqa: E402


@contextmanager
def paho_receive_path() -> Iterator[None]:
    """paho's and aiomqtt's receive path, for the comparison: no direct hand-off, paho's
    one-packet ``loop_read`` (the single-copy body read stays)."""
    install = _mqtt_client._paho_fast.install

    def plain(paho: Any, deliver: Any = None) -> bool:
        done = install(paho, None)
        if done:
            del paho.loop_read  # the class's own again
        return done

    _mqtt_client._paho_fast.install = plain  # type: ignore[assignment]
    try:
        yield
    finally:
        _mqtt_client._paho_fast.install = install  # type: ignore[assignment]


async def trial(messages: int, folder: Path) -> dict[str, float]:
    broker = await spawn_mosquitto()
    plan = folder / "plan.msgpack"
    write_plan(plan, [(f"x/update/agg/t{i}", os.urandom(100)) for i in range(8)])
    got, last = 0, 0.0
    waits: list[float] = []
    try:
        async with MqttBus("agg", broker.host, broker.port) as bus, bus.subscribe("x/#") as sub:
            async def reader() -> None:
                nonlocal got, last
                while True:
                    await sub.get()
                    got += 1
                    last = time.monotonic()

            task = asyncio.create_task(reader())
            start = time.monotonic()
            flood = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "benchmarks.flood", broker.host, str(broker.port),
                str(plan), "--seconds", "10", "--max", str(messages),
                cwd=ROOT, stdout=asyncio.subprocess.DEVNULL)
            try:
                while flood.returncode is None:
                    t = time.monotonic()
                    await bus.publish("y/probe", b"p")
                    waits.append(time.monotonic() - t)
                    await asyncio.sleep(0.5)
                seen = -1
                while seen != got:  # until a second passes with nothing new
                    seen = got
                    await asyncio.sleep(1.0)
            finally:
                if flood.returncode is None:
                    flood.kill()
                await flood.wait()
                task.cancel()
    finally:
        await broker.stop()
    took = max(last - start, 1e-9)
    return {"received": got, "seconds": took, "rate": got / took,
            "puback_max": max(waits, default=0.0),
            "puback_p50": statistics.median(waits) if waits else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_drain",
                                description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="50,000 messages, one trial")
    a = p.parse_args(argv)
    if a.quick:
        a.messages, a.trials = 50_000, 1
    configure_logging(level="error")
    rows: dict[str, list[dict[str, float]]] = {"fedbus": [], "paho": []}
    with TemporaryDirectory(prefix="fedbus-drain-") as tmp:
        for _ in range(a.trials):
            rows["fedbus"].append(asyncio.run(trial(a.messages, Path(tmp))))
            with paho_receive_path():
                rows["paho"].append(asyncio.run(trial(a.messages, Path(tmp))))
    load = os.getloadavg()[0]
    print(f"bench_drain: {a.messages:,} messages x {a.trials} trials, interleaved; "
          f"{platform.machine()} {platform.system()}, Python {platform.python_version()}, "
          f"load {load:.1f} at the end; {date.today()}")
    print("| receive path | received (median) | drain rate msg/s median (min-max) | "
          "PUBACK wait p50 / max, s (medians) |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        rates = [r["rate"] for r in rs]
        print(f"| {name} | {statistics.median(r['received'] for r in rs):,.0f} | "
              f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | "
              f"{statistics.median(r['puback_p50'] for r in rs):.3f} / "
              f"{statistics.median(r['puback_max'] for r in rs):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
