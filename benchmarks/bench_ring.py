"""Bytes through the broker per round: the star vs hybrid ring groups on the same one broker.

    .venv/bin/python -m benchmarks.bench_ring [--trainers 50] [--params 1000000]
        [--group-size 5] [--rounds 3] [--topologies star,hybrid]

star: one mosquitto, the aggregator and every trainer on it. hybrid: the same, with the
trainers in ring groups of ``--group-size`` (fedbus.services.ring): each group sums its
updates over the broker and one member uploads the group's. Every node runs in this process
on its own connection; the model is the numpy toy task with ``--params`` float32 parameters,
uncompressed (codec level 0: the bytes are the model's). The broker's own counters are read
(``$SYS/broker/bytes/received`` and ``/sent``: every byte of every MQTT packet) before the
nodes connect and after the job, divided by the rounds; the same method as
bench_topology.py. The broker is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import time
from typing import Any

from benchmarks._broker_bytes import broker_bytes
from fedbus.broker import MosquittoProcess, spawn_mosquitto

#: mosquitto publishes $SYS every sys_interval seconds (default 10): once a second here.
from fedbus.bus import Bus
from fedbus.connect import make_bus
from fedbus.log import configure_logging
from fedbus.manifest import Manifest, parse_manifest
from fedbus.node import build_node

#: mosquitto publishes $SYS every sys_interval seconds (default 10): once a second here.
_SYS = "sys_interval 1\n"


def manifest(name: str, args: argparse.Namespace, proc: MosquittoProcess) -> Manifest:
    data: dict[str, Any] = {
        "version": 1, "job": "bench-ring", "rounds": args.rounds, "seed": 0,
        "codec": {"level": 0}, "evaluate": {"where": "none"},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": args.params, "lr": 0.5, "delay_s": 0.0}},
        "broker": {"host": proc.host, "port": proc.port, "max_queued_messages": 100_000},
        "round": {"deadline_s": 600, "quorum": 1.0, "min_clients": args.trainers,
                  "start_timeout_s": 120},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
        "trainers": {"count": args.trainers, "prefix": "t"},
    }
    if name == "hybrid":
        size = args.group_size
        data["groups"] = [{"id": f"ring{g}", "step_timeout_s": 120,
                           "members": [f"t{i}" for i in range(g * size,
                                                              min(args.trainers, (g + 1) * size))]}
                          for g in range(-(-args.trainers // size))]
    return parse_manifest(data, f"<{name}>")


def site_hybrid(args: argparse.Namespace) -> dict[str, Any]:
    """Ring groups of ``args.group_size`` (default 5) under the root aggregator, spread over
    ``args.groups`` site brokers bridged to the root (``brokers:``, fedbus.deploy.bridge): the
    manifest body for bench_topology.py's ``TOPOLOGIES["hybrid"]`` (its ``_base`` added)."""
    size, sites = getattr(args, "group_size", 5), args.groups
    brokers: dict[str, Any] = {"root": None, **{f"site{g}": {"parent": "root"}
                                                 for g in range(sites)}}
    nodes: list[dict[str, Any]] = [{"id": "aggregator", "role": "aggregator", "broker": "root"}]
    nodes += [{"id": f"t{i}", "role": "trainer", "parent": "aggregator", "partition": i,
               "broker": f"site{i * sites // args.trainers}"} for i in range(args.trainers)]
    rings = [{"id": f"ring{r}", "step_timeout_s": 120,
              "members": [f"t{i}" for i in range(r * size, min(args.trainers, (r + 1) * size))]}
             for r in range(-(-args.trainers // size))]
    return {"brokers": brokers, "nodes": nodes, "groups": rings,
            "round": {"deadline_s": 600, "quorum": 1.0, "min_clients": args.trainers,
                      "start_timeout_s": 120}}


async def _counters(proc: MosquittoProcess) -> tuple[int, int]:
    return await broker_bytes(proc, "bench-ring.sys")


async def timed_job(m: Manifest, buses: dict[str, Bus]) -> tuple[float, Any]:
    """Every node of ``m`` on its bus in ``buses`` until the aggregator ends, each round
    aggregated; the job's wall seconds and the aggregator. The buses are closed after."""
    services = {n: build_node(m, n, bus) for n, bus in buses.items()}
    agg = services.pop("aggregator")
    for bus in buses.values():
        await bus.__aenter__()
    try:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(s.run(), name=i) for i, s in services.items()]
        await agg.run()
        wall = time.perf_counter() - t0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(agg.history) == m.rounds and all(r.aggregated for r in agg.history)
    finally:
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    return wall, agg


async def _federate(m: Manifest) -> tuple[float, int]:
    """Wall seconds of the job, and the updates the aggregator folded."""
    wall, agg = await timed_job(m, {n.id: make_bus(m, n) for n in m.nodes})
    assert all(len(r.accepted) == len(m.nodes) - 1 for r in agg.history)
    return wall, agg.strategy.num_accumulated  # in the last round


async def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    proc = await spawn_mosquitto(config_extra=_SYS)
    try:
        m = manifest(name, args, proc)
        await asyncio.sleep(1.2)  # a fresh $SYS sample after start-up
        before = await _counters(proc)
        wall, folded = await _federate(m)
        await asyncio.sleep(2.2)  # the counters are published once a second
        after = await _counters(proc)
    finally:
        await proc.stop()
    return {"topology": name, "rx_mb": (after[0] - before[0]) / args.rounds / 1e6,
            "tx_mb": (after[1] - before[1]) / args.rounds / 1e6, "folded": folded,
            "round_s": wall / args.rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=50)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--group-size", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--topologies", default="star,hybrid")
    args = p.parse_args()
    configure_logging(level="warning")
    model_mb = args.params * 4 / 1e6
    print(f"# bench_ring {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} "
          f"CPUs, {platform.python_version()}: {args.trainers} trainers, {args.params:,} params "
          f"({model_mb:.1f} MB a model), {args.rounds} rounds, ring groups of {args.group_size}")
    print("| topology | updates folded/round | received MB/round | sent MB/round | "
          "total MB/round | total / model | s/round |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.topologies.split(","):
        r = asyncio.run(measure(name.strip(), args))
        total = r["rx_mb"] + r["tx_mb"]
        print(f"| {r['topology']} | {r['folded']} | {r['rx_mb']:.1f} | {r['tx_mb']:.1f} | "
              f"{total:.1f} | {total / model_mb:.1f} | {r['round_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
