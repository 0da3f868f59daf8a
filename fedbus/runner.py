"""``fedbus run`` and ``fedbus serve``: nodes in this process, the private broker, signals, and
the observer that turns the aggregator's round reports into the display and the run folder.

SIGTERM and SIGINT cancel the main task; cancellation unwinds every node, stops the private
mosquitto (removing its temp folder) and marks the run folder ``stopped``. Exit code 128+N.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from fedbus._malloc import tune_for_rounds
from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.errors import FedbusError, ManifestError
from fedbus.log import LogSink
from fedbus.manifest import BrokerSpec, Manifest, with_broker, with_node_broker
from fedbus.metering import MeteredBus
from fedbus.node import build_node
from fedbus.progress import DisplayMode, ProgressState, final_line, make_display
from fedbus.runs import BEST_MODEL, FINAL_MODEL, RunRecorder
from fedbus.services.aggregator import Aggregator, RoundReport
from fedbus.services.async_aggregator import AsyncAggregator

if TYPE_CHECKING:
    from fedbus.prom import PromExporter
    from fedbus.sim import Population

__all__ = ["RunOptions", "run_federation", "run_population", "run_sim_workers", "serve_nodes"]

log = structlog.get_logger("fedbus.run")

AnyAggregator = Aggregator | AsyncAggregator
#: After a stop signal, how long nodes get to unwind before they are cancelled again.
_GOODBYE_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class RunOptions:
    memory: bool = False
    #: Root of the run folders; None: record nothing.
    runs_root: Path | None = None
    display: DisplayMode = "auto"
    #: Serve the live dashboard on this loopback port (0: any free port) during the run.
    dashboard_port: int | None = None
    #: Serve Prometheus metrics of the aggregator on (host, port).
    metrics: tuple[str, int] | None = None
    #: Command-line overrides, written into the run folder's manifest.
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Keep this file fresh while every bus is connected (container healthchecks).
    health_file: str | None = None
    #: The broker user a standby aggregator watches the active one with (secured brokers).
    watch_as: str | None = None


class _Stop:
    """Signal handling: the first SIGTERM/SIGINT cancels the main task; later ones wait for
    the clean-up already under way (it is bounded: the broker is killed after 5 s)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal, sig, task)

    def _on_signal(self, sig: int, task: asyncio.Task[Any]) -> None:
        if self.signum is None:
            self.signum = sig
            task.cancel()
            # Nodes say goodbye on the way out; if that hangs (a broker gone), cut it short.
            asyncio.get_running_loop().call_later(_GOODBYE_S, task.cancel)


@contextlib.asynccontextmanager
async def _broker_for(
    m: Manifest, memory: bool
) -> AsyncIterator[tuple[Manifest, MemoryBroker | None]]:
    if memory:
        yield m, MemoryBroker()
        return
    if m.brokers and any(b.spec is None for b in m.brokers.values()):
        # Several brokers: start those without host/port, each bridged to its parent's.
        from fedbus.deploy.local import spawn_bridged

        bridged = await spawn_bridged(m)
        try:
            yield bridged.manifest, None
        finally:
            try:
                await bridged.stop()
            finally:
                bridged.kill_now()
        return
    if m.broker is not None:
        yield m, None
        return
    # No broker named: start a private mosquitto on a free loopback port (see docs/broker.md
    # for why a real broker beats an embedded pure-Python one).
    from fedbus.broker import QUEUED_MESSAGES, packet_limit_conf, spawn_mosquitto

    # nodes chunk at the default size here: no packet of theirs is bigger than one chunk
    proc = await spawn_mosquitto(config_extra=packet_limit_conf(BrokerSpec().chunk_bytes))
    log.info("broker_started", endpoint=proc.endpoint, pid=proc.pid)
    try:
        yield with_broker(m, BrokerSpec(host=proc.host, port=proc.port,
                                        max_queued_messages=QUEUED_MESSAGES)), None
    finally:
        try:
            await proc.stop()
        finally:  # a second cancellation cut stop() short: finish synchronously
            proc.kill_now()
            shutil.rmtree(proc.workdir, ignore_errors=True)


async def run_federation(m: Manifest, opts: RunOptions, sink: LogSink | None) -> int:
    """Every node of ``m`` in this process; returns the exit code (128+N after signal N).

    On a broker the manifest (or ``--broker``) names, a job whose aggregator is already
    online there is refused before anything connects or a run folder is made."""
    if not opts.memory:
        agg = m.aggregator.id
        seen_by_agg = with_node_broker(m, agg)
        if seen_by_agg.broker is not None:
            from fedbus.failover import refuse_if_running

            await refuse_if_running(seen_by_agg, agg)
    tune_for_rounds()  # reuse model-sized buffers round after round (fedbus._malloc)
    return await _execute(m, [n.id for n in m.nodes], opts, sink, serving=False)


async def serve_nodes(m: Manifest, patterns: Sequence[str], opts: RunOptions,
                      sink: LogSink | None) -> int:
    """``fedbus serve``: the nodes matching ``patterns``, until done or SIGTERM/SIGINT (a
    service manager's stop, so exit 0). A run folder is written only when the aggregator is
    among them and ``opts.runs_root`` is set."""
    node_ids = [n.id for n in m.nodes if any(fnmatch.fnmatchcase(n.id, p) for p in patterns)]
    if not node_ids:
        raise ManifestError(m.source, "nodes",
                            f"--node {' '.join(patterns)} matches no node; known: "
                            f"{', '.join(n.id for n in m.nodes)}")
    if m.broker is None:
        raise ManifestError(m.source, "broker",
                            "`fedbus serve` needs a broker: add broker: {host, port} to the "
                            "manifest or pass --broker HOST:PORT")
    for n in node_ids:
        name = m.node(n).broker
        if name is not None and name in m.brokers and m.brokers[name].spec is None:
            raise ManifestError(m.source, f"brokers.{name}",
                                f"`fedbus serve` needs every broker running: give {name!r} "
                                "host and port (and deploy it with `fedbus bridge`'s config)")
    if not any(m.node(n).role == "aggregator" for n in node_ids):
        opts = dataclasses.replace(opts, runs_root=None)
    tune_for_rounds()  # reuse model-sized buffers round after round (fedbus._malloc)
    for n in node_ids:
        if m.node(n).role == "aggregator":
            # one active instance: a second one waits here as a standby (fedbus.failover)
            from fedbus.failover import await_leadership

            await await_leadership(m, n, watch_as=opts.watch_as)
    return await _execute(m, node_ids, opts, sink, serving=True)


async def _execute(m: Manifest, node_ids: Sequence[str], opts: RunOptions,
                   sink: LogSink | None, *, serving: bool) -> int:
    stop = _Stop()
    stop.install()
    dashboard = None
    if opts.dashboard_port is not None:
        # Bound first: a busy port is one line, with nothing started to unwind.
        from fedbus.dashboard import dashboard_socket

        dashboard = dashboard_socket(opts.dashboard_port)
    try:
        recorder = _open_recorder(m, opts, sink)
    except FedbusError:
        if dashboard is not None:
            dashboard.close()
        raise
    observer = _Observer(m, recorder, opts.display, sink)
    status = "failed"
    if opts.metrics is not None and any(m.node(n).role == "aggregator" for n in node_ids):
        from fedbus.prom import PromExporter

        observer.exporter = PromExporter(m.job, *opts.metrics)
        log.info("metrics_serving", url=f"http://{opts.metrics[0]}:{observer.exporter.port}/")
    try:
        _warn_if_anonymous(m, node_ids, opts.memory)
        async with _broker_for(m, opts.memory) as (m, mem):
            await _run_nodes(m, node_ids, mem, observer, opts, dashboard)
        status = "finished" if observer.history_len() else "failed"
    except asyncio.CancelledError:
        if stop.signum is None:
            raise
        status = "stopped"
        name = signal.Signals(stop.signum).name
        observer.display_stop()
        if serving:
            log.info("stopped_by_signal", nodes=list(node_ids), signal=name)
            return 0
        print(f"fedbus: stopped by {name}; nodes and broker shut down"
              + (f", partial run in {recorder.path}" if recorder else ""),
              file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        if dashboard is not None:
            dashboard.close()
        observer.display_stop()
        if observer.exporter is not None:
            observer.exporter.close()
        _close_recorder(recorder, observer, status, sink)
    _say_saved(m, recorder)
    return observer.final_line() if observer.agg is not None else 0


async def run_sim_workers(m: Manifest, count: int) -> int:
    """``fedbus worker``: ``count`` simulation workers until the job is done, or until
    SIGTERM/SIGINT (exit 0, a service manager's stop: the coordinator gives their clients to
    the other workers)."""
    from fedbus.sim import run_workers

    stop = _Stop()
    stop.install()
    try:
        done = await run_workers(m, count)
    except asyncio.CancelledError:
        if stop.signum is None:
            raise
        log.info("stopped_by_signal", signal=signal.Signals(stop.signum).name)
        return 0
    print(f"workers done: {', '.join(f'{k}={v}' for k, v in sorted(done.items()))}", flush=True)
    return 0


def _expected_dropouts(population: Population) -> Callable[[MutableMapping[str, Any]], None]:
    """A log tap: the aggregator's warning for each lost client is, in a simulation, a drawn
    dropout the round line counts; it goes to the run folder's log, not to the console."""
    def tap(event: MutableMapping[str, Any]) -> None:
        if event.get("event") in ("node_lost", "node_lost_in_round") \
                and population.is_client(str(event.get("peer", ""))):
            event["level"] = "info"
    return tap


def _open_recorder(m: Manifest, opts: RunOptions, sink: LogSink | None) -> RunRecorder | None:
    """The run folder (None with ``--no-record``), with the node logs attached to it."""
    try:
        recorder = RunRecorder(opts.runs_root, m, overrides=opts.overrides) \
            if opts.runs_root is not None else None
    except OSError as exc:
        raise FedbusError(f"cannot create a run folder under {opts.runs_root}/: {exc}; pass "
                          "--runs-dir DIR (or set $FEDBUS_RUNS_DIR), or --no-record") from None
    if recorder is not None:
        if sink is not None:
            sink.attach(recorder.path / "logs")
        print(f"fedbus: job {m.job}, run folder {recorder.path}", file=sys.stderr, flush=True)
    return recorder


def _close_recorder(recorder: RunRecorder | None, observer: _Observer, status: str,
                    sink: LogSink | None) -> None:
    if recorder is not None:
        if observer.agg is not None and observer.history_len() > 0:
            recorder.save_model(FINAL_MODEL, observer.agg.weights, observer.last_round)
        recorder.finish(status, observer.final_metrics())
    if sink is not None:
        sink.close()


def _say_saved(m: Manifest, recorder: RunRecorder | None) -> None:
    if recorder is not None:
        saved = ", ".join(p.name for p in sorted(recorder.path.iterdir()) if p.is_file())
        print(f"fedbus: saved {saved} in {recorder.path}; `fedbus show {m.job}` summarizes it",
              file=sys.stderr, flush=True)


async def run_population(m: Manifest, opts: RunOptions, sink: LogSink | None, *,
                         workers: int | None, remote_workers: int) -> int:
    """``fedbus run`` of a population manifest: the simulation (``fedbus.sim``) with the same
    display, run folder and stop signals as a deployment's run; exit 1 when its last round
    aggregated nothing (every client is the job's own), 128+N after signal N."""
    from fedbus.sim import run_simulation

    assert m.population is not None
    if not opts.memory and m.broker is None:
        raise ManifestError(m.source, "broker", "remote simulation workers join through a "
                            "broker: add broker: {host, port} or pass --broker HOST:PORT")
    stop = _Stop()
    stop.install()
    recorder = _open_recorder(m, opts, sink)
    observer = _Observer(m, recorder, opts.display, sink, simulated=True)
    if sink is not None:
        from fedbus.sim import Population  # a simulation's: a node never loads fedbus.sim

        sink.taps.append(_expected_dropouts(Population(m.population, m.seed)))
    status = "failed"

    async def on_report(report: RoundReport, agg: AnyAggregator) -> None:
        if observer.agg is None:
            observer.attach(agg)
        await observer.on_report(report, agg)
        if report.round >= m.rounds:
            observer.display_stop()

    try:
        result = await run_simulation(m, workers=workers, remote_workers=remote_workers,
                                      memory=MemoryBroker() if opts.memory else None,
                                      on_report=on_report)
        status = "finished" if observer.history_len() else "failed"
    except asyncio.CancelledError:
        if stop.signum is None:
            raise
        status = "stopped"
        observer.display_stop()
        print(f"fedbus: stopped by {signal.Signals(stop.signum).name}; simulation shut down"
              + (f", partial run in {recorder.path}" if recorder else ""),
              file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        observer.display_stop()
        _close_recorder(recorder, observer, status, sink)
    _say_saved(m, recorder)
    s = result.stats
    print(f"simulation updates={s.updates} dropouts={s.dropouts} "
          f"virtual_time={s.virtual_time:.2f}s workers={len(s.workers)}"
          + (f" workers_lost={len(s.workers_lost)} redispatched={s.redispatched}"
             if s.workers_lost else ""), flush=True)
    if result.best_round is not None and result.best_score is not None:
        print(f"best round={result.best_round} score={result.best_score:.4f}", flush=True)
    return final_line(result.history, strict=True)


async def _run_nodes(m: Manifest, node_ids: Sequence[str], mem: MemoryBroker | None,
                     observer: _Observer | None, opts: RunOptions,
                     dashboard: socket.socket | None = None) -> None:
    """Run ``node_ids`` in this process, each on its own bus connection."""
    # Build every service (importing torch, loading data) before any connection opens:
    # minutes of set-up on a Pi must not run into the MQTT keepalive.
    # Each node on its own broker (several, bridged, with `brokers:`; else the one).
    buses: dict[str, Any] = {n: make_bus(with_node_broker(m, n), m.node(n), memory=mem)
                             for n in node_ids}
    services: dict[str, Any] = {n: build_node(m, n, bus) for n, bus in buses.items()}
    _limit_torch_threads(sum(1 for n in node_ids if m.node(n).role == "trainer"))
    agg = next((s for s in services.values() if isinstance(s, (Aggregator, AsyncAggregator))),
               None)
    if observer is not None and agg is not None:
        # Swapped in after building, so build_node still sees the real bus (its type matters).
        agg.bus = observer.meter = MeteredBus(agg.bus)
    async with contextlib.AsyncExitStack() as stack:
        for bus in buses.values():
            await stack.enter_async_context(bus)
        # refusals are logged one line each only for the first of a kind (fedbus.log): the
        # totals, once each node is done, however it ends
        stack.callback(_log_refusal_totals, services)
        if opts.health_file:
            from fedbus.deploy.health import keep_health_file

            health = asyncio.create_task(keep_health_file(opts.health_file, buses.values()))
            stack.callback(health.cancel)
        async with asyncio.TaskGroup() as tg:
            others = [tg.create_task(svc.run(), name=node_id)
                      for node_id, svc in services.items() if svc is not agg]
            if opts.dashboard_port is not None:
                from fedbus.dashboard import serve_dashboard

                others.append(tg.create_task(serve_dashboard(
                    m, opts.dashboard_port, memory=mem, until_done=True, sock=dashboard),
                    name="dashboard"))
            if agg is not None:
                if observer is not None:
                    progress = tg.create_task(observer.follow(agg), name="progress")
                    others.append(progress)
                await tg.create_task(agg.run(), name=agg.config.node_id)
                if observer is not None:
                    # Its last reports are queued already; a job that ended short of its
                    # rounds (an error) must not leave the display waiting for more.
                    await asyncio.wait({progress}, timeout=5)
                # The job is over. Trainers on an anonymous broker do not trust `done` (anyone
                # could send one) and keep serving: the process that ran the job stops them.
                stores = [t for t in others if t.get_name() in services
                          and m.node(t.get_name()).role == "store"]
                for task in others:
                    if task not in stores:
                        task.cancel()
                if stores:  # a store stops on `done` once it has written what it received
                    await asyncio.wait(stores, timeout=STORE_GRACE_S)
                    for task in stores:
                        task.cancel()


def _log_refusal_totals(services: dict[str, Any]) -> None:
    for node_id, svc in services.items():
        rejections = getattr(svc, "rejections", None)
        counts = getattr(rejections, "counts", None)
        if counts:
            log.warning("rejections_total", node=node_id, counts=dict(counts),
                     total=sum(counts.values()))


#: How long a run lets a store finish writing after the last round.
STORE_GRACE_S = 60.0


def _warn_if_anonymous(m: Manifest, node_ids: Sequence[str], memory: bool) -> None:
    """Say loudly when a shared broker cannot tell who publishes: then anything on a topic
    may be forged, and fedbus can only bound the damage (docs/architecture.md). The private
    loopback broker of `fedbus run` and the memory bus are not shared."""
    if memory or m.broker is None:
        return
    from fedbus.credentials import node_credentials

    open_nodes = [n for n in node_ids if not node_credentials(m, n).secured]
    if open_nodes:
        log.warning("anonymous_broker", broker=f"{m.broker.host}:{m.broker.port}",
                    nodes=len(open_nodes),
                    detail="nodes log in without credentials: anyone who reaches the broker "
                           "can publish as any node. Messages are checked and forgeries "
                           "counted, but only authentication stops them: see `fedbus acl` "
                           "(README, Securing a federation)")


def _limit_torch_threads(n_trainers: int) -> None:
    # Many trainers in one process each train in a worker thread; torch's own intra-op pool
    # per trainer would oversubscribe the cores (2 on a Pi-class box).
    torch = sys.modules.get("torch")
    if torch is not None and n_trainers > 1:
        torch.set_num_threads(1)


class _Observer:
    """Reads the aggregator's reports; feeds the display, metrics.jsonl and the best model."""

    def __init__(self, m: Manifest, recorder: RunRecorder | None, mode: DisplayMode,
                 sink: LogSink | None, *, simulated: bool = False) -> None:
        self.m = m
        #: A simulation: a round's lost clients are its drawn dropouts, shown as a count.
        self.simulated = simulated
        self.recorder = recorder
        self.state = ProgressState(job=m.job, rounds=m.rounds,
                                   trainers=sum(1 for n in m.nodes if n.role == "trainer"))
        self.display = make_display(self.state, mode)
        self._display_on = False
        self.agg: AnyAggregator | None = None
        self.meter: MeteredBus | None = None
        self.exporter: PromExporter | None = None
        self.last_round = 0
        self._fit_s: list[float] = []
        self._last_wall = time.monotonic()
        self._bytes = (0, 0)
        self._sink = sink
        if sink is not None:
            sink.taps.append(self._tap)

    def _tap(self, event: MutableMapping[str, Any]) -> None:
        # Trainers log their fit time with each update; the round-time breakdown uses it.
        if event.get("event") in ("update_sent", "update_ready", "update_to_ring") \
                and "seconds" in event:
            with contextlib.suppress(TypeError, ValueError):
                self._fit_s.append(float(event["seconds"]))

    def attach(self, agg: AnyAggregator) -> None:
        """Start showing ``agg``'s progress (its reports then go to ``on_report``)."""
        self.agg = agg
        self.state.online = lambda: len(agg.online & agg.config.trainers)
        self.display.start()
        self._display_on = True
        self._last_wall = time.monotonic()

    async def follow(self, agg: AnyAggregator) -> None:
        self.attach(agg)
        while True:
            report = await agg.reports.get()
            await self.on_report(report, agg)
            if report.round >= self.m.rounds:
                break
        self.display_stop()

    async def on_report(self, report: RoundReport, agg: AnyAggregator) -> None:
        now = time.monotonic()
        row = report.as_meta()
        sent, received = (self.meter.sent, self.meter.received) if self.meter else (0, 0)
        fit = self._fit_s
        self._fit_s = []
        row.update(
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            elapsed_s=round(now - self.state.started, 3),
            wall_s=round(now - self._last_wall, 4),
            accepted=list(report.accepted),
            bytes_sent=sent - self._bytes[0],
            bytes_received=received - self._bytes[1],
            fit_s_max=round(max(fit), 4) if fit else None,
            fit_s_mean=round(sum(fit) / len(fit), 4) if fit else None,
        )
        if self.simulated:
            row["dropouts"] = len(report.lost)
        staleness = getattr(report, "staleness", None)
        if staleness is not None:
            row["staleness"] = list(staleness)
        self._bytes = (sent, received)
        self._last_wall = now
        self.last_round = report.round
        self.state.update(row)
        # Recorded before it is shown: a round the user saw is in the run folder.
        best = False
        if self.recorder is not None:
            if report.round > 1 and self.recorder.rounds == 0:
                self._continue_run_folder(report.round)
            best = self.recorder.record(row)
        self.display.round(row)
        if self.exporter is not None:
            self.exporter.observe(row)
        if best:
            assert self.recorder is not None
            snapshot = {k: v.copy() for k, v in agg.weights.items()}
            await asyncio.to_thread(self.recorder.save_model, BEST_MODEL, snapshot, report.round)

    def _continue_run_folder(self, round_: int) -> None:
        """The aggregator resumed at ``round_`` from a checkpoint: continue the run folder of
        the run it resumes (``RunRecorder.continue_previous``) rather than start a second."""
        assert self.recorder is not None
        if self._sink is not None:
            self._sink.close()  # this folder's log files, appended there and removed
        try:
            moved = self.recorder.continue_previous(round_)
        finally:
            if self._sink is not None:
                self._sink.attach(self.recorder.path / "logs")
        if moved:
            print(f"fedbus: resumed at round {round_} from a checkpoint: continuing run folder "
                  f"{self.recorder.path}", file=sys.stderr, flush=True)

    def display_stop(self) -> None:
        if self._display_on:
            self._display_on = False
            self.display.stop()

    def history_len(self) -> int:
        return len(self.agg.history) if self.agg is not None else 0

    def final_metrics(self) -> dict[str, Any]:
        last = self.agg.history[-1] if self.agg is not None and self.agg.history else None
        if last is None:
            return {}
        out: dict[str, Any] = {"round": last.round}
        if last.eval is not None:
            out["loss"] = last.eval.loss
            out.update({k: float(v) for k, v in last.eval.metrics.items()})
        return out

    def final_line(self) -> int:
        """Print the machine-readable last line of stdout; the exit code."""
        return final_line(self.agg.history if self.agg is not None else [], strict=False)
