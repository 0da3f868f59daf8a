"""Shaped device links: fedbus and Flower when every device has its own slow link.

    sudo .venv/bin/python -m benchmarks.bench_links                     # the default cases
    sudo .venv/bin/python -m benchmarks.bench_links --cases 10:1M --trials 3 --json links.json
    sudo .venv/bin/python -m benchmarks.bench_links --cases 10:1M --engines fedbus,flower \
        --max-uploads 10                                                # the upload gate opened

Needs root (``ip netns``, veth pairs, ``tc``). Every device is one network namespace joined to
a hub namespace by its own veth pair, shaped with ``tbf`` at R Mbit/s in both directions (each
end's egress; this kernel has no ``netem``, so there is no added delay or loss). The hub holds
the broker and the aggregator (fedbus), or the server (Flower); it is the "host side" of every
link, and is a namespace of its own, so that nothing is added to the machine's own network:

- hub ``fbl<pid>h``: ``lo`` up with 10.77.255.1/32, the address every device connects to;
  device i's link ``fb<pid>h<i>`` at 10.77.<i>.1/30;
- device ``fbl<pid>d<i>``: ``fb<pid>d<i>`` at 10.77.<i>.2/30, a route to 10.77.255.1 through it.

Workload: ``bench_wire``'s (one float32 vector of P parameters, each client returns it plus a
constant, FedAvg over all N every round, no evaluation), N = 10 devices, one process per
device (one device = one namespace = one link). Engines, interleaved per trial with the order
rotated: fedbus lossless, fedbus fp16 both ways (``codec.update``/``codec.model`` fp16),
fedbus int8 both ways, and Flower 1.42's legacy gRPC (its fastest mode). No zstd on either
side (``codec.level: 0``): the toy update is a constant and would compress unrealistically.

Reported per run: seconds a round (the server's own, median of rounds 2..R), bytes per device
per round each way as the hub's end of each link counted them (Ethernet frames, TCP/IP and
protocol overhead included; rounds 2..R), and CPU seconds a round of all the run's processes.

Teardown: the measurement runs in a child process inside the hub namespace; every process
started there is stopped by pid in a ``finally``; afterwards any process still inside one of
this run's namespaces (``ip netns pids``) is killed by pid, and every namespace this run
created is deleted, which deletes its veths and qdiscs with it — also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from benchmarks.bench_rounds import (
    _MANIFEST,
    ADD_TASK,
    Child,
    CpuMarks,
    LogReader,
    _eprint,
    _serve,
    machine,
)
from benchmarks.bench_wire import FLOWER_DIR, FLOWER_PY, _read_server, _size, _wait_listening
from fedbus.manifest import BrokerSpec

REPO = Path(__file__).resolve().parent.parent
HUB_ADDR = "10.77.255.1"
ENGINES = ("fedbus", "fedbus+fp16/fp16", "fedbus+int8/int8", "flower")
#: (Mbit/s, params): 11M at 10 Mbit/s is ~37 s a direction per device; opt in with --cases
CASES: tuple[tuple[float, int], ...] = ((10, 1_000_000), (50, 1_000_000), (50, 11_000_000))


# --- the links (outer process, root namespace) -------------------------------------------------

def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _tc(ns: str, *args: str) -> None:
    subprocess.run(["tc", "-n", ns, *args], check=True, capture_output=True, timeout=30)


@dataclass
class Links:
    """A hub namespace and ``devices`` device namespaces, each joined to the hub by a veth
    pair shaped with ``tbf``. ``up()`` builds them, ``down()`` deletes them (safe to call
    twice, and after a partial ``up()``)."""

    devices: int
    tag: str = field(default_factory=lambda: str(os.getpid()))
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"fbl{self.tag}h"

    def device(self, i: int) -> str:
        return f"fbl{self.tag}d{i}"

    def hub_if(self, i: int) -> str:
        return f"fb{self.tag}h{i}"

    def dev_if(self, i: int) -> str:
        return f"fb{self.tag}d{i}"

    def up(self) -> None:
        if self.devices > 250:
            raise ValueError("at most 250 devices (one 10.77.<i>.0/30 each)")
        _ip("netns", "add", self.hub)
        self.created.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "addr", "add", f"{HUB_ADDR}/32", "dev", "lo")
        for i in range(self.devices):
            dev = self.device(i)
            _ip("netns", "add", dev)
            self.created.append(dev)
            _ip("-n", dev, "link", "set", "lo", "up")
            _ip("link", "add", self.hub_if(i), "netns", self.hub, "type", "veth",
                "peer", "name", self.dev_if(i), "netns", dev)
            _ip("-n", self.hub, "addr", "add", f"10.77.{i}.1/30", "dev", self.hub_if(i))
            _ip("-n", self.hub, "link", "set", self.hub_if(i), "up")
            _ip("-n", dev, "addr", "add", f"10.77.{i}.2/30", "dev", self.dev_if(i))
            _ip("-n", dev, "link", "set", self.dev_if(i), "up")
            _ip("-n", dev, "route", "add", f"{HUB_ADDR}/32", "via", f"10.77.{i}.1")

    def shape(self, mbit: float) -> None:
        """``tbf`` at ``mbit`` on both ends of every link (each end shapes what it sends)."""
        for i in range(self.devices):
            for ns, dev in ((self.hub, self.hub_if(i)), (self.device(i), self.dev_if(i))):
                _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit:g}mbit",
                    "burst", "64kb", "latency", "50ms")

    def kill_leftovers(self) -> list[int]:
        """SIGKILL, by pid, any process still inside this run's namespaces."""
        killed = []
        for ns in self.created:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                 timeout=30).stdout
            for pid in (int(x) for x in out.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def down(self) -> None:
        killed = self.kill_leftovers()
        if killed:
            _eprint(f"killed leftover processes in the namespaces: {killed}")
            time.sleep(0.5)  # let the kernel tear them down before the namespaces go
        for ns in reversed(self.created):
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("netns", "del", ns)
        self.created.clear()


# --- one run (inner process, in the hub namespace) ---------------------------------------------

def _counter(iface: str, name: str) -> int:
    with open(f"/sys/class/net/{iface}/statistics/{name}") as f:
        return int(f.read())


@dataclass
class LinkMarks(CpuMarks):
    """CPU times and each link's byte counters (the hub's end), read as each round ends."""

    ifaces: list[str] = field(default_factory=list)
    byte_marks: list[list[tuple[int, int]]] = field(default_factory=list)  # (down, up) per link

    def mark(self) -> None:
        super().mark()
        self.byte_marks.append([(_counter(i, "tx_bytes"), _counter(i, "rx_bytes"))
                                for i in self.ifaces])

    def bytes_per_round(self) -> tuple[list[float], list[float]]:
        """Per device: bytes a round down (hub to device) and up, rounds 2..R."""
        if len(self.byte_marks) < 2:
            return [], []
        first, last, n = self.byte_marks[0], self.byte_marks[-1], len(self.byte_marks) - 1
        return ([(b[0] - a[0]) / n for a, b in zip(first, last, strict=True)],
                [(b[1] - a[1]) / n for a, b in zip(first, last, strict=True)])

    def grouped_cpu(self) -> dict[str, float]:
        """CPU seconds a round: the server side's processes by name, the devices summed."""
        per = self.per_round()
        out = {k: v for k, v in per.items() if not k.startswith("dev") and k != "total"}
        out["devices"] = sum(v for k, v in per.items() if k.startswith("dev"))
        out["total"] = per.get("total", float("nan"))
        return out


@dataclass
class Spec:
    """What the inner process runs (passed as JSON on its command line)."""

    engine: str
    params: int
    clients: int
    rounds: int
    tag: str
    out: str
    timeout_s: float
    max_uploads: int = 4
    flower_workers: int = 0  # 0: Flower's default thread pool (cores + 4)


def _device_cmd(links: Links, i: int, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", links.device(i), *cmd]


def _wait_children(server: Child, devices: Sequence[Child], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not server.reap(0.25):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: still running after {timeout_s:.0f}s")
        for d in devices:
            if d.reap(0) and d.proc.returncode != 0:
                raise RuntimeError(f"{what}: {d.name} exited with {d.proc.returncode}")


def run_fedbus(spec: Spec, links: Links, workdir: Path) -> dict[str, Any]:
    from fedbus.broker import spawn_mosquitto

    update, _, model = spec.engine.partition("+")[2].partition("/")
    broker = asyncio.run(spawn_mosquitto(host="0.0.0.0"))  # every address of the hub only
    children: list[Child] = []
    logs: list[IO[bytes]] = []
    try:
        manifest = workdir / "manifest.yaml"
        manifest.write_text(_MANIFEST.format(
            rounds=spec.rounds, n=spec.clients, level=0, host=HUB_ADDR, port=broker.port,
            size=spec.params, keepalive=30, update=update or "none", model=model or "none",
            chunk=BrokerSpec().chunk_bytes, uploads=spec.max_uploads, task_ref=ADD_TASK,
            task_extra=""))
        agg = Child("aggregator", _serve(manifest, "aggregator", json_log=True,
                                         stderr=subprocess.PIPE, log_level="info"))
        children.append(agg)
        assert agg.proc.stderr is not None
        marks = LinkMarks({"aggregator": agg.pid, "broker": broker.pid},
                          ifaces=[links.hub_if(i) for i in range(spec.clients)])
        reader = LogReader(agg.proc.stderr, cpu=marks)
        reader.start()
        devices = []
        for i in range(spec.clients):
            log = open(workdir / f"t{i}.log", "wb")  # closed in the finally
            logs.append(log)
            devices.append(Child(f"t{i}", subprocess.Popen(
                _device_cmd(links, i, sys.executable, "-m", "fedbus.cli", "serve",
                            str(manifest), "--node", f"t{i}", "--log-level", "warning"),
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)))
            children.append(devices[-1])
            marks.pids[f"dev{i}"] = devices[-1].pid
        _wait_children(agg, devices, spec.timeout_s, spec.engine)
        reader.join()
        finished = reader.named("round_finished")
        round_s = [float(e["seconds"]) for e in finished]
        if agg.proc.returncode != 0 or len(round_s) != spec.rounds:
            raise RuntimeError(f"{spec.engine}: aggregator rc {agg.proc.returncode}, rounds "
                               f"{round_s}: {reader.other[-5:]}")
        down, up = marks.bytes_per_round()
        return {"round_s": round_s, "cpu": marks.grouped_cpu(), "down": down, "up": up}
    finally:
        for child in reversed(children):
            child.stop()
        asyncio.run(broker.stop())
        for f in logs:
            f.close()


def run_flower(spec: Spec, links: Links, workdir: Path) -> dict[str, Any]:
    from fedbus.broker import free_port

    port = free_port("0.0.0.0")
    common = ["--port", str(port), "--params", str(spec.params), "--rounds", str(spec.rounds)]
    wire = str(FLOWER_DIR / "wire_flower.py")
    children: list[Child] = []
    try:
        server = Child("server", subprocess.Popen(
            [str(FLOWER_PY), wire, "server", "--host", "0.0.0.0", "--clients",
             str(spec.clients), "--max-workers", str(spec.flower_workers), *common],
            cwd=FLOWER_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL))
        children.append(server)
        assert server.proc.stdout is not None
        marks = LinkMarks({"server": server.pid},
                          ifaces=[links.hub_if(i) for i in range(spec.clients)])
        out: list[str] = []
        reader = threading.Thread(target=_read_server, args=(server.proc.stdout, out, marks),
                                  daemon=True)
        reader.start()
        _wait_listening(port, server.proc, 60.0)
        devices = []
        for i in range(spec.clients):
            devices.append(Child(f"c{i}", subprocess.Popen(
                _device_cmd(links, i, str(FLOWER_PY), wire, "clients", "--host", HUB_ADDR,
                            "--clients", "1", *common),
                cwd=FLOWER_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)))
            children.append(devices[-1])
            marks.pids[f"dev{i}"] = devices[-1].pid
        _wait_children(server, devices, spec.timeout_s, "flower")
        reader.join(10.0)
        if server.proc.returncode != 0 or not out:
            raise RuntimeError(f"Flower server exited with {server.proc.returncode}: {out[-3:]}")
        down, up = marks.bytes_per_round()
        return {"round_s": json.loads(out[-1])["round_s"], "cpu": marks.grouped_cpu(),
                "down": down, "up": up}
    finally:
        for child in reversed(children):
            child.stop()


def inside(spec: Spec) -> int:
    """The inner process: one run of one engine, its result as JSON in ``spec.out``."""
    from fedbus.log import configure_logging

    configure_logging(level="warning")
    signal.signal(signal.SIGTERM, _interrupt)
    links = Links(spec.clients, spec.tag)
    with tempfile.TemporaryDirectory(prefix="fedbus-links-") as tmp:
        run = run_flower if spec.engine == "flower" else run_fedbus
        result = run(spec, links, Path(tmp))
    Path(spec.out).write_text(json.dumps(result))
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- trials and report (outer process) ---------------------------------------------------------

@dataclass
class Run:
    engine: str
    label: str  # the engine and any non-default width (fedbus's gate, Flower's workers)
    mbit: float
    params: int
    clients: int
    trial: int
    round_s: list[float]
    cpu: dict[str, float]
    down: list[float]  # bytes per round, per device
    up: list[float]
    load: float
    wall_s: float

    @property
    def median_s(self) -> float:
        return statistics.median(self.round_s[1:] or self.round_s)


def _expected_s(engine: str, mbit: float, params: int, rounds: int, clients: int,
                max_uploads: int) -> float:
    """A generous bound on one run: every round's bytes at the link rate, the uploads in
    waves of ``max_uploads``, times three, plus start-up."""
    per_byte = {"fp16/fp16": 2, "int8/int8": 1}.get(engine.partition("+")[2], 4)
    one_way = per_byte * params * 8 / (mbit * 1e6) * 1.1
    waves = 1 if engine == "flower" else -(-clients // max_uploads)
    return rounds * one_way * (1 + waves) * 3 + 180


def label(engine: str, max_uploads: int, flower_workers: int) -> str:
    if engine == "flower":
        return f"flower, {flower_workers} workers" if flower_workers else "flower"
    return f"{engine}, gate {max_uploads}" if max_uploads != 4 else engine


def one_run(links: Links, engine: str, mbit: float, params: int, rounds: int, trial: int,
            max_uploads: int, workdir: Path, flower_workers: int = 0) -> Run:
    out = workdir / f"{engine.replace('/', '_')}-{trial}.json"
    timeout_s = _expected_s(engine, mbit, params, rounds, links.devices, max_uploads)
    spec = Spec(engine, params, links.devices, rounds, links.tag, str(out), timeout_s,
                max_uploads, flower_workers)
    load = os.getloadavg()[0]
    started = time.monotonic()
    proc = subprocess.Popen(["ip", "netns", "exec", links.hub, sys.executable, "-m",
                             "benchmarks.bench_links", "--inside", json.dumps(asdict(spec))],
                            cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        rc = proc.wait(timeout=timeout_s + 60)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the inner process stops its own children on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if rc != 0:
        raise RuntimeError(f"{engine} at {mbit:g} Mbit/s, P={params}: inner run exited {rc}")
    r = json.loads(out.read_text())
    return Run(engine, label(engine, max_uploads, flower_workers), mbit, params, links.devices,
               trial, r["round_s"], r["cpu"], r["down"], r["up"], load,
               time.monotonic() - started)


def _mb(xs: Sequence[float]) -> float:
    return statistics.median(xs) / 1e6 if xs else float("nan")


def table(runs: Sequence[Run]) -> str:
    out = ["| link | P x N | engine | s/round (min–max) | vs Flower | MB/device/round down / up "
           "| CPU s/round | load | trials |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (mbit, params), group in _by(runs, lambda r: (r.mbit, r.params)):
        flower = [r.median_s for r in group if r.engine == "flower"]
        flower_s = statistics.median(flower) if flower else float("nan")
        for engine, rs in _by(group, lambda r: r.label):
            med = statistics.median(r.median_s for r in rs)
            out.append(
                f"| {mbit:g} Mbit/s | {params / 1e6:g}M x {rs[0].clients} | {engine} "
                f"| {med:.2f} ({min(r.median_s for r in rs):.2f}–"
                f"{max(r.median_s for r in rs):.2f}) | **{med / flower_s:.2f}** "
                f"| {statistics.median(_mb(r.down) for r in rs):.2f} / "
                f"{statistics.median(_mb(r.up) for r in rs):.2f} "
                f"| {statistics.median(r.cpu.get('total', float('nan')) for r in rs):.2f} "
                f"| {min(r.load for r in rs):.1f}–{max(r.load for r in rs):.1f} | {len(rs)} |")
    return "\n".join(out)


def _by(runs: Sequence[Run], key: Any) -> Iterator[tuple[Any, list[Run]]]:
    seen: dict[Any, list[Run]] = {}
    for r in runs:
        seen.setdefault(key(r), []).append(r)
    yield from seen.items()


def parse_cases(spec: str) -> tuple[tuple[float, int], ...]:
    """``10:1M,50:11M`` -> ((10.0, 1_000_000), (50.0, 11_000_000))."""
    return tuple((float(m), _size(p)) for m, p in (x.split(":") for x in spec.split(",")))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None,
                   help="Mbit/s:P pairs (default 10:1M,50:1M,50:11M)")
    p.add_argument("--clients", type=int, default=10, help="devices (one namespace each)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated, of " + ", ".join(ENGINES))
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-uploads", type=int, default=4,
                   help="fedbus's round.max_uploads (fedbus's default 4)")
    p.add_argument("--flower-workers", type=int, default=0,
                   help="Flower's server thread pool (0: its default, cores + 4 = 6 on 2 "
                        "cores, which serves 10 clients in two waves)")
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inside:
        return inside(Spec(**json.loads(args.inside)))
    if os.geteuid() != 0:
        raise SystemExit("needs root: ip netns, veth pairs and tc")
    engines = [e for e in args.engines.split(",") if e]
    if unknown := set(engines) - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(unknown)}; choose from {ENGINES}")
    if "flower" in engines and not FLOWER_PY.exists():
        raise SystemExit("Flower's venv is missing: bash benchmarks/flower/setup.sh grpc")
    cases = parse_cases(args.cases) if args.cases else CASES
    info = machine()
    _eprint(f"machine: {info['nproc']} cores, load {info['loadavg'][0]:.2f}")
    signal.signal(signal.SIGTERM, _interrupt)
    links = Links(args.clients)
    runs: list[Run] = []
    try:
        links.up()
        with tempfile.TemporaryDirectory(prefix="fedbus-links-") as tmp:
            for mbit, params in cases:
                links.shape(mbit)
                for trial in range(args.trials):
                    order = engines[trial % len(engines):] + engines[:trial % len(engines)]
                    for engine in order:
                        run = one_run(links, engine, mbit, params, args.rounds, trial,
                                      args.max_uploads, Path(tmp), args.flower_workers)
                        runs.append(run)
                        _eprint(f"{mbit:g} Mbit/s P={params / 1e6:g}M trial {trial + 1}/"
                                f"{args.trials} {run.label:17s} rounds "
                                f"{[round(s, 2) for s in run.round_s]} median r2+ "
                                f"{run.median_s:.2f} s, MB/device/round down {_mb(run.down):.2f}"
                                f" up {_mb(run.up):.2f}, CPU s/round "
                                f"{run.cpu.get('total', float('nan')):.2f}, load "
                                f"{run.load:.1f}, {run.wall_s:.0f} s wall")
    finally:
        links.down()
    info["loadavg_after"] = os.getloadavg()
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "clients": args.clients, "rounds": args.rounds,
            "max_uploads": args.max_uploads, "flower_workers": args.flower_workers,
            "runs": [asdict(r) | {"median_s": r.median_s} for r in runs]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
