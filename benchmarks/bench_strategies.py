"""Strategy benchmark: every built-in strategy on the non-IID digits example, through the real
services on the in-process memory bus (aggregator + 10 trainers, one process).

Run ``python -m benchmarks.bench_strategies`` (``--only fedavg,fedbuff`` for a subset,
``--tune`` to also run the other hyperparameter candidates tried, ``--json PATH`` to keep
the figures). Prints a markdown table; docs/strategies.md holds the last full run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.manifest import parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.services.async_aggregator import AsyncAggregator

SEED = 0
TRAINERS = 10
ROUNDS = 20
ALPHA = 0.5  # Dirichlet concentration of the label split
#: Local training of examples/digits/manifest.yaml (tuned there for FedAvg).
BASE_TASK: dict[str, Any] = {"alpha": ALPHA, "epochs": 5, "lr": 0.05, "momentum": 0.9,
                             "batch_size": 32}
#: SCAFFOLD's and FedDyn's analyses assume plain local SGD; lr 0.2 without momentum makes
#: about the same local progress as lr 0.05 with momentum 0.9 (see the fedavg_sgd baseline).
PLAIN_SGD: dict[str, Any] = {"momentum": 0.0, "lr": 0.2}
#: Seconds each trainer sleeps before a fit in the heterogeneous-speed runs (partition order):
#: two fast, ..., two 10x slower devices.
SPEEDS = (0.02, 0.02, 0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3)
#: Client updates every run gets: 20 synchronous rounds of 10 trainers.
BUDGET = ROUNDS * TRAINERS


@dataclass(frozen=True)
class Case:
    label: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    rounds: int = ROUNDS
    speeds: tuple[float, ...] = ()
    evaluate_every: int = 1
    selector: Any = "all"

    def manifest(self) -> dict[str, Any]:
        task = {**BASE_TASK, **self.task}
        if self.speeds:
            task["speeds"] = list(self.speeds)
        return {
            "version": 1, "job": "bench", "rounds": self.rounds, "seed": SEED,
            "strategy": {"name": self.strategy, "params": self.params},
            "selector": self.selector,
            "round": {"deadline_s": 120, "quorum": 1.0, "min_clients": TRAINERS,
                      "start_timeout_s": 60},
            "evaluate": {"where": "server", "every": self.evaluate_every},
            "task": {"ref": "examples.digits.task:make_task", "params": task},
            "nodes": [{"id": "agg", "role": "aggregator"}],
            "trainers": {"count": TRAINERS, "prefix": "t", "parent": "agg"},
        }


def _dp(name: str, **params: Any) -> tuple[str, dict[str, Any]]:
    return name, {"strategy": {"name": "fedavg"}, "num_sampled_clients": TRAINERS, **params}


CASES: list[Case] = [
    Case("fedavg", "fedavg"),
    Case("fedavgm", "fedavgm", {"server_lr": 1.0, "momentum": 0.9}),
    Case("fedprox", "fedprox", {"proximal_mu": 0.01}),
    Case("fedadam", "fedadam", {"eta": 0.03, "tau": 1e-3}),
    Case("fedyogi", "fedyogi", {"eta": 0.03, "tau": 1e-3}),
    Case("fedadagrad", "fedadagrad", {"eta": 0.1, "tau": 1e-3}),
    Case("fedavg_sgd", "fedavg", task=PLAIN_SGD),
    Case("feddyn", "feddyn", {"num_clients": TRAINERS, "alpha": 0.1}, task=PLAIN_SGD),
    Case("scaffold", "scaffold", {"num_clients": TRAINERS}, task=PLAIN_SGD),
    Case("median", "median"),
    Case("trimmed_mean", "trimmed_mean", {"beta": 0.1}),
    Case("krum", "krum", {"f": 1}),
    Case("multi_krum", "multi_krum", {"f": 1}),
    Case("bulyan", "bulyan", {"f": 1}),
    Case("dp_fixed", *_dp("dp_fixed", noise_multiplier=0.05, clipping_norm=3.0)),
    Case("dp_adaptive", *_dp("dp_adaptive", noise_multiplier=0.05, initial_clipping_norm=1.0,
                             target_clipped_quantile=0.5, clip_norm_lr=0.2)),
    # Heterogeneous device speeds: the synchronous baseline waits for the slowest each round.
    Case("fedavg_hetero", "fedavg", speeds=SPEEDS),
    Case("fedbuff", "fedbuff", {"buffer_size": TRAINERS, "server_lr": 1.0},
         rounds=BUDGET // TRAINERS, speeds=SPEEDS),
    Case("fedbuff_k5", "fedbuff", {"buffer_size": 5, "server_lr": 1.0},
         rounds=BUDGET // 5, speeds=SPEEDS, evaluate_every=2),
    Case("fedasync", "fedasync", {"alpha": 0.3, "staleness": "polynomial", "a": 0.5},
         rounds=BUDGET, speeds=SPEEDS, evaluate_every=TRAINERS),
]

#: Other candidates tried (``--tune`` runs them after the main cases); the main values above
#: are the better of each pair on the same test set (no separate validation split).
TUNE: list[Case] = [
    Case("fedavgm m=0.5", "fedavgm", {"server_lr": 1.0, "momentum": 0.5}),
    Case("fedavgm m=0.5 lr=0.5", "fedavgm", {"server_lr": 0.5, "momentum": 0.5}),
    Case("fedprox mu=0.1", "fedprox", {"proximal_mu": 0.1}),
    Case("fedadam eta=0.01", "fedadam", {"eta": 0.01, "tau": 1e-3}),
    Case("fedadam eta=0.003", "fedadam", {"eta": 0.003, "tau": 1e-3}),
    Case("fedyogi eta=0.01", "fedyogi", {"eta": 0.01, "tau": 1e-3}),
    Case("fedadagrad eta=0.01", "fedadagrad", {"eta": 0.01, "tau": 1e-3}),
    Case("fedadagrad eta=0.03", "fedadagrad", {"eta": 0.03, "tau": 1e-3}),
    Case("feddyn alpha=0.01", "feddyn", {"num_clients": TRAINERS, "alpha": 0.01},
         task=PLAIN_SGD),
    Case("fedavg_sgd lr=0.1", "fedavg", task={"momentum": 0.0, "lr": 0.1}),
    Case("scaffold lr=0.1", "scaffold", {"num_clients": TRAINERS},
         task={"momentum": 0.0, "lr": 0.1}),
    Case("dp_fixed sigma=0.02", *_dp("dp_fixed", noise_multiplier=0.02, clipping_norm=3.0)),
    Case("fedasync alpha=0.6", "fedasync", {"alpha": 0.6},
         rounds=BUDGET, speeds=SPEEDS, evaluate_every=TRAINERS),
    Case("fedasync alpha=0.1", "fedasync", {"alpha": 0.1},
         rounds=BUDGET, speeds=SPEEDS, evaluate_every=TRAINERS),
]


@dataclass
class Result:
    label: str
    strategy: str
    params: dict[str, Any]
    task: dict[str, Any]
    versions: int
    client_updates: int
    final_accuracy: float
    best_accuracy: float
    seconds: float


async def run_case(case: Case) -> Result:
    m = parse_manifest(case.manifest(), f"<bench {case.label}>")
    # Ten trainers each train (or sleep) in a worker thread; the default pool (cores + 4)
    # would queue them and turn heterogeneous speeds into pool contention.
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2 * TRAINERS))
    broker = MemoryBroker()
    async with contextlib.AsyncExitStack() as stack:
        services: dict[str, Any] = {}
        for node in m.nodes:
            bus = await stack.enter_async_context(make_bus(m, node, memory=broker))
            services[node.id] = build_node(m, node.id, bus)
        agg = services["agg"]
        assert isinstance(agg, (Aggregator, AsyncAggregator))
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for node_id, svc in services.items():
                tg.create_task(svc.run(), name=node_id)
        seconds = time.perf_counter() - started
    accs = [r.eval.metrics["accuracy"] for r in agg.history
            if r.eval is not None and "accuracy" in r.eval.metrics]
    if isinstance(agg, AsyncAggregator):
        updates = sum(agg.contributions.values())
    else:
        updates = sum(len(r.accepted) for r in agg.history)
    return Result(case.label, case.strategy, case.params, {**BASE_TASK, **case.task},
                  versions=len(agg.history), client_updates=updates,
                  final_accuracy=accs[-1] if accs else float("nan"),
                  best_accuracy=max(accs) if accs else float("nan"), seconds=seconds)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gb = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as f:
        ram_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": ram_gb,
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def table(results: Sequence[Result]) -> str:
    base = next((r.final_accuracy for r in results if r.label == "fedavg"), None)
    lines = ["| strategy | versions | client updates | final acc | best acc | vs fedavg | "
             "wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        diff = f"{r.final_accuracy - base:+.3f}" if base is not None else ""
        lines.append(f"| {r.label} | {r.versions} | {r.client_updates} | "
                     f"{r.final_accuracy:.4f} | {r.best_accuracy:.4f} | {diff} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated labels to run")
    parser.add_argument("--tune", action="store_true",
                        help="also run the other hyperparameter candidates tried")
    parser.add_argument("--json", help="write the results and the machine to this file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # eleven services share the cores; see fedbus.cli
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    cases = CASES + TUNE if args.tune else CASES
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in CASES + TUNE if c.label in wanted]
    results: list[Result] = []
    for case in cases:
        result = asyncio.run(run_case(case))
        results.append(result)
        print(f"{case.label:>22}: final {result.final_accuracy:.4f} best "
              f"{result.best_accuracy:.4f} in {result.seconds:.1f}s", file=sys.stderr,
              flush=True)
    info = machine()
    print(f"\nmachine: {info}\n")
    print(table(results[: len(CASES)] if args.tune and not args.only else results))
    if args.tune and not args.only:
        print("\nOther candidates tried:\n")
        print(table([results[0], *results[len(CASES):]]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
