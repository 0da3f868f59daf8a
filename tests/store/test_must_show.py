"""The store's workloads on a small digits federation, checked for meaning: a trainer on
flipped labels is flagged and contributes least; two groups with disjoint labels are found
by clustering, and their cluster models beat the global model on their own data. Each with
the store sent every update (full updates kept) and fed only the aggregator's sketches
(``full_update_rounds: 0``), where the workloads that need full updates say so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation import connect, run_all

from fedbus.bus.memory import MemoryBroker
from fedbus.manifest import Manifest, parse_manifest
from fedbus.services.aggregator import Aggregator
from fedbus.services.store import StoreService
from fedbus.store import StoreError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

TASK = "tests.store.digits_variants:make_task"


FEEDS = pytest.mark.parametrize("full", [2, 0], ids=["updates", "sketches"])


def manifest(tmp: Path, n: int, rounds: int, params: dict[str, Any], full: int = 2,
             ) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "digits", "rounds": rounds, "seed": 1, "strategy": "fedavg",
        "round": {"deadline_s": 30, "min_clients": n, "start_timeout_s": 30},
        "task": {"ref": TASK, "params": params},
        "nodes": [{"id": "agg", "role": "aggregator"}, {"id": "store", "role": "store"}],
        "trainers": {"count": n, "prefix": "t", "parent": "agg"},
        "store": {"dir": str(tmp / "store"), "sketch_dim": 512, "full_update_rounds": full},
    })


async def federate(m: Manifest) -> tuple[Aggregator, StoreService]:
    services = await connect(m, MemoryBroker())
    await run_all(services, timeout=120)
    return services["agg"], services["store"]


@FEEDS
async def test_poisoned_trainer_is_flagged_and_contributes_least(tmp_path: Path,
                                                                full: int) -> None:
    # Prepare: five trainers on an even split; t4 learns on labels 9 - y
    torch.set_num_threads(1)
    m = manifest(tmp_path, n=5, rounds=4,
                 params={"mode": "flip", "poisoned": [4], "epochs": 2, "lr": 0.5}, full=full)
    # Execute
    agg, store = await federate(m)
    flagged = (await store.workloads.run("malicious", {})).data
    similar = (await store.workloads.run("scheduling", {"by": "similarity"})).data
    # Assert
    assert agg.history[-1].eval is not None and agg.history[-1].eval.metrics["accuracy"] > 0.5
    assert flagged["flagged"] == ["t4"], flagged["clients"]
    scores = {c: v["score"] for c, v in flagged["clients"].items()}
    assert max(scores, key=lambda c: scores[c]) == "t4"
    assert similar["ranking"][-1]["client"] == "t4", similar["scores"]  # least like the rest
    if not full:
        with pytest.raises(StoreError, match="full_update_rounds"):
            await store.workloads.run("contribution", {"permutations": 12})
        debug = (await store.workloads.run("debugging", {"round": 4})).data
        assert "sketches only" in debug["note"] and "outliers" in debug
        return
    contribution = (await store.workloads.run("contribution", {"permutations": 12})).data
    assert contribution["lowest"] == "t4", contribution["shapley"]
    assert min(contribution["leave_one_out"], key=lambda c: contribution["leave_one_out"][c]) \
        == "t4"
    assert contribution["tokens"]["t4"] == min(contribution["tokens"].values())
    assert sum(contribution["tokens"].values()) == pytest.approx(100.0, abs=1e-3)


@FEEDS
async def test_clusters_are_the_label_groups_and_personalization_helps(tmp_path: Path,
                                                                      full: int) -> None:
    # Prepare: t0-t2 hold labels 0-4 only, t3-t5 labels 5-9 only
    from tests.store.digits_variants import group_of, make_task

    torch.set_num_threads(1)
    m = manifest(tmp_path, n=6, rounds=3, params={"mode": "groups", "epochs": 2}, full=full)
    # Execute
    agg, store = await federate(m)
    clusters = (await store.workloads.run("clustering", {"k": 2})).data
    # Assert: the clusters are exactly the label groups
    assert sorted(map(sorted, clusters["members"])) == [["t0", "t1", "t2"], ["t3", "t4", "t5"]]
    if not full:
        with pytest.raises(StoreError, match="full_update_rounds"):
            await store.workloads.run("personalization", {"k": 2})
        return
    personal = await store.workloads.run("personalization", {"k": 2, "with_models": True})
    # ...and each group's cluster model beats the global model on every member's local data
    global_w = agg.weights
    for p in range(6):
        local = make_task(partition=p, num_partitions=6, seed=m.seed, mode="groups",
                          local_test=True)
        j = personal.data["clusters"][f"t{p}"]
        cluster_w = {k.split("/", 1)[1]: v for k, v in personal.tensors.items()
                     if k.startswith(f"cluster{j}/")}
        local.set_weights(global_w)
        acc_global = local.evaluate().metrics["accuracy"]
        local.set_weights(cluster_w)
        acc_cluster = local.evaluate().metrics["accuracy"]
        assert acc_cluster > acc_global + 0.05, (p, group_of(p, 6), acc_cluster, acc_global)
    assert np.isfinite(personal.data["silhouette"])
