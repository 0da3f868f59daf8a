"""Fuzz a running federation over a real mosquitto and check that nothing gives way.

    .venv/bin/python -m benchmarks.bench_fuzz                   # 10,000 messages, open broker
    .venv/bin/python -m benchmarks.bench_fuzz --messages 50000 --json fuzz.json
    .venv/bin/python -m benchmarks.bench_fuzz --sign               # signatures required
    .venv/bin/python -m benchmarks.bench_fuzz --sign --attack flood --flood-s 20
    .venv/bin/python -m benchmarks.bench_fuzz --sign --attack huge  # one 64 MiB publish

Two runs of the same job (numpy toy task, FedAvg, 3 trainers, updates bigger than a chunk so
the upload gate and chunk reassembly are in play), each on its own fresh mosquitto, each as
separate processes exactly as deployed (``fedbus serve --node aggregator``,
``fedbus serve --node 't*'`` and, recording the rounds, ``fedbus serve --node store``; with
``--checkpointer``, ``--node store --node ckpt``: state/ topics get a listener too):

1. clean: no attacker; records every round's metrics and each process's peak RSS (VmHWM);
2. fuzzed: an attacker connects, watches the job's traffic (to learn the aggregator's epoch and
   to have real messages to replay), waits for the first round order and then publishes
   ``--messages`` messages from ``fedbus.fuzz.Fuzzer`` on every topic some node subscribes to.

The flood must fall inside the job whatever the machine's load: the aggregator's evaluations
keep pace with it (the attacker writes its progress to a file; ``make_gated_task``), between
rounds where no deadline runs, so the flood spreads over the rounds and the last round, and
the job, cannot end before the flood does.

``--attack flood`` replaces the fuzzer by ``benchmarks.flood``: tiny messages (garbage,
unsigned envelopes, envelopes signed with another real node's key) on every topic some node
subscribes to, as fast as one publisher process can write them, for ``--flood-s`` seconds
(at most ``--messages``); the rate it reached is reported. ``--attack huge`` publishes one
64 MiB message on a trainer's update topic, unsigned, then signed with that trainer's own
key (a trainer turned hostile). Both live in ``benchmarks/attacks.py``. ``--sign`` runs the
job with ``security.sign: required`` (keys made with ``fedbus.signing`` for every node), on
the anonymous broker or, with ``--secure``, on the ``fedbus acl`` one.

It reports whether every process survived, each one's peak RSS against the clean run, the
rejections each service counted by reason (the aggregator's from its round reports, the
others' from their JSON logs), and whether the final model's metrics equal the clean run's
(expected only when the broker authenticates publishers; on an open broker well-formed
forgeries can move the model, and the point is that nothing dies, hangs or grows; with
signatures required, on any broker). The final model is compared by its tensors' bytes (the
aggregator's run folder's ``model-final.safetensors``; its header holds the run id).

Every process started here is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import yaml

from benchmarks.attacks import Broker, flood, huge, write_progress
from benchmarks.bench_rounds import REPO, Child, Sampler
from fedbus import topics
from fedbus.broker import spawn_mosquitto
from fedbus.bus import MqttOptions
from fedbus.bus.mqtt import MqttBus
from fedbus.codec import decode
from fedbus.errors import CodecError
from fedbus.fuzz import Fuzzer
from fedbus.log import configure_logging
from fedbus.manifest import load_manifest, parse_manifest
from fedbus.signing import Signer, read_key, split_signed, write_key_pair

MIB = 1 << 20


@dataclass
class Run:
    """What one run (clean or fuzzed) left behind."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    alive_at_end: dict[str, bool] = field(default_factory=dict)
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    sent_to_aggregator: int = 0
    seconds: float = 0.0
    #: When the flood started and ended, and when the last round report came (seconds from
    #: the start of the run): the flood must fall inside the job.
    flood: tuple[float, float] = (0.0, 0.0)
    job_end: float = 0.0
    #: Rounds the metadata store wrote a record for (its folder, after the run).
    store_rounds: int = 0
    #: SHA-256 of the final model's tensors (name order, raw bytes), from the run folder.
    final_model: str = ""
    #: A flood's rate, messages a second, as its publisher measured it.
    flood_rate: float = 0.0


@dataclass
class Result:
    messages: int
    clean: Run
    fuzzed: Run
    same_model: bool
    secure: bool = False
    sign: bool = False
    attack: str = "fuzz"
    machine: str = field(default_factory=lambda: f"{platform.machine()} {platform.system()}, "
                                                 f"Python {platform.python_version()}")
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))


#: Longest one evaluation waits for the flood to get on (a bound on a hang, not a timing).
GATE_MAX_S = 600.0
#: The file the attacker keeps its progress in ("sent total"), and that gated tasks read.
PROGRESS = "flood-progress"


def _progress(path: Path) -> float:
    """The share of the flood sent so far (1.0: all, or no flood; 0.0 before it starts)."""
    try:
        sent, total = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return 0.0
    return 1.0 if total == 0 else sent / total


class _GatedTask:
    """The toy task, whose evaluations keep pace with the flood: the aggregator's evaluation of
    round r (between rounds, in a worker thread: no round deadline runs then) waits until
    (r-1)/(``paced_rounds``-1) of the flood is sent. So the flood spreads over the rounds, and
    the last round starts only once all of it is sent, however slow a loaded machine makes
    either."""

    def __init__(self, inner: Any, gate: str, paced_rounds: int) -> None:
        self.inner = inner
        self.gate = Path(gate)
        self.paced_rounds = paced_rounds
        self.evaluations = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def evaluate(self) -> Any:
        self.evaluations += 1
        # Round 1's evaluation never waits: the attacker starts once it sees the job under way
        # (on a secured broker, from round 1's metrics, published after this evaluation).
        share = min((self.evaluations - 1) / max(self.paced_rounds - 1, 1), 1.0)
        deadline = time.monotonic() + GATE_MAX_S
        while _progress(self.gate) < share and time.monotonic() < deadline:
            time.sleep(0.02)  # another process's file; bounded
        return self.inner.evaluate()


def make_gated_task(*, gate: str, paced_rounds: int, **params: Any) -> Any:
    from examples.toy.task import make_task

    return _GatedTask(make_task(**params), gate, paced_rounds)


def manifest_data(broker: dict[str, Any], *, rounds: int, size: int,
                  delay_s: float, store_dir: str, gate: str,
                  keys: str | None = None, checkpointer: bool = False) -> dict[str, Any]:
    extra: dict[str, Any] = {"security": {"sign": "required", "keys": keys}} if keys else {}
    if checkpointer:
        # served in the store's process: state/ topics have listeners too
        extra["checkpoint"] = {"dir": str(Path(store_dir).parent / "checkpoints"),
                               "wait_s": 10}
    nodes = [{"id": "aggregator", "role": "aggregator"}, {"id": "store", "role": "store"}]
    nodes += [{"id": "ckpt", "role": "checkpointer"}] if checkpointer else []
    return {**extra, "nodes": nodes,
        "version": 1, "job": "fuzz", "seed": 7, "rounds": rounds, "strategy": "fedavg",
        # updates of `size` float32 params exceed one chunk: grants and reassembly are used
        "broker": {"chunk_bytes": 32_768, "max_queued_messages": 100_000, **broker},
        "codec": {"level": 0},
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 60,
                  "max_uploads": 2},
        "evaluate": {"where": "server", "every": 1},
        "task": {"ref": "benchmarks.bench_fuzz:make_gated_task",
                 "params": {"size": size, "lr": 0.5, "delay_s": delay_s, "gate": gate,
                            "paced_rounds": max(rounds - 1, 1)}},
        "trainers": {"count": 3, "prefix": "t", "parent": "aggregator"},
        # fed every update (the default feed), so the flood on update topics reaches it too
        "store": {"dir": store_dir, "sketch_dim": 64, "full_update_rounds": 1,
                  "cache_mb": 16, "backlog_mb": 16, "precompute": False},
    }


#: Operator users on a secured broker: the watcher, and the attacker (two connections, since
#: the broker names a session after its user and a second login would kick the first).
OPERATORS = ("watcher", "mallory", "mallory-eye")


async def start_broker(folder: Path, secure: bool, sign: bool = False,
                       **job: Any) -> tuple[Broker, Path, str]:
    """A fresh mosquitto (secured: every node and operator with its own credentials and
    rights, from ``fedbus.deploy``), the manifest file pointing at it and the nodes the store's
    process serves; with ``sign``, a key pair for every node in ``folder/keys``."""
    job = {**job, "store_dir": str(folder / "store"), "gate": str(folder / PROGRESS)}
    if sign:
        job["keys"] = str(folder / "keys")
        for node in parse_manifest(manifest_data({"host": "127.0.0.1", "port": 1},
                                                 **job)).nodes:
            write_key_pair(folder / "keys", node.id)
    if not secure:
        proc = await spawn_mosquitto()
        broker = Broker(proc.host, proc.port, proc.stop)
        data = manifest_data({"host": proc.host, "port": proc.port}, **job)
    else:
        from fedbus.deploy.local import spawn_secure_mosquitto

        plain = parse_manifest(manifest_data({"host": "127.0.0.1", "port": 1}, **job))
        sb = await spawn_secure_mosquitto(plain, operators=OPERATORS)
        broker = Broker(sb.host, sb.port, sb.stop, sb.password)
        spec = sb.manifest.broker
        assert spec is not None
        data = manifest_data({"host": sb.host, "port": sb.port,
                              "password_file": spec.password_file}, **job)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return broker, path, "store ckpt" if job.get("checkpointer") else "store"


async def one_run(folder: Path, *, messages: int, rounds: int, size: int,
                  delay_s: float, seed: int = 0, secure: bool = False, sign: bool = False,
                  attack: str = "fuzz", flood_s: float = 20.0,
                  checkpointer: bool = False) -> Run:
    """One federation on a fresh mosquitto; attacked when ``messages`` > 0."""
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local temp folder
    broker, path, store_nodes = await start_broker(
        folder, secure, sign, rounds=rounds, size=size, delay_s=delay_s,
        checkpointer=checkpointer)
    children: list[Child] = []
    samplers: dict[str, Sampler] = {}
    run = Run()
    if not messages:
        write_progress(folder / PROGRESS, 0, 0)  # no flood: nothing to wait for
    try:
        m = load_manifest(path)
        async with MqttBus("watcher", broker.host, broker.port, client_id="watcher",
                           options=MqttOptions(**broker.login("watcher"))) as watch, \
                watch.subscribe(topics.metrics(m.job, "aggregator")) as metrics_sub:
            started = time.monotonic()
            # the store first: it records from its subscription on
            for name, node in (("store", store_nodes), ("aggregator", "aggregator"),
                               ("trainers", "t*")):
                log = open(folder / f"{name}.log", "wb")  # noqa: ASYNC230 - a log sink
                runs = folder / "runs" if name == "aggregator" else None
                child = Child(name, _serve(path, node, log, runs))
                log.close()  # the child holds its own descriptor
                children.append(child)
                samplers[name] = Sampler(child.pid, hz=20)
                samplers[name].start()
            attacker: asyncio.Task[None] | None = None
            if messages:
                how = {"fuzz": _attack, "flood": flood, "huge": huge}[attack]
                task = how(m, broker, messages, seed, run, started, folder / PROGRESS,
                           flood_s=flood_s, keys=folder / "keys" if sign else None)
                attacker = asyncio.create_task(task)
                # an attacker that failed must not leave the job waiting for its progress
                attacker.add_done_callback(
                    lambda _: write_progress(folder / PROGRESS, 0, 0))
            agg = next(c for c in children if c.name == "aggregator")
            seen: set[str] = set()
            while True:
                try:
                    msg = await metrics_sub.get(timeout=2)
                except TimeoutError:
                    if agg.reap(0):
                        break
                    continue
                try:
                    env = decode(_unsigned(msg.payload))
                except CodecError:
                    continue
                if env.kind == "metrics" and env.msg_id not in seen:
                    seen.add(env.msg_id)
                    run.metrics.append(dict(env.meta))
                    if env.meta.get("round") == rounds:
                        run.job_end = time.monotonic() - started
                        break
            if attacker is not None:
                await asyncio.wait_for(attacker, 120)
            agg.reap(30)
            store = next(c for c in children if c.name == "store")
            store.reap(30)  # it ends on the aggregator's `done`, once it has written
            run.seconds = time.monotonic() - started
        for child in children:
            run.alive_at_end[child.name] = child.proc.poll() is None
        for name, sampler in samplers.items():
            sampler.stop()
            run.peak_rss[name] = sampler.last_hwm
    finally:
        for child in children:
            child.stop()
        for sampler in samplers.values():
            sampler.stop()
        await broker.stop()
    for child in children:
        run.exit_codes[child.name] = child.proc.returncode
    run.rejected = _rejections(folder, run.metrics)
    run.store_rounds = len(list((folder / "store").glob("**/rounds/*/record.fb")))
    run.final_model = _final_model(folder / "runs")
    return run


def _unsigned(payload: bytes) -> bytes:
    """A payload without its signature trailer (the watcher reads; it need not check)."""
    parts = split_signed(payload)
    return payload if parts is None else bytes(parts[0])


def _final_model(runs: Path) -> str:
    import hashlib

    from fedbus.modelfile import read_safetensors
    from fedbus.runs import FINAL_MODEL

    found = sorted(runs.glob(f"**/{FINAL_MODEL}"))
    if len(found) != 1:
        return ""
    weights = read_safetensors(found[0])
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name]).tobytes())
    return h.hexdigest()


def _serve(manifest: Path, node: str, log: Any, runs: Path | None = None) -> Any:
    import subprocess

    extra = ["--runs-dir", str(runs)] if runs is not None else []
    return subprocess.Popen(
        [sys.executable, "-m", "fedbus.cli", "serve", str(manifest),
         *(a for n in node.split() for a in ("--node", n)), "--log-json", *extra],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


async def _attack(m: Any, broker: Broker, messages: int, seed: int, run: Run,
                  t0: float, progress: Path, *, keys: Path | None = None, **_: Any) -> None:
    import random

    model = {"w": np.zeros(m.task.params["size"], np.float32)}
    fuzzer = Fuzzer(m, model, seed=seed)
    # With the job's keys (a signed job), half the forgeries carry a real signature of
    # another node of the job than the one they name: checked, then refused by the door.
    rng = random.Random(seed)
    nodes = [n.id for n in m.nodes]
    signers = {n: Signer(n, read_key(keys / f"{n}.key")) for n in nodes} if keys else {}
    agg_prefix = topics.updates_for(m.job, m.aggregator.id)[:-1]
    # What the attacker may read: everything on an open broker; on a secured one it holds
    # operator credentials (metrics and presence; control on any node), and the broker
    # refuses the rest of what it sends.
    readable = ([f"fedbus/v1/{m.job}/#"] if broker.password is None
                else [topics.metrics_all(m.job), topics.presence_all(m.job)])
    # The attacker speaks raw MQTT: fedbus's own bus would wrap a fake chunk frame into a
    # real one-chunk transfer and so defuse the chunk floods.
    raw = aiomqtt.Client(broker.host, broker.port, identifier="mallory",
                         logger=logging.getLogger("fedbus.fuzz.attacker"),
                         protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=200,
                         **broker.login("mallory"))
    raw.pending_calls_threshold = 1 << 30  # a flood is the point, not a warning
    async with MqttBus("mallory-eye", broker.host, broker.port, client_id="mallory-eye",
                       options=MqttOptions(**broker.login("mallory-eye"))) as bus, raw, \
            bus.subscribe(*readable) as spy:
        # learn from real traffic until the job is under way, then flood
        while True:
            msg = await spy.get(timeout=300)  # a bound on a hang; generous under load
            fuzzer.observe(msg.topic, msg.payload)
            if msg.topic in (topics.model(m.job, m.aggregator.id),
                             topics.metrics(m.job, m.aggregator.id)):
                break
        sent: Counter[str] = Counter()
        batch: list[Any] = []
        flood_start = time.monotonic() - t0
        for fm in fuzzer.messages(messages):
            payload = fm.payload
            if signers and rng.random() < 0.5:
                named = fm.topic.rsplit("/", 1)[1]
                payload = signers[rng.choice([n for n in nodes if n != named])].sign(payload)
            batch.append(raw.publish(fm.topic, payload, qos=1, retain=fm.retain))
            sent[fm.category] += 1
            if fm.topic.startswith(agg_prefix):
                run.sent_to_aggregator += 1
            if len(batch) >= 200:
                await asyncio.gather(*batch)
                batch.clear()
                write_progress(progress, sum(sent.values()), messages)
                while True:  # keep replays fresh without slowing the flood
                    try:
                        seen = await spy.get(timeout=0)
                    except TimeoutError:
                        break
                    fuzzer.observe(seen.topic, seen.payload)
        await asyncio.gather(*batch)
        run.sent = dict(sent)
        run.flood = (flood_start, time.monotonic() - t0)
        write_progress(progress, messages, messages)  # the last round may start


def _rejections(folder: Path, metrics: list[dict[str, Any]] | None = None
                ) -> dict[str, dict[str, int]]:
    """Counted rejections by node and reason, from each process's JSON log, plus the chunk
    layer's drops (``drop_chunk``) under ``chunk:<reason>`` and the signature checks'
    refusals (``message_refused``) under ``signature:<reason>``. A node logs a reason's first
    ten and every thousandth (each line with its running ``total``) and its totals when it
    stops (``rejections_total``): the largest count seen wins. The aggregator's own counts are
    exact from its round reports (``metrics``) too."""
    out: dict[str, Counter[str]] = {}
    totals: dict[str, dict[str, int]] = {}
    for name in ("aggregator", "trainers", "store"):
        path = folder / f"{name}.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(json.JSONDecodeError, TypeError, ValueError):
                e = json.loads(line)
                event = e.get("event")
                if event == "rejections_total" and isinstance(e.get("counts"), dict):
                    totals[str(e.get("node"))] = {str(k): int(v) for k, v in e["counts"].items()}
                elif event == "drop_chunk":
                    key = f"chunk:{e.get('reason')}"
                    counter = out.setdefault(name, Counter())
                    counter[key] = max(counter[key] + 1, int(e.get("refused", 0)))
                elif event in ("message_rejected", "message_refused"):
                    key = (f"signature:{e.get('reason')}" if event == "message_refused"
                           else str(e.get("reason")))
                    seen = out.setdefault(str(e.get("node")), Counter())
                    seen[key] = max(seen[key] + 1, int(e.get("total") or 0))
    exact: Counter[str] = Counter()
    for report in metrics or []:
        exact.update({str(k): int(v) for k, v in (report.get("rejected") or {}).items()})
    if exact:
        totals["aggregator"] = {**totals.get("aggregator", {}),
                                **{k: max(v, totals.get("aggregator", {}).get(k, 0))
                                   for k, v in exact.items()}}
    for node, counts in totals.items():
        node_counts = out.setdefault(node, Counter())
        for reason, n in counts.items():
            node_counts[reason] = max(node_counts[reason], n)
    return {k: dict(v) for k, v in out.items()}


def survived(run: Run, name: str) -> bool:
    """Exited 0 (the aggregator at the end of its job; trainers on an authenticated
    broker, which trust its `done`), or still serving when the job ended."""
    return run.exit_codes.get(name) == 0 or (name != "aggregator"
                                             and run.alive_at_end.get(name, False))


def compare(clean: Run, fuzzed: Run) -> bool:
    """Same final model: its tensors' bytes (and every round's loss and distance) equal."""
    def key(r: Run) -> list[tuple[Any, ...]]:
        return [(x.get("round"), x.get("loss"), x.get("distance")) for x in r.metrics]
    return (bool(clean.metrics) and bool(clean.final_model) and key(clean) == key(fuzzed)
            and clean.final_model == fuzzed.final_model)


async def fuzz(messages: int = 10_000, *, rounds: int = 6, size: int = 20_000,
               delay_s: float = 0.5, seed: int = 0, secure: bool = False, sign: bool = False,
               attack: str = "fuzz", flood_s: float = 20.0, checkpointer: bool = False,
               folder: Path | None = None) -> Result:
    with tempfile.TemporaryDirectory(prefix="fedbus-fuzz-") as tmp:
        base = folder or Path(tmp)
        job = {"rounds": rounds, "size": size, "delay_s": delay_s, "secure": secure,
               "sign": sign, "checkpointer": checkpointer}
        clean = await one_run(base / "clean", messages=0, **job)
        fuzzed = await one_run(base / "fuzzed", messages=messages, seed=seed, attack=attack,
                               flood_s=flood_s, **job)
    return Result(messages=messages, clean=clean, fuzzed=fuzzed, secure=secure, sign=sign,
                  attack=attack, same_model=compare(clean, fuzzed))


def table(r: Result) -> str:
    broker = ("authenticated broker, attacker with operator credentials" if r.secure
              else "open broker") + (", signatures required" if r.sign else "")
    what = {"fuzz": f"{r.messages:,} fuzzed messages",
            "flood": f"a flood of {sum(r.fuzzed.sent.values()):,} messages at "
                     f"{r.fuzzed.flood_rate:,.0f}/s",
            "huge": "one 64 MiB publish, unsigned and signed"}[r.attack]
    lines = [
        f"Attacking a running federation ({what}, {broker}; {r.machine}; {r.date})",
        "",
        "| process | survived | peak RSS clean | peak RSS fuzzed | ratio |",
        "|---|---|---|---|---|",
    ]
    for name in ("aggregator", "trainers", "store"):
        c, f = r.clean.peak_rss.get(name, 0), r.fuzzed.peak_rss.get(name, 0)
        alive = survived(r.fuzzed, name)
        lines.append(f"| {name} | {'yes' if alive else 'NO'} | {c / MIB:.0f} MiB | "
                     f"{f / MIB:.0f} MiB | {f / c if c else 0:.2f} |")
    lines += ["", "| sent by category | messages |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(r.fuzzed.sent.items())]
    lines += ["", "| node | rejections by reason |", "|---|---|"]
    for node, reasons in sorted(r.fuzzed.rejected.items()):
        text = ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items(), key=lambda x: -x[1]))
        lines.append(f"| {node} | {text} |")
    lines += ["", f"final model equal to the clean run's: {'yes' if r.same_model else 'no'}; "
                  f"rounds {len(r.fuzzed.metrics)}/{len(r.clean.metrics)}; flood from "
                  f"{r.fuzzed.flood[0]:.1f} s to {r.fuzzed.flood[1]:.1f} s, last round report "
                  f"at {r.fuzzed.job_end:.1f} s; "
                  f"{r.fuzzed.seconds:.1f} s fuzzed vs {r.clean.seconds:.1f} s clean; "
                  f"store records {r.fuzzed.store_rounds} rounds ({r.clean.store_rounds} "
                  "clean)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fuzz",
                                description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--secure", action="store_true",
                   help="broker with generated users and rights; the attacker is an operator")
    p.add_argument("--sign", action="store_true",
                   help="the job requires signed messages (security.sign: required)")
    p.add_argument("--attack", choices=("fuzz", "flood", "huge"), default="fuzz")
    p.add_argument("--flood-s", type=float, default=20.0,
                   help="--attack flood: how long the flood lasts (at most --messages)")
    p.add_argument("--checkpointer", action="store_true",
                   help="add a checkpointer (in the store's process): state/ topics are "
                        "listened to as well")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    # The watcher and the attacker's own buses see the flood too: keep their logs quiet.
    configure_logging(level="error")
    result = asyncio.run(fuzz(args.messages, rounds=args.rounds, seed=args.seed,
                              secure=args.secure, sign=args.sign, attack=args.attack,
                              flood_s=args.flood_s, checkpointer=args.checkpointer))
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
