"""Bytes through each broker per round: star vs two-level hierarchy vs hybrid ring groups.

    .venv/bin/python -m benchmarks.bench_topology [--trainers 50] [--params 1000000]
        [--groups 5] [--rounds 3] [--topologies star,hierarchy,hybrid]

star: one mosquitto, the aggregator and every trainer on it. hierarchy: the aggregator on a
root mosquitto; ``--groups`` site mosquittos, each bridged to the root (bridge generated from
the manifest, fedbus.deploy.bridge) and holding one relay with its share of the trainers.
hybrid: the aggregator on the root mosquitto, trainers spread over the ``--groups`` bridged site
brokers in ring groups of 5 (benchmarks/bench_ring.py ``site_hybrid``): the ring's reduce
traffic stays on each site broker and one group update a ring crosses to the root. Every
node runs in this process on its own connection; the model is the numpy toy task with
``--params`` float32 parameters, uncompressed (codec level 0: the bytes are the model's).

Each broker's own counters are read: mosquitto's ``$SYS/broker/bytes/received`` and ``/sent``
(every byte of every MQTT packet, bridges included), before the nodes connect and after the
job, divided by the rounds. Every broker started here is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
from collections.abc import Callable
from typing import Any

from benchmarks._broker_bytes import broker_bytes
from benchmarks.bench_ring import site_hybrid, timed_job
from fedbus.broker import MosquittoProcess, spawn_mosquitto

#: mosquitto publishes $SYS every sys_interval seconds (default 10): once a second here.
from fedbus.connect import make_bus
from fedbus.deploy.local import spawn_bridged
from fedbus.log import configure_logging
from fedbus.manifest import Manifest, parse_manifest, with_node_broker

#: mosquitto publishes $SYS every sys_interval seconds (default 10): once a second here.
_SYS = "sys_interval 1\n"


def _base(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "version": 1, "job": "bench-topo", "rounds": args.rounds, "seed": 0,
        "codec": {"level": 0},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": args.params, "lr": 0.5, "delay_s": 0.0}},
        "evaluate": {"where": "none"},
    }


def star(args: argparse.Namespace) -> dict[str, Any]:
    return {**_base(args),
            "round": {"deadline_s": 600, "quorum": 1.0, "min_clients": args.trainers,
                      "start_timeout_s": 120},
            "nodes": [{"id": "aggregator", "role": "aggregator"}],
            "trainers": {"count": args.trainers, "prefix": "t"}}


def hierarchy(args: argparse.Namespace) -> dict[str, Any]:
    groups = args.groups
    brokers: dict[str, Any] = {"root": None}
    nodes: list[dict[str, Any]] = [{"id": "aggregator", "role": "aggregator", "broker": "root"}]
    for g in range(groups):
        brokers[f"site{g}"] = {"parent": "root"}
        nodes.append({"id": f"r{g}", "role": "relay", "parent": "aggregator",
                      "broker": f"site{g}"})
    nodes += [{"id": f"t{i}", "role": "trainer", "parent": f"r{i % groups}", "partition": i}
              for i in range(args.trainers)]
    return {**_base(args), "brokers": brokers, "nodes": nodes,
            "round": {"deadline_s": 600, "quorum": 1.0, "min_clients": groups,
                      "start_timeout_s": 120}}


def hybrid(args: argparse.Namespace) -> dict[str, Any]:
    return {**_base(args), **site_hybrid(args)}


TOPOLOGIES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "star": star, "hierarchy": hierarchy, "hybrid": hybrid}


async def _counters(proc: MosquittoProcess) -> tuple[int, int]:
    return await broker_bytes(proc, "bench-topo.sys")


async def _federate(m: Manifest) -> float:
    wall, _ = await timed_job(m, {n.id: make_bus(with_node_broker(m, n.id), n)
                                  for n in m.nodes})
    return wall


async def measure(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    m = parse_manifest(TOPOLOGIES[name](args), f"<{name}>")
    procs: dict[str, MosquittoProcess] = {}
    bridged = None
    try:
        if m.brokers:
            bridged = await spawn_bridged(m, config_extra=_SYS)
            procs = bridged.procs
            m = bridged.manifest
        else:
            procs = {"root": await spawn_mosquitto(config_extra=_SYS)}
            m = parse_manifest({**TOPOLOGIES[name](args),
                                "broker": {"host": procs["root"].host,
                                           "port": procs["root"].port,
                                           "max_queued_messages": 100_000}}, f"<{name}>")
        await asyncio.sleep(1.2)  # a fresh $SYS sample after start-up
        before = {b: await _counters(p) for b, p in procs.items()}
        wall = await _federate(m)
        await asyncio.sleep(2.2)  # the counters are published once a second
        after = {b: await _counters(p) for b, p in procs.items()}
    finally:
        if bridged is not None:
            await bridged.stop()
        else:
            for p in procs.values():
                await p.stop()
    rows = []
    for b in procs:
        rx = (after[b][0] - before[b][0]) / args.rounds
        tx = (after[b][1] - before[b][1]) / args.rounds
        rows.append({"topology": name, "broker": b, "rx_mb": rx / 1e6, "tx_mb": tx / 1e6,
                     "round_s": wall / args.rounds})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", type=int, default=50)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--groups", type=int, default=5, help="site brokers (relays) of the hierarchy")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--topologies", default="star,hierarchy,hybrid",
                   help=f"comma-separated, of: {', '.join(TOPOLOGIES)}")
    args = p.parse_args()
    configure_logging(level="warning")  # the table on stdout, problems only on stderr
    model_mb = args.params * 4 / 1e6
    print(f"# bench_topology {datetime.date.today()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {platform.python_version()}: {args.trainers} trainers, "
          f"{args.params:,} params ({model_mb:.1f} MB a model), {args.rounds} rounds, "
          f"hierarchy of {args.groups} site brokers")
    print("| topology | broker | received MB/round | sent MB/round | total MB/round | "
          "total / model | s/round |")
    print("|---|---|---:|---:|---:|---:|---:|")
    root: dict[str, float] = {}
    for name in args.topologies.split(","):
        for r in asyncio.run(measure(name.strip(), args)):
            total = r["rx_mb"] + r["tx_mb"]
            if r["broker"] == "root":
                root[r["topology"]] = total
            print(f"| {r['topology']} | {r['broker']} | {r['rx_mb']:.1f} | {r['tx_mb']:.1f} | "
                  f"{total:.1f} | {total / model_mb:.1f} | {r['round_s']:.2f} |", flush=True)
    if "star" in root and "hierarchy" in root:
        print(f"\nroot broker: star / hierarchy = {root['star'] / root['hierarchy']:.1f}x "
              f"(fan-in {args.trainers / args.groups:g})")
    if "star" in root and "hybrid" in root:
        print(f"root broker: star / hybrid = {root['star'] / root['hybrid']:.1f}x "
              f"(ring groups of 5: {-(-args.trainers // 5)} group updates a round)")


if __name__ == "__main__":
    main()
