"""Flower 1.42's legacy gRPC mode training fedbus's digits task (bench_links.py 10:digits).

Runs in Flower's own venv with torch (``bash benchmarks/flower/setup.sh``); the task is
fedbus's ``examples/digits`` MLP, imported from the checkout, so both sides train the same
model from the same initial weights on the same partitions with the same local steps:

    .venv/bin/python digits_flower.py server --port 8080 --clients 10 --rounds 20
    .venv/bin/python digits_flower.py client --port 8080 --clients 10 --partition 3

``server``: ``flwr.server.start_server`` with FedAvg over all N clients every round and a
central evaluation of each round's model on the held-out split (fedbus's ``evaluate: {where:
server, every: 1}``). As each round's evaluation ends it prints ``{"round_finished": R, "t":
seconds since round 1 began, "accuracy": A}`` (a round begins once FedAvg has sampled its
clients: round 1 waits for all N to connect, which fedbus's aggregator does before its
``round_started`` too); last, every round's seconds (from
``configure_fit`` to the end of the evaluation, as fedbus's ``round_finished.seconds``).

``client``: one ``flwr.client.start_client(..., transport="grpc-bidi")`` training partition i
of N, config ``{"round": R, "seed": 0}`` (fedbus's aggregator sends the same). Torch's
threads: as the environment says (bench_links gives both systems ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
#: examples/digits/manifest.yaml's task params
PARAMS = {"epochs": 5, "lr": 0.05, "momentum": 0.9, "batch_size": 32}
SEED = 0


def _task(partition: int | None, clients: int) -> Any:
    sys.path.insert(0, str(ROOT))
    from examples.digits.task import make_task

    return make_task(partition=partition, num_partitions=clients, seed=SEED, **PARAMS)


def serve(host: str, port: int, clients: int, rounds: int, max_workers: int | None) -> int:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import Server, ServerConfig, SimpleClientManager, start_server
    from flwr.server.strategy import FedAvg

    task = _task(None, clients)
    names = list(task.get_weights())
    marks: list[tuple[float, float]] = []
    started: dict[str, float] = {}

    def evaluate(rnd: int, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        if rnd == 0:  # Flower evaluates the initial model before round 1: not timed
            return None
        task.set_weights(dict(zip(names, parameters, strict=True)))
        res = task.evaluate()
        now = time.perf_counter()
        marks.append((started["t"], now))
        acc = float(res.metrics["accuracy"])
        print(json.dumps({"round_finished": rnd, "t": now - started["first"], "accuracy": acc}),
              flush=True)
        return res.loss, {"accuracy": acc}

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            out = super().configure_fit(server_round, parameters, client_manager)
            started["t"] = time.perf_counter()  # sampled: the round's clients are connected
            started.setdefault("first", started["t"])
            return out

    def fit_config(rnd: int) -> dict[str, Any]:
        return {"round": rnd, "seed": SEED}

    init = task.get_weights()
    strategy = TimedFedAvg(
        fraction_fit=1.0, min_fit_clients=clients, min_available_clients=clients,
        fraction_evaluate=0.0, min_evaluate_clients=0, evaluate_fn=evaluate,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters([init[k] for k in names]))
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    server.set_max_workers(max_workers)
    start_server(server_address=f"{host}:{port}", server=server,
                 config=ServerConfig(num_rounds=rounds))
    print(json.dumps({"round_s": [b - a for a, b in marks]}), flush=True)
    return 0 if len(marks) == rounds else 1


def run_client(host: str, port: int, clients: int, partition: int) -> int:
    from flwr.client import NumPyClient, start_client

    task = _task(partition, clients)
    names = list(task.get_weights())

    class Client(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            task.set_weights(dict(zip(names, parameters, strict=True)))
            result = task.fit({"round": int(config["round"]), "seed": int(config["seed"])}, {})
            weights = task.get_weights()
            return [weights[k] for k in names], result.num_examples, {}

    start_client(server_address=f"{host}:{port}", client=Client().to_client(),
                 transport="grpc-bidi", insecure=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("server", "client"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="the server's address to listen on (server) or to connect to (client)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--partition", type=int, default=0, help="client: its partition of N")
    p.add_argument("--max-workers", type=int, default=0,
                   help="server: clients served at once (0: Flower's default, cores + 4)")
    args = p.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if args.role == "server":
        return serve(args.host, args.port, args.clients, args.rounds, args.max_workers or None)
    return run_client(args.host, args.port, args.clients, args.partition)


if __name__ == "__main__":
    sys.exit(main())
