"""The store over a real mosquitto: chunked updates that go through the upload gate reach it
(published after the grant on the same topic), and queries are answered over MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedbus import topics
from fedbus.broker import MosquittoProcess
from fedbus.connect import make_bus
from fedbus.manifest import NodeSpec, parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.store import query as q
from tests.store.mqtt_federation import cancelled, store_federation

pytestmark = [pytest.mark.broker]

ROOT = Path(__file__).resolve().parents[2]
SIZE = 300_000  # 1.2 MB float32 updates: above the 1 MB chunk size, so they use the gate


async def test_gated_updates_reach_the_store_and_queries_work_over_mqtt(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    # Prepare
    m = parse_manifest({
        "version": 1, "job": "toy", "rounds": 2, "seed": 1, "strategy": "fedavg",
        "broker": {"host": mosquitto.host, "port": mosquitto.port},
        "codec": {"level": 0},
        "round": {"deadline_s": 30, "min_clients": 3, "start_timeout_s": 30, "max_uploads": 1},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": SIZE, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp_path / "store"), "sketch_dim": 256, "exit_on_done": False,
                  "full_update_rounds": 3},
    })
    # Execute
    async with store_federation(m, ("t0", "t1", "t2")) as run:
        agg, store = run.agg, run.store
        async with asyncio.timeout(120):
            await agg.run()
        async with asyncio.timeout(60), store.progress:
            await store.progress.wait_for(lambda: store.done.is_set() and not store.backlog)
        async with make_bus(m, NodeSpec(id="asker", role="trainer")) as asker:
            lineage, _ = await q.ask(asker, m, "store", "lineage", {}, 30)
            personal, tensors = await q.ask(asker, m, "store", "personalization",
                                            {"k": 2, "client": "t1"}, 60)
            contribution, _ = await q.ask(asker, m, "store", "contribution",
                                          {"permutations": 4}, 60)
    # Assert: every gated update of both rounds was recorded, and the answers came back
    assert [len(r.accepted) for r in agg.history] == [3, 3]
    assert store.store.rounds() == [1, 2]
    for r in (1, 2):
        clients = store.store.records[r]["clients"]
        assert sorted(clients) == ["t0", "t1", "t2"]
        assert all(c["bytes"] > 1_000_000 for c in clients.values())
    assert lineage["ok"] and lineage["result"]["clients"]["t2"]["rounds"] == [1, 2]
    assert personal["ok"], personal
    assert contribution["ok"], contribution  # online, as `fedbus query` asks a running store
    j = personal["result"]["clusters"]["t1"]
    assert list(tensors) == [f"cluster{j}/w"] and tensors[f"cluster{j}/w"].shape == (SIZE,)
    assert np.isfinite(tensors[f"cluster{j}/w"]).all()


async def test_a_stopped_then_killed_store_process_never_holds_up_a_round(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    # Prepare: the store as its own process (fedbus serve), frozen with SIGSTOP before round 1
    data = {
        "version": 1, "job": "toy", "rounds": 3, "seed": 1, "strategy": "fedavg",
        "broker": {"host": mosquitto.host, "port": mosquitto.port},
        "codec": {"level": 0},
        "round": {"deadline_s": 30, "min_clients": 3, "start_timeout_s": 30},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": SIZE, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": 3, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp_path / "store"), "sketch_dim": 256},
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    m = parse_manifest(data)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedbus.cli", "serve", str(path), "--node", "store", cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buses = {n: make_bus(m, m.node(n)) for n in ("agg", "t0", "t1", "t2")}
    services: dict[str, Any] = {n: build_node(m, n, bus) for n, bus in buses.items()}
    agg: Aggregator = services["agg"]
    tasks = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            for bus in buses.values():
                await stack.enter_async_context(bus)
            async with buses["agg"].subscribe(topics.presence("toy", "store")) as presence:
                await presence.get(timeout=60)  # online: subscribed
            os.kill(proc.pid, signal.SIGSTOP)
            # Execute: three rounds; the frozen store is killed once round 1 is over
            tasks = [asyncio.create_task(services[t].run()) for t in ("t0", "t1", "t2")]
            run = asyncio.create_task(agg.run())
            async with asyncio.timeout(120):
                first = await agg.reports.get()
                os.kill(proc.pid, signal.SIGKILL)
                await run
    finally:
        await cancelled(tasks)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            await proc.wait()
    # Assert: every round aggregated every trainer, with the store frozen and then dead
    assert first.round == 1 and proc.returncode == -signal.SIGKILL
    assert [(r.aggregated, len(r.accepted)) for r in agg.history] == [(True, 3)] * 3
