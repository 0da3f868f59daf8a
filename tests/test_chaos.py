"""Kill -9 the aggregator process mid-job, restart it: the final model is the uninterrupted
run's, to the last bit (the harness is benchmarks/bench_chaos.py; 10 trials there)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.bench_chaos import chaos, twins

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_a_killed_aggregator_process_resumes_to_the_same_model() -> None:
    # seed 0: SIGKILL in round 4, 0.27 s and 0.01 s into it
    trials = asyncio.run(chaos(2, ["fedavg"], rounds=6, seed=0))
    for t in trials:
        assert t.killed and t.same_model, t
        # it continued from the last checkpoint: the round before, or the round itself if
        # the kill came after that round was made durable
        assert t.resumed_from in (t.kill_in_round - 1, t.kill_in_round), t


def test_a_standby_takes_over_with_no_command_typed() -> None:
    # seed 0: the active aggregator is SIGKILLed in round 4; the standby was waiting
    trials = asyncio.run(chaos(1, ["fedavg"], rounds=6, seed=0, standby=True))
    t = trials[0]
    assert t.killed and t.same_model, t
    assert t.failover_s is not None and t.failover_s < 10, t  # docs/benchmarks.md: ~0.2 s


def test_two_aggregators_started_together_settle_on_one_leader_for_the_whole_job() -> None:
    # two `fedbus serve --node aggregator` at the same instant (10 trials: bench_chaos --twins)
    t = asyncio.run(twins(1, "fedavg", rounds=6))[0]
    assert t.round_runners == 1, t  # one led every round: they never took turns
    # elected without a candidate waiting out another's ticket (_DEFER_S, 10 s); the time
    # includes starting two processes, which a busy machine stretches (it took > 5 s beside
    # make test-under-load)
    assert t.elected_s is not None and t.elected_s < 10, t
    assert t.same_model, t


@pytest.mark.parametrize("victim", ["checkpointer", "trainers", "broker", "redis", "standby"])
def test_killing_any_other_component_leaves_the_final_model_unchanged(victim: str) -> None:
    # the checkpointer (rounds go on undurable until it is back), the trainers' process
    # (their updates are asked for again), the broker (no persistence: its queues are lost),
    # the checkpointer's Redis (the disk behind it keeps every checkpoint; it comes back
    # empty), the waiting standby aggregator (the active one never notices)
    trials = asyncio.run(chaos(1, ["fedadam"], rounds=6, seed=0, victim=victim))
    t = trials[0]
    assert t.killed and t.rounds_done == 6, t
    # A round that selected while the trainers were dead runs without them and changes the
    # model, as it should; otherwise nothing was lost.
    assert t.same_model or t.short_rounds > 0, t
