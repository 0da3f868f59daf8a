"""Simulation at scale: rounds/s and peak memory of virtual-client populations.

    .venv/bin/python -m benchmarks.bench_sim              # 1,000 and 10,000 clients + digits CNN
    .venv/bin/python -m benchmarks.bench_sim --quick      # small smoke run
    .venv/bin/python -m benchmarks.bench_sim --baseline   # also one Trainer object per client

Every case runs in a fresh subprocess (``--one``), so its peak RSS (``ru_maxrss``) is its own.
Rounds/s counts round time only (the aggregator's per-round seconds, evaluation included);
start-up (building tasks, announcing every client's presence) is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _population_manifest(clients: int, per_round: int, rounds: int, size: int,
                         dropout: float = 0.0) -> dict[str, Any]:
    return {
        "version": 1, "job": "bench", "seed": 0, "rounds": rounds, "strategy": "fedavg",
        "round": {"quorum": 0.9}, "evaluate": {"where": "server", "every": rounds},
        "task": {"ref": "examples.population.task:make_task", "params": {"size": size}},
        "population": {"clients": clients, "per_round": per_round, "partition": "dirichlet",
                       "speed_sigma": 0.5, "dropout": dropout},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
    }


def _trainers_manifest(clients: int, per_round: int, rounds: int, size: int) -> dict[str, Any]:
    """The pre-simulation way: one Trainer object (and task, and model) per client."""
    return {
        "version": 1, "job": "bench", "seed": 0, "rounds": rounds, "strategy": "fedavg",
        "selector": {"name": "random", "params": {"count": per_round}},
        "round": {"min_clients": clients, "deadline_s": 600},
        "evaluate": {"where": "server", "every": rounds},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": size}},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
        "trainers": {"count": clients, "prefix": "t"},
    }


async def _run_one(case: dict[str, Any]) -> dict[str, Any]:
    import yaml

    from fedbus.log import configure_logging
    from fedbus.manifest import parse_manifest

    configure_logging(json=False, level="error")
    started = time.perf_counter()
    rss_before = _rss_mb()
    kind = case["kind"]
    if kind == "digits":
        data = yaml.safe_load((ROOT / "examples/digits_sim/manifest.yaml").read_text())
        data["rounds"] = case["rounds"]
        data["population"]["clients"] = case["clients"]
        m = parse_manifest(data, str(ROOT / "examples/digits_sim/manifest.yaml"))
    elif kind == "population":
        m = parse_manifest(_population_manifest(case["clients"], case["per_round"],
                                                case["rounds"], case["size"],
                                                case.get("dropout", 0.0)))
    else:
        m = parse_manifest(_trainers_manifest(case["clients"], case["per_round"],
                                              case["rounds"], case["size"]))
    if kind == "trainers":
        import tempfile

        from fedbus.runner import RunOptions, run_federation
        from fedbus.runs import find_run

        with tempfile.TemporaryDirectory(prefix="bench-sim-") as root, \
                contextlib.redirect_stdout(io.StringIO()):
            opts = RunOptions(memory=True, runs_root=Path(root), display="none")
            await run_federation(m, opts, None)
            rows = find_run(m.job, Path(root)).metrics
        # The run folder's metrics.jsonl: one row a round, with its seconds.
        seconds = sum(float(r["seconds"]) for r in rows)
        final = {"rounds_done": len(rows)}
    else:
        from fedbus.sim import run_simulation

        result = await run_simulation(m, workers=case["workers"])
        history = result.history
        seconds = sum(r.seconds for r in history)
        last = history[-1].eval
        final = {} if last is None else {"loss": last.loss, **dict(last.metrics)}
        final["updates"] = result.stats.updates
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**case, "total_s": round(total, 2), "round_s": round(seconds, 3),
            "rounds_per_s": round(case["rounds"] / seconds, 2) if seconds == seconds else None,
            "startup_s": round(total - seconds, 2) if seconds == seconds else None,
            "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak, 1),
            "final": final}


def _cases(quick: bool, baseline: bool) -> list[dict[str, Any]]:
    rounds = 3 if quick else 20
    pops = (200, 2000) if quick else (1000, 10_000)
    per_round = 20 if quick else 100
    cases: list[dict[str, Any]] = [
        {"kind": "population", "clients": n, "per_round": per_round, "rounds": rounds,
         "size": 1000, "workers": 2} for n in pops]
    # Dropouts are announced as the client going offline; the aggregator then keeps a round
    # open LOSS_GRACE_S (0.5 s) after the last loss, which dominates a 40 ms round.
    cases.append({**cases[-1], "dropout": 0.02})
    cases += [{"kind": "digits", "clients": n, "per_round": 50, "rounds": 5 if quick else 40,
               "workers": 2} for n in ((1000,) if quick else (1000, 10_000))]
    if baseline:
        cases.append({"kind": "trainers", "clients": 200 if quick else 1000,
                      "per_round": per_round, "rounds": 3 if quick else 5, "size": 1000})
    return cases


def _table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| case | clients | per round | rounds | rounds/s | start-up s | total s | "
             "RSS before run MB | peak RSS MB | final |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        final = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r["final"].items())
        kind = r["kind"] + (f" (dropout {r['dropout']:g})" if r.get("dropout") else "")
        lines.append(f"| {kind} | {r['clients']} | {r['per_round']} | {r['rounds']} | "
                     f"{r['rounds_per_s'] if r['rounds_per_s'] is not None else '-'} | "
                     f"{r['startup_s'] if r['startup_s'] is not None else '-'} | "
                     f"{r['total_s']} | {r['rss_before_mb']} | {r['peak_rss_mb']} | {final} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sim",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--baseline", action="store_true",
                   help="also run one Trainer object per client (the pre-simulation way)")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(_run_one(json.loads(args.one)))))
        return 0
    rows = []
    for case in _cases(args.quick, args.baseline):
        print(f"running {case}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_sim", "--one",
                              json.dumps(case)], cwd=ROOT, capture_output=True, text=True,
                             timeout=3600, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    pairs = [[r for r in rows if r["kind"] == kind and not r.get("dropout")]
             for kind in ("population", "digits")]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(_table(rows))
    for pair in pairs:
        if len(pair) == 2:
            a, b = pair
            print(f"\n{a['kind']}: peak RSS {b['clients']} vs {a['clients']} clients: "
                  f"{b['peak_rss_mb'] / a['peak_rss_mb'] - 1:+.1%} "
                  f"({b['peak_rss_mb'] - a['peak_rss_mb']:+.1f} MB)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
