"""Selectors: the shared contract, checkpoint/restore, and each policy's behaviour."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from strategy_testkit import assert_trees_equal, codec_roundtrip

from strategies import (
    InFlightSelector,
    OortSelector,
    RandomSelector,
    ReliabilitySelector,
    Selector,
    StrategyError,
    TieredSelector,
    make_selector,
    statistical_utility,
)

NODES = [f"n{i:02d}" for i in range(24)]
SPEED = {n: 1.0 + (i % 6) for i, n in enumerate(NODES)}  # seconds per round

FACTORIES: dict[str, Callable[[], Selector]] = {
    "oort": lambda: OortSelector(num_clients=5, seed=4),
    "tiered": lambda: TieredSelector(num_clients=4, num_tiers=3, credits=3, seed=4),
    "reliability": lambda: ReliabilitySelector(num_clients=6, seed=4),
    "inflight": lambda: InFlightSelector(concurrency=5, seed=4),
    "random": lambda: RandomSelector(fraction=0.2, seed=4),
}


def drive(selector: Selector, rounds: range, seed: int = 0) -> list[list[str]]:
    """Run rounds with a changing available set and deterministic feedback."""
    rng = np.random.default_rng(seed + rounds.start)
    picks = []
    for r in rounds:
        available = [n for n in NODES if rng.random() < 0.85]
        chosen = selector.select(available, r)
        picks.append(chosen)
        for n in chosen:
            ok = not (n.endswith("3") and r % 2 == 0)
            selector.report(n, r, completed=ok, duration_s=SPEED[n] if ok else None,
                            utility=10.0 / SPEED[n] + (r % 3))
    return picks


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_selection_is_a_duplicate_free_subset_and_deterministic(name):
    # Prepare
    rng = np.random.default_rng(2)
    a, b = FACTORIES[name](), FACTORIES[name]()
    # Execute
    picks_a, picks_b = drive(a, range(1, 15)), drive(b, range(1, 15))
    # Assert
    assert picks_a == picks_b
    for chosen in picks_a:
        assert len(chosen) == len(set(chosen))
        assert set(chosen) <= set(NODES)
    available = [n for n in NODES if rng.random() < 0.5]
    assert set(FACTORIES[name]().select(available, 1)) <= set(available)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_restored_selector_makes_identical_next_rounds(name):
    # Prepare
    steady = FACTORIES[name]()
    expected = drive(steady, range(1, 8)) + drive(steady, range(8, 16))
    first = FACTORIES[name]()
    drive(first, range(1, 8))
    state = codec_roundtrip(first.state_dict())
    # Execute
    resumed = FACTORIES[name]()
    resumed.load_state_dict(state)
    after = drive(resumed, range(8, 16))
    # Assert
    assert after == expected[7:]
    assert_trees_equal(codec_roundtrip(resumed.state_dict()), steady.state_dict())


def test_registry_builds_each_selector():
    for name, cls in [("oort", OortSelector), ("tiered", TieredSelector),
                      ("reliability", ReliabilitySelector), ("inflight", InFlightSelector)]:
        assert type(make_selector(name)) is cls


# --- Oort -----------------------------------------------------------------------------------

def test_oort_prefers_high_utility_fast_clients_yet_explores():
    # Prepare: 20 known clients. c00-c04 informative and fast; c05-c09 informative but 10x
    # slower than the preferred duration; the rest dull. Five new clients are unexplored.
    sel = OortSelector(num_clients=5, exploration_factor=0.2, exploration_decay=1.0,
                       min_exploration=0.2, preferred_duration_s=10.0, seed=1)
    known = [f"c{i:02d}" for i in range(20)]
    for i, n in enumerate(known):
        utility = 100.0 if i < 10 else 1.0
        sel.report(n, 0, completed=True, duration_s=100.0 if 5 <= i < 10 else 5.0,
                   utility=utility)
    fresh = [f"new{i}" for i in range(5)]
    # Execute
    counts: Counter[str] = Counter()
    for r in range(1, 41):
        for n in sel.select(known + fresh, r):
            counts[n] += 1
    # Assert
    fast_good = sum(counts[n] for n in known[:5])
    slow_good = sum(counts[n] for n in known[5:10])
    dull = sum(counts[n] for n in known[10:])
    assert fast_good >= 4 * 40 * 0.9  # the four exploitation slots go to them
    assert slow_good == 0 and dull == 0  # below the cutoff
    assert sum(counts[n] for n in fresh) == 40  # one exploration slot each round
    assert set(fresh) <= set(counts)


def test_oort_explores_everyone_first_then_exploits():
    # Prepare: epsilon = 1 keeps every slot for exploration while unexplored clients remain.
    sel = OortSelector(num_clients=4, exploration_factor=1.0, exploration_decay=1.0,
                       min_exploration=1.0, seed=0)
    nodes = [f"c{i}" for i in range(8)]
    # Execute: two rounds explore four each; then unused exploration slots go to exploitation.
    seen = []
    for r in (1, 2, 3):
        chosen = sel.select(nodes, r)
        seen.append(chosen)
        for n in chosen:
            sel.report(n, r, completed=True, duration_s=1.0,
                       utility=statistical_utility(4.0 * int(n[1:]), 4))
    # Assert
    assert set(seen[0]) | set(seen[1]) == set(nodes) and not set(seen[0]) & set(seen[1])
    assert len(seen[2]) == 4 and "c7" in seen[2] and "c0" not in seen[2]
    assert statistical_utility(16.0, 4) == pytest.approx(8.0)


# --- TiFL -----------------------------------------------------------------------------------

def profiled_tiered(**params) -> tuple[TieredSelector, list[list[str]]]:
    sel = TieredSelector(seed=3, **params)
    tiers = [[f"fast{i}" for i in range(4)], [f"mid{i}" for i in range(4)],
             [f"slow{i}" for i in range(4)]]
    for latency, tier in zip([1.0, 5.0, 20.0], tiers, strict=True):
        for n in tier:
            sel.report(n, 0, completed=True, duration_s=latency)
    return sel, tiers


def test_tiered_picks_all_clients_of_a_round_from_one_tier():
    # Prepare
    sel, tiers = profiled_tiered(num_clients=3, num_tiers=3)
    everyone = [n for t in tiers for n in t]
    # Execute
    picks = [(sel.select(everyone, r), sel.last_tier) for r in range(1, 31)]
    # Assert
    assert [sorted(t) for t in sel.tiers()] == [sorted(t) for t in tiers]
    for chosen, tier in picks:
        assert tier is not None and set(chosen) <= set(tiers[tier]) and len(chosen) == 3
    assert {tier for _, tier in picks} == {0, 1, 2}


def test_tiered_probabilities_and_credits():
    # Prepare
    only_fast, tiers = profiled_tiered(num_clients=2, tier_probabilities=[1.0, 0.0, 0.0])
    credited, _ = profiled_tiered(num_clients=2, credits=2)
    everyone = [n for t in tiers for n in t]
    # Execute
    fast_tiers = {(only_fast.select(everyone, r), only_fast.last_tier)[1] for r in range(10)}
    credited_tiers = []
    for r in range(6):
        credited.select(everyone, r)
        credited_tiers.append(credited.last_tier)
    # Assert: probability 0 never picked; credits spread six rounds exactly 2/2/2.
    assert fast_tiers == {0}
    assert Counter(credited_tiers) == {0: 2, 1: 2, 2: 2}
    assert credited.select(everyone, 7)  # credits spent: still selects


def test_tiered_profiles_unknown_nodes_first_and_tops_up_small_tiers():
    # Prepare
    sel, tiers = profiled_tiered(num_clients=3, tier_probabilities=[0.0, 0.0, 1.0])
    # Execute
    with_new = sel.select([*tiers[2], "newbie"], 1)
    short = sel.select([tiers[2][0], *tiers[1]], 2)
    # Assert
    assert "newbie" in with_new and len(with_new) == 3
    assert tiers[2][0] in short and len(short) == 3  # topped up from the faster tier


# --- reliability ----------------------------------------------------------------------------

def test_reliability_skips_flaky_nodes_but_retries_them_sometimes():
    # Prepare: "flaky" always misses, the rest always deliver.
    sel = ReliabilitySelector(decay=0.5, threshold=0.3, explore_prob=0.1, seed=0)
    nodes = ["a", "b", "c", "flaky"]
    picked_flaky = 0
    # Execute
    for r in range(200):
        chosen = sel.select(nodes, r)
        picked_flaky += "flaky" in chosen
        for n in chosen:
            sel.report(n, r, completed=(n != "flaky"))
    # Assert: taken in the first rounds until its rate passes 0.3, then ~10% of the time.
    assert sel.miss_rate("flaky") > 0.3
    assert 5 <= picked_flaky <= 45
    assert sel.select(["a", "b", "c"], 201) == ["a", "b", "c"]


def test_reliability_takes_a_recovered_node_back():
    # Prepare
    sel = ReliabilitySelector(decay=0.5, threshold=0.3, explore_prob=1.0, seed=0)
    for r in range(5):
        sel.report("x", r, completed=False)
    # Execute: explore_prob = 1 re-admits it; it delivers twice.
    for r in range(5, 7):
        assert "x" in sel.select(["x", "y"], r)
        sel.report("x", r, completed=True)
    strict = ReliabilitySelector(decay=0.5, threshold=0.3, explore_prob=0.0, seed=0)
    strict.load_state_dict(codec_roundtrip(sel.state_dict()))
    # Assert: its rate fell under the threshold, so even a strict selector takes it.
    assert sel.miss_rate("x") < 0.3
    assert strict.select(["x", "y"], 7) == ["x", "y"]
    assert strict.select(["x"], 8) == ["x"]


def test_reliability_never_returns_nothing_when_someone_is_available():
    sel = ReliabilitySelector(threshold=0.1, explore_prob=0.0)
    for n in ["p", "q"]:
        sel.report(n, 0, completed=False)
    sel.report("q", 1, completed=True)
    assert sel.select(["p", "q"], 2) == ["q"]


# --- in flight ------------------------------------------------------------------------------

def test_inflight_keeps_c_busy_and_refills_on_report():
    # Prepare
    sel = InFlightSelector(concurrency=3, seed=0)
    nodes = [f"c{i}" for i in range(10)]
    # Execute / Assert
    first = sel.select(nodes, 0)
    assert len(first) == 3 and sel.in_flight == first
    assert sel.select(nodes, 0) == []
    sel.report(first[0], 0, completed=True)
    refill = sel.select(nodes, 1)
    assert len(refill) == 1 and refill[0] not in first[1:]
    assert len(sel.in_flight) == 3
    sel.report("stranger", 1, completed=True)  # not in flight: ignored
    assert len(sel.in_flight) == 3


def test_inflight_frees_slots_of_failed_and_vanished_nodes():
    # Prepare
    sel = InFlightSelector(concurrency=2, seed=1)
    nodes = ["a", "b", "c", "d", "e"]
    failed, gone = sel.select(nodes, 0)
    # Execute / Assert: a failure (or timeout) report frees its slot.
    sel.report(failed, 0, completed=False)
    again = sel.select(nodes, 1)
    assert len(again) == 1 and again[0] != gone
    # A node in flight that is no longer available is presumed lost at the next select.
    refill = sel.select([n for n in nodes if n != gone], 2)
    assert len(refill) == 1 and gone not in sel.in_flight and len(sel.in_flight) == 2


def test_random_count_picks_exactly_count_reproducibly() -> None:
    from strategies import RandomSelector

    pool = [f"c{i}" for i in range(1000)]
    a, b = RandomSelector(count=100, seed=3), RandomSelector(count=100, seed=3)
    picks = [a.select(pool, r) for r in range(3)]
    assert all(len(p) == 100 and len(set(p)) == 100 for p in picks)
    assert picks == [b.select(pool, r) for r in range(3)]
    assert RandomSelector(count=100).select(pool[:40], 1) == sorted(pool[:40])
    with pytest.raises(StrategyError, match="count"):
        RandomSelector(count=0)
