"""fedbus over mosquitto vs Flower 1.42's legacy gRPC mode, same workload, side by side.

    bash benchmarks/flower/setup.sh grpc              # once: Flower in its own venv
    .venv/bin/python -m benchmarks.bench_wire          # 1M x 10, 1M x 50, 11M x 10; 3 trials
    .venv/bin/python -m benchmarks.bench_wire --quick  # 1M x 10, 1 trial
    .venv/bin/python -m benchmarks.bench_wire --sizes 1M:10 --trials 3 --json wire.json
    .venv/bin/python -m benchmarks.bench_wire --flower-tuned   # + Flower with fedbus's malloc
    .venv/bin/python -m benchmarks.bench_wire --busy 2         # beside two busy loops

Workload, identical on both sides: the model is one float32 vector of P parameters; N clients
each return it plus a constant (``benchmarks/wire_task.py``, ``flower/wire_flower.py``);
FedAvg over all N every round; R = 5 rounds; no evaluation.

- fedbus: mosquitto (its own, on a free loopback port), the aggregator in one process and the
  N trainers in another (``fedbus serve``, as ``bench_rounds`` runs them), lossless
  (``codec.update.mode: none``, no zstd) and with a lossy mode (``--lossy``: by default int8
  both ways, ``codec.update`` and ``codec.model``).
- Flower: ``flwr.server.start_server`` with FedAvg in one process, the N clients as threads
  of another (``start_client(..., transport="grpc-bidi")``), from Flower's own venv.

Both client processes are pinned to the same cores. A round's time is the server's own:
fedbus's ``round_finished`` seconds; Flower's from ``configure_fit`` to the end of
``aggregate_fit``. Each run gives the median of rounds 2..R (round 1 of Flower also waits for
its clients to connect); the table gives the median over ``--trials`` runs, the trials of the
engines interleaved so that load from elsewhere on the machine hits them alike, and the ratio
fedbus / Flower. Peak RSS is the server's (aggregator's) VmHWM.

Every process started here is stopped by pid in a ``finally``; Flower's two processes run
under ``--timeout`` seconds each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks.bench_rounds import (
    ADD_TASK,
    MIB,
    Child,
    CpuMarks,
    Sampler,
    _eprint,
    _pin,
    cpu_text,
    idle_rss,
    machine,
    run_one,
)
from fedbus._malloc import broker_env
from fedbus.broker import free_port
from fedbus.log import configure_logging
from fedbus.manifest import BrokerSpec

REPO = Path(__file__).resolve().parent.parent
FLOWER_DIR = REPO / "benchmarks/flower"
FLOWER_PY = FLOWER_DIR / ".venv/bin/python"
#: fedbus's default chunk size (broker.chunk_bytes)
CHUNK_BYTES = BrokerSpec().chunk_bytes
SIZES: tuple[tuple[int, int], ...] = ((1_000_000, 10), (1_000_000, 50), (11_000_000, 10))


@dataclass
class Run:
    engine: str  # "fedbus", "fedbus+int8", "flower"
    params: int
    clients: int
    trial: int
    round_s: list[float]
    peak_rss: int  # server / aggregator VmHWM, bytes
    wall_s: float
    #: CPU seconds a round over rounds 2..R, per process (fedbus: aggregator, trainers,
    #: broker; Flower: server, clients) and their "total"
    cpu_per_round: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.cpu_per_round.get("total", float("nan"))

    @property
    def median_s(self) -> float:
        later = self.round_s[1:] or self.round_s
        return statistics.median(later)


@dataclass
class Cell:
    params: int
    clients: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median(self, engine: str) -> float:
        return statistics.median(r.median_s for r in self.runs[engine])

    def peak(self, engine: str) -> int:
        return max(r.peak_rss for r in self.runs[engine])

    def cpu(self, engine: str) -> float:
        """Median over trials of the CPU seconds a round, all of the engine's processes."""
        return statistics.median(r.cpu_s for r in self.runs[engine])


def run_fedbus(params: int, clients: int, rounds: int, *, lossy: str, trial: int,
               idle: int, timeout_s: float, chunk_bytes: int = CHUNK_BYTES) -> Run:
    """``lossy``: "none", or the update's codec mode and optionally the broadcast model's,
    as ``UPDATE[/MODEL]`` (``int8/int8``: int8 both ways)."""
    update, _, model = lossy.partition("/")
    row = run_one(clients, params, rounds, level=0, idle_rss=idle, trainer_cores=2,
                  timeout_s=timeout_s, update=update, model=model or "none",
                  task_ref=ADD_TASK, trainer_grace_s=2.0, chunk_bytes=chunk_bytes)
    engine = "fedbus" if lossy == "none" else f"fedbus+{lossy}"
    return Run(engine, params, clients, trial, row.round_s, row.agg_peak, row.seconds,
               row.cpu_per_round)


def _flower(role: str, port: int, params: int, clients: int, rounds: int,
            **popen: Any) -> subprocess.Popen[bytes]:
    cmd = [str(FLOWER_PY), str(FLOWER_DIR / "wire_flower.py"), role, "--port", str(port),
           "--params", str(params), "--clients", str(clients), "--rounds", str(rounds)]
    return subprocess.Popen(cmd, cwd=FLOWER_DIR, stdin=subprocess.DEVNULL, **popen)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Flower server exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is about to open, bounded by the deadline
    raise TimeoutError(f"Flower server not listening on {port} after {timeout_s:.0f}s")


def _read_server(stream: IO[bytes], lines: list[str], cpu: CpuMarks) -> None:
    """Collect the Flower server's stdout lines, marking CPU times as each round ends."""
    for raw in stream:
        line = raw.decode(errors="replace").strip()
        if line.startswith('{"round_finished"'):
            cpu.mark()
        lines.append(line)


def run_flower(params: int, clients: int, rounds: int, *, trial: int,
               timeout_s: float, tuned: bool = False) -> Run:
    """``tuned``: Flower's processes get fedbus's allocator tuning too (``fedbus._malloc``,
    through glibc's tunables), so the comparison is not of two allocators."""
    started = time.monotonic()
    env = broker_env() if tuned else None
    port = free_port()
    children: list[Child] = []
    sampler: Sampler | None = None
    try:
        server = Child("flower-server", _flower("server", port, params, clients, rounds,
                                                env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL))
        children.append(server)
        assert server.proc.stdout is not None
        cpu = CpuMarks({"server": server.pid})
        out: list[str] = []
        reader = threading.Thread(target=_read_server, args=(server.proc.stdout, out, cpu),
                                  daemon=True, name="flower-out")
        reader.start()
        sampler = Sampler(server.pid)
        sampler.start()
        _wait_listening(port, server.proc, 60.0)
        cl = Child("flower-clients", _flower("clients", port, params, clients, rounds,
                                             env=env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
        children.append(cl)
        cpu.pids["clients"] = cl.pid
        _pin(cl.pid, 2)
        deadline = time.monotonic() + timeout_s
        while not server.reap(0.25):
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flower P={params} N={clients}: still running after "
                                   f"{timeout_s:.0f}s")
            # reap(), not poll(): poll() would reap the clients and lose their CPU time
            if cl.reap(0) and cl.proc.returncode != 0:
                raise RuntimeError(f"Flower clients exited with {cl.proc.returncode}")
        sampler.stop()
        reader.join(10.0)
        if server.proc.returncode != 0 or not out:
            raise RuntimeError(f"Flower server exited with {server.proc.returncode}: {out[-3:]}")
        result = json.loads(out[-1])
        cl.reap(10.0)
        return Run("flower+malloc" if tuned else "flower", params, clients, trial,
                   result["round_s"], sampler.last_hwm,
                   time.monotonic() - started, cpu.per_round())
    finally:
        if sampler is not None:
            sampler.stop()
        for child in reversed(children):
            child.stop()


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def parse_sizes(spec: str) -> tuple[tuple[int, int], ...]:
    """``1M:10,11M:10`` -> ((1_000_000, 10), (11_000_000, 10))."""
    return tuple((_size(p), int(n)) for p, n in (x.split(":") for x in spec.split(",")))


def table(cells: Sequence[Cell], lossy: str) -> str:
    """Round seconds with the CPU seconds a round (all of an engine's processes) beside each."""
    fl = f"fedbus+{lossy}"
    lines = [
        f"| P x N | fedbus s/round (CPU s) | fedbus {lossy} s/round (CPU s) "
        f"| Flower gRPC s/round (CPU s) | fedbus / Flower | fedbus {lossy} / Flower "
        f"| CPU fedbus / Flower | CPU {lossy} / Flower | agg peak MiB (fedbus / {lossy}) "
        "| Flower server peak MiB | trials |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for c in cells:
        flower, flower_cpu = c.median("flower"), c.cpu("flower")
        fb, fb_cpu = (c.median("fedbus"), c.cpu("fedbus")) if "fedbus" in c.runs else (nan, nan)
        lo, lo_cpu = (c.median(fl), c.cpu(fl)) if fl in c.runs else (nan, nan)
        lines.append(
            f"| {c.params / 1e6:g}M x {c.clients} | {fb:.3f} ({fb_cpu:.2f}) "
            f"| {lo:.3f} ({lo_cpu:.2f}) | {flower:.3f} ({flower_cpu:.2f}) "
            f"| **{fb / flower:.2f}** | **{lo / flower:.2f}** "
            f"| {fb_cpu / flower_cpu:.2f} | {lo_cpu / flower_cpu:.2f} "
            f"| {(c.peak('fedbus') if 'fedbus' in c.runs else 0) / MIB:,.0f} / "
            f"{(c.peak(fl) if fl in c.runs else 0) / MIB:,.0f} "
            f"| {c.peak('flower') / MIB:,.0f} | {len(c.runs['flower'])} |")
    return "\n".join(lines)


def tuned_table(cells: Sequence[Cell], lossy: str) -> str:
    """fedbus against Flower run with the same allocator tuning (``--flower-tuned``)."""
    fl = f"fedbus+{lossy}"
    lines = [f"| P x N | Flower, fedbus's malloc tuning, s/round (CPU s) | fedbus / it "
             f"| fedbus {lossy} / it | CPU fedbus / it | Flower server peak MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for c in cells:
        t, t_cpu = c.median("flower+malloc"), c.cpu("flower+malloc")
        fb = c.median("fedbus") if "fedbus" in c.runs else nan
        fb_cpu = c.cpu("fedbus") if "fedbus" in c.runs else nan
        lo = c.median(fl) if fl in c.runs else nan
        lines.append(f"| {c.params / 1e6:g}M x {c.clients} | {t:.3f} ({t_cpu:.2f}) "
                     f"| **{fb / t:.2f}** | **{lo / t:.2f}** | {fb_cpu / t_cpu:.2f} "
                     f"| {c.peak('flower+malloc') / MIB:,.0f} |")
    return "\n".join(lines)


def _run_cells(cells: list[Cell], sizes: Sequence[tuple[int, int]], trials: int,
               engines: Sequence[str], idle: int, args: argparse.Namespace) -> None:
    for params, clients in sizes:
        cell = Cell(params, clients)
        cells.append(cell)
        for trial in range(trials):
            # rotate the order each trial: no engine always runs first (or last)
            order = engines[trial % len(engines):] + engines[:trial % len(engines)]
            for engine in order:
                if engine.startswith("flower"):
                    run = run_flower(params, clients, args.rounds, trial=trial,
                                     timeout_s=args.timeout, tuned=engine != "flower")
                else:
                    run = run_fedbus(params, clients, args.rounds,
                                     lossy="none" if engine == "fedbus" else engine,
                                     trial=trial, idle=idle, timeout_s=args.timeout,
                                     chunk_bytes=args.chunk_bytes)
                cell.runs.setdefault(run.engine, []).append(run)
                _eprint(f"P={params / 1e6:g}M N={clients} trial {trial + 1}/{trials} "
                        f"{run.engine:12s} rounds {[round(s, 3) for s in run.round_s]} "
                        f"median r2+ {run.median_s:.3f} s, CPU s/round r2+ "
                        f"{cpu_text(run.cpu_per_round)}, peak {run.peak_rss / MIB:,.0f} MiB, "
                        f"{run.wall_s:.0f} s wall, load {os.getloadavg()[0]:.1f}")


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes spinning a core each (``yes > /dev/null``), stopped by pid."""
    procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
             for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="P:N pairs, e.g. 1M:10,1M:50,11M:10")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lossy", default="int8/int8",
                   help="the lossy column: codec.update mode, then optionally /codec.model mode "
                        "(int8/int8: both ways; int8: the updates only; 'none' skips it)")
    p.add_argument("--quick", action="store_true", help="1M x 10, one trial")
    p.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES,
                   help="fedbus's broker.chunk_bytes (default: fedbus's, 4 MiB)")
    p.add_argument("--flower-tuned", action="store_true",
                   help="also run Flower with fedbus's allocator tuning (fedbus._malloc: "
                        "glibc's tunables in its environment), interleaved with the rest")
    p.add_argument("--busy", type=int, default=0, metavar="K",
                   help="run beside K busy loops (`yes > /dev/null`, started and stopped "
                        "here): both engines' slowdown under load")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--json", type=Path, help="also write every run here")
    args = p.parse_args(argv)
    if not FLOWER_PY.exists():
        raise SystemExit("Flower's venv is missing: run `bash benchmarks/flower/setup.sh grpc`")
    configure_logging(level="warning")
    sizes = parse_sizes(args.sizes) if args.sizes else SIZES
    trials = args.trials
    if args.quick:
        sizes, trials = ((1_000_000, 10),), 1
    info = machine()
    _eprint(f"machine: {info['nproc']} cores, {info['cpu']}, load {info['loadavg'][0]:.2f}")
    idle = idle_rss()
    engines = ["fedbus", "flower"] + ([args.lossy] if args.lossy != "none" else []) \
        + (["flower+malloc"] if args.flower_tuned else [])
    cells: list[Cell] = []
    with busy_loops(args.busy):
        _run_cells(cells, sizes, trials, engines, idle, args)
    info["busy_loops"] = args.busy
    info["loadavg_after"] = os.getloadavg()
    print(table(cells, args.lossy))
    if args.flower_tuned:
        print("\n" + tuned_table(cells, args.lossy))
    for c in cells:
        print(f"\nP={c.params / 1e6:g}M N={c.clients}: fedbus / Flower = "
              f"{c.median('fedbus') / c.median('flower'):.2f}"
              + (f", fedbus {args.lossy} / Flower = "
                 f"{c.median('fedbus+' + args.lossy) / c.median('flower'):.2f}"
                 if args.lossy != "none" else ""))
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps({
                "machine": info, "rounds": args.rounds, "trials": trials, "lossy": args.lossy,
                "chunk_bytes": args.chunk_bytes,
                "runs": [asdict(r) | {"median_s": r.median_s, "cpu_s": r.cpu_s}
                         for c in cells for rs in c.runs.values() for r in rs],
            }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
