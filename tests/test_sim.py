"""Simulation with virtual clients: the real aggregator, a coordinator and a few workers.

Repeatability is the point: a seeded simulation gives bit-identical models run to run and with
any number of workers, synchronous and asynchronous (the virtual clock orders arrivals).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedbus.broker import MosquittoProcess
from fedbus.errors import FedbusError, ManifestError
from fedbus.manifest import Manifest, parse_manifest
from fedbus.services.async_aggregator import AsyncReport
from fedbus.sim import ClientStateStore, Population, run_simulation

ROOT = Path(__file__).resolve().parents[1]


def manifest(strategy: str = "fedavg", params: dict[str, Any] | None = None, *,
             seed: int = 3, rounds: int = 4, **population: Any) -> dict[str, Any]:
    pop = {"clients": 200, "per_round": 12, "speed_sigma": 0.8, **population}
    return {
        "version": 1, "job": "sim", "seed": seed, "rounds": rounds,
        "strategy": {"name": strategy, "params": params or {}},
        "round": {"quorum": 0.5},
        "evaluate": {"where": "server", "every": 2},
        "task": {"ref": "examples.population.task:make_task", "params": {"size": 32}},
        "population": pop,
        "nodes": [{"id": "agg", "role": "aggregator"}],
    }


def run(data: dict[str, Any], workers: int = 1) -> Any:
    return asyncio.run(run_simulation(parse_manifest(data), workers=workers))


STRATEGIES = [
    ("fedavg", {}),
    ("fedadam", {"eta": 0.05}),
    ("fedbuff", {"buffer_size": 4}),
    ("fedasync", {"alpha": 0.6, "staleness": "polynomial"}),
]


@pytest.mark.parametrize(("strategy", "params"), STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_same_seed_gives_bit_identical_models(strategy: str, params: dict[str, Any]) -> None:
    # Prepare: heterogeneous speeds, dropouts and stale updates, so order matters.
    data = manifest(strategy, params, dropout=0.1, stale_prob=0.3)
    # Execute: the same seed with one worker and with two, and another seed.
    one = run(data, workers=1)
    two = run(data, workers=2)
    other = run({**data, "seed": 4}, workers=2)
    # Assert
    assert np.array_equal(one.weights["w"], two.weights["w"])
    assert not np.array_equal(one.weights["w"], other.weights["w"])
    assert one.stats.updates == two.stats.updates > 0
    assert sum(two.worker_items.values()) >= two.stats.updates
    assert all(n > 0 for n in two.worker_items.values())  # both workers took work
    assert one.history[-1].eval is not None and one.history[-1].eval.loss < 1.0


def test_async_arrivals_follow_the_virtual_clock() -> None:
    # Prepare: FedAsync with widely spread speeds and frequent delays.
    data = manifest("fedasync", {"alpha": 0.5}, rounds=30, speed_sigma=1.0, stale_prob=0.5,
                    stale_delay=3.0)
    m = parse_manifest(data)
    population = Population(m.population, m.seed)  # type: ignore[arg-type]
    # Execute
    result = asyncio.run(run_simulation(m, workers=2))
    # Assert: staleness happened, and fast clients delivered more often than slow ones.
    reports = [r for r in result.history if isinstance(r, AsyncReport)]
    assert max(max(r.staleness, default=0) for r in reports) >= 1
    done = [c for r in reports for c in r.accepted]
    speeds = {c: population.speed(population.index(c)) for c in set(done)}
    repeat = [speeds[c] for c in set(done) if done.count(c) > 1]
    once = [speeds[c] for c in set(done) if done.count(c) == 1]
    assert repeat and np.median(repeat) > np.median(once)
    assert result.stats.virtual_time > 0


def test_dropouts_are_lost_for_the_round_and_the_job_goes_on() -> None:
    result = run(manifest(rounds=3, dropout=0.3), workers=2)
    lost = [c for r in result.history for c in r.lost]
    assert len(lost) == result.stats.dropouts > 0
    assert all(r.aggregated for r in result.history)


def test_client_state_lives_in_the_store_not_in_workers(tmp_path: Path) -> None:
    # Prepare: clients that count their own turns in their saved state; few clients, so
    # each trains several times, on whichever worker is free.
    data = manifest(rounds=6, clients=15, per_round=10, state_dir=str(tmp_path))
    data["task"]["params"]["stateful"] = True
    data["round"]["quorum"] = 1.0
    # Execute
    result = run(data, workers=2)
    # Assert: each client's saved count equals the rounds it took part in.
    store = ClientStateStore(tmp_path)
    turns: dict[str, int] = {}
    for report in result.history:
        for client in report.accepted:
            turns[client] = turns.get(client, 0) + 1
    assert len(store) == len(turns) > 0
    for client, n in turns.items():
        assert int(store.get(client)["visits"][0]) == n


def test_client_state_store_round_trip(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    state = {"c/w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([3])}
    store.put("client-7", state)
    back = store.get("client-7")
    assert store.get("client-8") == {}
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)
    store.put("client-7", {})
    assert store.get("client-7") == {} and len(store) == 0
    (tmp_path / "client-9.fbs").write_bytes(b"not a frame")
    with pytest.raises(FedbusError, match="delete it"):
        store.get("client-9")


def test_rehearsal_and_best_model() -> None:
    plain = run(manifest(rounds=4))
    rehearsed = run(manifest(rounds=4, rehearsal=True))
    assert rehearsed.history[-1].eval.loss < plain.history[-1].eval.loss  # type: ignore[union-attr]
    assert plain.best_round is not None and plain.best_weights is not None
    scores = [-r.eval.loss for r in plain.history if r.eval is not None]
    assert plain.best_score == max(scores)


@pytest.mark.parametrize(("strategy", "params"), STRATEGIES[2:], ids=["fedbuff", "fedasync"])
def test_async_rehearsal_steps_every_model_version(strategy: str, params: dict[str, Any]) -> None:
    # Prepare: an asynchronous job with and without server-side rehearsal.
    plain = run(manifest(strategy, params, rounds=8))
    # Execute: with rehearsal, on one worker and on two
    one = run(manifest(strategy, params, rounds=8, rehearsal=True), workers=1)
    two = run(manifest(strategy, params, rounds=8, rehearsal=True), workers=2)
    # Assert: every version took the step toward the server's data (closer to the optimum),
    # and the run repeats bit for bit.
    assert one.history[-1].eval.loss < plain.history[-1].eval.loss  # type: ignore[union-attr]
    assert np.array_equal(one.weights["w"], two.weights["w"])
    assert len(one.history) == 8 and one.stats.updates == two.stats.updates


def test_population_manifest_defaults_and_errors() -> None:
    m: Manifest = parse_manifest(manifest())
    assert m.population is not None and m.population.clients == 200
    assert len(m.trainers_of("agg")) == 200 and m.round.min_clients == 200
    assert m.round.deadline_s == 3600.0
    bad = [
        ({"clients": 0, "per_round": 1}, "population.clients"),
        ({"clients": 5, "per_round": 6}, "population.per_round"),
        ({"clients": 5, "per_round": 2, "alpha": 0}, "population.alpha"),
        ({"clients": 5, "per_round": 2, "partition": "zipf"}, "population.partition"),
        ({"clients": 5, "per_round": 2, "dropout": 1.0}, "population.dropout"),
        ({"clients": 5, "per_round": 2, "prefix": "a/"}, "population.prefix"),
        ({"clients": 5, "per_round": 2, "speed": 1}, "population.speed"),
        ({"per_round": 2}, "population.clients"),
    ]
    for pop, field in bad:
        data = manifest()
        data["population"] = pop
        with pytest.raises(ManifestError) as err:
            parse_manifest(data)
        assert err.value.field == field, (pop, err.value)
    data = manifest()
    data["trainers"] = {"count": 2}
    with pytest.raises(ManifestError, match="remove `trainers:`"):
        parse_manifest(data)


@pytest.mark.broker
@pytest.mark.slow
async def test_two_worker_processes_through_mosquitto_match_one_process(
        tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    # Prepare: the reference on the memory bus in this process, with one worker.
    data = manifest(rounds=3, dropout=0.1)
    reference = await run_simulation(parse_manifest(data), workers=1)
    over_mqtt = {**data, "broker": {"host": mosquitto.host, "port": mosquitto.port}}
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(over_mqtt))
    procs: list[asyncio.subprocess.Process] = []
    try:
        # Execute: aggregator + coordinator here, no local worker, two worker processes.
        for _ in range(2):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.cli", "worker", str(path), cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT))
        result = await asyncio.wait_for(
            run_simulation(parse_manifest(over_mqtt), workers=0, remote_workers=2), 120)
        outputs = [(await asyncio.wait_for(p.communicate(), 30))[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    # Assert: the same final model, and both processes trained clients.
    assert np.array_equal(result.weights["w"], reference.weights["w"])
    assert len(result.stats.workers) == 2
    assert all("workers done" in out for out in outputs), outputs
    trained = [int(line.rsplit("=", 1)[1]) for out in outputs for line in out.splitlines()
               if line.startswith("workers done")]
    assert len(trained) == 2 and all(n > 0 for n in trained)


def test_client_side_dp_is_applied_by_workers() -> None:
    # Prepare: dp_client with a tiny clipping norm and no noise, so clipping is visible.
    data = manifest("dp_client", {"strategy": {"name": "fedavg"}, "noise_multiplier": 0.0,
                                  "clipping_norm": 0.01}, rounds=2)
    plain = run(manifest(rounds=2))
    # Execute
    result = run(data)
    # Assert: every round's model moved by at most the clipping norm (a mean of clipped
    # deltas), while without DP it moved much further.
    moved = float(np.linalg.norm(result.weights["w"]))
    assert moved <= 2 * 0.01 + 1e-6
    assert float(np.linalg.norm(plain.weights["w"])) > 10 * moved


def test_stale_synchronous_updates_train_from_an_older_model() -> None:
    # Prepare: the same job with and without stale updates (1 round late, half of them).
    fresh = run(manifest(rounds=5))
    # Execute
    stale = run(manifest(rounds=5, stale_prob=0.5, stale_delay=1), workers=2)
    again = run(manifest(rounds=5, stale_prob=0.5, stale_delay=1), workers=1)
    # Assert: stale updates happened, changed the model, and are as repeatable as the rest.
    assert stale.stats.stale > 0 and fresh.stats.stale == 0
    assert not np.array_equal(stale.weights["w"], fresh.weights["w"])
    assert np.array_equal(stale.weights["w"], again.weights["w"])
    assert all(r.aggregated and not r.rejected for r in stale.history)


def test_fedbus_run_simulates_a_population_manifest(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(manifest(rounds=2)))
    # Execute: the CLI as a user runs it (memory bus, no broker to set up).
    out = subprocess.run([sys.executable, "-m", "fedbus.cli", "run", str(path), "--workers",
                          "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("round")] == ["1/2", "2/2"]
    assert lines[-1].startswith("final loss=")
    assert any(ln.startswith("simulation updates=") and "workers=2" in ln for ln in lines)


def test_a_job_whose_rounds_stop_aggregating_exits_non_zero(tmp_path: Path) -> None:
    # Prepare: every client's training raises, so no round aggregates anything
    data = manifest(rounds=2, clients=6, per_round=3)
    data["task"]["params"]["broken"] = list(range(6))
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(data))
    # Execute
    out = subprocess.run([sys.executable, "-m", "fedbus.cli", "run", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    # Assert: the last line still says what the model is, and the exit code says it failed
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("final ")
    assert "aggregated nothing" in out.stderr


def test_example_population_manifests_load() -> None:
    from fedbus.manifest import load_manifest

    pop = load_manifest(ROOT / "examples/population/manifest.yaml")
    cnn = load_manifest(ROOT / "examples/digits_sim/manifest.yaml")
    assert pop.population is not None and pop.population.clients == 10_000
    assert cnn.population is not None and cnn.population.clients == 1_000
    assert cnn.population.partition == "dirichlet"


@pytest.mark.torch
def test_digits_cnn_population_learns() -> None:
    # Prepare: the CNN example, scaled down to 100 clients and 12 rounds of 20.
    pytest.importorskip("torch")
    from fedbus.sim.tasks import open_population_task

    data = yaml.safe_load((ROOT / "examples/digits_sim/manifest.yaml").read_text())
    data["rounds"] = 12
    data["evaluate"] = {"where": "server", "every": 12}
    data["population"].update(clients=100, per_round=20, dropout=0.0)
    data["strategy"] = "fedavg"
    data["task"]["params"].update(lr=0.1, momentum=0.9)
    m = parse_manifest(data, str(ROOT / "examples/digits_sim/manifest.yaml"))
    before = open_population_task(m, None).evaluate()
    # Execute
    result = asyncio.run(run_simulation(m, workers=2))
    # Assert: the model learned (loss down, accuracy up) from non-IID generated clients.
    after = result.history[-1].eval
    assert after is not None
    assert after.loss < before.loss
    assert after.metrics["accuracy"] > before.metrics["accuracy"] + 0.1, (before, after)


@pytest.mark.parametrize("strategy", ["fedavg", "fedasync"])
def test_a_client_whose_training_raises_is_lost_not_waited_for(strategy: str) -> None:
    # Prepare: a small population where a third of the clients always raise in fit().
    data = manifest(strategy, rounds=4, clients=30, per_round=10)
    data["task"]["params"]["broken"] = list(range(0, 30, 3))
    # Execute: must finish (a hung round would hit the pytest timeout).
    result = run(data, workers=2)
    # Assert: the failures were counted and the job still trained.
    assert result.stats.failures > 0
    assert result.stats.updates > 0
    assert len(result.history) == 4


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff"])
def test_workers_train_from_a_compressed_broadcast(strategy: str) -> None:
    # Prepare: the same simulated job with the model broadcast as int8 and as float32
    params = {"buffer_size": 4} if strategy == "fedbuff" else {}
    data = manifest(strategy, params)
    # Execute
    exact = run(data)
    lossy = run({**data, "codec": {"model": "int8"}})
    # Assert: the same work done, a model within int8's precision of the exact one
    assert lossy.stats.updates == exact.stats.updates > 0
    scale = float(np.abs(exact.weights["w"]).max())
    np.testing.assert_allclose(lossy.weights["w"], exact.weights["w"], rtol=0,
                               atol=0.03 * scale)
    assert not np.array_equal(lossy.weights["w"], exact.weights["w"])
