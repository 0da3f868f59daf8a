"""Asynchronous FedBuff on digits, flat against relays that pre-aggregate, over mosquitto.

    .venv/bin/python -m benchmarks.bench_async_preagg                # 3 repeats, 10 trainers
    .venv/bin/python -m benchmarks.bench_async_preagg --repeats 1 --versions 10   # smoke
    .venv/bin/python -m benchmarks.bench_async_preagg --json out.json

Fan-in 10: the same ten digits trainers (the star's partitions, even ones fast, odd ones ten
times slower) once flat under the root and once under one relay with ``pre_aggregate: 10``
(with ``--relays 2``: twenty trainers, two relays of ten). Every node runs in this process on
its own MQTT connection to a private mosquitto. Reported per run: the bytes of every message
published to the root's update topics (``update/aggregator/+``: updates, forwarded updates
and their ``ready``s, as a listener of its own receives them, MQTT headers aside), their
count, the updates the root folded, and the root's final accuracy; then, per topology, the
median and range over the repeats, and the flat/relay ratio of root update bytes per repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedbus import topics  # noqa: E402
from fedbus.broker import QUEUED_MESSAGES, spawn_mosquitto  # noqa: E402
from fedbus.connect import make_bus  # noqa: E402
from fedbus.log import configure_logging  # noqa: E402
from fedbus.manifest import BrokerSpec, Manifest, NodeSpec, parse_manifest, with_broker  # noqa: E402
from fedbus.node import build_node  # noqa: E402
from fedbus.services.async_aggregator import AsyncAggregator  # noqa: E402
from fedbus.services.relay import AsyncRelay  # noqa: E402


def manifest(*, relays: int, trainers: int, pre_aggregate: int, versions: int, buffer: int,
             speeds: Sequence[float], repeat: int = 1) -> Manifest:
    groups = [f"site-{i}" for i in range(relays)]
    nodes: list[dict[str, Any]] = [{"id": "aggregator", "role": "aggregator"}]
    nodes += [{"id": g, "role": "relay", "parent": "aggregator",
               "pre_aggregate": pre_aggregate} for g in groups]
    for i in range(trainers):
        nodes.append({"id": f"trainer-{i}", "role": "trainer",
                      "parent": groups[i * relays // trainers] if groups else "aggregator",
                      "partition": i})
    return parse_manifest({
        # a job of its own per run: no retained presence of an earlier run on the broker
        "version": 1, "job": f"preagg-{'relays' if relays else 'flat'}-{repeat}", "seed": 0,
        "rounds": versions, "codec": {"level": 1, "shuffle": False},
        "strategy": {"name": "fedbuff", "params": {"buffer_size": buffer, "server_lr": 0.8}},
        "round": {"deadline_s": 30, "min_clients": max(1, relays) if relays else trainers,
                  "start_timeout_s": 60},
        "evaluate": {"where": "server", "every": versions},
        "task": {"ref": "examples.digits.task:make_task",
                 "params": {"epochs": 5, "lr": 0.05, "momentum": 0.9, "batch_size": 32,
                            "speeds": list(speeds)}},
        "nodes": nodes,
    })


async def run_case(m: Manifest, port: int, host: str) -> dict[str, Any]:
    m = with_broker(m, BrokerSpec(host=host, port=port, max_queued_messages=QUEUED_MESSAGES))
    buses = {n.id: make_bus(m, n) for n in m.nodes}
    ear = make_bus(m, NodeSpec(id="bench-ear", role="trainer"))
    seen = {"bytes": 0, "messages": 0}
    for bus in (*buses.values(), ear):
        await bus.__aenter__()
    try:
        async def listen() -> None:
            async with ear.subscribe(topics.updates_for(m.job, "aggregator")) as sub:
                listening.set()
                async for msg in sub:
                    seen["bytes"] += len(msg.payload)
                    seen["messages"] += 1

        listening = asyncio.Event()
        ear_task = asyncio.create_task(listen())
        await listening.wait()
        services = {n.id: build_node(m, n.id, buses[n.id]) for n in m.nodes}
        root = services.pop("aggregator")
        assert isinstance(root, AsyncAggregator)
        tasks = [asyncio.create_task(s.run(), name=i) for i, s in services.items()]
        started = time.monotonic()
        await root.run()
        wall = time.monotonic() - started
        await asyncio.sleep(0.5)  # what is still on its way to the listener
        for t in (*tasks, ear_task):
            t.cancel()
        await asyncio.gather(*tasks, ear_task, return_exceptions=True)
    finally:
        for bus in (*buses.values(), ear):
            await bus.__aexit__(None, None, None)
    final = root.history[-1].eval
    assert final is not None
    relays = [s for s in services.values() if isinstance(s, AsyncRelay)]
    staleness = [s for r in root.history for s in getattr(r, "staleness", [])]
    return {
        "topology": f"{len(relays)} relay(s), pre_aggregate {relays[0].forward.pre_aggregate}"
        if relays else "flat",
        "versions": root.version, "updates": sum(root.contributions.values()),
        "seconds": round(wall, 1),
        "root_update_bytes": seen["bytes"], "root_update_msgs": seen["messages"],
        "accuracy": round(float(final.metrics["accuracy"]), 4),
        "staleness_mean": round(statistics.fmean(staleness), 2) if staleness else None,
        "relay_lost": sum(sum(r.lost.values()) for r in relays),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    proc = await spawn_mosquitto()
    results = []
    try:
        for rep in range(args.repeats):
            for relays in (0, args.relays):  # interleaved: the box's load hits both alike
                m = manifest(relays=relays, trainers=10 * args.relays,
                             pre_aggregate=args.pre_aggregate,
                             versions=args.versions, buffer=args.buffer, speeds=args.speeds,
                             repeat=rep + 1)
                print(f"repeat {rep + 1}: {m.job} ...", file=sys.stderr)
                r = await run_case(m, proc.port, proc.host)
                r["repeat"] = rep + 1
                results.append(r)
                print(f"  {r}", file=sys.stderr)
    finally:
        await proc.stop()
    return results


def _spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):g} ({min(values):g}-{max(values):g})"


def table(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    lines = [
        f"FedBuff (buffer {args.buffer}, server_lr 0.8), digits, {10 * max(1, args.relays)} "
        f"trainers (fit delays {args.speeds[0]} / {args.speeds[1]} s alternating), "
        f"{args.versions} versions, {args.repeats} repeats interleaved; mosquitto on "
        f"loopback; {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {date.today()}, load at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        "| topology | root update MB, median (range) | root update msgs | updates folded "
        "| final accuracy | staleness mean | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for topo in dict.fromkeys(r["topology"] for r in results):
        rs = [r for r in results if r["topology"] == topo]
        lines.append(
            f"| {topo} | {_spread([r['root_update_bytes'] / 1e6 for r in rs])} "
            f"| {_spread([r['root_update_msgs'] for r in rs])} "
            f"| {_spread([r['updates'] for r in rs])} | {_spread([r['accuracy'] for r in rs])} "
            f"| {_spread([r['staleness_mean'] for r in rs])} "
            f"| {_spread([r['seconds'] for r in rs])} |")
    flat = [r for r in results if r["topology"] == "flat"]
    relay = [r for r in results if r["topology"] != "flat"]
    ratios = [f["root_update_bytes"] / r["root_update_bytes"] for f, r in zip(flat, relay,
                                                                               strict=True)]
    gaps = [f["accuracy"] - r["accuracy"] for f, r in zip(flat, relay, strict=True)]
    lines += ["", "flat / relays root update bytes, per repeat: "
                  + ", ".join(f"{x:.2f}" for x in ratios)
                  + f"; median {statistics.median(ratios):.2f}",
              "flat - relays accuracy, per repeat: " + ", ".join(f"{x:+.4f}" for x in gaps)
              + f"; median {statistics.median(gaps):+.4f}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--relays", type=int, default=1, help="relays of ten trainers each")
    p.add_argument("--pre-aggregate", type=int, default=10)
    p.add_argument("--versions", type=int, default=40)
    p.add_argument("--buffer", type=int, default=10)
    p.add_argument("--speeds", type=float, nargs=2, default=[0.03, 0.3])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    configure_logging(level="warning")
    results = asyncio.run(main_async(args))
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
