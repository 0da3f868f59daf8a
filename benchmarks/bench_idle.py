"""Idle memory of each kind of node, started the way a device starts it.

One mosquitto (started here, on a free port) and one ``fedbus serve MANIFEST --node ID``
process per role of a numpy-only job (the toy task): aggregator, relay, checkpointer, store
and a trainer. Once every node has announced itself online, each process's RSS and PSS
(``/proc/PID/smaps_rollup``) and its count of loaded modules' worth of memory are read, a few
times, and the median is printed. Nothing trains: the aggregator waits for more trainers
than exist, so every node sits as it would between jobs.

    .venv/bin/python -m benchmarks.bench_idle            # about 30 s
    .venv/bin/python -m benchmarks.bench_idle --json idle.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedbus import topics
from fedbus.broker import spawn_mosquitto
from fedbus.bus.mqtt import MqttBus
from fedbus.codec import decode

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"agg": "aggregator", "relay": "relay", "ckpt": "checkpointer", "store": "store",
         "t0": "trainer"}


def _manifest(host: str, port: int) -> dict[str, object]:
    return {
        "version": 1, "job": "idle", "rounds": 3,
        "broker": {"host": host, "port": port},
        # more trainers than will ever come: the aggregator waits, idle
        "round": {"min_clients": 5, "start_timeout_s": 3600},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 64}},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  {"id": "ckpt", "role": "checkpointer"},
                  {"id": "relay", "role": "relay", "parent": "agg"},
                  {"id": "store", "role": "store"}],
        "trainers": {"count": 5, "prefix": "t", "parent": "relay"},
    }


def _memory(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0])
    return values["Rss"] / 1024, values["Pss"] / 1024


async def _wait_online(host: str, port: int, nodes: set[str], timeout: float) -> None:
    async with MqttBus("bench-idle-watch", host, port) as bus, \
            bus.subscribe(topics.presence_all("idle")) as sub:
        online: set[str] = set()
        try:
            async with asyncio.timeout(timeout):
                while not nodes <= online:
                    env = decode((await sub.get()).payload)
                    if env.meta.get("status") == "online":
                        online.add(env.sender)
        except TimeoutError:
            raise SystemExit(f"not online after {timeout:.0f} s: "
                             f"{sorted(nodes - online)}") from None


def _serve(manifest: Path, node: str, env: dict[str, str], log: Path
           ) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "fedbus.cli", "serve", str(manifest), "--node", node],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


async def measure(samples: int) -> dict[str, dict[str, float]]:
    broker = await spawn_mosquitto()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.yaml"
        path.write_text(yaml.safe_dump(_manifest(broker.host, broker.port)))
        env = dict(os.environ, FEDBUS_RUNS_DIR=str(Path(tmp) / "runs"))
        try:
            for node in ROLES:
                procs[node] = _serve(path, node, env, Path(tmp) / f"{node}.log")
            try:
                await _wait_online(broker.host, broker.port, set(ROLES), timeout=120)
            except SystemExit:
                for node in ROLES:
                    print(node, (Path(tmp) / f"{node}.log").read_text()[-600:], file=sys.stderr)
                raise
            rows: dict[str, list[tuple[float, float]]] = {n: [] for n in ROLES}
            for _ in range(samples):
                await asyncio.sleep(2)
                for node, proc in procs.items():
                    if proc.poll() is not None:
                        tail = (Path(tmp) / f"{node}.log").read_text()[-2000:]
                        raise SystemExit(f"{node} exited ({proc.returncode}):\n{tail}")
                    rows[node].append(_memory(proc.pid))
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            await broker.stop()
    return {node: {"rss_mib": statistics.median(r for r, _ in v),
                   "pss_mib": statistics.median(p for _, p in v)}
            for node, v in rows.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    result = asyncio.run(measure(args.samples))
    print(f"idle nodes of a numpy-only job (toy task), {time.strftime('%Y-%m-%d')}, "
          f"load {load:.1f}, Python {platform.python_version()}")
    print("| node | role | RSS MiB | RSS MB | PSS MiB |")
    print("|---|---|---:|---:|---:|")
    for node, r in result.items():
        print(f"| {node} | {ROLES[node]} | {r['rss_mib']:.1f} | "
              f"{r['rss_mib'] * 1.048576:.1f} | {r['pss_mib']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"load": load, "nodes": result}, indent=2))


if __name__ == "__main__":
    main()
