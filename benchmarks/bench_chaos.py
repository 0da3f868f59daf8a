"""Kill -9 a federation's aggregator at random moments; the restarted one must end with exactly
the model of a run that was never interrupted.

    .venv/bin/python -m benchmarks.bench_chaos                    # 10 trials, FedAvg and FedAdam
    .venv/bin/python -m benchmarks.bench_chaos --trials 3 --strategy fedavg
    .venv/bin/python -m benchmarks.bench_chaos --twins --trials 10   # two leaders-to-be at once

Each run is real processes on a fresh local mosquitto, as deployed: ``fedbus serve`` for the
aggregator, the checkpointer and the trainers (one process). A trial starts the job, kills the
aggregator with SIGKILL at a random moment (uniform over the clean run's duration), starts a
new aggregator process with the same manifest, and compares the final model's metrics (every
round's loss and distance, to the last bit) with the clean run's. It also reports how long
the restarted aggregator took from its start to its first round (restore included) and the
checkpoint write latency the aggregator saw. ``--twins`` starts two instances of the
aggregator at the same instant instead and kills nothing: one must lead from start to end,
within seconds, and the model must be the clean run's.

Every process started here is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.bench_rounds import REPO, Child
from fedbus.broker import free_port, spawn_mosquitto
from fedbus.log import configure_logging

STRATEGIES: dict[str, Any] = {
    "fedavg": "fedavg",
    "fedadam": {"name": "fedadam", "params": {"eta": 0.1}},
    # asynchronous: one trainer in flight at a time, so the arrival order is fixed
    "fedbuff": {"name": "fedbuff", "params": {"buffer_size": 2}},
}
SELECTORS: dict[str, Any] = {"fedbuff": {"name": "inflight", "params": {"concurrency": 1}}}


@dataclass
class Trial:
    strategy: str
    kill_in_round: int
    kill_after_s: float
    killed: bool
    same_model: bool
    resumed_from: int | None
    victim: str = "aggregator"
    #: Rounds finished, and how many of them had fewer than all trainers (a trainer that is
    #: dead when a round selects is not in it: the model then differs, as it should).
    rounds_done: int = 0
    short_rounds: int = 0
    #: With a standby: seconds from the SIGKILL to the standby starting its next round.
    failover_s: float | None = None
    checkpoint_s: list[float] = field(default_factory=list)


def write_manifest(folder: Path, host: str, port: int, strategy: str, rounds: int,
                   redis_url: str | None = None) -> Path:
    data = {
        "version": 1, "job": "chaos", "seed": 11, "rounds": rounds,
        "strategy": STRATEGIES[strategy], "selector": SELECTORS.get(strategy, "all"),
        "broker": {"host": host, "port": port, "max_queued_messages": 100_000},
        # a lost update is asked for again at the deadline at the latest
        "round": {"deadline_s": 5, "quorum": 1.0, "min_clients": 3, "start_timeout_s": 60},
        "checkpoint": {"dir": str(folder / "checkpoints"), "wait_s": 10,
                       **({"redis": redis_url} if redis_url else {})},
        "evaluate": {"where": "server", "every": 1},
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": 10_000, "lr": 0.3, "delay_s": 0.2}},
        "nodes": [{"id": "aggregator", "role": "aggregator"},
                  {"id": "ckpt", "role": "checkpointer"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "aggregator"},
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _redis_server(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """A redis-server of our own on ``port`` (no persistence), once it accepts connections."""
    import socket

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (the `redis` victim needs it)")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.02)  # a harness start-up poll, bounded


def _serve(manifest: Path, node: str, log: Path, cwd: Path) -> Child:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedbus.cli", "serve", str(manifest), "--node", node,
             "--log-json"], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=out, env={**_env(), "PYTHONPATH": str(REPO)})
    return Child(node, proc)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _final_metrics(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Every finished round's (round, loss, distance), the last report of each round winning
    (a round the killed aggregator finished is finished again by its successor)."""
    rounds: dict[int, tuple[Any, ...]] = {}
    for e in events:
        if e.get("event") in ("round_finished", "version_finished"):
            rounds[int(e["round"])] = (e["round"], e.get("loss"), e.get("distance"))
    return [rounds[r] for r in sorted(rounds)]


def _rounds_started(log: Path) -> int:
    try:
        text = log.read_text(errors="replace")
        # synchronous rounds start; asynchronous model versions finish
        return text.count('"event": "round_started"') + text.count('"event": "version_finished"')
    except OSError:
        return 0


def _ts(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


async def one_run(folder: Path, strategy: str, rounds: int, kill_at: tuple[int, float] | None,
                  *, standby: bool = False, victim: str = "aggregator",
                  ) -> tuple[list[tuple[Any, ...]], Trial | None, float]:
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local temp folder
    standby = standby or victim == "standby"
    proc = await spawn_mosquitto()
    brokers = [proc]
    children: list[Child] = []
    redis: list[subprocess.Popen[bytes]] = []
    redis_port = free_port() if victim == "redis" else 0
    log = folder / "aggregator.log"
    try:
        if redis_port:  # the checkpointer keeps checkpoints in Redis, backed by its disk
            redis.append(_redis_server(redis_port, folder))
        path = write_manifest(folder, proc.host, proc.port, strategy, rounds,
                              f"redis://127.0.0.1:{redis_port}/0" if redis_port else None)
        others = {"ckpt": _serve(path, "ckpt", folder / "ckpt.log", folder),
                  "t*": _serve(path, "t*", folder / "trainers.log", folder)}
        children += others.values()
        started = time.monotonic()
        agg = _serve(path, "aggregator", log, folder)
        children.append(agg)
        killed = False
        killed_at_wall = 0.0
        standby_log = folder / "standby.log"
        if standby:
            # a second instance, started once the first is active: it waits as a standby
            while agg.proc.poll() is None and _rounds_started(log) < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polling a child's log: no event to await
            children.append(_serve(path, "aggregator", standby_log, folder))
        if kill_at is not None:
            # kill once round `kill_at[0]` has started, `kill_at[1]` seconds into it
            while agg.proc.poll() is None and _rounds_started(log) < kill_at[0]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polling a child's log: no event to await
            await asyncio.sleep(kill_at[1])
            if victim != "aggregator" and agg.proc.poll() is None:
                # another component dies -9 and comes back; the aggregator lives on
                killed = True
                if victim == "broker":
                    brokers[-1].kill_now()  # SIGKILL; no persistence: its queues are gone
                    brokers.append(await spawn_mosquitto(proc.port))
                elif victim == "redis":  # SIGKILL; back empty (no persistence) a second later
                    redis[-1].kill()
                    redis[-1].wait(10)
                    await asyncio.sleep(1.0)
                    redis.append(_redis_server(redis_port, folder))
                elif victim == "standby":  # the waiting instance dies and is started again
                    children[-1].proc.kill()
                    children[-1].reap(10)
                    children.append(_serve(path, "aggregator", standby_log, folder))
                else:
                    node = {"checkpointer": "ckpt", "trainers": "t*"}[victim]
                    others[node].proc.kill()
                    others[node].reap(10)
                    name = "ckpt" if node == "ckpt" else "trainers"
                    others[node] = _serve(path, node, folder / f"{name}.log", folder)
                    children.append(others[node])
            elif agg.proc.poll() is None:
                agg.proc.kill()  # SIGKILL: no goodbye, the broker fires its will
                killed_at_wall = time.time()
                agg.reap(10)
                killed = True
                if standby:
                    agg = children[-1]  # nobody types a command: the standby takes over
                    log = standby_log
                else:
                    agg = _serve(path, "aggregator", log, folder)
                    children.append(agg)
        while agg.proc.poll() is None:
            if time.monotonic() - started > 300:
                raise TimeoutError("the job did not finish in 300 s")
            await asyncio.sleep(0.05)  # polling a child's exit: no event to await
        elapsed = time.monotonic() - started
    finally:
        for child in children:
            child.stop()
        for b in brokers:
            await b.stop()
        for r in redis:
            r.kill()
            r.wait(10)
    events = _events(folder / "aggregator.log")
    if standby and standby_log.exists():
        events += _events(standby_log)
    trial = None
    if kill_at is not None:
        restored = [e for e in events if e.get("event") == "restored"]
        failover = None
        if standby and killed:
            after = [_ts(e) for e in _events(standby_log) if e.get("event") == "round_started"]
            failover = after[0] - killed_at_wall if after else None
        finished: dict[int, int] = {}
        for e in events:
            if e.get("event") in ("round_finished", "version_finished"):
                # an asynchronous version folds buffer_size updates, not every trainer
                full = e.get("event") == "version_finished"
                finished[int(e["round"])] = 3 if full else int(e.get("participants", 0))
        trial = Trial(strategy=strategy, kill_in_round=kill_at[0], kill_after_s=kill_at[1],
                      killed=killed, same_model=False, failover_s=failover,
                      rounds_done=len(finished),
                      short_rounds=sum(1 for p in finished.values() if p < 3),
                      resumed_from=restored[-1]["round"] if restored else None,
                      checkpoint_s=[float(e["seconds"]) for e in events
                                    if e.get("event") == "checkpoint_acked"])
    return _final_metrics(events), trial, elapsed


async def chaos(trials: int, strategies: Sequence[str], rounds: int, seed: int, *,
                standby: bool = False, victim: str = "aggregator") -> list[Trial]:
    rng = random.Random(seed)
    out: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="fedbus-chaos-") as tmp:
        for strategy in strategies:
            clean, _, _ = await one_run(Path(tmp) / strategy / "clean", strategy, rounds, None)
            for i in range(trials):
                # a random round, a random moment in it (a round lasts about 0.3 s here)
                kill = (rng.randint(1, rounds), rng.uniform(0.0, 0.35))
                metrics, trial, _ = await one_run(Path(tmp) / strategy / f"trial{i}", strategy,
                                                  rounds, kill, standby=standby, victim=victim)
                trial.victim = victim
                assert trial is not None
                trial.same_model = bool(clean) and metrics == clean
                out.append(trial)
                print(f"{strategy} trial {i}: kill in round {kill[0]} after {kill[1]:.2f} s, "
                      f"killed={trial.killed}, "
                      f"resumed from round {trial.resumed_from}, same model={trial.same_model}",
                      file=sys.stderr, flush=True)
    return out


@dataclass
class TwinTrial:
    """Two instances of the aggregator started at the same instant (fedbus.failover)."""

    #: Seconds from the start to the first instance elected.
    elected_s: float | None
    #: Instances that started a round while the job ran: 1 means one leader, never alternating.
    round_runners: int
    same_model: bool

    def elapsed_text(self) -> str:
        return f"{self.elected_s:.2f} s" if self.elected_s is not None else "never"


async def twin_run(folder: Path, strategy: str, rounds: int) -> tuple[list[tuple[Any, ...]],
                                                                      TwinTrial]:
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a local temp folder
    proc = await spawn_mosquitto()
    children: list[Child] = []
    logs = [folder / "aggregator-a.log", folder / "aggregator-b.log"]
    try:
        path = write_manifest(folder, proc.host, proc.port, strategy, rounds)
        children += [_serve(path, "ckpt", folder / "ckpt.log", folder),
                     _serve(path, "t*", folder / "trainers.log", folder)]
        started = time.time()
        twins = [_serve(path, "aggregator", log, folder) for log in logs]  # the same instant
        children += twins
        deadline = time.monotonic() + 300
        # the job ends when the leader exits; the other then takes over, restores the last
        # round from the checkpointer and ends too
        while any(t.proc.poll() is None for t in twins):
            if time.monotonic() > deadline:
                raise TimeoutError("the twins did not finish in 300 s")
            await asyncio.sleep(0.05)  # polling children's exits: no event to await
    finally:
        for child in children:
            child.stop()
        await proc.stop()
    per_log = [_events(log) for log in logs]
    elected = [_ts(e) for events in per_log for e in events if e.get("event") == "leader_elected"]
    runners = sum(1 for events in per_log
                  if any(e.get("event") == "round_started" for e in events))
    metrics = _final_metrics([e for events in per_log for e in events])
    return metrics, TwinTrial(elapsed(elected, started), runners, same_model=False)


def elapsed(times: list[float], since: float) -> float | None:
    return min(times) - since if times else None


async def twins(trials: int, strategy: str, rounds: int) -> list[TwinTrial]:
    out: list[TwinTrial] = []
    with tempfile.TemporaryDirectory(prefix="fedbus-twins-") as tmp:
        clean, _, _ = await one_run(Path(tmp) / "clean", strategy, rounds, None)
        for i in range(trials):
            metrics, trial = await twin_run(Path(tmp) / f"trial{i}", strategy, rounds)
            trial.same_model = bool(clean) and metrics == clean
            out.append(trial)
            print(f"twins trial {i}: elected after {trial.elapsed_text()}, "
                  f"instances that ran rounds: {trial.round_runners}, "
                  f"same model={trial.same_model}", file=sys.stderr, flush=True)
    return out


def table(trials: list[Trial]) -> str:
    lines = ["| strategy | SIGKILL of | trial | in round | s into it | resumed after round | "
             "rounds with < 3 trainers | same final model |",
             "|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(trials):
        lines.append(f"| {t.strategy} | {t.victim} | {i} | "
                     f"{t.kill_in_round if t.killed else 'ended first'} | "
                     f"{t.kill_after_s:.2f} | "
                     f"{_resumed(t)} | {t.short_rounds} | "
                     f"{'yes' if t.same_model else 'NO'} |")
    fails = sorted(t.failover_s for t in trials if t.failover_s is not None)
    if fails:
        lines.append("")
        lines.append(f"standby took over (SIGKILL of the active aggregator to its next round "
                     f"started): median {fails[len(fails) // 2]:.2f} s, max {fails[-1]:.2f} s "
                     f"({len(fails)} failovers)")
    acks = [s for t in trials for s in t.checkpoint_s]
    if acks:
        acks.sort()
        lines.append("")
        lines.append(f"checkpoint acknowledged in median {acks[len(acks) // 2] * 1000:.1f} ms, "
                     f"max {acks[-1] * 1000:.1f} ms ({len(acks)} checkpoints, 10,000 params)")
    return "\n".join(lines)


def _resumed(t: Trial) -> str:
    if t.victim != "aggregator":
        return "- (it lived on)"
    return str(t.resumed_from) if t.resumed_from is not None else "none (fresh start)"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_chaos",
                                description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--strategy", action="append", choices=sorted(STRATEGIES))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--victim", default="aggregator",
                   choices=("aggregator", "checkpointer", "trainers", "broker", "redis",
                            "standby"),
                   help="what to SIGKILL and restart (the broker and redis: without "
                        "persistence; standby: the waiting aggregator, the active one lives)")
    p.add_argument("--standby", action="store_true",
                   help="run a standby aggregator that takes over (no restart by the harness)")
    p.add_argument("--twins", action="store_true",
                   help="start two aggregator instances at the same instant, kill nothing")
    args = p.parse_args(argv)
    configure_logging(level="error")
    if args.twins:
        runs = asyncio.run(twins(args.trials, (args.strategy or ["fedavg"])[0], args.rounds))
        print("| trial | first leader elected after | instances that ran rounds | "
              "same final model |\n|---|---|---|---|")
        for i, t in enumerate(runs):
            print(f"| {i} | {t.elapsed_text()} | {t.round_runners} | "
                  f"{'yes' if t.same_model else 'NO'} |")
        return 0 if all(t.same_model and t.round_runners == 1 for t in runs) else 1
    trials = asyncio.run(chaos(args.trials, args.strategy or ["fedavg", "fedadam"],
                               args.rounds, args.seed, standby=args.standby,
                               victim=args.victim))
    print(table(trials))
    # a round that ran without a dead trainer legitimately changes the model
    return 0 if all(t.same_model or t.short_rounds for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
