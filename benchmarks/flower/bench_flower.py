"""fedbus's simulation vs Flower's simulation engine (Ray backend), same task, side by side.

    bash benchmarks/flower/setup.sh                       # once: Flower in its own venv
    .venv/bin/python -m benchmarks.flower.bench_flower    # both runs, then the table

Task: ``examples/digits_sim`` (CNN on sklearn digits, generated non-IID clients) with FedAvg,
the same local training (fedbus's ``TorchTask``: epochs, lr, momentum, batch order seeded by
client and round) and the same initial model on both sides; 1,000 clients, 50 a round, central
evaluation on the held-out split every 5 rounds. Flower's clients keep one task object per Ray
actor and switch its data per client (the cheapest way to host many clients in Flower, and
what fedbus's workers do). Both sides get the 2 cores: Flower two 1-CPU actors, fedbus two
workers. Per-round time is measured from the first round's start to the last round's end.
Both sides train the same clients each round: Flower samples its proxies, and the server tells
each which client's data to train, drawn by fedbus's ``RandomSelector`` with the job seed, so
final accuracies differ only by floating-point order, not by which clients were sampled.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FLOWER_PY = ROOT / "benchmarks/flower/.venv/bin/python"
PARAMS = {"epochs": 2, "lr": 0.1, "momentum": 0.9, "batch_size": 16}
CLIENTS, PER_ROUND, ROUNDS, EVERY, SEED = 1000, 50, 40, 5, 0


def _task(partition: int | None) -> Any:
    from examples.digits_sim.task import make_task

    return make_task(partition=partition, num_partitions=CLIENTS, seed=SEED,
                     partition_scheme="dirichlet", alpha=0.5, **PARAMS)


def run_fedbus() -> dict[str, Any]:
    import asyncio

    from fedbus.log import configure_logging
    from fedbus.manifest import parse_manifest
    from fedbus.sim import run_simulation

    configure_logging(json=False, level="error")
    m = parse_manifest({
        "version": 1, "job": "vsflower", "seed": SEED, "rounds": ROUNDS, "strategy": "fedavg",
        "evaluate": {"where": "server", "every": EVERY},
        "task": {"ref": "examples.digits_sim.task:make_task", "params": PARAMS},
        "population": {"clients": CLIENTS, "per_round": PER_ROUND, "partition": "dirichlet",
                       "alpha": 0.5, "workers": 2},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
    }, str(ROOT / "benchmarks/flower/manifest"))
    started = time.perf_counter()
    result = asyncio.run(run_simulation(m))
    total = time.perf_counter() - started
    rounds_s = sum(r.seconds for r in result.history)
    accs = [(r.round, r.eval.metrics["accuracy"]) for r in result.history if r.eval]
    return {"side": "fedbus", "total_s": total, "round_s": rounds_s / ROUNDS,
            "final_accuracy": accs[-1][1], "accuracy": accs}


# Module level (not closures): Ray pickles the client app and ships it to its actors.
@functools.cache
def _names() -> list[str]:
    return list(_task(None).get_weights())


@functools.cache
def _actor_task() -> Any:
    """One task object per Ray actor process, switched between clients."""
    import torch

    torch.set_num_threads(1)
    return _task(0)


@functools.cache
def _client_class() -> Any:
    import numpy as np
    from flwr.client import NumPyClient

    class Client(NumPyClient):  # type: ignore[misc]
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            task = _actor_task()
            # The server names the data this proxy trains (see _SameClients): the same
            # clients as fedbus's selector picked, whichever proxy Flower sampled.
            task.use_partition(int(config.get("partition", self.partition)))
            names = _names()
            task.set_weights(dict(zip(names, parameters, strict=True)))
            result = task.fit({"round": int(config["round"]), "seed": SEED}, {})
            weights = task.get_weights()
            return [weights[k] for k in names], result.num_examples, {}

    return Client


def run_flower() -> dict[str, Any]:
    import numpy as np
    import torch
    from flwr.client import ClientApp
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    names = _names()

    def client_fn(context: Context) -> Any:
        return _client_class()(int(context.node_config["partition-id"])).to_client()

    server_task = _task(None)
    accs: list[tuple[int, float]] = []
    marks: dict[str, float] = {}

    def evaluate(rnd: int, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        if rnd == 0 or (rnd % EVERY and rnd != ROUNDS):
            return None
        server_task.set_weights(dict(zip(names, parameters, strict=True)))
        res = server_task.evaluate()
        accs.append((rnd, res.metrics["accuracy"]))
        marks["end"] = time.perf_counter()
        return res.loss, {"accuracy": res.metrics["accuracy"]}

    def fit_config(rnd: int) -> dict[str, Any]:
        marks.setdefault("start", time.perf_counter())
        return {"round": rnd}

    from flwr.common import FitIns

    from strategies import RandomSelector

    # fedbus's default population selector with the job seed, over the same sorted ids.
    selector = RandomSelector(count=PER_ROUND, seed=SEED)
    pool = sorted(f"client-{i}" for i in range(CLIENTS))

    class _SameClients(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            pairs = super().configure_fit(server_round, parameters, client_manager)
            picked = selector.select(pool, server_round)
            return [(proxy, FitIns(ins.parameters,
                                   {**ins.config, "partition": int(cid.rsplit("-", 1)[1])}))
                    for (proxy, ins), cid in zip(pairs, picked, strict=True)]

    init = server_task.get_weights()
    strategy = _SameClients(fraction_fit=PER_ROUND / CLIENTS, min_fit_clients=PER_ROUND,
                      fraction_evaluate=0.0, min_evaluate_clients=0,
                      min_available_clients=CLIENTS, evaluate_fn=evaluate,
                      on_fit_config_fn=fit_config,
                      initial_parameters=ndarrays_to_parameters([init[k] for k in names]))

    def server_fn(context: Context) -> Any:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "include_dashboard": False}}
    started = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn),
                   client_app=ClientApp(client_fn=client_fn), num_supernodes=CLIENTS,
                   backend_config=backend)
    total = time.perf_counter() - started
    return {"side": "flower", "total_s": total,
            "round_s": (marks["end"] - marks["start"]) / ROUNDS,
            "final_accuracy": accs[-1][1], "accuracy": accs}


def _peak(cmd: list[str]) -> dict[str, Any]:
    """Run one side in a fresh process; its result is the last stdout line (JSON)."""
    wrapper = ("import json, resource, sys; sys.argv = ['x', '--side', sys.argv[1]]; "
               "from benchmarks.flower.bench_flower import main; main()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # Ray's worker processes import from here
    out = subprocess.run([cmd[0], "-c", wrapper, cmd[1]], cwd=ROOT, capture_output=True,
                         text=True, timeout=3600, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", choices=("fedbus", "flower"))
    args = p.parse_args()
    if args.side:
        import resource

        result = run_fedbus() if args.side == "fedbus" else run_flower()
        # Ray's actors are child processes: count them too for Flower.
        result["peak_rss_mb_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_rss_mb_children"] = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                                          / 1024)
        print(json.dumps(result))
        return 0
    if not FLOWER_PY.exists():
        raise SystemExit("run `bash benchmarks/flower/setup.sh` first")
    rows = [_peak([sys.executable, "fedbus"]), _peak([str(FLOWER_PY), "flower"])]
    print("| engine | s / round | total s | final accuracy | peak RSS MB (main / largest child) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['side']} | {r['round_s']:.3f} | {r['total_s']:.1f} | "
              f"{r['final_accuracy']:.4f} | {r['peak_rss_mb_self']:.0f} / "
              f"{r['peak_rss_mb_children']:.0f} |")
    fb, fl = rows
    print(f"\nFlower / fedbus time per round: {fl['round_s'] / fb['round_s']:.1f}x; accuracy "
          f"difference {100 * (fb['final_accuracy'] - fl['final_accuracy']):+.1f} points")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
