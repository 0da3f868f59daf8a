"""Flower 1.42's legacy gRPC mode on the wire benchmark's workload (run by bench_wire.py).

Runs in Flower's own venv (benchmarks/flower/setup.sh), imports nothing from fedbus:

    .venv/bin/python wire_flower.py server --port 8080 --params 1000000 --clients 10 --rounds 5
    .venv/bin/python wire_flower.py clients --port 8080 --clients 10

``server``: ``flwr.server.start_server`` with FedAvg over all N clients every round, no
evaluation; the model is one float32 vector of P zeros. It prints a JSON line
``{"round_finished": R}`` as each round ends, then one last JSON line: each round's seconds,
from ``configure_fit`` (the server starts sending the model) to the end of ``aggregate_fit``
(the new model is ready), and the total.

``clients``: N ``flwr.client.start_client(..., transport="grpc-bidi")`` in threads of one
process (fedbus's side runs its N trainers in one process too). Trivial training: each client
returns the parameters plus a constant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any

import numpy as np


def serve(host: str, port: int, params: int, clients: int, rounds: int,
          max_workers: int | None = None) -> int:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import Server, ServerConfig, SimpleClientManager, start_server
    from flwr.server.strategy import FedAvg

    marks: list[tuple[float, float]] = []
    started: dict[str, float] = {}

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            started["t"] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed")
            marks.append((started["t"], time.perf_counter()))
            # one line as each round ends: the harness reads the processes' CPU time then
            print(json.dumps({"round_finished": server_round}), flush=True)
            return out

    strategy = TimedFedAvg(
        fraction_fit=1.0, min_fit_clients=clients, min_available_clients=clients,
        fraction_evaluate=0.0, min_evaluate_clients=0,
        initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]))
    # Flower serves a round's clients from a thread pool of max_workers threads; None is
    # Python's default, min(32, cores + 4): 6 on a 2-core machine
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    server.set_max_workers(max_workers)
    t0 = time.perf_counter()
    start_server(server_address=f"{host}:{port}", server=server,
                 config=ServerConfig(num_rounds=rounds))
    total = time.perf_counter() - t0
    print(json.dumps({"round_s": [b - a for a, b in marks], "total_s": total}), flush=True)
    return 0 if len(marks) == rounds else 1


def run_clients(host: str, port: int, clients: int) -> int:
    from flwr.client import NumPyClient, start_client

    class Client(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            return [p + np.float32(0.01) for p in parameters], 1, {}

    errors: list[BaseException] = []

    def one() -> None:
        try:
            start_client(server_address=f"{host}:{port}", client=Client().to_client(),
                         transport="grpc-bidi", insecure=True)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"client failed: {errors[0]!r}", file=sys.stderr)
    return 1 if errors else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("server", "clients"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="the server's address to listen on (server) or to connect to (clients)")
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-workers", type=int, default=0,
                   help="server: clients served at once (0: Flower's default, cores + 4)")
    args = p.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    if args.role == "server":
        return serve(args.host, args.port, args.params, args.clients, args.rounds,
                     args.max_workers or None)
    return run_clients(args.host, args.port, args.clients)


if __name__ == "__main__":
    sys.exit(main())
