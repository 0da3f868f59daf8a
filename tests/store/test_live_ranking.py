"""The ranked selector asks the store for a fresh ranking before every round, and a store
that is slow or absent costs a round at most the selector's timeout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from federation import connect, run_all

from fedbus import topics
from fedbus.bus.memory import MemoryBroker
from fedbus.manifest import Manifest, compile_wiring, parse_manifest
from fedbus.services.store import StoreService


def manifest(tmp: Path, rounds: int, timeout_s: float = 5.0) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 3, "strategy": "fedavg",
        "selector": {"name": "ranked", "params": {
            "store": "store", "num_clients": 2, "explore": 0.0, "by": "similarity",
            "window": 2, "timeout_s": timeout_s}},
        "round": {"deadline_s": 10, "min_clients": 4, "start_timeout_s": 10},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 32, "lr": 0.5}},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": 4, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp / "store"), "sketch_dim": 64, "precompute": False},
    })


async def run(m: Manifest, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    services = await connect(m, MemoryBroker(), skip=skip)
    await run_all(services)
    return services


async def test_each_round_is_selected_by_the_stores_latest_ranking(tmp_path: Path) -> None:
    # Prepare
    m = manifest(tmp_path, rounds=5)
    # Execute
    services = await run(m)
    agg, store = services["agg"], services["store"]
    assert isinstance(store, StoreService)
    # Assert: from round 3 on (round r-2 is the newest closed round when round r is
    # selected: a round closes when the next model shows its result) the selector ranks by
    # the store's answer, and the round's selection is that ranking's top two
    sel = agg.selector
    assert sel.refreshes == 3 and sel.fallbacks == {"no_ranking": 2}, sel.fallbacks
    expected = (await store.workloads.run("scheduling", {"round": 3, "window": 2})).data
    assert sel.scores == expected["scores"]
    top2 = sorted(c["client"] for c in expected["ranking"][:2])
    assert store.store.records[5]["selected"] == top2
    assert [len(r.accepted) for r in agg.history] == [2] * 5
    # the aggregator's wiring lets it ask (ACLs are generated from it)
    w = compile_wiring(m)["agg"]
    assert topics.reply("toy", "agg") in w.subscribe
    assert topics.query("toy", "store", "agg") in w.publish


async def test_without_a_store_the_rounds_go_on_after_the_timeout(tmp_path: Path) -> None:
    # Prepare: the store never starts
    m = manifest(tmp_path, rounds=3, timeout_s=0.2)
    # Execute
    started = time.monotonic()
    services = await run(m, skip=("store",))
    # Assert: every round ran, each waited for the store once, and that was counted
    agg = services["agg"]
    assert [len(r.accepted) for r in agg.history] == [2, 2, 2]
    assert agg.selector.fallbacks == {"timeout": 3} and agg.selector.refreshes == 0
    assert time.monotonic() - started < 30
