"""10,000 hostile messages during a federation, over a real mosquitto: nothing gives way.

The harness is ``benchmarks/bench_fuzz.py`` (``python -m benchmarks.bench_fuzz`` for longer
runs); this test runs it once at the size the issue asks for and checks what it reports.
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.bench_fuzz import Result, fuzz

pytestmark = [pytest.mark.broker, pytest.mark.slow]

MESSAGES = 10_000


@pytest.fixture(scope="module")
def open_broker_run() -> Result:
    return asyncio.run(fuzz(MESSAGES))


def test_no_process_dies_or_hangs(open_broker_run: Result) -> None:
    r = open_broker_run
    assert sum(r.fuzzed.sent.values()) == MESSAGES
    assert r.fuzzed.exit_codes["aggregator"] == 0  # it finished every round, and exited
    assert len(r.fuzzed.metrics) == len(r.clean.metrics)
    assert r.fuzzed.alive_at_end["trainers"]  # still serving when the job ended


def test_memory_stays_within_twice_the_clean_peak(open_broker_run: Result) -> None:
    r = open_broker_run
    for name in ("aggregator", "trainers"):
        assert r.clean.peak_rss[name] > 0
        assert r.fuzzed.peak_rss[name] <= 2 * r.clean.peak_rss[name], (
            name, r.clean.peak_rss[name], r.fuzzed.peak_rss[name])


def test_every_message_at_the_aggregator_is_counted(open_broker_run: Result) -> None:
    r = open_broker_run
    agg = r.fuzzed.rejected["aggregator"]
    on_updates = sum(v for k, v in agg.items()
                     if not k.startswith("presence_") and k != "bad_presence")
    # Every fuzz message on update/<aggregator>/* is refused and counted, except a forged
    # `ready` that looked plausible (granted; the trainer then counts the unexpected grant).
    # A forged update that got in displaces the real one, which is then counted instead.
    assert on_updates >= r.fuzzed.sent_to_aggregator - r.fuzzed.sent["forged_ready"]
    for reasons in ({"too_large"}, {"truncated"}, {"bad_magic"}, {"unknown_sender"},
                    {"stale", "not_selected"}, {"duplicate"}, {"unexpected_ready"},
                    {"non_finite", "norm_exceeded"}, {"wrong_shape", "bad_shape"},
                    {"wrong_dtype"}, {"spoofed_sender"}, {"chunk:not_admitted"},
                    {"presence_bad_magic", "bad_presence"}):
        assert reasons & set(agg), (reasons, agg)


def test_trainers_count_forged_control_messages(open_broker_run: Result) -> None:
    r = open_broker_run
    for node in ("t0", "t1", "t2"):
        got = set(r.fuzzed.rejected[node])
        for reason in ("implausible_round", "unexpected_done", "unexpected_grant",
                       "presence_contradicted", "bad_magic", "too_large"):
            assert reason in got, (node, reason, got)
        assert got & {"duplicate", "old_round"}  # replayed orders
