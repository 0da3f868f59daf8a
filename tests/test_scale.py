"""Trainers by the hundred (benchmarks/bench_scale.py) and the toy task's O(1) form. No timing
is asserted: speed lives in the benchmark and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from benchmarks import bench_scale
from examples.toy.task import make_task
from tests.conftest import _need_mosquitto


def test_independent_toy_targets_are_o1_and_their_optimum_is_the_weighted_mean() -> None:
    # Prepare: 20 trainers of a 10,000-partition job, and the server's copy of a small job
    start = time.perf_counter()
    big = [make_task(partition=p, num_partitions=10_000, size=1000, independent=True)
           for p in range(20)]
    took = time.perf_counter() - start
    tasks = [make_task(partition=p, num_partitions=7, size=40, independent=True)
             for p in range(7)]
    server = make_task(partition=None, num_partitions=7, size=40, independent=True)

    # Check: a trainer's set-up does not draw the population (the default form takes 0.35 s
    # a trainer at 10,000), its target depends on (seed, partition) alone, and the server's
    # optimum is the example-weighted mean of the targets
    assert took < 2.0
    assert np.array_equal(big[3].target, make_task(partition=3, num_partitions=5, size=1000,
                                                   independent=True).target)
    mean = (sum(t.target.astype(np.float64) * t.num_examples for t in tasks)
            / sum(t.num_examples for t in tasks))
    np.testing.assert_allclose(server.global_target, mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tasks[0].global_target, server.global_target)


def test_bench_scale_runs_rounds_through_relays_with_every_trainer_connected() -> None:
    # Prepare: 60 trainers in 2 worker processes under 2 relays, 2 rounds
    _need_mosquitto()
    args = argparse.Namespace(rounds=2, params=100, keepalive=30, fan_in=30, procs=2,
                              connect_concurrency=16, connect_timeout=30.0, deadline=60.0,
                              quorum=1.0, timeout=60.0, idle_s=0.5)

    # Execute
    res = asyncio.run(bench_scale.measure(60, args))

    # Check: all connected, every round aggregated with every trainer's examples, memory read
    assert res["connected"] == 60 and res["relays"] == 2
    assert res["rounds_completed"] == 2 and res["examples_ok"] and res["error"] is None
    assert res["pss_mib"]["total"] > 0 and "| 60 | 2 | 60 |" in bench_scale.row(res)
