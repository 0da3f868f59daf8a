"""Broker throughput: 1 MB QoS 1 messages through mosquitto vs amqtt (pure Python), loopback.

    .venv/bin/python benchmarks/bench_broker.py [--count 40] [--amqtt-python /path/python]

amqtt is not a fedbus dependency; install it in a separate venv (it pins its own deps) and
pass that interpreter with --amqtt-python. Every broker this script starts is stopped by pid in
a ``finally``, and each measurement is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time

import aiomqtt

from fedbus.broker import free_port, spawn_mosquitto
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus

_AMQTT_MAIN = """
import asyncio, sys
from amqtt.broker import Broker
async def main():
    cfg = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{sys.argv[1]}"}},
           "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                       {"allow_anonymous": True}}}
    broker = Broker(cfg)
    await broker.start()
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def _wait_port(port: int, limit_s: float) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # polling a port, bounded by the timeout
                continue
            w.close()
            return


async def measure(port: int, size: int, count: int, limit_s: float, v5: bool) -> float:
    """MB/s for ``count`` messages of ``size`` bytes, publish start to last receipt."""
    proto = aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311
    payload = os.urandom(size)
    topic = "bench/broker"
    async with (
        aiomqtt.Client("127.0.0.1", port, protocol=proto, timeout=limit_s) as sub,
        aiomqtt.Client(
            "127.0.0.1", port, protocol=proto, timeout=limit_s, max_inflight_messages=100
        ) as pub,
    ):
        await sub.subscribe(topic, qos=1)
        got = 0

        async def receive() -> None:
            nonlocal got
            async for _ in sub.messages:
                got += 1
                if got == count:
                    return

        reader = asyncio.create_task(receive())
        start = time.perf_counter()
        async with asyncio.timeout(limit_s):
            for _ in range(count):
                await pub.publish(topic, payload, qos=1)
            await reader
        elapsed = time.perf_counter() - start
    return size * count / elapsed / 1e6


async def probe_v5(port: int) -> str:
    try:
        async with aiomqtt.Client(
            "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, timeout=5
        ):
            return "accepted"
    except aiomqtt.MqttError as exc:
        return f"rejected ({exc})"


def _start_amqtt(python: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [python, "-c", _AMQTT_MAIN, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def measure_bus(port: int, size: int, count: int, chunk_bytes: int, limit_s: float,
                      password: str | None = None) -> float:
    """MB/s of whole payloads through two MqttBus instances (chunking + reassembly included).
    ``password``: log in as the node id with it (ejabberd refuses nameless clients)."""
    payload = os.urandom(size)

    def login(user: str) -> dict[str, str]:
        return {"username": user, "password": password} if password else {}

    async with (
        MqttBus("bench-pub", "127.0.0.1", port,
                options=MqttOptions(chunk_bytes=chunk_bytes, **login("bench-pub"))) as pub,
        MqttBus("bench-sub", "127.0.0.1", port,
                options=MqttOptions(**login("bench-sub"))) as sub_bus,
        sub_bus.subscribe("bench/bus") as sub,
    ):
        start = time.perf_counter()
        async with asyncio.timeout(limit_s):
            for _ in range(count):
                await pub.publish("bench/bus", payload)
            for _ in range(count):
                assert (await sub.get()).payload == payload
        elapsed = time.perf_counter() - start
    return size * count / elapsed / 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--amqtt-python", default=None)
    ap.add_argument("--ejabberd", action="store_true",
                    help="also ejabberd's mod_mqtt (Debian package), the second MQTT 5 broker")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} cores "
          f"python {platform.python_version()}; {args.count} x {args.size} B, QoS 1")  # fmt: skip

    async with await spawn_mosquitto() as mosq:
        for v5 in (False, True):
            rate = await measure(mosq.port, args.size, args.count, args.timeout, v5)
            print(f"mosquitto  mqtt{'5' if v5 else '3.1.1'}  {rate:8.1f} MB/s")
        for chunk in (256 * 1024, 1_000_000, 4_000_000):
            rate = await measure_bus(mosq.port, 16_000_000, 5, chunk, args.timeout)
            print(f"mosquitto  MqttBus 16 MB payloads, chunk_bytes={chunk:>9}  {rate:8.1f} MB/s")

    if args.ejabberd:
        from fedbus.broker_ejabberd import spawn_ejabberd

        ej = await spawn_ejabberd()
        try:
            for chunk in (256 * 1024, 1_000_000, 4_000_000):
                rate = await measure_bus(ej.port, 16_000_000, 5, chunk, args.timeout, "anonymous")
                print(f"ejabberd   MqttBus 16 MB payloads, chunk_bytes={chunk:>9}  "
                      f"{rate:8.1f} MB/s")
        finally:
            await ej.stop()

    if args.amqtt_python:
        port = free_port()
        proc = _start_amqtt(args.amqtt_python, port)
        try:
            await _wait_port(port, 20)
            rate = await measure(port, args.size, args.count, args.timeout, v5=False)
            print(f"amqtt      mqtt3.1.1  {rate:8.1f} MB/s")
            print(f"amqtt      mqtt5      {await probe_v5(port)}")
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    else:
        print("amqtt      skipped (pass --amqtt-python)", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
