"""The ``fedbus`` command: run a whole federation, serve one node, validate, watch.

Logging is configured here and only here. Progress goes to stdout, one line a round, and the
last line of ``run`` is the final metric (``final accuracy=0.94``), so scripts can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fnmatch
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog

from fedbus import topics
from fedbus.bus import Bus
from fedbus.bus.memory import MemoryBroker
from fedbus.codec import decode
from fedbus.errors import CodecError, FedbusError, ManifestError
from fedbus.log import configure_logging
from fedbus.manifest import BrokerSpec, Manifest, NodeSpec, describe, load_manifest, with_broker
from fedbus.node import build_node, make_bus
from fedbus.services.aggregator import Aggregator, RoundReport
from fedbus.services.async_aggregator import AsyncAggregator

__all__ = ["main"]

log = structlog.get_logger("fedbus.cli")


def _parse_broker(value: str) -> BrokerSpec:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--broker wants HOST:PORT, got {value!r}")
    return BrokerSpec(host=host or "127.0.0.1", port=int(port))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-json", action="store_true", help="JSON log lines (for machines)")
    common.add_argument("--log-level", default="info", help="debug, info, warning, error")
    p = argparse.ArgumentParser(prog="fedbus", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    run = add("run", "run every node of a manifest in this process")
    run.add_argument("manifest")
    run.add_argument("--rounds", type=int, help="override the manifest's rounds")
    run.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")
    run.add_argument("--memory", action="store_true",
                     help="in-process memory bus instead of MQTT (simulation, no broker)")

    serve = add("serve", "run one node (what compose and systemd start)")
    serve.add_argument("manifest")
    serve.add_argument("--node", required=True, action="append",
                       help="node id from the manifest; repeat it or use a glob ('t*') to "
                       "run many nodes in this process (simulation: many clients a worker)")
    serve.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")

    val = add("validate", "check a manifest and print what it declares")
    val.add_argument("manifest")

    watch = add("watch", "print the per-round metrics of a running job")
    watch.add_argument("manifest")
    watch.add_argument("--broker", type=_parse_broker)

    query = add("query", "ask the job's store for a workload (JSON on stdout): summary, "
                "lineage, scheduling, malicious, debugging, clustering, personalization, "
                "contribution")
    query.add_argument("manifest")
    query.add_argument("workload")
    query.add_argument("--round", type=int, help="the round to look at (default: the last)")
    query.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                       help="a workload argument, e.g. --arg k=3 --arg by=loss (repeatable)")
    query.add_argument("--store", help="store node id (default: the manifest's first store)")
    query.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")
    query.add_argument("--offline", action="store_true",
                       help="read the store's folder here instead of asking the running store "
                       "(the default when the manifest names no broker)")
    query.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    query.add_argument("--save", metavar="DIR", help="write returned models here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    try:
        manifest = load_manifest(args.manifest)
        if getattr(args, "broker", None):
            manifest = with_broker(manifest, args.broker)
        if args.command == "validate":
            print(describe(manifest))
            return 0
        if args.command == "run":
            return asyncio.run(_run_all(manifest, args.rounds, memory=args.memory))
        if args.command == "serve":
            return asyncio.run(_serve(manifest, args.node))
        if args.command == "query":
            return asyncio.run(_query(manifest, args))
        return asyncio.run(_watch_only(manifest))
    except ManifestError as exc:
        print(f"fedbus: invalid manifest: {exc}", file=sys.stderr)
        return 2
    except FedbusError as exc:
        log.error("failed", error=str(exc))
        print(f"fedbus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# --- run: the whole federation in one process -----------------------------------------------

@contextlib.asynccontextmanager
async def _broker_for(
    m: Manifest, memory: bool
) -> AsyncIterator[tuple[Manifest, MemoryBroker | None]]:
    if memory:
        yield m, MemoryBroker()
        return
    if m.broker is not None:
        yield m, None
        return
    # No broker named: start a private mosquitto on a free loopback port (see docs/broker.md
    # for why a real broker beats an embedded pure-Python one).
    from fedbus.broker import spawn_mosquitto

    proc = await spawn_mosquitto()
    log.info("broker_started", endpoint=proc.endpoint, pid=proc.pid)
    try:
        yield with_broker(m, BrokerSpec(host=proc.host, port=proc.port)), None
    finally:
        await proc.stop()


async def _run_all(m: Manifest, rounds: int | None, *, memory: bool) -> int:
    if rounds is not None:
        m = dataclasses.replace(m, rounds=rounds)
    async with _broker_for(m, memory) as (m, mem):
        return await _run_nodes(m, [n.id for n in m.nodes], mem)


async def _run_nodes(m: Manifest, node_ids: Sequence[str], mem: MemoryBroker | None) -> int:
    """Run ``node_ids`` in this process, each on its own bus connection."""
    # Build every service (importing torch, loading data) before any connection opens:
    # minutes of set-up on a Pi must not run into the MQTT keepalive.
    buses = {n: make_bus(m, m.node(n), memory=mem) for n in node_ids}
    services: dict[str, Any] = {n: build_node(m, n, bus) for n, bus in buses.items()}
    _limit_torch_threads(sum(1 for n in node_ids if m.node(n).role == "trainer"))
    agg = next((s for s in services.values() if isinstance(s, (Aggregator, AsyncAggregator))),
               None)
    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        async with asyncio.TaskGroup() as tg:
            for node_id, svc in services.items():
                tg.create_task(svc.run(), name=node_id)
            if agg is not None:
                tg.create_task(_progress(agg, m.rounds), name="progress")
    return _final_line(agg) if agg is not None else 0


def _limit_torch_threads(n_trainers: int) -> None:
    # Many trainers in one process each train in a worker thread; torch's own intra-op pool
    # per trainer would oversubscribe the cores (2 on a Pi-class box).
    torch = sys.modules.get("torch")
    if torch is not None and n_trainers > 1:
        torch.set_num_threads(1)


async def _progress(agg: Aggregator | AsyncAggregator, rounds: int) -> None:
    while True:
        report = await agg.reports.get()
        print(_format_round(report.as_meta(), rounds), flush=True)
        if report.round >= rounds:
            return


def _format_round(meta: dict[str, Any], rounds: int) -> str:
    parts = [f"round {meta['round']:>3}/{rounds}",
             f"participants {meta['participants']}/{meta['selected']}"]
    for key in ("train_loss", "loss", "accuracy"):
        if isinstance(meta.get(key), (int, float)):
            parts.append(f"{key} {meta[key]:.4f}")
    if meta.get("lost"):
        parts.append(f"lost {','.join(meta['lost'])}")
    if meta.get("rejected"):
        parts.append(f"rejected {sum(meta['rejected'].values())}")
    if not meta.get("aggregated", True):
        parts.append("NOT AGGREGATED")
    parts.append(f"{meta['seconds']:.2f}s")
    return "  ".join(parts)


def _final_line(agg: Aggregator | AsyncAggregator) -> int:
    last: RoundReport | None = agg.history[-1] if agg.history else None
    if last is None:
        print("final rounds=0")
        return 1
    if last.eval is not None and "accuracy" in last.eval.metrics:
        print(f"final accuracy={last.eval.metrics['accuracy']:.4f}")
    elif last.eval is not None:
        print(f"final loss={last.eval.loss:.6g}")
    else:
        print(f"final rounds={last.round}")
    return 0


# --- serve: one node -------------------------------------------------------------------------

async def _serve(m: Manifest, patterns: Sequence[str]) -> int:
    node_ids = [n.id for n in m.nodes if any(fnmatch.fnmatchcase(n.id, p) for p in patterns)]
    if not node_ids:
        raise ManifestError(m.source, "nodes",
                            f"--node {' '.join(patterns)} matches no node; known: "
                            f"{', '.join(n.id for n in m.nodes)}")
    if m.broker is None:
        raise ManifestError(m.source, "broker",
                            "`fedbus serve` needs a broker: add broker: {host, port} to the "
                            "manifest or pass --broker HOST:PORT")
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    assert main_task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, main_task.cancel)
    try:
        return await _run_nodes(m, node_ids, None)
    except asyncio.CancelledError:
        log.info("stopped_by_signal", nodes=node_ids)
        return 0


# --- query: ask the store ---------------------------------------------------------------------

async def _query(m: Manifest, args: argparse.Namespace) -> int:
    import json

    import yaml

    from fedbus.store import query as q

    wargs: dict[str, Any] = {}
    for item in args.arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedbusError(f"--arg {item!r}: use KEY=VALUE, e.g. --arg k=3")
        wargs[key] = yaml.safe_load(value)
    if args.round is not None:
        wargs["round"] = args.round
    node = q.store_node(m, args.store)
    if args.offline or m.broker is None:
        meta, tensors = await q.ask_offline(m, node, args.workload, wargs)
    else:
        me = NodeSpec(id=f"query-{_short_id()}", role="trainer")
        async with make_bus(m, me) as bus:
            meta, tensors = await q.ask(bus, m, node.id, args.workload, wargs, args.timeout)
    if args.save and tensors:
        meta["saved"] = q.save_models(tensors, args.save)
    print(json.dumps(meta, indent=2, default=str))
    return 0 if meta.get("ok") else 1


# --- watch: metrics of a running job ---------------------------------------------------------

async def _watch_only(m: Manifest) -> int:
    if m.broker is None:
        raise ManifestError(m.source, "broker", "`fedbus watch` needs --broker HOST:PORT")
    watcher = NodeSpec(id=f"watch-{_short_id()}", role="trainer")
    async with make_bus(m, watcher) as bus:
        await _print_metrics(bus, m)
    return 0


async def _print_metrics(bus: Bus, m: Manifest) -> None:
    async with bus.subscribe(topics.metrics(m.job, m.aggregator.id)) as sub:
        async for msg in sub:
            try:
                env = decode(msg.payload)
            except CodecError as exc:
                log.warning("message_rejected", reason=exc.reason, topic=msg.topic)
                continue
            print(_format_round(dict(env.meta), m.rounds), flush=True)
            if env.meta.get("round") == m.rounds:
                return


def _short_id() -> str:
    return str(os.getpid())


if __name__ == "__main__":
    sys.exit(main())
