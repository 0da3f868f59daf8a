"""Asynchronous FedBuff through relays, trainers ten times apart in speed, over mosquitto.

    .venv/bin/python -m benchmarks.bench_async_relays            # 10 trainers, 2 relays, 100k
    .venv/bin/python -m benchmarks.bench_async_relays --quick    # smoke run, a few seconds
    .venv/bin/python -m benchmarks.bench_async_relays --json out.json

Every node runs in this process on its own MQTT connection to a private mosquitto (as
``fedbus run`` does), once through two relays and once flat (every trainer under the root),
with the same trainers: half fast (``--fast`` seconds a fit), half ten times slower. Reported:
updates/s at the root, staleness (mean, p50, p95, max) as the root computed it, and for the
fast trainers the idle gap between handing in an update and starting the next fit (what a
fast trainer would wait if a slow one held it back), with the share of the work they did; a
control run with no slow trainers at all gives the gap a fast trainer has when nobody could
hold it back.
The orders a trainer received are counted too: with per-trainer work orders they follow its
own work, where the shared model topic used to deliver every order to every trainer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedbus.broker import QUEUED_MESSAGES, spawn_mosquitto  # noqa: E402
from fedbus.connect import make_bus  # noqa: E402
from fedbus.log import configure_logging  # noqa: E402
from fedbus.manifest import BrokerSpec, Manifest, parse_manifest, with_broker  # noqa: E402
from fedbus.node import build_node  # noqa: E402
from fedbus.services.async_aggregator import AsyncAggregator, AsyncReport  # noqa: E402
from fedbus.task import (  # noqa: E402
    EvalResult,
    FitResult,
    Task,
    open_task,
)


class TimedTask:
    """A task that records when each fit started and ended (monotonic seconds)."""

    def __init__(self, inner: Task) -> None:
        self.inner = inner
        self.fits: list[tuple[float, float]] = []

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.inner.get_weights()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.inner.set_weights(weights)

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        start = time.monotonic()
        try:
            return self.inner.fit(config, extra)
        finally:
            self.fits.append((start, time.monotonic()))

    def evaluate(self) -> EvalResult:
        return self.inner.evaluate()


def manifest(*, relays: bool, trainers: int, size: int, fast: float, versions: int,
             buffer: int, slow: bool = True) -> Manifest:
    # even partitions fast, odd ones ten times slower (or, for the control, fast too)
    speeds = [fast, 10 * fast if slow else fast]
    groups = [f"site-{g}" for g in "ab"] if relays else []
    nodes: list[dict[str, Any]] = [{"id": "aggregator", "role": "aggregator"}]
    nodes += [{"id": g, "role": "relay", "parent": "aggregator"} for g in groups]
    for i in range(trainers):
        parent = groups[i * len(groups) // trainers] if groups else "aggregator"
        nodes.append({"id": f"trainer-{i}", "role": "trainer", "parent": parent,
                      "partition": i})
    return parse_manifest({
        "version": 1, "job": ("bench-relays" if relays else "bench-flat")
        + ("" if slow else "-control"), "seed": 0,
        "rounds": versions,
        "strategy": {"name": "fedbuff", "params": {"buffer_size": buffer}},
        "round": {"deadline_s": 60, "min_clients": 2 if relays else trainers,
                  "start_timeout_s": 60},
        "evaluate": {"where": "none"}, "codec": {"level": 0},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": size, "lr": 0.5, "speeds": speeds}},
        "nodes": nodes,
    })


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_case(m: Manifest, port: int, host: str) -> dict[str, Any]:
    m = with_broker(m, BrokerSpec(host=host, port=port, max_queued_messages=QUEUED_MESSAGES))
    buses = {n.id: make_bus(m, n) for n in m.nodes}
    timed = {n.id: TimedTask(open_task(m, n)) for n in m.nodes if n.role == "trainer"}
    for bus in buses.values():
        await bus.__aenter__()
    try:
        services = {n.id: build_node(m, n.id, buses[n.id], task=timed.get(n.id))
                    for n in m.nodes}
        root = services.pop("aggregator")
        assert isinstance(root, AsyncAggregator)
        tasks = [asyncio.create_task(s.run(), name=i) for i, s in services.items()]
        started = time.monotonic()
        await root.run()
        wall = time.monotonic() - started
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        received = {n: int(buses[n].stats.get("received", 0))  # type: ignore[attr-defined]
                    for n in timed}
        root_out = int(buses["aggregator"].stats.get("published_bytes", 0))  # type: ignore[attr-defined]
    finally:
        for bus in buses.values():
            await bus.__aexit__(None, None, None)
    result = summarize(m, root, timed, wall, received)
    result["root_out_mb"] = round(root_out / 1e6, 1)
    return result


def summarize(m: Manifest, root: AsyncAggregator, timed: Mapping[str, TimedTask],
              wall: float, received: Mapping[str, int]) -> dict[str, Any]:
    staleness: dict[str, list[int]] = {}
    for r in root.history:
        if isinstance(r, AsyncReport):
            for who, s in zip(r.accepted, r.staleness, strict=True):
                staleness.setdefault(who, []).append(s)
    every = [s for v in staleness.values() for s in v]
    fast = [n for n in timed if int(n.rsplit("-", 1)[1]) % 2 == 0]
    slow = [n for n in timed if n not in fast]
    # idle gap: from the end of one fit to the start of the next, fast trainers only
    gaps = [b[0] - a[1] for n in fast
            for a, b in zip(timed[n].fits, timed[n].fits[1:], strict=False)]
    fit_s = {n: statistics.median(e - s for s, e in t.fits) if t.fits else float("nan")
             for n, t in timed.items()}
    updates = sum(root.contributions.values())
    orders = sum(len(t.fits) for t in timed.values())
    return {
        "topology": ("relays" if any(n.role == "relay" for n in m.nodes) else "flat")
        + ("" if m.task.params["speeds"][0] != m.task.params["speeds"][1]
           else ", control: no slow trainers"),
        "trainers": len(timed), "versions": root.version, "updates": updates,
        "seconds": round(wall, 2), "updates_per_s": round(updates / wall, 1),
        "staleness": {"mean": round(statistics.fmean(every), 2), "p50": _pct(every, 0.5),
                      "p95": _pct(every, 0.95), "max": max(every)},
        "staleness_fast_mean": round(statistics.fmean(
            [s for n in fast for s in staleness.get(n, [])] or [float("nan")]), 2),
        "staleness_slow_mean": round(statistics.fmean(
            [s for n in slow for s in staleness.get(n, [])] or [float("nan")]), 2),
        "fast_share": round(sum(root.contributions[n] for n in fast) / max(1, updates), 3),
        "fit_s_fast": round(statistics.median(fit_s[n] for n in fast), 4),
        "fit_s_slow": round(statistics.median(fit_s[n] for n in slow), 4),
        "fast_gap_ms": {"p50": round(1000 * _pct(gaps, 0.5), 1),
                        "p95": round(1000 * _pct(gaps, 0.95), 1),
                        "max": round(1000 * max(gaps, default=float("nan")), 1)},
        "fast_fits_per_s": round(sum(len(timed[n].fits) for n in fast) / len(fast) / wall, 2),
        "received_msgs_max": max(received.values()),
        "orders_trained": orders,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    proc = await spawn_mosquitto()
    results = []
    try:
        for relays, slow in ((True, True), (False, True), (True, False)):
            m = manifest(relays=relays, trainers=args.trainers, size=args.size,
                         fast=args.fast, versions=args.versions, buffer=args.buffer, slow=slow)
            print(f"running {m.job} ...", file=sys.stderr)
            results.append(await run_case(m, proc.port, proc.host))
    finally:
        await proc.stop()
    return results


def table(results: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"FedBuff (buffer {args.buffer}), {args.trainers} trainers (even ones {args.fast}s a "
        f"fit, odd ones {10 * args.fast}s), toy model {args.size:,} float32, "
        f"{args.versions} versions; mosquitto on loopback; {platform.machine()} "
        f"{platform.system()}, Python {platform.python_version()}, {date.today()}",
        "",
        "| topology | updates/s | staleness mean / p50 / p95 / max | fast / slow staleness "
        "| fast share of updates | fast trainer idle gap p50 / p95 / max | fast fits/s "
        "| msgs a trainer received (max) / orders in the job | root published MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, g = r["staleness"], r["fast_gap_ms"]
        lines.append(
            f"| {r['topology']} | {r['updates_per_s']} ({r['updates']} in {r['seconds']} s) "
            f"| {s['mean']} / {s['p50']} / {s['p95']} / {s['max']} "
            f"| {r['staleness_fast_mean']} / {r['staleness_slow_mean']} | {r['fast_share']} "
            f"| {g['p50']} / {g['p95']} / {g['max']} ms | {r['fast_fits_per_s']} "
            f"| {r['received_msgs_max']} / {r['orders_trained']} | {r['root_out_mb']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainers", type=int, default=10)
    p.add_argument("--size", type=int, default=100_000, help="model parameters (float32)")
    p.add_argument("--fast", type=float, default=0.02, help="seconds a fast trainer's fit")
    p.add_argument("--versions", type=int, default=100)
    p.add_argument("--buffer", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="4 trainers, 20 versions, 10k params")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.trainers, args.versions, args.size, args.buffer = 4, 20, 10_000, 2
    configure_logging(level="warning")
    results = asyncio.run(main_async(args))
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
