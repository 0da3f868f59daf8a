"""fedbus: run a federation, serve one node, validate a manifest, watch and review runs.

Logging is configured here and only here. The last line ``fedbus run`` prints on stdout is
the final metric (``final accuracy=0.94``), so scripts can read it. Each subcommand is one
``_add_<name>`` function (its arguments and examples) plus one ``_cmd_<name>`` handler.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from fedbus.progress import DisplayMode

from fedbus import __version__
from fedbus.errors import FedbusError, ManifestError
from fedbus.log import LEVELS, LogSink, configure_logging
from fedbus.manifest import (
    BrokerSpec,
    Manifest,
    broker_address,
    describe,
    load_manifest,
    with_broker,
)

__all__ = ["main"]

log = structlog.get_logger("fedbus.cli")

_TOP_EXAMPLES = """\
examples:
  fedbus new mytask && cd mytask && fedbus run manifest.yaml
  fedbus run examples/digits/manifest.yaml          the demo: 10 trainers, private broker
  fedbus validate examples/digits/manifest.yaml
  fedbus ls && fedbus show digits                   review runs (runs/<job>/<run-id>/)
  fedbus plot digits                                PNG charts of the latest digits run

Run `fedbus COMMAND --help` for a command's options and examples.
"""

Handler = Callable[[argparse.Namespace, LogSink], int]


# --- argument types ---------------------------------------------------------------------------

def _parse_broker(value: str) -> BrokerSpec:
    try:
        return broker_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return n


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value!r}")
    return n


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"wants [HOST:]PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port 0-65535 (0: any free port), got "
                                         f"{value!r}")
    return int(value)


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seconds > 0, got {value!r}") from None
    if not s > 0:
        raise argparse.ArgumentTypeError(f"must be seconds > 0, got {value!r}")
    return s


# --- the parser -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-json", action="store_true",
                        help="log lines as JSON on stderr (for machines)")
    common.add_argument("--log-level", default="info", choices=LEVELS,
                        help="least severe events to log (default: info)")
    p = argparse.ArgumentParser(prog="fedbus", description=__doc__.splitlines()[0],
                                epilog=_TOP_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"fedbus {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, examples: str, handler: Handler) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help, parents=[common],
                             epilog="examples:\n" + examples,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(handler=handler)
        return cmd

    from fedbus.deploy.commands import COMMANDS as DEPLOY_COMMANDS

    for register in (_add_run, _add_worker, _add_serve, _add_validate, _add_watch, _add_query,
                     _add_ls, _add_show, _add_plot, _add_new, _add_dashboard, *DEPLOY_COMMANDS):
        register(add)
    return p


Adder = Callable[[str, str, str, Handler], argparse.ArgumentParser]


def _add_run(add: Adder) -> None:
    run = add("run", "run every node of a manifest in this process", """\
  fedbus run examples/digits/manifest.yaml
  fedbus run manifest.yaml --rounds 5 --runs-dir /tmp/runs
  fedbus run manifest.yaml --memory --quiet         in-process bus, final line only
  fedbus run manifest.yaml --dashboard 8765         live page on http://127.0.0.1:8765/
""", _cmd_run)
    run.add_argument("manifest")
    run.add_argument("--rounds", type=_positive_int, help="override the manifest's rounds")
    run.add_argument("--broker", type=_parse_broker,
                     help="HOST:PORT of a running broker instead of a private mosquitto")
    run.add_argument("--memory", action="store_true",
                     help="in-process memory bus instead of MQTT (simulation, no broker)")
    run.add_argument("--runs-dir", metavar="DIR",
                     help="root of the run folders (default: $FEDBUS_RUNS_DIR or ./runs)")
    run.add_argument("--no-record", action="store_true", help="write no run folder")
    run.add_argument("--quiet", action="store_true",
                     help="no progress display, errors only; the final line still prints")
    run.add_argument("--display", choices=("auto", "live", "plain"), default="auto",
                     help="live: redrawn panel; plain: one line a round (default: live on a "
                     "terminal, plain otherwise)")
    run.add_argument("--dashboard", type=_port, metavar="PORT",
                     help="serve the live dashboard on 127.0.0.1:PORT during the run")
    run.add_argument("--metrics", type=_listen, metavar="[HOST:]PORT",
                     help="Prometheus /metrics of the aggregator (host default 127.0.0.1; "
                     "needs the 'metrics' extra)")
    run.add_argument("--workers", type=_count,
                     help="population manifests: simulation workers in this process "
                     "(default: population.workers, else one per core; 0 with "
                     "--remote-workers: all the training is done by `fedbus worker`s)")
    run.add_argument("--remote-workers", type=int, default=0, metavar="N",
                     help="population manifests: also wait for N `fedbus worker` processes "
                     "on the broker")


def _add_worker(add: Adder) -> None:
    worker = add("worker", "host virtual clients of a population manifest (joins a "
                 "simulation through the broker)", """\
  fedbus run sim.yaml --broker 127.0.0.1:1883 --remote-workers 2
  fedbus worker sim.yaml --broker 127.0.0.1:1883     (twice, on any machine)
""", _cmd_worker)
    worker.add_argument("manifest")
    worker.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")
    worker.add_argument("--workers", type=_positive_int, default=1,
                        help="worker objects in this process (default 1)")


def _add_serve(add: Adder) -> None:
    serve = add("serve", "run one node (what compose and systemd start)", """\
  fedbus serve manifest.yaml --node aggregator --broker 10.0.0.5:1883
  fedbus serve manifest.yaml --node 'trainer-*'     many trainers in one process
  fedbus serve manifest.yaml --node aggregator --runs-dir /var/lib/fedbus/runs
  fedbus serve manifest.yaml --node aggregator --metrics 0.0.0.0:9108
""", _cmd_serve)
    serve.add_argument("manifest")
    serve.add_argument("--node", required=True, action="append",
                       help="node id from the manifest; repeat it or use a glob ('t*') to "
                       "run many nodes in this process (simulation: many clients a worker)")
    serve.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")
    serve.add_argument("--runs-dir", metavar="DIR",
                       help="serving the aggregator: write its run folder under DIR (default: "
                       "$FEDBUS_RUNS_DIR if set, else none)")
    serve.add_argument("--dashboard", type=_port, metavar="PORT",
                       help="serve the live dashboard on 127.0.0.1:PORT")
    serve.add_argument("--metrics", type=_listen, metavar="[HOST:]PORT",
                       help="serving the aggregator: Prometheus /metrics on HOST:PORT "
                       "(e.g. 0.0.0.0:9108 for a remote scraper; needs the 'metrics' extra)")
    serve.add_argument("--health-file", help="keep this file fresh while connected (container "
                       "healthchecks: python -m fedbus.deploy.health FILE)")
    serve.add_argument("--watch-as", metavar="USER",
                       help="an aggregator that finds another instance active waits as a "
                       "standby, watching with this broker user (an operator from `fedbus "
                       "acl --operator`; needed on a secured broker)")


def _add_validate(add: Adder) -> None:
    val = add("validate", "check a manifest, its task and files; print what it declares", """\
  fedbus validate examples/digits/manifest.yaml
""", _cmd_validate)
    val.add_argument("manifest")
    val.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")


def _add_watch(add: Adder) -> None:
    watch = add("watch", "print the per-round metrics of a running job", """\
  fedbus watch manifest.yaml --broker 127.0.0.1:1883
  fedbus watch manifest.yaml --broker 127.0.0.1:1883 --timeout 300
  fedbus watch secure-manifest.yaml --user ops     a secured broker, as an operator
""", _cmd_watch)
    watch.add_argument("manifest")
    watch.add_argument("--broker", type=_parse_broker)
    watch.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                       help="give up after this long without a round report (default: 60)")
    watch.add_argument("--user", help="connect as this operator (from `fedbus acl --operator`) "
                       "on a secured broker")


def _add_query(add: Adder) -> None:
    query = add("query", "ask the job's metadata store for a workload (JSON on stdout)", """\
  fedbus query manifest.yaml summary
  fedbus query manifest.yaml malicious --arg threshold=2.5
  fedbus query manifest.yaml contribution --round 5 --arg permutations=64
  fedbus query manifest.yaml personalization --arg client=trainer-3 --save models/
  workloads: summary lineage scheduling malicious debugging clustering personalization
  contribution (docs/store.md)
""", _cmd_query)
    query.add_argument("manifest")
    query.add_argument("workload")
    query.add_argument("--round", type=_positive_int,
                       help="the round to look at (default: the last)")
    query.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                       help="a workload argument, e.g. --arg k=3 --arg by=loss (repeatable)")
    query.add_argument("--store", help="store node id (default: the manifest's first store)")
    query.add_argument("--broker", type=_parse_broker, help="HOST:PORT instead of the manifest's")
    query.add_argument("--offline", action="store_true",
                       help="read the store's folder here instead of asking the running store "
                       "(the default when the manifest names no broker)")
    query.add_argument("--timeout", type=_seconds, default=120.0, metavar="SECONDS",
                       help="seconds to wait for the store's reply (default: 120)")
    query.add_argument("--save", metavar="DIR", help="write returned models here")
    query.add_argument("--user", help="connect as this operator (from `fedbus acl --operator`) "
                       "on a secured broker")


def _add_ls(add: Adder) -> None:
    ls = add("ls", "list recorded runs", """\
  fedbus ls
  fedbus ls digits --runs-dir /tmp/runs
""", _cmd_ls)
    ls.add_argument("job", nargs="?", help="only this job's runs")
    ls.add_argument("--runs-dir", metavar="DIR", help="default: $FEDBUS_RUNS_DIR or ./runs")


def _add_show(add: Adder) -> None:
    show = add("show", "summarize one run: final and best metrics, models, rounds", """\
  fedbus show digits                     the latest digits run
  fedbus show 20261201-2215-ab12         a run id (or a prefix of one)
  fedbus show runs/digits/20261201-2215-ab12
  fedbus show digits --logs trainer-3         one node's log events
  fedbus show digits --logs --level warning   every node's warnings and errors
""", _cmd_show)
    show.add_argument("run", help="run folder, job/run-id, run id (prefix) or job (latest)")
    show.add_argument("--runs-dir", metavar="DIR", help="default: $FEDBUS_RUNS_DIR or ./runs")
    show.add_argument("--logs", nargs="?", const="", metavar="NODE",
                      help="print the run's log events instead (all nodes, or NODE's)")
    show.add_argument("--level", choices=LEVELS, default="info",
                      help="with --logs: least severe events shown (default: info)")


def _add_plot(add: Adder) -> None:
    plot = add("plot", "write PNG charts of one or more runs (needs the 'plot' extra)", """\
  fedbus plot digits                          charts of the latest digits run, in its folder
  fedbus plot run-a run-b --out compare/      several runs on one chart
""", _cmd_plot)
    plot.add_argument("runs", nargs="+", metavar="RUN")
    plot.add_argument("--out", metavar="DIR",
                      help="where the PNGs go (default: the first run's folder, plots/)")
    plot.add_argument("--runs-dir", metavar="DIR", help="default: $FEDBUS_RUNS_DIR or ./runs")


def _add_new(add: Adder) -> None:
    new = add("new", "write a runnable project: task module (PyTorch) and manifest", """\
  fedbus new mytask && cd mytask && fedbus run manifest.yaml
""", _cmd_new)
    new.add_argument("name", help="folder to create; also the job and module name")


def _add_dashboard(add: Adder) -> None:
    dash = add("dashboard", "serve a live web page of a running job (loopback only)", """\
  fedbus dashboard manifest.yaml --broker 127.0.0.1:1883 --port 8765
  fedbus dashboard secure-manifest.yaml --user ops     a secured broker, as an operator
""", _cmd_dashboard)
    dash.add_argument("manifest")
    dash.add_argument("--broker", type=_parse_broker)
    dash.add_argument("--port", type=_port, default=8765, help="default: 8765 (0: any free)")
    dash.add_argument("--user", help="connect as this operator (from `fedbus acl --operator`) "
                      "on a secured broker")


# --- entry point ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = args.log_level
    if args.command == "run":
        # Node logs go to the run folder; the console gets problems only, all of it at debug.
        if getattr(args, "quiet", False):
            console = "error"
        elif args.log_level != "debug":
            console = max(args.log_level, "warning", key=LEVELS.index)
    sink = configure_logging(json=args.log_json, level=args.log_level, console_level=console)
    handler: Handler = args.handler
    try:
        try:
            return handler(args, sink)
        except BaseExceptionGroup as group:
            # An error inside a node's task group: report the error, not the group's traceback.
            raise _leaf(group) from None
    except ManifestError as exc:
        print(f"fedbus: invalid manifest: {exc}", file=sys.stderr)
        return 2
    except FedbusError as exc:
        if args.log_json:  # machines read the event; people read the line below
            log.error("failed", error=str(exc))
        print(f"fedbus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fedbus show ... | head`: the reader left; say nothing more, like any Unix tool.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups; cancellations are echoes."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_leaf(e) for e in exc.exceptions]
        real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
        return (real or leaves)[0]
    return exc


def _manifest(args: argparse.Namespace) -> Manifest:
    m = load_manifest(args.manifest)
    if getattr(args, "broker", None):
        # only the address: credentials, chunking and limits stay the manifest's
        base = m.broker or BrokerSpec()
        m = with_broker(m, dataclasses.replace(base, host=args.broker.host,
                                               port=args.broker.port))
        if m.brokers:  # several brokers declared: --broker puts every node on that one
            m = dataclasses.replace(m, brokers={}, nodes=tuple(
                dataclasses.replace(n, broker=None) for n in m.nodes))
    return m


def _cmd_run(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.checks import check_manifest
    from fedbus.runner import RunOptions, run_federation
    from fedbus.runs import runs_root

    m = _manifest(args)
    overrides: dict[str, Any] = {}
    if args.rounds is not None:
        m = dataclasses.replace(m, rounds=args.rounds)
        overrides["rounds"] = args.rounds
    if args.broker is not None:
        overrides["broker"] = {"host": args.broker.host, "port": args.broker.port}
    display: DisplayMode = "none" if args.quiet else ("plain" if args.log_json
                                                     else args.display)
    runs = None if args.no_record else runs_root(args.runs_dir)
    if m.population is not None:
        from fedbus.runner import run_population

        # A simulation runs on the in-process bus unless a broker is named.
        memory = args.memory or (m.broker is None and not args.remote_workers)
        sim = RunOptions(memory=memory, runs_root=runs, display=display, overrides=overrides)
        return asyncio.run(run_population(m, sim, sink, workers=args.workers,
                                          remote_workers=args.remote_workers))
    if args.dashboard is not None and not args.memory:
        from fedbus.credentials import credentials_key

        key = credentials_key(m)
        if key is not None:
            raise FedbusError(f"--dashboard: job {m.job!r}'s broker asks for credentials ({key}"
                              f"); serve the page beside the run as an operator instead: "
                              f"fedbus dashboard {args.manifest} --user OPERATOR")
    check_manifest(m, [n.id for n in m.nodes])
    opts = RunOptions(
        memory=args.memory,
        runs_root=runs,
        display=display,
        dashboard_port=args.dashboard,
        metrics=args.metrics,
        overrides=overrides,
    )
    return asyncio.run(run_federation(m, opts, sink))


def _cmd_worker(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.runner import run_sim_workers

    return asyncio.run(run_sim_workers(_manifest(args), args.workers))


def _cmd_serve(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.runner import RunOptions, serve_nodes
    from fedbus.runs import ENV_VAR, runs_root

    record = args.runs_dir or os.environ.get(ENV_VAR)
    opts = RunOptions(runs_root=runs_root(record) if record else None, display="plain",
                      dashboard_port=args.dashboard, metrics=args.metrics,
                      health_file=args.health_file, watch_as=args.watch_as)
    return asyncio.run(serve_nodes(_manifest(args), args.node, opts, sink))


def _cmd_validate(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.checks import check_manifest

    m = _manifest(args)
    check_manifest(m)
    print(describe(m))
    print("imported  the task's module (its code ran: validate only manifests you trust); its "
          "parameters fit the factory; named files exist")
    return 0


def _cmd_watch(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.watch import watch

    return asyncio.run(watch(_manifest(args), args.timeout, user=args.user))


def _cmd_query(args: argparse.Namespace, sink: LogSink) -> int:
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
    meta, tensors = asyncio.run(q.run_query(_manifest(args), args.store, args.workload, wargs,
                                            offline=args.offline, timeout=args.timeout,
                                            user=args.user))
    if args.save and tensors:
        meta["saved"] = q.save_models(tensors, args.save)
    print(json.dumps(meta, indent=2, default=str))
    return 0 if meta.get("ok") else 1


def _cmd_ls(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.runs import format_listing, list_runs, runs_root

    print(format_listing(list_runs(runs_root(args.runs_dir), args.job)))
    return 0


def _cmd_show(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.runs import describe_run, find_run, format_logs, runs_root

    run = find_run(args.run, runs_root(args.runs_dir))
    if args.logs is not None:
        print(format_logs(run, args.logs or None, args.level))
    else:
        print(describe_run(run))
    return 0


def _cmd_plot(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.plots import plot_runs
    from fedbus.runs import find_run, runs_root

    runs = [find_run(r, runs_root(args.runs_dir)) for r in args.runs]
    out = Path(args.out) if args.out else runs[0].path / "plots"
    for path in plot_runs(runs, out):
        print(path)
    return 0


def _cmd_new(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.scaffold import new_project

    folder = new_project(Path(args.name))
    print(f"created {folder}/ — next: cd {folder} && fedbus run manifest.yaml")
    return 0


def _cmd_dashboard(args: argparse.Namespace, sink: LogSink) -> int:
    from fedbus.dashboard import serve_dashboard

    m = _manifest(args)
    if m.broker is None:
        raise ManifestError(m.source, "broker", "`fedbus dashboard` needs --broker HOST:PORT")
    return asyncio.run(serve_dashboard(m, args.port, until_done=False, user=args.user))


if __name__ == "__main__":
    sys.exit(main())
