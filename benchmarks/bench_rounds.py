"""Aggregator round overhead and peak RSS over a real mosquitto, N trainers x P float32 params.

    .venv/bin/python -m benchmarks.bench_rounds            # N in {10, 50} x P in {1M, 11M}
    .venv/bin/python -m benchmarks.bench_rounds --quick    # N=10, P=1M only (< 1 min)
    .venv/bin/python -m benchmarks.bench_rounds --json rounds.json

For each (N, P) the script starts its own mosquitto on a free loopback port, then two
processes, exactly as a deployment would:

- the aggregator alone: ``python -m fedbus.cli serve M --node aggregator --log-json``, so its
  RSS is its own. /proc/PID/status is sampled at ~20 Hz (VmRSS and VmHWM); the peak is the
  last VmHWM read before it exits (VmHWM only grows). The kernel's ``ru_maxrss`` is kept as
  a cross-check only: it also counts the forking parent's RSS, so it is valid only when it
  exceeds what this script held when it started the child;
- all N trainers in ONE process: ``python -m fedbus.cli serve M --node 't*'`` pinned to at
  most 2 cores.

The job is FedAvg with the numpy toy task (one step toward a target: trivial training), no
evaluation, no compression (``codec.level 0``) unless ``--codec-level`` says otherwise. Round
overhead is the aggregator's own ``round_finished`` ``seconds``, median over the rounds after
the first; update traffic into the aggregator is N x P x 4 bytes over that time.

Baselines in the same run: the RSS of an idle interpreter that imported what the aggregator
imports (``fedbus.cli``, ``fedbus.bus.mqtt``), and the theoretical floor of FedAvg: the model
in float32 plus a float64 accumulator, 12 bytes a parameter, on top of that idle RSS.

Every process started here (mosquitto, both serve processes) is stopped by pid in a
``finally``. Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from fedbus.broker import MosquittoProcess, spawn_mosquitto
from fedbus.log import configure_logging
from fedbus.manifest import BrokerSpec

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
MIB = 1 << 20
FULL_GRID: tuple[tuple[int, int], ...] = (
    (10, 1_000_000), (50, 1_000_000), (10, 11_000_000), (50, 11_000_000))
QUICK_GRID: tuple[tuple[int, int], ...] = ((10, 1_000_000),)
_STATUS_FIELD = re.compile(rb"^(VmRSS|VmHWM):\s+(\d+)\s+kB", re.MULTILINE)

#: How every benchmark job's manifest begins (``rounds`` to fill in); bench_store's too.
JOB_HEAD = """\
version: 1
job: bench
seed: 0
rounds: {rounds}
strategy: fedavg
"""

_MANIFEST = "# written by benchmarks/bench_rounds.py\n" + JOB_HEAD + """\
round: {{deadline_s: 600, quorum: 1.0, min_clients: {n}, start_timeout_s: 180,
        max_uploads: {uploads}}}
evaluate: {{where: none}}
codec: {{level: {level}, update: {{mode: {update}}}, model: {{mode: {model}}}}}
broker: {{host: "{host}", port: {port}, keepalive_s: {keepalive}, chunk_bytes: {chunk}}}
task:
  ref: "{task_ref}"
  params: {{size: {size}{task_extra}}}
nodes:
  - {{id: aggregator, role: aggregator}}
trainers: {{count: {n}, prefix: "t", parent: aggregator}}
"""


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- /proc sampling --------------------------------------------------------------------------

def read_mem(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in bytes; None once it has exited (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    found = {k.decode(): int(v) * 1024 for k, v in _STATUS_FIELD.findall(text)}
    if "VmRSS" not in found or "VmHWM" not in found:
        return None
    return found["VmRSS"], found["VmHWM"]


@dataclass
class Sampler:
    """Samples a pid's VmRSS/VmHWM at ``hz`` in a thread until the process is gone."""

    pid: int
    hz: float = 20.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss, hwm)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"rss-{self.pid}")
        self._thread.start()

    def _loop(self) -> None:
        period = 1.0 / self.hz
        while not self._stop.is_set():
            mem = read_mem(self.pid)
            if mem is None:
                return
            self.samples.append((time.monotonic(), *mem))
            self._stop.wait(period)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def rss_at(self, t: float) -> int | None:
        """The last VmRSS sampled at or before ``t``."""
        before = [s for s in self.samples if s[0] <= t]
        return before[-1][1] if before else None

    @property
    def last_hwm(self) -> int:
        return self.samples[-1][2] if self.samples else 0


# --- CPU time --------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (all its threads); None once gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


@dataclass
class CpuMarks:
    """CPU seconds of named processes, read at each round's end as the server reports it:
    CPU per round is the difference between the first and the last mark over the rounds in
    between (rounds 2..R, as the round times), start-up and shut-down excluded."""

    pids: dict[str, int] = field(default_factory=dict)
    marks: list[dict[str, float]] = field(default_factory=list)

    def mark(self) -> None:
        now: dict[str, float] = {}
        for name, pid in list(self.pids.items()):
            cpu = cpu_seconds(pid)
            if cpu is not None:
                now[name] = cpu
        self.marks.append(now)

    def per_round(self) -> dict[str, float]:
        """Mean CPU seconds a round for each process and their ``total``; empty with fewer
        than two marks."""
        if len(self.marks) < 2:
            return {}
        first, last = self.marks[0], self.marks[-1]
        out = {name: (last[name] - first[name]) / (len(self.marks) - 1)
               for name in self.pids if name in first and name in last}
        out["total"] = sum(out.values())
        return out


# --- processes -------------------------------------------------------------------------------

@dataclass
class Child:
    """A process started here; ``reap`` records its rc, ru_maxrss and CPU time."""

    name: str
    proc: subprocess.Popen[bytes]
    maxrss: int | None = None  # bytes, from wait4 once reaped (includes the parent at fork)
    cpu_s: float = 0.0  # user + system CPU seconds, from wait4 once reaped

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reap(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for exit; record rc and ru_maxrss. True when it exited."""
        deadline = time.monotonic() + timeout_s
        while self.proc.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.maxrss = usage.ru_maxrss * 1024
                self.cpu_s = usage.ru_utime + usage.ru_stime
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)  # polling a child's exit, bounded by the deadline
        return True

    def stop(self) -> None:
        """Terminate, then kill, exactly this pid (safe to call twice)."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        if not self.reap(5.0):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.reap(5.0)


def _pin(pid: int, cores: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:cores]
    with contextlib.suppress(OSError):
        os.sched_setaffinity(pid, chosen)
    return chosen


def _serve(manifest: Path, node: str, *, json_log: bool, stderr: IO[bytes] | int,
           log_level: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fedbus.cli", "serve", str(manifest), "--node", node,
           "--log-level", log_level]
    if json_log:
        cmd.append("--log-json")
    return subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr)


@dataclass
class LogReader:
    """Reads the aggregator's JSON log lines (stderr) in a thread, stamping arrival times."""

    stream: IO[bytes]
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    cpu: CpuMarks | None = None  # marked at each round_finished as it arrives
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="agg-log")
        self._thread.start()

    def _loop(self) -> None:
        for raw in self.stream:
            now = time.monotonic()
            line = raw.decode(errors="replace").strip()
            try:
                event = json.loads(line)
            except ValueError:
                self.other.append(line)
                continue
            if isinstance(event, dict):
                if self.cpu is not None and event.get("event") == "round_finished":
                    self.cpu.mark()
                self.events.append((now, event))

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5)

    def first(self, name: str) -> float | None:
        return next((t for t, e in self.events if e.get("event") == name), None)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("event") == name]


# --- one configuration -----------------------------------------------------------------------

@dataclass
class Row:
    trainers: int
    params: int
    rounds: int
    round_s: list[float]
    overhead_s: float  # median over rounds after the first
    update_mb_s: float
    agg_ready_rss: int  # at clients_ready: imports + bus + initial model, before round 1
    agg_end_rss: int  # after the last round, before exit
    agg_peak: int  # VmHWM last polled before exit
    agg_maxrss: int  # ru_maxrss cross-check (0 when the parent's RSS at fork could mask it)
    floor: int  # idle baseline + 12 bytes/param
    trainer_peak: int
    broker_peak: int
    rss_timeline: list[tuple[float, int]]  # (s since round 1 started, VmRSS) at ~4 Hz
    seconds: float
    rejected: dict[str, int]
    lost: int  # trainers reported lost (last will) over all rounds; 0 in a clean run
    agg_cpu_s: float  # whole process, start-up included (wait4)
    trainers_cpu_s: float  # whole process, start-up included (wait4)
    #: CPU seconds a round, rounds 2..R: aggregator, trainers, broker and their total
    cpu_per_round: dict[str, float] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_over_floor(self) -> float:
        return self.agg_peak / self.floor

    @property
    def mb_per_agg_cpu_s(self) -> float:
        """Update MB folded per CPU second of the aggregator (start-up included): what it
        could take in with a core to itself."""
        return self.trainers * self.params * 4 * self.rounds / MB / max(self.agg_cpu_s, 1e-9)


async def _start_broker() -> MosquittoProcess:
    return await spawn_mosquitto()


async def _stop_broker(broker: MosquittoProcess) -> None:
    await broker.stop()


#: The default task: numpy toy (one step toward a target per round).
TOY_TASK = "examples.toy.task:make_task"
#: bench_wire's task: the model plus a constant, as the Flower side does.
ADD_TASK = "benchmarks.wire_task:make_task"


def run_one(n: int, params: int, rounds: int, *, level: int, idle_rss: int,
            trainer_cores: int, timeout_s: float, keepalive: int = 30,
            probe: bool = False, update: str = "none", model: str = "none",
            task_ref: str = TOY_TASK,
            trainer_grace_s: float = 2.0, chunk_bytes: int = BrokerSpec().chunk_bytes,
            max_uploads: int = 4, sign: bool = False) -> Row:
    started = time.monotonic()
    broker: MosquittoProcess | None = None
    children: list[Child] = []
    workdir = Path(tempfile.mkdtemp(prefix="fedbus-bench-rounds-"))
    sampler: Sampler | None = None
    reader: LogReader | None = None
    try:
        broker = asyncio.run(_start_broker())
        manifest = workdir / "manifest.yaml"
        manifest.write_text(_MANIFEST.format(rounds=rounds, n=n, level=level, host=broker.host,
                                             port=broker.port, size=params,
                                             keepalive=keepalive, update=update,
                                             model=model, chunk=chunk_bytes, uploads=max_uploads,
                                             task_ref=task_ref,
                                             task_extra=", lr: 0.5" if task_ref == TOY_TASK
                                             else ""))
        if sign:  # every message signed and checked (security.sign: required), keys here
            from fedbus.signing import write_key_pair

            for node in ["aggregator", *(f"t{i}" for i in range(n))]:
                write_key_pair(workdir / "keys", node)
            with manifest.open("a") as f:
                f.write("security: {sign: required, keys: keys}\n")
        probe_out = workdir / "probe.jsonl"
        parent_rss = (read_mem(os.getpid()) or (0, 0))[0]
        if probe:
            agg = Child("aggregator", subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_rounds", "--probe-serve",
                 str(manifest), "--probe-out", str(probe_out)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE))
        else:
            agg = Child("aggregator", _serve(manifest, "aggregator", json_log=True,
                                             stderr=subprocess.PIPE, log_level="info"))
        children.append(agg)
        assert agg.proc.stderr is not None
        cpu = CpuMarks({"aggregator": agg.pid, "broker": broker.pid})
        reader = LogReader(agg.proc.stderr, cpu=cpu)
        reader.start()
        sampler = Sampler(agg.pid)
        sampler.start()
        with open(workdir / "trainers.log", "wb") as trainer_log:  # the child keeps its fd
            trainers = Child("trainers", _serve(manifest, "t*", json_log=False,
                                                stderr=trainer_log, log_level="warning"))
        children.append(trainers)
        cpu.pids["trainers"] = trainers.pid
        _pin(trainers.pid, trainer_cores)
        trainer_hwm = 0
        broker_hwm = 0
        deadline = time.monotonic() + timeout_s
        while not agg.reap(0.25):
            for pid in (trainers.pid, broker.pid):
                mem = read_mem(pid)
                if mem is not None and pid == trainers.pid:
                    trainer_hwm = max(trainer_hwm, mem[1])
                elif mem is not None:
                    broker_hwm = max(broker_hwm, mem[1])
            # reap() through wait4, not poll(): poll() would reap the process and lose its
            # CPU time (trainers_cpu_s was 0.0 in every run when the trainers exited first)
            if trainers.reap(0) and trainers.proc.returncode != 0:
                raise RuntimeError(f"trainer process exited with {trainers.proc.returncode}: "
                                   f"{(workdir / 'trainers.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"N={n} P={params}: aggregator still running after "
                                   f"{timeout_s:.0f}s")
        sampler.stop()
        reader.join()
        if agg.proc.returncode != 0:
            tail = "\n".join(json.dumps(e) for _, e in reader.events[-10:])
            raise RuntimeError(f"aggregator exited with {agg.proc.returncode}:\n{tail}\n"
                               f"{reader.other[-5:]}")
        mem = read_mem(trainers.pid)
        if mem is not None:
            trainer_hwm = max(trainer_hwm, mem[1])
        # On an anonymous broker trainers keep serving after the job's `done` (anyone could
        # have sent it): stop them now, so that wait4 gives their CPU time to this row.
        if not trainers.reap(trainer_grace_s):
            trainers.stop()
        mem = read_mem(broker.pid)
        if mem is not None:
            broker_hwm = max(broker_hwm, mem[1])

        finished = reader.named("round_finished")
        round_s = [float(e["seconds"]) for e in finished]
        if len(round_s) != rounds or not all(e.get("aggregated") for e in finished):
            raise RuntimeError(f"N={n} P={params}: expected {rounds} aggregated rounds, got "
                               f"{[(e.get('round'), e.get('aggregated')) for e in finished]}")
        later = round_s[1:] or round_s
        overhead = statistics.median(later)
        rejected: dict[str, int] = {}
        for e in finished:
            for k, v in (e.get("rejected") or {}).items():
                rejected[k] = rejected.get(k, 0) + int(v)
        t_ready = reader.first("clients_ready") or started
        t_round1 = reader.first("round_started") or t_ready
        ready_rss = sampler.rss_at(t_ready) or 0
        end_rss = sampler.samples[-1][1] if sampler.samples else 0
        timeline = [(round(t - t_round1, 2), rss) for t, rss, _ in sampler.samples[::5]
                    if t >= t_round1]
        return Row(
            trainers=n, params=params, rounds=rounds, round_s=round_s, overhead_s=overhead,
            update_mb_s=n * params * 4 / overhead / MB,
            agg_ready_rss=ready_rss, agg_end_rss=end_rss,
            agg_peak=sampler.last_hwm,
            agg_maxrss=(agg.maxrss or 0) if (agg.maxrss or 0) > parent_rss else 0,
            floor=idle_rss + 12 * params, trainer_peak=trainer_hwm, broker_peak=broker_hwm,
            rss_timeline=timeline, seconds=time.monotonic() - started, rejected=rejected,
            lost=sum(len(e.get("lost") or []) for e in finished),
            agg_cpu_s=agg.cpu_s, trainers_cpu_s=trainers.cpu_s,
            cpu_per_round=cpu.per_round(),
            probe=probe_summary(probe_out) if probe else {},
        )
    finally:
        if sampler is not None:
            sampler.stop()
        for child in reversed(children):
            child.stop()
        if broker is not None:
            asyncio.run(_stop_broker(broker))
        if sys.exc_info()[0] is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _eprint(f"  logs kept in {workdir}")
            with contextlib.suppress(OSError):
                events = reader.events if reader is not None else []
                (workdir / "aggregator.jsonl").write_text("\n".join(
                    json.dumps(e) for _, e in events))


# --- diagnosis: where does the aggregator hold memory? --------------------------------------

_PROBE_FIELDS = ("incoming_queued", "buffered_bytes", "partial_transfers", "queue_high_water",
                 "chunks_received", "transfers_completed", "rejected_buffer_full",
                 "transfers_dropped")


def probe_serve(manifest: str, out: str, hz: float = 10.0) -> int:
    """``fedbus serve MANIFEST --node aggregator`` plus a thread that writes, ``hz`` times a
    second, the bus's queue lengths (chunks waiting in aiomqtt, whole updates waiting in the
    subscription and their bytes, bytes in partial reassemblies) and VmRSS as JSON lines.

    Diagnosis only (``--probe``): the thread reads the bus's counters without locks.
    """
    from fedbus import cli, runner

    buses: list[Any] = []
    namespace = vars(runner)  # runner imported make_bus by name: patch it where it is looked up
    make_bus = namespace["make_bus"]

    def capture(*a: Any, **kw: Any) -> Any:
        bus = make_bus(*a, **kw)
        buses.append(bus)
        return bus

    namespace["make_bus"] = capture
    stop = threading.Event()

    def loop() -> None:
        with open(out, "w") as f:
            while not stop.wait(1.0 / hz):
                for bus in list(buses):
                    row: dict[str, Any] = {"t": time.monotonic()}
                    try:
                        stats = bus.stats
                        row.update({k: stats.get(k, 0) for k in _PROBE_FIELDS})
                        subs = [s for ss in list(bus._dispatch._by_filter.values()) for s in ss]
                        items = [m for s in subs for m in list(s._queue._queue)]
                    except RuntimeError:  # a queue changed under us; next sample
                        continue
                    row["sub_queued"] = len(items)
                    row["sub_queued_bytes"] = sum(len(getattr(m, "payload", b"")) for m in items)
                    mem = read_mem(os.getpid())
                    row["rss"] = mem[0] if mem else 0
                    f.write(json.dumps(row) + "\n")
                    f.flush()

    threading.Thread(target=loop, daemon=True, name="probe").start()
    try:
        return cli.main(["serve", manifest, "--node", "aggregator", "--log-json"])
    finally:
        stop.set()


def probe_summary(path: Path) -> dict[str, Any]:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if not rows:
        return {}
    peak = max(rows, key=lambda r: r["rss"])
    keys = ("incoming_queued", "sub_queued", "sub_queued_bytes", "buffered_bytes",
            "partial_transfers")
    return {
        "samples": len(rows),
        "max": {k: max(r.get(k, 0) for r in rows) for k in keys},
        "at_peak_rss": {k: peak.get(k, 0) for k in (*keys, "rss")},
        "rejected_buffer_full": rows[-1].get("rejected_buffer_full", 0),
        "transfers_dropped": rows[-1].get("transfers_dropped", 0),
    }


# --- baseline and machine --------------------------------------------------------------------

def idle_rss() -> int:
    """VmHWM of an interpreter that only imported what the aggregator imports (it reads its
    own /proc/self/status last; ru_maxrss would include this script's RSS at fork)."""
    code = ("import fedbus.cli, fedbus.bus.mqtt, numpy, re; "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return int(out.split()[-1]) * 1024


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_total = next((int(ln.split()[1]) * 1024 for ln in f
                          if ln.startswith("MemTotal")), 0)
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([mosq, "-h"], capture_output=True, timeout=5, text=True).stdout
        version = out.splitlines()[0] if out else ""
    return {
        "nproc": os.cpu_count(), "cpu": model, "ram_gib": round(mem_total / (1 << 30), 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "mosquitto": version, "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# --- report ----------------------------------------------------------------------------------

def _mib(b: int) -> str:
    return f"{b / MIB:,.0f}"


def table(rows: Sequence[Row], idle: int) -> str:
    head = ("| trainers | params | round s (median r2+) | update MB/s in | agg RSS ready MiB "
            "| agg RSS end MiB | agg peak MiB | floor MiB | peak / floor | peak − idle B/param "
            "| trainers proc peak MiB | broker peak MiB | agg CPU s/round "
            "| update MB per agg CPU s | CPU s/round r2+, all processes |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r.trainers} | {r.params / MB:g}M | {r.overhead_s:.2f} | {r.update_mb_s:,.0f} "
            f"| {_mib(r.agg_ready_rss)} | {_mib(r.agg_end_rss)} | **{_mib(r.agg_peak)}** "
            f"| {_mib(r.floor)} | {r.peak_over_floor:.2f} "
            f"| {(r.agg_peak - idle) / r.params:.1f} | {_mib(r.trainer_peak)} "
            f"| {_mib(r.broker_peak)} | {r.agg_cpu_s / r.rounds:.1f} "
            f"| {r.mb_per_agg_cpu_s:,.0f} | {cpu_text(r.cpu_per_round)} |")
    return "\n".join(lines)


def cpu_text(cpu: dict[str, float]) -> str:
    """``0.34 (aggregator 0.10, broker 0.05, trainers 0.19)``: the total CPU seconds a
    round, then each process's."""
    if not cpu:
        return "n/a"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items()) if k != "total")
    return f"{cpu['total']:.2f} ({parts})"


def growth(rows: Sequence[Row]) -> Iterator[str]:
    by = {(r.trainers, r.params): r for r in rows}
    for p in sorted({r.params for r in rows}):
        small, big = by.get((10, p)), by.get((50, p))
        if small and big:
            yield (f"P={p / MB:g}M: aggregator peak {_mib(small.agg_peak)} MiB at N=10 vs "
                   f"{_mib(big.agg_peak)} MiB at N=50 (x{big.agg_peak / small.agg_peak:.2f}, "
                   f"{(big.agg_peak - small.agg_peak) / (4 * p):+.1f} model sizes)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=10, P=1M only (under a minute)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per job (default 3)")
    p.add_argument("--codec-level", type=int, default=0, help="zstd level (0 = raw)")
    p.add_argument("--update", default="none", help="codec.update mode (none, fp16, int8, topk)")
    p.add_argument("--model", default="none", help="codec.model mode (none, fp16, int8)")
    p.add_argument("--task", choices=("toy", "add"), default="toy",
                   help="toy: one step toward a target; add: model + constant (bench_wire's)")
    p.add_argument("--chunk-bytes", type=int, default=BrokerSpec().chunk_bytes,
                   help="broker.chunk_bytes (default: fedbus's)")
    p.add_argument("--max-uploads", type=int, default=4, help="round.max_uploads")
    p.add_argument("--sign", action="store_true",
                   help="security.sign: required (every message signed and checked)")
    p.add_argument("--trainer-cores", type=int, default=2, help="cores for the trainer process")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per configuration")
    p.add_argument("--keepalive", type=int, default=30,
                   help="MQTT keepalive (s); 30 is fedbus's default (10 s dropped 50 trainers "
                   "sharing one process on 2 cores: see docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--probe", action="store_true",
                   help="diagnosis: run the aggregator under a thread that records the bus's "
                   "queue lengths and reassembly bytes (slightly perturbs the timings)")
    p.add_argument("--only", help="run only these N:P pairs, e.g. 10:11000000,50:11000000")
    p.add_argument("--probe-serve", help=argparse.SUPPRESS)
    p.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_serve:
        return probe_serve(args.probe_serve, args.probe_out)
    configure_logging(level="warning")
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.only:
        grid = tuple((int(a), int(b)) for a, b in (x.split(":") for x in args.only.split(",")))
    rounds = args.rounds or 3
    info = machine()
    _eprint(f"machine: {info['nproc']} cores, {info['cpu']}, {info['ram_gib']} GiB, "
            f"load {info['loadavg'][0]:.2f}")
    idle = idle_rss()
    _eprint(f"idle interpreter (fedbus.cli + mqtt bus imported): {_mib(idle)} MiB")
    rows: list[Row] = []
    for n, params in grid:
        _eprint(f"N={n} P={params / MB:g}M: {rounds} rounds ...")
        row = run_one(n, params, rounds, level=args.codec_level, idle_rss=idle,
                      trainer_cores=args.trainer_cores, timeout_s=args.timeout,
                      keepalive=args.keepalive, probe=args.probe, update=args.update,
                      model=args.model,
                      task_ref=ADD_TASK if args.task == "add" else TOY_TASK,
                      chunk_bytes=args.chunk_bytes, max_uploads=args.max_uploads,
                      sign=args.sign)
        _eprint(f"  rounds {[round(s, 2) for s in row.round_s]} s, agg peak "
                f"{_mib(row.agg_peak)} MiB (ru_maxrss "
                f"{_mib(row.agg_maxrss) if row.agg_maxrss else 'n/a'}), trainers "
                f"{_mib(row.trainer_peak)} MiB, CPU s agg {row.agg_cpu_s:.1f} / trainers "
                f"{row.trainers_cpu_s:.1f} (whole run), CPU s/round r2+ "
                f"{cpu_text(row.cpu_per_round)}, lost {row.lost}, {row.seconds:.0f} s wall")
        if row.probe:
            _eprint(f"  probe: {json.dumps(row.probe)}")
        rows.append(row)
    info["loadavg_after"] = os.getloadavg()
    print(table(rows, idle))
    for line in growth(rows):
        print(f"\n{line}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "idle_rss": idle, "rounds": rounds,
            "codec_level": args.codec_level,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.bench_rounds",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rows": [{**asdict(r), "peak_over_floor": r.peak_over_floor,
                      "mb_per_agg_cpu_s": r.mb_per_agg_cpu_s} for r in rows],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
