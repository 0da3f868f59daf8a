"""Shaped device links: fedbus and Flower when every device has its own slow link.

    sudo .venv/bin/python -m benchmarks.bench_links                     # the default cases
    sudo .venv/bin/python -m benchmarks.bench_links --cases 10:1M --trials 3 --json links.json
    sudo .venv/bin/python -m benchmarks.bench_links --cases 10:1M --engines fedbus,flower \
        --max-uploads 10                                                # the upload gate opened
    sudo .venv/bin/python -m benchmarks.bench_links --cases 10:digits   # time to 0.94 on digits

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

Digits (``--cases 10:digits``): examples/digits/manifest.yaml's job (the MLP on sklearn's
digits, partition i of N per device, 5 local epochs, central evaluation every round, zstd
level 1 on fedbus's side as in the example) for ``--digits-rounds`` rounds, every device in
every round on both sides; Flower's side is ``flower/digits_flower.py`` training the same task
from the same initial model (its venv needs torch: ``bash benchmarks/flower/setup.sh``).
Reported: seconds from round 1's start (all devices connected) until an evaluation first
reaches ``--target`` (0.94), rounds to it, final accuracy. Every process of both systems runs
with ``OMP_NUM_THREADS=1`` (``run_env``).

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
    JOB_HEAD,
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
#: ``P`` of a case that trains digits to a target accuracy instead of the wire workload
DIGITS = 0
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

    @property
    def digits(self) -> bool:
        return self.params == DIGITS


#: The digits case's job: examples/digits/manifest.yaml's task, codec and evaluation, every
#: trainer in every round (quorum 1.0, as Flower's FedAvg with min_fit_clients = N)
_DIGITS_MANIFEST = "# written by benchmarks/bench_links.py\n" + JOB_HEAD + """\
round: {{deadline_s: 600, quorum: 1.0, min_clients: {n}, start_timeout_s: 180,
        max_uploads: {uploads}}}
evaluate: {{where: server, every: 1}}
codec: {{level: 1, update: {{mode: {update}}}, model: {{mode: {model}}}}}
broker: {{host: "{host}", port: {port}, keepalive_s: 30, chunk_bytes: {chunk}}}
task:
  ref: "examples.digits.task:make_task"
  params: {{epochs: 5, lr: 0.05, momentum: 0.9, batch_size: 32}}
nodes:
  - {{id: aggregator, role: aggregator}}
trainers: {{count: {n}, prefix: "t", parent: aggregator}}
"""


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
        fill = {"rounds": spec.rounds, "n": spec.clients, "host": HUB_ADDR,
                "port": broker.port, "update": update or "none", "model": model or "none",
                "chunk": BrokerSpec().chunk_bytes, "uploads": spec.max_uploads}
        manifest.write_text(_DIGITS_MANIFEST.format(**fill) if spec.digits else _MANIFEST.format(
            level=0, size=spec.params, keepalive=30, task_ref=ADD_TASK, task_extra="", **fill))
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
        t0 = reader.first("round_started") or 0.0
        curve = [(t - t0, float(e["accuracy"])) for t, e in reader.events
                 if e.get("event") == "round_finished" and "accuracy" in e]
        return {"round_s": round_s, "cpu": marks.grouped_cpu(), "down": down, "up": up,
                "curve": curve}
    finally:
        for child in reversed(children):
            child.stop()
        asyncio.run(broker.stop())
        for f in logs:
            f.close()


def run_flower(spec: Spec, links: Links, workdir: Path) -> dict[str, Any]:
    from fedbus.broker import free_port

    port = free_port("0.0.0.0")
    common = ["--port", str(port), "--rounds", str(spec.rounds)]
    if spec.digits:  # fedbus's digits task, one client process per device: partition i of N
        script = str(FLOWER_DIR / "digits_flower.py")

        def client_args(i: int) -> list[str]:
            return ["client", "--clients", str(spec.clients), "--partition", str(i)]
    else:  # the wire workload: trivial training, one client per device process
        script = str(FLOWER_DIR / "wire_flower.py")
        common += ["--params", str(spec.params)]

        def client_args(i: int) -> list[str]:
            return ["clients", "--clients", "1"]
    children: list[Child] = []
    try:
        server = Child("server", subprocess.Popen(
            [str(FLOWER_PY), script, "server", "--host", "0.0.0.0", "--clients",
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
                _device_cmd(links, i, str(FLOWER_PY), script, *client_args(i), "--host",
                            HUB_ADDR, *common),
                cwd=FLOWER_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)))
            children.append(devices[-1])
            marks.pids[f"dev{i}"] = devices[-1].pid
        _wait_children(server, devices, spec.timeout_s, "flower")
        reader.join(10.0)
        if server.proc.returncode != 0 or not out:
            raise RuntimeError(f"Flower server exited with {server.proc.returncode}: {out[-3:]}")
        down, up = marks.bytes_per_round()
        curve = [(float(e["t"]), float(e["accuracy"])) for e in map(json.loads, out[:-1])
                 if "accuracy" in e]
        return {"round_s": json.loads(out[-1])["round_s"], "cpu": marks.grouped_cpu(),
                "down": down, "up": up, "curve": curve}
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
    #: digits: (seconds since round 1 began, accuracy) as each round's evaluation ended
    curve: list[tuple[float, float]] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.round_s[1:] or self.round_s)

    def to_target(self, target: float) -> tuple[float, int] | None:
        """(seconds, rounds) until an evaluation first reached ``target``; None if none did."""
        return next(((t, i + 1) for i, (t, acc) in enumerate(self.curve) if acc >= target),
                    None)

    def after_first(self, target: float) -> float:
        """Seconds from round 1's end to ``target`` (round 1 also warms every process up: on
        digits, torch's first ``fit`` is most of it, the same on both sides)."""
        hit = self.to_target(target)
        return hit[0] - self.curve[0][0] if hit else float("nan")


def _expected_s(engine: str, mbit: float, params: int, rounds: int, clients: int,
                max_uploads: int) -> float:
    """A generous bound on one run: every round's bytes at the link rate, the uploads in
    waves of ``max_uploads``, times three, plus start-up (digits: 10 s a round)."""
    if params == DIGITS:
        return rounds * 10 + 180
    per_byte = {"fp16/fp16": 2, "int8/int8": 1}.get(engine.partition("+")[2], 4)
    one_way = per_byte * params * 8 / (mbit * 1e6) * 1.1
    waves = 1 if engine == "flower" else -(-clients // max_uploads)
    return rounds * one_way * (1 + waves) * 3 + 180


def label(engine: str, max_uploads: int, flower_workers: int) -> str:
    if engine == "flower":
        return f"flower, {flower_workers} workers" if flower_workers else "flower"
    return f"{engine}, gate {max_uploads}" if max_uploads != 4 else engine


def run_env() -> dict[str, str]:
    """Every process of a run, both systems: one OpenMP thread each. Ten device processes
    share this machine's cores; with torch's default pool (one thread a core) each, their
    OpenMP threads spin-wait on each other (fedbus's digits round: 4.7 s and 8.8 CPU-s
    instead of 0.12 s and 0.23). A real device has its cores to itself; here it does not."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


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
                            cwd=REPO, stdin=subprocess.DEVNULL, env=run_env())
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
               time.monotonic() - started, [(t, a) for t, a in r["curve"]])


def _mb(xs: Sequence[float]) -> float:
    return statistics.median(xs) / 1e6 if xs else float("nan")


def table(runs: Sequence[Run]) -> str:
    """The wire cases: seconds a round, each engine against Flower."""
    out = ["| link | P x N | engine | s/round (min–max) | vs Flower | MB/device/round down / up "
           "| CPU s/round | load | trials |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (mbit, params), group in _by([r for r in runs if r.params != DIGITS],
                                     lambda r: (r.mbit, r.params)):
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


def digits_table(runs: Sequence[Run], target: float) -> str:
    """The digits cases: time to ``target`` accuracy, each engine against Flower. A trial
    that never reached it counts as its whole run (and the cell says how many did)."""
    out = [f"| link | N | engine | time to {target:g} s (min–max) | vs Flower | after round 1 "
           f"s | rounds to {target:g} | final accuracy | s/round | kB/device/round down / up "
           "| CPU s/round | load | trials (reached) |", "|---|---|---|" + "---:|" * 10]

    def seconds(r: Run) -> float:
        hit = r.to_target(target)
        return hit[0] if hit else (r.curve[-1][0] if r.curve else float("nan"))

    for mbit, group in _by([r for r in runs if r.params == DIGITS], lambda r: r.mbit):
        flower = [seconds(r) for r in group if r.engine == "flower"]
        flower_s = statistics.median(flower) if flower else float("nan")
        for engine, rs in _by(group, lambda r: r.label):
            secs = [seconds(r) for r in rs]
            hits = [h for h in (r.to_target(target) for r in rs) if h]
            rounds = f"{statistics.median(h[1] for h in hits):g}" if hits else "–"
            med = statistics.median(secs)
            final = statistics.median(r.curve[-1][1] for r in rs if r.curve)
            out.append(
                f"| {mbit:g} Mbit/s | {rs[0].clients} | {engine} | {med:.2f} ({min(secs):.2f}–"
                f"{max(secs):.2f}) | **{med / flower_s:.2f}** "
                f"| {statistics.median(r.after_first(target) for r in rs):.2f} "
                f"| {rounds} | {final:.4f} "
                f"| {statistics.median(r.median_s for r in rs):.3f} "
                f"| {statistics.median(_mb(r.down) for r in rs) * 1e3:.1f} / "
                f"{statistics.median(_mb(r.up) for r in rs) * 1e3:.1f} "
                f"| {statistics.median(r.cpu.get('total', float('nan')) for r in rs):.2f} "
                f"| {min(r.load for r in rs):.1f}–{max(r.load for r in rs):.1f} "
                f"| {len(rs)} ({len(hits)}) |")
    return "\n".join(out)


def _by(runs: Sequence[Run], key: Any) -> Iterator[tuple[Any, list[Run]]]:
    seen: dict[Any, list[Run]] = {}
    for r in runs:
        seen.setdefault(key(r), []).append(r)
    yield from seen.items()


def parse_cases(spec: str) -> tuple[tuple[float, int], ...]:
    """``10:1M,50:11M`` -> ((10.0, 1_000_000), (50.0, 11_000_000)); ``10:digits`` ->
    ((10.0, DIGITS),)."""
    return tuple((float(m), DIGITS if p.strip() == "digits" else _size(p))
                 for m, p in (x.split(":") for x in spec.split(",")))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=None,
                   help="Mbit/s:P pairs (default 10:1M,50:1M,50:11M); P = digits trains "
                        "examples/digits to --target for --digits-rounds rounds")
    p.add_argument("--clients", type=int, default=10, help="devices (one namespace each)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help="comma-separated, of " + ", ".join(ENGINES))
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--digits-rounds", type=int, default=20,
                   help="rounds of a digits case (examples/digits/manifest.yaml's 20)")
    p.add_argument("--target", type=float, default=0.94,
                   help="a digits case's accuracy to reach (central evaluation)")
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
    cases = parse_cases(args.cases) if args.cases else CASES
    if "flower" in engines and not FLOWER_PY.exists():
        raise SystemExit("Flower's venv is missing: bash benchmarks/flower/setup.sh grpc")
    if "flower" in engines and any(p == DIGITS for _, p in cases) and subprocess.run(
            [str(FLOWER_PY), "-c", "import torch, sklearn"], capture_output=True).returncode:
        raise SystemExit("digits needs torch in Flower's venv: bash benchmarks/flower/setup.sh")
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
                        rounds = args.digits_rounds if params == DIGITS else args.rounds
                        run = one_run(links, engine, mbit, params, rounds, trial,
                                      args.max_uploads, Path(tmp), args.flower_workers)
                        runs.append(run)
                        hit = run.to_target(args.target)
                        _eprint(f"{mbit:g} Mbit/s P={params / 1e6:g}M trial {trial + 1}/"
                                f"{args.trials} {run.label:17s} rounds "
                                f"{[round(s, 2) for s in run.round_s]} median r2+ "
                                f"{run.median_s:.2f} s, MB/device/round down {_mb(run.down):.2f}"
                                f" up {_mb(run.up):.2f}, CPU s/round "
                                f"{run.cpu.get('total', float('nan')):.2f}, load "
                                f"{run.load:.1f}, {run.wall_s:.0f} s wall"
                                + (f", {args.target:g} at {hit[0]:.2f} s (round {hit[1]})"
                                   if hit else "" if params else ", target not reached"))
    finally:
        links.down()
    info["loadavg_after"] = os.getloadavg()
    if any(r.params != DIGITS for r in runs):
        print(table(runs))
    if any(r.params == DIGITS for r in runs):
        print(digits_table(runs, args.target))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "clients": args.clients, "rounds": args.rounds,
            "max_uploads": args.max_uploads, "flower_workers": args.flower_workers,
            "digits_rounds": args.digits_rounds, "target": args.target,
            "runs": [asdict(r) | {"median_s": r.median_s} for r in runs]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
