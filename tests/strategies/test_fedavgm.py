"""FedAvgM: server momentum v = beta v + mean delta; w += server_lr v (Hsu et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_testkit import (
    codec_roundtrip,
    random_rounds,
    run_round,
    small_model,
    upd,
)

from strategies import FedAvg, FedAvgM, StrategyError


def reference_fedavgm(model, rounds, server_lr, momentum):
    """Straight from the paper: v <- beta v + Δw; w <- w - v, with Δw = -(weighted mean delta)."""
    w = {k: v.astype(np.float64).copy() for k, v in model.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    out = []
    for ups in rounds:
        total = sum(u.num_examples for u in ups)
        for k in w:
            pseudo_grad = -sum(u.num_examples * u.delta[k] for u in ups) / total
            v[k] = momentum * v[k] - pseudo_grad
            w[k] = w[k] + server_lr * v[k]
        out.append({k: x.copy() for k, x in w.items()})
    return out, v


def test_matches_reference_over_rounds() -> None:
    # Prepare
    model = small_model()
    rounds = random_rounds(model, num_rounds=5, clients=3, seed=1)
    strategy = FedAvgM(server_lr=0.7, momentum=0.9)
    expected, expected_v = reference_fedavgm(model, rounds, 0.7, 0.9)
    # Execute
    w = model
    got = []
    for r, ups in enumerate(rounds):
        w = run_round(strategy, w, r, ups)
        got.append(w)
    # Assert
    for r in range(len(rounds)):
        for k in model:
            np.testing.assert_allclose(got[r][k], expected[r][k], atol=1e-6, rtol=0)
    for k in model:
        np.testing.assert_allclose(strategy.state_dict()["v"][k], expected_v[k], atol=1e-9)


def test_hand_built_two_rounds() -> None:
    # Prepare: one scalar tensor, deltas 2 (n=1) and 4 (n=3): mean 3.5; then mean 1.
    model = {"x": np.array([1.0])}
    strategy = FedAvgM(server_lr=0.5, momentum=0.5)
    # Execute
    w1 = run_round(strategy, model, 0, [upd("a", {"x": [2.0]}, 1), upd("b", {"x": [4.0]}, 3)])
    w2 = run_round(strategy, w1, 1, [upd("a", {"x": [1.0]}, 5)])
    # Assert: v1 = 3.5, w1 = 1 + 1.75; v2 = 0.5*3.5 + 1 = 2.75, w2 = 2.75 + 1.375
    assert w1["x"][0] == pytest.approx(2.75)
    assert w2["x"][0] == pytest.approx(4.125)


def test_zero_momentum_unit_lr_is_fedavg() -> None:
    model = small_model()
    rounds = random_rounds(model, 3, 4, seed=2)
    a, b = FedAvgM(server_lr=1.0, momentum=0.0), FedAvg()
    wa = wb = model
    for r, ups in enumerate(rounds):
        wa, wb = run_round(a, wa, r, ups), run_round(b, wb, r, ups)
        for k in model:
            np.testing.assert_allclose(wa[k], wb[k], atol=1e-12)


def test_empty_round_leaves_model_and_momentum() -> None:
    model = small_model()
    strategy = FedAvgM(momentum=0.9)
    w = run_round(strategy, model, 0, random_rounds(model, 1, 2)[0])
    v_before = strategy.state_dict()["v"]
    w2 = run_round(strategy, w, 1, [])
    for k in model:
        np.testing.assert_array_equal(w2[k], w[k])
        np.testing.assert_array_equal(strategy.state_dict()["v"][k], v_before[k])


def test_keeps_float32_dtype_and_does_not_modify_input() -> None:
    model = small_model(np.float32)
    original = {k: v.copy() for k, v in model.items()}
    strategy = FedAvgM()
    ups = random_rounds(model, 1, 2)[0]
    out = run_round(strategy, model, 0, [upd(u.sender, u.delta, u.num_examples, dtype=np.float32)
                                         for u in ups])
    assert all(out[k].dtype == np.float32 for k in out)
    for k in model:
        np.testing.assert_array_equal(model[k], original[k])


def test_state_roundtrips() -> None:
    model = small_model()
    rounds = random_rounds(model, 5, 3, seed=3)
    strategy = FedAvgM(server_lr=0.3, momentum=0.8)
    run_round(strategy, model, 0, rounds[0])
    state = strategy.state_dict()
    back = codec_roundtrip(state)
    for k in model:
        np.testing.assert_array_equal(back["v"][k], state["v"][k])


def test_restoring_state_of_another_model_fails_clearly() -> None:
    strategy = FedAvgM()
    strategy.load_state_dict({"v": {"other": np.zeros(2)}})
    with pytest.raises(StrategyError, match="does not match the model"):
        strategy.begin(small_model(), 0)
