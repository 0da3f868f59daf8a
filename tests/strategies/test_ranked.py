"""The ranked selector: the store's scheduling scores decide, with a little exploration."""

from __future__ import annotations

import pytest
from strategy_testkit import assert_trees_equal, codec_roundtrip

from strategies import StrategyError, make_selector
from strategies.ranked import RankedSelector

NODES = [f"t{i}" for i in range(10)]
SCORES = {f"t{i}": float(i) for i in range(10)}  # t9 best


def test_without_exploration_the_top_scores_are_picked() -> None:
    # Prepare
    sel = make_selector("ranked", {"ranking": SCORES, "num_clients": 3, "explore": 0.0})
    # Execute / Assert
    assert sel.select(NODES, 1) == ["t7", "t8", "t9"]
    assert sel.select(["t0", "t1", "t9"], 2) == ["t0", "t1", "t9"]  # fewer available


def test_exploration_takes_a_seeded_share_of_the_rest() -> None:
    # Prepare
    sel = RankedSelector(SCORES, num_clients=4, explore=0.5, seed=3)
    # Execute
    picks = [sel.select(NODES, r) for r in range(1, 30)]
    # Assert: t9 and t8 always; two others, varying, never duplicated
    assert all({"t8", "t9"} <= set(p) and len(set(p)) == 4 for p in picks)
    assert len({tuple(p) for p in picks}) > 3
    again = RankedSelector(SCORES, num_clients=4, explore=0.5, seed=3)
    assert [again.select(NODES, r) for r in range(1, 30)] == picks


def test_a_list_ranking_unranked_clients_and_checkpoints() -> None:
    # Prepare: a list, best first; t5 unranked fills the last slot
    sel = RankedSelector(["t2", "t1"], num_clients=3, explore=0.0, seed=1)
    assert sel.select(["t1", "t2", "t5"], 1) == ["t1", "t2", "t5"]
    sel.set_ranking({"t5": 1.0, "t1": 0.5})
    # Execute
    restored = RankedSelector(num_clients=3, explore=0.0)
    restored.load_state_dict(codec_roundtrip(sel.state_dict()))
    # Assert
    assert_trees_equal(restored.state_dict(), sel.state_dict())
    assert restored.select(["t1", "t2", "t5", "t6"], 2) == sel.select(["t1", "t2", "t5", "t6"], 2)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(StrategyError, match="explore"):
        RankedSelector(explore=2)
    with pytest.raises(StrategyError, match="finite"):
        RankedSelector({"a": float("nan")})
