"""Simulation = deployment: the same manifest run with virtual clients and with one trainer
per client gives the same model, because both run one client-side chain (client-side DP,
then ``codec.update``) seeded per (job seed, client, round), never per process."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from federation import federate

from fedbus.bus.memory import MemoryBroker
from fedbus.connect import make_bus
from fedbus.manifest import parse_manifest
from fedbus.sim import run_simulation

CLIENTS = 4
ROUNDS = 3


def _common(strategy: dict[str, Any], codec: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1, "job": "same", "seed": 11, "rounds": ROUNDS,
        "strategy": strategy, "codec": codec,
        "round": {"quorum": 1.0, "deadline_s": 30, "min_clients": CLIENTS},
        "task": {"ref": "examples.population.task:make_task",
                 "params": {"size": 600, "lr": 0.3, "spread": 2.0}},
    }


def simulated(strategy: dict[str, Any], codec: dict[str, Any]) -> np.ndarray:
    data = {**_common(strategy, codec),
            "population": {"clients": CLIENTS, "per_round": CLIENTS, "speed_sigma": 0.0,
                           "prefix": "client-"},
            "nodes": [{"id": "agg", "role": "aggregator"}]}
    result = asyncio.run(run_simulation(parse_manifest(data), workers=2))
    assert len(result.history) == ROUNDS and all(r.aggregated for r in result.history)
    return np.asarray(result.weights["w"])


def deployed(strategy: dict[str, Any], codec: dict[str, Any]) -> np.ndarray:
    data = {**_common(strategy, codec),
            "nodes": [{"id": "agg", "role": "aggregator"}],
            "trainers": {"count": CLIENTS, "prefix": "client-", "parent": "agg"}}
    m = parse_manifest(data)
    broker = MemoryBroker()
    agg = asyncio.run(federate(m, lambda n: make_bus(m, n, memory=broker)))
    assert len(agg.history) == ROUNDS and all(r.aggregated for r in agg.history)
    return np.asarray(agg.weights["w"])


CASES = {
    "none": ({"name": "fedavg"}, {}),
    "int8": ({"name": "fedavg"}, {"update": "int8"}),
    "fp16": ({"name": "fedavg"}, {"update": "fp16"}),
    # top-k keeps each client's unsent residual between rounds: a trainer in memory, a
    # virtual client in its saved state
    "topk": ({"name": "fedavg"}, {"update": {"mode": "topk", "fraction": 0.2}}),
    "client_dp": ({"name": "dp_client", "params": {"strategy": {"name": "fedavg"},
                                                   "noise_multiplier": 0.5,
                                                   "clipping_norm": 5.0}}, {}),
    "client_dp_int8": ({"name": "dp_client", "params": {"strategy": {"name": "fedavg"},
                                                        "noise_multiplier": 0.5,
                                                        "clipping_norm": 5.0}},
                       {"update": "int8"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_simulation_and_deployment_give_the_same_model(case: str) -> None:
    # Prepare
    strategy, codec = CASES[case]
    # Execute
    sim = simulated(strategy, codec)
    dep = deployed(strategy, codec)
    # Assert: equal up to the order updates are summed in (arrival vs client order)
    assert np.abs(sim).max() > 0.1  # the model moved
    np.testing.assert_allclose(sim, dep, rtol=0, atol=1e-6)


def test_a_lossy_codec_changes_the_simulated_model() -> None:
    # The simulation really applies codec.update (it used to send every update lossless).
    plain = simulated(*CASES["none"])
    lossy = simulated(*CASES["int8"])
    assert not np.array_equal(plain, lossy)
    np.testing.assert_allclose(plain, lossy, atol=0.05)
