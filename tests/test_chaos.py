"""Kill -9 the aggregator process mid-job, restart it: the final model is the uninterrupted
run's, to the last bit (the harness is benchmarks/bench_chaos.py; 10 trials there)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.bench_chaos import chaos

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_a_killed_aggregator_process_resumes_to_the_same_model() -> None:
    trials = asyncio.run(chaos(2, ["fedavg"], rounds=6, seed=3))
    assert all(t.killed for t in trials)
    assert all(t.same_model for t in trials), trials
    assert any(t.resumed_from is not None and t.resumed_from >= 1 for t in trials)
