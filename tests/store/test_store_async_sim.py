"""The store records an asynchronous (FedBuff) federation and a simulated population, and its
workloads run on what it recorded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from federation import connect, run_all

from fedbus.bus.memory import MemoryBroker
from fedbus.manifest import parse_manifest
from fedbus.services.store import StoreService
from fedbus.sim import run_simulation
from fedbus.store.repository import Retention, RoundStore
from fedbus.store.workloads import Workloads


async def test_an_async_fedbuff_federation_is_recorded_by_model_version(tmp_path: Path) -> None:
    # Prepare: FedBuff over 6 trainers, 3 updates a version, 5 versions
    m = parse_manifest({
        "version": 1, "job": "toy", "rounds": 5, "seed": 3,
        "strategy": {"name": "fedbuff", "params": {"buffer_size": 3}},
        "round": {"deadline_s": 10, "min_clients": 6, "start_timeout_s": 10},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 32, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": 6, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp_path / "store"), "sketch_dim": 64,
                  "full_update_rounds": 10, "precompute": False},
    })
    services = await connect(m, MemoryBroker())
    # Execute
    await run_all(services)
    agg, store = services["agg"], services["store"]
    assert isinstance(store, StoreService)
    records = store.store.records
    scheduling = (await store.workloads.run("scheduling", {"window": 10})).data
    lineage = (await store.workloads.run("lineage", {})).data
    malicious = (await store.workloads.run("malicious", {})).data
    # Assert: every update the aggregator applied is filed under the version it went into
    # (none refused as stale; a fast trainer's second update in one version is counted)
    updates = sum(len(r["clients"]) for r in records.values())
    repeats = store.rejections.counts.get("repeat_in_version", 0)
    assert updates == store.stats["updates"]
    assert updates + repeats >= sum(len(r.accepted) for r in agg.history)
    assert set(store.rejections.counts) <= {"repeat_in_version"}, store.rejections.counts
    clients = [c for r in records.values() for c in r["clients"].values()]
    assert all(c["staleness"] >= 0 and c["base_round"] + c["staleness"] in records
               for c in clients)
    assert sorted(records)[0] == 0  # version 0: the initial model
    chained = [r for r in sorted(records) if records[r]["result_digest"] is not None]
    for r in chained:  # each version's result is the next version's start
        if r + 1 in records:
            assert records[r]["result_digest"] == records[r + 1]["model_digest"]
    assert set(scheduling["scores"]) <= {f"t{i}" for i in range(6)} and scheduling["scores"]
    assert lineage["rounds"] and malicious["clients"]


async def test_a_simulated_population_is_recorded_and_clustered(tmp_path: Path) -> None:
    # Prepare: 40 virtual clients, 8 a round, on the memory bus; the store is only declared:
    # the simulation starts it (as `fedbus run` does) before the first round
    m = parse_manifest({
        "version": 1, "job": "sim", "seed": 3, "rounds": 3, "strategy": "fedavg",
        "evaluate": {"where": "none"},
        "task": {"ref": "examples.population.task:make_task", "params": {"size": 32}},
        "population": {"clients": 40, "per_round": 8},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "store": {"dir": str(tmp_path / "store"), "sketch_dim": 64},
    })

    # Execute
    async with asyncio.timeout(60):
        result = await run_simulation(m, workers=2)

    store = RoundStore(tmp_path / "store", "sim", cache_bytes=8 << 20,
                       retention=Retention(0, 0, 0))
    clusters = (await Workloads(store, None, seed=3).run("clustering", {"k": 2})).data

    # Assert: each round's eight virtual clients on disk, as the aggregator accepted them
    records = store.records
    assert sorted(records) == [1, 2, 3]
    for report in result.history:
        assert sorted(records[report.round]["clients"]) == sorted(report.accepted)
        assert all(c.startswith("client-") for c in records[report.round]["clients"])
        assert "unknown_sender" not in records[report.round]["rejected"]
    assert set(clusters["clusters"]) == {c for r in records.values() for c in r["clients"]}
