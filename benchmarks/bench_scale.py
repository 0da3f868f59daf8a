"""Thousands of trainers on one box, through relays: connections, seconds a round, memory.

    .venv/bin/python -m benchmarks.bench_scale --trainers 1000,3000,10000 [--fan-in 1000]
        [--procs 4] [--rounds 3] [--json out.json]
    .venv/bin/python -m benchmarks.bench_scale --quick     # 200 trainers, about a minute

One mosquitto, a root aggregator, ``ceil(N / fan-in)`` relays under it and N trainers under
the relays (built programmatically, like benchmarks/bench_topology.py), every node on its
own MQTT connection. The trainers are spread over ``--procs`` worker processes (spawned, each
holding N / procs connections); the root and the relays share one more. The model is the toy
task's, ``--params`` float32 values (1,000: 4 KB) with ``independent: true`` (O(1) set-up per
trainer), uncompressed, so what is measured is connections and messages, not training.

Before mosquitto is spawned, this process raises its open-files limit (RLIMIT_NOFILE) to
the hard limit: mosquitto and the workers inherit it (10,000 trainers need 10,000 sockets in
the broker and N / procs in each worker).

The sequence: the trainer workers start and connect (``--connect-concurrency`` connects in
flight a process; a connect that fails is retried with a jittered, doubling pause), then
everything idles for ``--idle-s`` seconds (CPU time and PSS of each process measured), then the
root and relay process starts and runs ``--rounds`` rounds (idle means: every trainer has
subscribed, mosquitto's ``$SYS/broker/subscriptions/count``, and 2 s have passed). Reported:
connections (mosquitto's ``$SYS/broker/clients/connected``, this benchmark's own watcher not
counted), seconds from the workers' start until all were connected, seconds a round (the root's
round reports; median of rounds 2.. when there are), rounds completed, and PSS
(``/proc/PID/smaps_rollup``) of mosquitto, the trainer workers and the root's process, in total
and per trainer. Every child process and the broker are stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import resource
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import aiomqtt

from fedbus import topics
from fedbus.broker import MosquittoProcess, spawn_mosquitto
from fedbus.bus import Bus, Will
from fedbus.codec import encode
from fedbus.connect import broker_settings, mqtt_bus
from fedbus.errors import ConnectError
from fedbus.log import configure_logging
from fedbus.manifest import Manifest, NodeSpec, parse_manifest
from fedbus.node import build_node
from fedbus.wire import presence

#: mosquitto publishes $SYS every sys_interval seconds (default 10): once a second here.
_SYS = "sys_interval 1\n"
_CONNECTED = "$SYS/broker/clients/connected"
_SUBSCRIPTIONS = "$SYS/broker/subscriptions/count"
#: Filters a trainer subscribes to (model, control, work, its own presence).
_TRAINER_FILTERS = 4


def raise_nofile() -> int:
    """Raise this process's open-files limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def manifest(n: int, fan_in: int, args: argparse.Namespace, host: str, port: int
             ) -> dict[str, Any]:
    relays = -(-n // fan_in)
    nodes: list[dict[str, Any]] = [{"id": "root", "role": "aggregator"}]
    nodes += [{"id": f"r{g}", "role": "relay", "parent": "root"} for g in range(relays)]
    nodes += [{"id": f"t{i}", "role": "trainer", "parent": f"r{i % relays}", "partition": i}
              for i in range(n)]
    return {
        "version": 1, "job": "scale", "rounds": args.rounds, "seed": 0,
        "broker": {"host": host, "port": port, "keepalive_s": args.keepalive,
                   "max_queued_messages": 100_000},
        "codec": {"level": 0},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": args.params, "lr": 0.5, "independent": True}},
        "evaluate": {"where": "none"},
        "round": {"deadline_s": args.deadline, "quorum": args.quorum, "min_clients": relays,
                  "start_timeout_s": args.timeout},
        "nodes": nodes,
    }


# -- the worker processes ------------------------------------------------------------------


def _bus(m: Manifest, node: NodeSpec, connect_timeout_s: float) -> Bus:
    """``fedbus.connect.make_bus`` (will and birth: the node's presence) with a longer
    connect timeout: thousands of connects in one event loop take longer than one."""
    topic = topics.presence(m.job, node.id)
    will = Will(topic, encode(presence(m.job, node.id, node.role, "offline")), True)
    birth = Will(topic, encode(presence(m.job, node.id, node.role, "online")), True)
    s = broker_settings(m, node.id)
    s = dataclasses.replace(s, options=dataclasses.replace(
        s.options, connect_timeout_s=connect_timeout_s, reconnect_max_s=30.0))
    return mqtt_bus(node.id, s, will=will, birth=birth)


async def _serve(spec: dict[str, Any], ids: list[str], out: Any, opts: dict[str, Any]) -> None:
    m = parse_manifest(spec, "<bench-scale>")
    gate = asyncio.Semaphore(opts["concurrency"])
    services: dict[str, Any] = {}
    buses: list[Bus] = []
    retries = 0
    t0 = time.perf_counter()

    async def connect(node_id: str) -> None:
        nonlocal retries
        node = m.node(node_id)
        for attempt in range(20):
            bus = _bus(m, node, opts["connect_timeout_s"])
            try:
                async with gate:
                    await bus.__aenter__()
            except ConnectError:
                retries += 1
                await asyncio.sleep(min(30.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0))
                continue
            buses.append(bus)
            services[node_id] = build_node(m, node_id, bus)
            return
        raise ConnectError(f"{node_id}: 20 connect attempts", "see the broker's log")

    await asyncio.gather(*(connect(i) for i in ids))
    out.put(("connected", os.getpid(), len(ids), time.perf_counter() - t0, retries))
    tasks = [asyncio.create_task(s.run(), name=i) for i, s in services.items() if i != "root"]
    if "root" not in services:
        await asyncio.gather(*tasks)  # until terminated (trainers do not trust `done`)
        return
    agg = services["root"]
    job = asyncio.create_task(agg.run())
    told = 0
    while not job.done() or told < len(agg.history):
        for r in agg.history[told:]:
            out.put(("round", r.round, r.seconds, len(r.accepted), r.examples, r.aggregated))
        told = len(agg.history)
        await asyncio.wait({job}, timeout=0.5)
    out.put(("done", repr(job.exception()) if job.exception() else None))
    for t in tasks:
        t.cancel()


def _worker(spec: dict[str, Any], ids: list[str], out: Any, opts: dict[str, Any]) -> None:
    configure_logging(level="error")  # connect retries are counted, not logged
    asyncio.run(_serve(spec, ids, out, opts))


# -- measuring ---------------------------------------------------------------------------


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watcher:
    """mosquitto's counts of connected clients and of subscriptions, as it publishes them
    ($SYS, once a second)."""

    def __init__(self, proc: MosquittoProcess) -> None:
        self.proc = proc
        self.connected = -1
        self.subscriptions = -1
        self._task: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        async with aiomqtt.Client(self.proc.host, self.proc.port,
                                  identifier="bench-scale-watch") as client:
            await client.subscribe(_CONNECTED)
            await client.subscribe(_SUBSCRIPTIONS)
            async for message in client.messages:
                value = int(bytes(message.payload))  # type: ignore[arg-type]
                if message.topic.matches(_CONNECTED):
                    self.connected = value - 1  # not this watcher
                else:
                    self.subscriptions = value - 2

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _drain(out: Any, seen: list[tuple[Any, ...]]) -> None:
    while True:
        try:
            seen.append(out.get_nowait())
        except queue.Empty:
            return


async def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM (``timeout``, a CI runner) cancels the run: the ``finally`` stops every child
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    proc = await spawn_mosquitto(config_extra=_SYS)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers: list[Any] = []
    watcher = Watcher(proc)
    spec = manifest(n, args.fan_in, args, proc.host, proc.port)
    relays = len(spec["nodes"]) - n - 1
    opts = {"concurrency": args.connect_concurrency, "connect_timeout_s": args.connect_timeout}
    res: dict[str, Any] = {"trainers": n, "relays": relays, "procs": args.procs,
                           "rounds_completed": 0, "round_s": []}
    msgs: list[tuple[Any, ...]] = []
    try:
        watcher.start()
        ids = [f"t{i}" for i in range(n)]
        t0 = time.perf_counter()
        for k in range(args.procs):
            w = ctx.Process(target=_worker, args=(spec, ids[k::args.procs], out, opts),
                            daemon=True)
            w.start()
            workers.append(w)
        deadline = t0 + args.timeout
        while watcher.connected < n and time.perf_counter() < deadline:
            if any(not w.is_alive() for w in workers):
                raise RuntimeError(f"a trainer worker died ({[w.exitcode for w in workers]})")
            await asyncio.sleep(0.2)
        res["connected"] = watcher.connected
        res["connect_s"] = time.perf_counter() - t0
        _drain(out, msgs)
        res["connect_retries"] = sum(m[4] for m in msgs if m[0] == "connected")
        print(f"  {n}: {watcher.connected} connected in {res['connect_s']:.1f} s", flush=True)
        if watcher.connected < n:
            return res
        # idle: every trainer connected and subscribed, nothing to do
        settle = time.perf_counter() + 120
        while time.perf_counter() < settle:
            if watcher.subscriptions >= _TRAINER_FILTERS * n:
                break
            await asyncio.sleep(0.2)  # a $SYS count, published once a second
        res["serving_s"] = time.perf_counter() - t0
        await asyncio.sleep(2.0)
        pids = [w.pid for w in workers]
        before = {p: cpu_s(p) for p in [*pids, proc.pid]}
        await asyncio.sleep(args.idle_s)
        idle_cpu = {p: (cpu_s(p) - c) / args.idle_s for p, c in before.items()}
        res["idle_cpu_trainers"] = sum(idle_cpu[p] for p in pids)
        res["idle_cpu_broker"] = idle_cpu[proc.pid]
        res["idle_pss_trainers_mib"] = sum(pss_mib(p) for p in pids)
        res["idle_pss_broker_mib"] = pss_mib(proc.pid)
        print(f"  {n}: all subscribed at {res['serving_s']:.1f} s; idle: trainers "
              f"{res['idle_cpu_trainers']:.2f} CPU s/s "
              f"({res['idle_cpu_trainers'] / n * 1e6:.0f} us/s each), broker "
              f"{res['idle_cpu_broker']:.2f}, trainers' PSS {res['idle_pss_trainers_mib']:.0f} MiB",
              flush=True)
        # the root and its relays
        root = ctx.Process(target=_worker, args=(spec, ["root"] + [f"r{g}" for g in range(
            relays)], out, opts), daemon=True)
        t1 = time.perf_counter()
        root.start()
        workers.append(root)
        done = False
        rounds: list[tuple[Any, ...]] = []
        while not done and time.perf_counter() < t1 + args.timeout:
            try:
                msg = await asyncio.to_thread(out.get, True, 1.0)
            except queue.Empty:
                if not root.is_alive():
                    break
                continue
            if msg[0] == "round":
                rounds.append(msg)
                if len(rounds) == 1:
                    res["pss_mib"] = _pss(workers, proc)
                print(f"  {n}: round {msg[1]}: {msg[2]:.2f} s, {msg[3]} of {relays} relays, "
                      f"{msg[4]} examples", flush=True)
            elif msg[0] == "done":
                done = True
                res["error"] = msg[1]
        res["job_s"] = time.perf_counter() - t1
        res["rounds_completed"] = sum(1 for r in rounds if r[5])
        res["round_s"] = [r[2] for r in rounds]
        res["examples_ok"] = all(r[4] == sum(10 + 5 * p for p in range(n)) for r in rounds)
        res.setdefault("pss_mib", _pss(workers, proc))
        return res
    finally:
        await watcher.stop()
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
                w.join(5)
        await proc.stop()


def _pss(workers: list[Any], proc: MosquittoProcess) -> dict[str, float]:
    trainers = sum(pss_mib(w.pid) for w in workers[:-1])
    root = pss_mib(workers[-1].pid)
    broker = pss_mib(proc.pid)
    return {"trainers": trainers, "root_relays": root, "broker": broker,
            "harness": pss_mib(os.getpid()), "total": trainers + root + broker}


def row(r: dict[str, Any]) -> str:
    n = r["trainers"]
    s = r["round_s"]
    later = s[1:] or s
    med = f"{statistics.median(later):.2f}" if later else "-"
    spread = f" ({min(later):.2f}-{max(later):.2f})" if len(later) > 1 else ""
    p = r.get("pss_mib") or {}
    total = p.get("total")
    return (f"| {n:,} | {r['relays']} | {r.get('connected', 0):,} | "
            f"{r.get('connect_s', 0):.1f} | {r.get('connect_retries', 0)} | "
            f"{r['rounds_completed']} | {med}{spread} | "
            f"{p.get('broker', 0):.0f} / {p.get('trainers', 0):.0f} / "
            f"{p.get('root_relays', 0):.0f} | {total or 0:,.0f} | "
            f"{(p.get('trainers', 0) * 1024 / n) if p else 0:.0f} | "
            f"{r.get('idle_cpu_trainers', 0):.2f} / {r.get('idle_cpu_broker', 0):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", default="1000,3000,10000", help="comma-separated sizes")
    p.add_argument("--fan-in", type=int, default=1000, help="trainers per relay")
    p.add_argument("--procs", type=int, default=4, help="trainer worker processes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--params", type=int, default=1000)
    p.add_argument("--keepalive", type=int, default=60,
                   help="broker.keepalive_s (30 s lost 80 trainers of 10,000 at load 7)")
    p.add_argument("--connect-concurrency", type=int, default=64,
                   help="connects in flight per worker process")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="seconds per connect")
    p.add_argument("--deadline", type=float, default=300.0, help="round.deadline_s")
    p.add_argument("--quorum", type=float, default=1.0,
                   help="round.quorum (1.0: a round needs every trainer, and the run checks "
                        "every trainer's examples were counted)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds allowed to connect, and again to finish the rounds")
    p.add_argument("--idle-s", type=float, default=10.0, help="idle window measured")
    p.add_argument("--quick", action="store_true", help="200 trainers, 2 processes, fan-in 100")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    if args.quick:
        args.trainers, args.procs, args.fan_in = "200", 2, 100
    configure_logging(level="error")
    hard = raise_nofile()
    sizes = [int(x) for x in args.trainers.split(",")]
    print(f"# bench_scale {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC on "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}; open files {hard}; {args.params:,} params, "
          f"fan-in {args.fan_in}, {args.procs} trainer processes, {args.rounds} rounds",
          flush=True)
    results = []
    for n in sizes:
        results.append(asyncio.run(measure(n, args)))
        results[-1]["load"] = os.getloadavg()[0]
    print("\n| trainers | relays | connected | s to connect all | connect retries | rounds | "
          "s/round (median of 2..) | PSS MiB broker / trainers / root+relays | "
          "total PSS MiB | trainer KiB each | idle CPU trainers / broker |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for r in results:
        print(row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
