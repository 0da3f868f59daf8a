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
    serve.add_argument("--health-file", help="keep this file fresh while connected (container "
                       "healthchecks: python -m fedbus.deploy.health FILE)")

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
    query.add_argument("--user", help="connect as this operator (from `fedbus acl --operator`) "
                       "on a secured broker")
    watch.add_argument("--user", help="connect as this operator (from `fedbus acl --operator`) "
                       "on a secured broker")
    _add_deploy_commands(add)
    return p


def _add_deploy_commands(add: Any) -> None:
    acl = add("acl", "write broker users, passwords and per-node rights (mosquitto)")
    acl.add_argument("manifest")
    acl.add_argument("--out", required=True, help="folder for passwd, acl, dynsec.json, ...")
    acl.add_argument("--secrets", help="NODE=password lines; other nodes get random ones")
    acl.add_argument("--operator", action="append", default=[],
                     help="an operator user (watch metrics, send control); repeatable")
    acl.add_argument("--backend", choices=("dynsec", "acl_file"), default="dynsec",
                     help="dynsec (refuses forbidden subscriptions visibly) or acl_file")
    acl.add_argument("--plugin", help="path of mosquitto_dynamic_security.so on the broker")
    acl.add_argument("--broker-dir", help="where the broker sees --out (e.g. a container mount)")
    acl.add_argument("--certs", help="folder from `fedbus certs`: add mTLS to the broker lines")
    acl.add_argument("--listen", metavar="HOST:PORT", type=_parse_broker,
                     help="listener of the whole broker.conf (default 0.0.0.0 and the "
                     "manifest's port)")
    acl.add_argument("--persistence-dir", default="/var/lib/mosquitto/",
                     help="broker.conf's persistence_location")
    acl.add_argument("--group", help="give the broker's files to this group (mosquitto; root)")
    certs = add("certs", "write a CA, the broker's certificate and one per node (CN = node id)")
    certs.add_argument("manifest")
    certs.add_argument("--out", required=True)
    certs.add_argument("--host", action="append", default=[],
                       help="a name or address clients dial the broker by; repeatable")
    certs.add_argument("--operator", action="append", default=[])
    certs.add_argument("--days", type=int, default=825)
    comp = add("compose", "write a docker compose file: broker, redis if needed, every node")
    comp.add_argument("manifest", help="path relative to the project root, where compose runs")
    comp.add_argument("--out", help="file to write (default: stdout)")
    comp.add_argument("--redis", action=argparse.BooleanOptionalAction, default=None,
                      help="add redis (default: only when a node's role uses it)")
    comp.add_argument("--secure", metavar="DIR",
                      help="generate broker users/rights into DIR and lock the broker down")
    comp.add_argument("--certs", metavar="DIR", help="a `fedbus certs` folder: mTLS")
    comp.add_argument("--image", default="fedbus:dev")
    units = add("units", "write a node's systemd unit and environment file")
    units.add_argument("manifest")
    units.add_argument("--node", required=True)
    units.add_argument("--out", required=True, help="folder for fedbus-NODE.service, NODE.env")
    units.add_argument("--manifest-path", help="the manifest's path on the device "
                       "(default: this file's absolute path)")
    units.add_argument("--prefix", default="/opt/fedbus", help="install prefix (venv, app)")
    units.add_argument("--env-dir", default="/etc/fedbus", help="where NODE.env is installed")
    units.add_argument("--secure", metavar="DIR",
                       help="a `fedbus acl` folder: put the node's password in its env file")
    units.add_argument("--systemd", type=int, default=252,
                       help="systemd version on the device (>= 254 adds restart backoff)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(json=args.log_json, level=args.log_level)
    try:
        try:
            return _main(args)
        except BaseExceptionGroup as group:
            # An error inside a node's task group: report the error, not the group's traceback.
            raise _leaf(group) from None
    except ManifestError as exc:
        print(f"fedbus: invalid manifest: {exc}", file=sys.stderr)
        return 2
    except FedbusError as exc:
        log.error("failed", error=str(exc))
        print(f"fedbus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups; cancellations are echoes."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_leaf(e) for e in exc.exceptions]
        real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
        return (real or leaves)[0]
    return exc


def _main(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.manifest)
    if getattr(args, "broker", None):
        # only the address: credentials, chunking and limits stay the manifest's
        base = manifest.broker or BrokerSpec()
        manifest = with_broker(manifest, dataclasses.replace(
            base, host=args.broker.host, port=args.broker.port))
    if args.command == "validate":
        print(describe(manifest))
        return 0
    if args.command == "acl":
        return _acl(manifest, args)
    if args.command == "certs":
        return _certs(manifest, args)
    if args.command == "compose":
        return _compose(manifest, args)
    if args.command == "units":
        return _units(manifest, args)
    if args.command == "run":
        return asyncio.run(_run_all(manifest, args.rounds, memory=args.memory))
    if args.command == "serve":
        return asyncio.run(_serve(manifest, args.node, args.health_file))
    if args.command == "query":
        return asyncio.run(_query(manifest, args))
    return asyncio.run(_watch_only(manifest, args.user))


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
    from fedbus.broker import QUEUED_MESSAGES, spawn_mosquitto

    proc = await spawn_mosquitto()
    log.info("broker_started", endpoint=proc.endpoint, pid=proc.pid)
    try:
        yield with_broker(m, BrokerSpec(host=proc.host, port=proc.port,
                                        max_queued_messages=QUEUED_MESSAGES)), None
    finally:
        await proc.stop()


async def _run_all(m: Manifest, rounds: int | None, *, memory: bool) -> int:
    if rounds is not None:
        m = dataclasses.replace(m, rounds=rounds)
    async with _broker_for(m, memory) as (m, mem):
        return await _run_nodes(m, [n.id for n in m.nodes], mem)


async def _run_nodes(m: Manifest, node_ids: Sequence[str], mem: MemoryBroker | None, *,
                     health_file: str | None = None) -> int:
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
        if health_file:
            from fedbus.deploy.health import keep_health_file

            health = asyncio.create_task(keep_health_file(health_file, buses.values()))
            stack.callback(health.cancel)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(svc.run(), name=node_id) for node_id, svc in services.items()
                     if svc is not agg]
            if agg is not None:
                tg.create_task(_progress(agg, m.rounds), name="progress")
                await tg.create_task(agg.run(), name=m.aggregator.id)
                # The job is over. Trainers on an anonymous broker do not trust `done` (anyone
                # could send one) and keep serving: the process that ran the job stops them.
                stores = [t for t in tasks if m.node(t.get_name()).role == "store"]
                for task in tasks:
                    if task not in stores:
                        task.cancel()
                if stores:  # a store stops on `done` once it has written what it received
                    await asyncio.wait(stores, timeout=_STORE_GRACE_S)
                    for task in stores:
                        task.cancel()
    return _final_line(agg) if agg is not None else 0


#: How long `fedbus run` lets a store finish writing after the last round.
_STORE_GRACE_S = 60.0


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

async def _serve(m: Manifest, patterns: Sequence[str], health_file: str | None = None) -> int:
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
        return await _run_nodes(m, node_ids, None, health_file=health_file)
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
        me = NodeSpec(id=args.user or f"query-{_short_id()}", role="trainer")
        async with make_bus(m, me) as bus:
            meta, tensors = await q.ask(bus, m, node.id, args.workload, wargs, args.timeout)
    if args.save and tensors:
        meta["saved"] = q.save_models(tensors, args.save)
    print(json.dumps(meta, indent=2, default=str))
    return 0 if meta.get("ok") else 1

# --- acl, certs: broker security generated from the manifest --------------------------------

def _acl(m: Manifest, args: argparse.Namespace) -> int:
    from fedbus.deploy.passwords import read_secrets_file
    from fedbus.deploy.security import TlsFiles, write_broker_security

    users = [n.id for n in m.nodes] + list(args.operator)
    given = read_secrets_file(args.secrets, users) if args.secrets else None
    tls = None
    if args.certs:
        d = os.path.abspath(args.certs)
        tls = TlsFiles(ca=f"{d}/ca.crt", cert=f"{d}/broker.crt", key=f"{d}/broker.key")
    files = write_broker_security(m, args.out, passwords=given, operators=args.operator,
                                  backend=args.backend, plugin=args.plugin,
                                  broker_dir=args.broker_dir, tls=tls,
                                  persistence_dir=args.persistence_dir,
                                  port=args.listen.port if args.listen else None,
                                  listen_host=args.listen.host if args.listen else "0.0.0.0",
                                  group=args.group)
    # Paths only: the passwords stay in their 0600 files.
    print(f"users     {len(files.users)}: {', '.join(files.users)}")
    print(f"broker    append {files.conf} to mosquitto.conf ({files.backend}); "
          f"it reads {files.dynsec if files.backend == 'dynsec' else files.acl}")
    print(f"passwords {files.password_dir}/<node> (mode 0600): give each node only its own")
    print(f"or run    mosquitto -c {files.broker_conf}  (a whole config: listener, persistence, "
          "limits, security)")
    return 0


def _certs(m: Manifest, args: argparse.Namespace) -> int:
    from fedbus.deploy.certs import write_certs

    files = write_certs(m, args.out, broker_hosts=args.host, operators=args.operator,
                        days=args.days)
    print(f"ca        {files.ca} (keep ca.key offline once nodes have their certificates)")
    print(f"broker    {files.broker_cert}, {files.broker_key}")
    print(f"nodes     {files.out_dir}/nodes/<node>.crt|.key for {len(files.users)} users, "
          "CN = node id")
    return 0


def _compose(m: Manifest, args: argparse.Namespace) -> int:
    from fedbus.deploy.compose import compose_yaml

    text = compose_yaml(m, args.manifest, redis=args.redis, image=args.image,
                        secure_dir=args.secure, certs_dir=args.certs)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


def _units(m: Manifest, args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedbus.deploy.units import write_unit

    password = None
    if args.secure:
        try:
            password = (Path(args.secure) / "passwords" / args.node).read_text().strip()
        except OSError as exc:
            raise ManifestError(m.source, "nodes", f"no password for {args.node!r} in "
                                f"{args.secure}/passwords: {exc.strerror}; run `fedbus acl` "
                                "first") from None
    files = write_unit(m, args.node, args.out, manifest_path=args.manifest_path,
                       prefix=args.prefix, env_dir=args.env_dir, password=password,
                       systemd_version=args.systemd)
    print(f"unit      {files.unit} -> /etc/systemd/system/{files.name}")
    print(f"env       {files.env} -> {args.env_dir}/{args.node}.env (0640 root:fedbus)")
    return 0


# --- watch: metrics of a running job ---------------------------------------------------------

async def _watch_only(m: Manifest, user: str | None = None) -> int:
    if m.broker is None:
        raise ManifestError(m.source, "broker", "`fedbus watch` needs --broker HOST:PORT")
    watcher = NodeSpec(id=user or f"watch-{_short_id()}", role="trainer")
    async with make_bus(m, watcher) as bus:
        await _print_metrics(bus, m)
    return 0


async def _print_metrics(bus: Bus, m: Manifest) -> None:
    async with bus.subscribe(topics.metrics(m.job, m.aggregator.id)) as sub:
        log.info("watch_started", job=m.job, node=m.aggregator.id)
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
