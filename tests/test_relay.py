"""Relays: a two-level hierarchy gives the flat star's model; a relay's death drops its group."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation import connect, federate, run_root
from spies import assert_follows_wiring, spy_buses

from fedbus.bus.memory import MemoryBroker
from fedbus.compress import UpdateCodec
from fedbus.connect import make_bus
from fedbus.errors import ManifestError
from fedbus.manifest import Manifest, compile_wiring, parse_manifest
from fedbus.node import build_node
from fedbus.services.aggregator import Aggregator
from fedbus.services.relay import Relay

ROOT = Path(__file__).resolve().parents[1]
TASK = {"ref": "examples.toy.task:make_task", "params": {"size": 64, "lr": 0.4}}


def flat(rounds: int = 3) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 9, "task": TASK,
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 4, "start_timeout_s": 10},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  *({"id": f"t{i}", "role": "trainer", "partition": i} for i in range(4))],
    })


def tree(rounds: int = 3) -> Manifest:
    return parse_manifest({
        "version": 1, "job": "toy", "rounds": rounds, "seed": 9, "task": TASK,
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 2, "start_timeout_s": 10},
        "nodes": [{"id": "agg", "role": "aggregator"},
                  {"id": "r0", "role": "relay"}, {"id": "r1", "role": "relay", "parent": "agg"},
                  {"id": "t0", "role": "trainer", "parent": "r0", "partition": 0},
                  {"id": "t1", "role": "trainer", "parent": "r0", "partition": 1},
                  {"id": "t2", "role": "trainer", "parent": "r1", "partition": 2},
                  {"id": "t3", "role": "trainer", "parent": "r1", "partition": 3}],
    })


async def run(m: Manifest) -> tuple[Aggregator, dict[str, Any]]:
    return await run_root(await connect(m, MemoryBroker()))


async def test_a_two_level_hierarchy_gives_the_flat_stars_model() -> None:
    # Prepare / Execute: the same four trainers, flat and under two relays
    star, _ = await run(flat())
    hier, services = await run(tree())
    # Assert: FedAvg of FedAvgs weighted by examples is FedAvg (to float rounding)
    np.testing.assert_allclose(hier.weights["w"], star.weights["w"], rtol=1e-5, atol=1e-6)
    assert [sorted(r.accepted) for r in hier.history] == [["r0", "r1"]] * 3
    relay = services["r0"]
    assert isinstance(relay, Relay)
    assert [sorted(r.accepted) for r in relay.history] == [["t0", "t1"]] * 3
    # each relay reported its group's examples upward (10 + 15 for r0 in the toy task)
    assert relay.history[0].examples == 25


def test_relays_are_wired_like_aggregators_below_and_trainers_above() -> None:
    w = compile_wiring(tree())
    assert "fedbus/v1/toy/update/r0/+" in w["r0"].subscribe
    assert "fedbus/v1/toy/model/agg" in w["r0"].subscribe
    assert "fedbus/v1/toy/update/agg/r0" in w["r0"].publish
    assert "fedbus/v1/toy/model/r0" in w["r0"].publish
    assert "fedbus/v1/toy/model/r0" in w["t0"].subscribe


@pytest.mark.parametrize(("nodes", "field"), [
    ([{"id": "r0", "role": "relay", "parent": "t0"}], "nodes[1].parent"),
    ([{"id": "r0", "role": "relay", "parent": "r1"},
      {"id": "r1", "role": "relay", "parent": "r0"}], "nodes[1].parent"),
    ([{"id": "r0", "role": "relay", "partition": 1}], "nodes[1].partition"),
])
def test_bad_relays_are_refused_by_field(nodes: list[dict[str, Any]], field: str) -> None:
    data = {"version": 1, "job": "toy", "rounds": 1, "task": TASK,
            "nodes": [{"id": "agg", "role": "aggregator"}, *nodes,
                      {"id": "t0", "role": "trainer"}]}
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    assert err.value.field == field, err.value


async def test_a_relay_subscribes_and_publishes_exactly_what_the_wiring_says() -> None:
    m = tree(rounds=2)
    spies, spy = spy_buses(m, MemoryBroker())
    await federate(m, spy, timeout=30)
    assert_follows_wiring(m, spies, ("r0", "r1", "t0", "agg"))


@pytest.mark.broker
def test_the_hierarchy_example_runs_over_mosquitto_to_the_stars_result() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def final(manifest: str) -> str:
        out = subprocess.run([sys.executable, "-m", "fedbus.cli", "run", manifest,
                              "--no-record"], cwd=root, capture_output=True, text=True,
                             timeout=120, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert final("examples/toy/hierarchy-manifest.yaml") == final("examples/toy/manifest.yaml")


async def test_a_dead_relay_drops_its_group_at_once_and_it_rejoins() -> None:
    # Prepare: the tree, quorum 0.5 so the root can finish a round with one relay
    base = tree(rounds=4)
    m = parse_manifest({
        "version": 1, "job": "toy", "rounds": 4, "seed": 9,
        "task": {"ref": "examples.toy.task:make_task",
                 "params": {"size": 64, "lr": 0.4, "delay_s": 0.1}},
        "round": {"deadline_s": 10, "quorum": 0.5, "min_clients": 2, "start_timeout_s": 10},
        "nodes": [{"id": n.id, "role": n.role, "parent": n.parent,
                   **({"partition": n.partition} if n.partition is not None else {})}
                  for n in base.nodes],
    })
    broker = MemoryBroker()
    buses = {n.id: make_bus(m, n, memory=broker) for n in m.nodes}
    for b in buses.values():
        await b.__aenter__()
    services = {i: build_node(m, i, b) for i, b in buses.items()}
    agg = services.pop("agg")
    killed_at: list[float] = []

    async def kill_r1_in_round_2() -> None:
        await agg.reports.get()  # round 1 is over
        await asyncio.sleep(0.05)  # into round 2
        tasks["r1"].cancel()
        await buses["r1"].kill()  # its will fires: the root drops r1's group at once
        killed_at.append(asyncio.get_running_loop().time())
        await agg.reports.get()  # restart it once round 2 is over
        bus = make_bus(m, m.node("r1"), memory=broker)
        await bus.__aenter__()
        tasks["r1"] = asyncio.create_task(build_node(m, "r1", bus).run())

    # Execute
    async with asyncio.timeout(60):
        tasks = {i: asyncio.create_task(s.run(), name=i) for i, s in services.items()}
        killer = asyncio.create_task(kill_r1_in_round_2())
        await agg.run()
        await killer
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    # Assert: round 2 lost r1 (and with it t2, t3) without waiting for the deadline; the
    # restarted relay took part again later
    second = agg.history[1]
    assert second.lost == ["r1"] and second.accepted == ["r0"]
    assert second.seconds < 5
    assert "r1" in agg.history[-1].accepted


# --- a relay's own group strategy --------------------------------------------------------

def with_group_strategy(m: Manifest, relay: str, strategy: dict[str, Any]) -> Manifest:
    nodes = [{"id": n.id, "role": n.role, "parent": n.parent,
              **({"partition": n.partition} if n.partition is not None else {}),
              **({"strategy": strategy} if n.id == relay else {})} for n in m.nodes]
    return parse_manifest({
        "version": 1, "job": m.job, "rounds": m.rounds, "seed": m.seed, "task": TASK,
        "round": {"deadline_s": 10, "quorum": 1.0, "min_clients": 2, "start_timeout_s": 10},
        "nodes": nodes,
    })


async def test_a_relay_folds_its_group_with_its_own_strategy() -> None:
    # Prepare: r0 folds t0, t1 with server momentum (FedAvgM); r1 and the root use FedAvg
    beta, eta = 0.5, 1.5
    m = with_group_strategy(tree(rounds=3), "r0",
                            {"name": "fedavgm", "params": {"momentum": beta, "server_lr": eta}})
    from examples.toy.task import make_task
    tasks = [make_task(partition=i, num_partitions=4, seed=9, size=64) for i in range(4)]
    t = np.stack([task.target for task in tasks]).astype(np.float64)
    n = np.array([task.num_examples for task in tasks], dtype=np.float64)
    # Execute
    hier, services = await run(m)
    # Assert: the model computed by hand, round by round. A trainer's delta is lr (t_i - w);
    # r0 sends w' - w of its momentum step, r1 its FedAvg; the root weighs both by examples.
    lr, w, v = 0.4, np.zeros(64), np.zeros(64)
    for _ in range(3):
        delta = lr * (t - w)
        v = beta * v + (n[0] * delta[0] + n[1] * delta[1]) / (n[0] + n[1])
        group0 = eta * v
        group1 = (n[2] * delta[2] + n[3] * delta[3]) / (n[2] + n[3])
        w = w + ((n[0] + n[1]) * group0 + (n[2] + n[3]) * group1) / n.sum()
    np.testing.assert_allclose(hier.weights["w"], w, rtol=1e-4, atol=1e-5)
    assert services["r0"].group.strategy.name == "fedavgm"
    assert [r.examples for r in hier.history] == [70, 70, 70]  # 10 + 15 + 20 + 25


async def test_fedavg_relays_named_explicitly_still_give_the_stars_model() -> None:
    # Prepare / Execute: both relays say `strategy: fedavg`
    m = with_group_strategy(with_group_strategy(tree(), "r0", {"name": "fedavg"}),
                            "r1", {"name": "fedavg"})
    star, _ = await run(flat())
    hier, _ = await run(m)
    # Assert
    np.testing.assert_allclose(hier.weights["w"], star.weights["w"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("node", "strategy", "root", "says"), [
    ({"id": "t9", "role": "trainer"}, "fedavgm", "fedavg", "only a relay"),
    ({"id": "r9", "role": "relay"}, "fedbuff", "fedavg", "asynchronous"),
    ({"id": "r9", "role": "relay"}, "fedavgm", "fedbuff", "forwards every update"),
    ({"id": "r9", "role": "relay"}, "nosuch", "fedavg", "nosuch"),
    ({"id": "r9", "role": "relay"}, {"name": "scaffold", "params": {"num_clients": 1}},
     "fedavg", "extra tensors"),
])
def test_group_strategies_are_checked_by_field(node: dict[str, Any], strategy: Any, root: str,
                                               says: str) -> None:
    data = {"version": 1, "job": "toy", "rounds": 1, "task": TASK, "strategy": root,
            "nodes": [{"id": "agg", "role": "aggregator"}, {**node, "strategy": strategy},
                      {"id": "t0", "role": "trainer"}]}
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    assert err.value.field.startswith("nodes[1].strategy"), err.value
    assert says in str(err.value)


async def test_a_late_trainer_under_a_relay_joins_a_later_round_with_the_current_model() -> None:
    # Prepare: t3 starts only after round 2; its relay waits 1 s for it, then goes on
    base = tree(rounds=5)
    m = parse_manifest({
        "version": 1, "job": "toy", "rounds": 5, "seed": 9, "task": TASK,
        "round": {"deadline_s": 10, "quorum": 0.5, "min_clients": 2, "start_timeout_s": 1},
        "nodes": [{"id": n.id, "role": n.role, "parent": n.parent,
                   **({"partition": n.partition} if n.partition is not None else {})}
                  for n in base.nodes],
    })
    broker = MemoryBroker()
    services = await connect(m, broker, skip=("t3",))
    agg = services.pop("agg")
    late: list[asyncio.Task[Any]] = []

    async def start_t3_after_round_2() -> None:
        for _ in range(2):
            await agg.reports.get()
        bus = make_bus(m, m.node("t3"), memory=broker)
        await bus.__aenter__()
        late.append(asyncio.create_task(build_node(m, "t3", bus).run()))

    # Execute
    async with asyncio.timeout(30):
        tasks = [asyncio.create_task(s.run()) for s in services.values()]
        starter = asyncio.create_task(start_t3_after_round_2())
        await agg.run()
        await starter
        for t in tasks + late:
            t.cancel()
        await asyncio.gather(*tasks, *late, return_exceptions=True)
    # Assert: r1 went on without t3 (not stopped by it), and t3 took part once it was there
    r1 = services["r1"]
    assert r1.history[0].accepted == ["t2"]
    assert ["t2", "t3"] in [sorted(r.accepted) for r in r1.history[2:]]
    assert all(sorted(r.accepted) == ["r0", "r1"] for r in agg.history)


async def test_relays_decode_a_compressed_broadcast_and_compress_their_own() -> None:
    # Prepare: codec.model int8 for the root and the relays alike
    exact, _ = await run(tree())
    m = tree()
    m = dataclasses.replace(m, codec=dataclasses.replace(m.codec, model=UpdateCodec(
        mode="int8", stochastic=False)))
    # Execute
    lossy, services = await run(m)
    # Assert: every level trained every round from the int8 view, close to the exact run
    assert [sorted(r.accepted) for r in lossy.history] == [["r0", "r1"]] * 3
    assert all(s.rejections.total == 0 for s in services.values()
               if hasattr(s, "rejections"))
    scale = float(np.abs(exact.weights["w"]).max())
    np.testing.assert_allclose(lossy.weights["w"], exact.weights["w"], rtol=0,
                               atol=0.02 * scale)


@pytest.mark.broker
@pytest.mark.slow
def test_ten_relays_of_a_hundred_trainers_in_one_process_complete_their_rounds(
        tmp_path: Path) -> None:
    # Prepare: 1,011 nodes, each on its own MQTT connection to `fedbus run`'s private
    # mosquitto. Six or more relays in one process used to deadlock: each held one of
    # asyncio's worker threads for its group's whole round, and the trainers starved.
    import subprocess
    import sys

    import yaml

    nodes: list[dict[str, Any]] = [{"id": "agg", "role": "aggregator"}]
    for r in range(10):
        nodes.append({"id": f"relay-{r}", "role": "relay", "parent": "agg"})
        nodes += [{"id": f"t{r * 100 + t}", "role": "trainer", "parent": f"relay-{r}",
                   "partition": r * 100 + t} for t in range(100)]
    path = tmp_path / "hierarchy.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "job": "h10", "rounds": 2, "seed": 1, "strategy": "fedavg",
        "round": {"deadline_s": 240, "quorum": 1.0, "min_clients": 10},
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 64}},
        "nodes": nodes}))
    # Execute
    done = subprocess.run([sys.executable, "-m", "fedbus.cli", "run", str(path),
                           "--runs-dir", str(tmp_path / "runs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    # Assert: both rounds aggregated every relay's group of 100
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [ln for ln in done.stdout.splitlines() if ln.startswith("round")]
    assert len(rounds) == 2 and all("participants 10/10" in ln for ln in rounds), rounds
    assert done.stdout.splitlines()[-1].startswith("final loss=")
