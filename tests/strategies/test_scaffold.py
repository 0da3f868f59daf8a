"""SCAFFOLD server control variate and model update (Karimireddy et al. 2020, Algorithm 1)."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_testkit import (
    assert_sync_resume_identical,
    codec_roundtrip,
    run_round,
    small_model,
    upd,
)

from strategies import Scaffold, StrategyError


def scaffold_rounds(model, num_rounds, clients, seed):
    """Rounds whose updates carry control deltas; participation varies by round."""
    rng = np.random.default_rng(seed)
    rounds = []
    for r in range(num_rounds):
        ups = []
        for i in range(1 + r % clients):
            delta = {k: rng.normal(0, 1, v.shape) for k, v in model.items()}
            aux = {f"scaffold.dc/{k}": rng.normal(0, 1, v.shape) for k, v in model.items()}
            ups.append(upd(f"c{i}", delta, int(rng.integers(1, 30)), aux=aux))
        rounds.append(ups)
    return rounds


def test_model_and_control_over_rounds_match_algorithm_1() -> None:
    # Prepare
    model = small_model()
    rounds = scaffold_rounds(model, 5, 3, seed=31)
    n_total, eta_g = 7, 0.8
    strategy = Scaffold(num_clients=n_total, server_lr=eta_g)
    x = {k: v.copy() for k, v in model.items()}
    c = {k: np.zeros_like(v) for k, v in model.items()}
    w = model
    for r, ups in enumerate(rounds):
        # Execute
        sent = strategy.client_tensors(r)
        w = run_round(strategy, w, r, ups)
        # Reference: x += η_g mean Δy; c += |S|/N mean Δc (unweighted)
        for k in x:
            if r > 0:
                np.testing.assert_allclose(sent[f"scaffold.c/{k}"], c[k], atol=1e-12)
            x[k] = x[k] + eta_g * sum(u.delta[k] for u in ups) / len(ups)
            dc_mean = sum(u.aux[f"scaffold.dc/{k}"] for u in ups) / len(ups)
            c[k] = c[k] + len(ups) / n_total * dc_mean
        # Assert
        for k in model:
            np.testing.assert_allclose(w[k], x[k], atol=1e-9)
            np.testing.assert_allclose(strategy.state_dict()["c"][k], c[k], atol=1e-12)


def test_hand_built_round() -> None:
    strategy = Scaffold(num_clients=4, server_lr=1.0)
    x0 = {"x": np.array([1.0])}
    ups = [upd("a", {"x": [2.0]}, 1, aux={"scaffold.dc/x": [1.0]}),
           upd("b", {"x": [4.0]}, 9, aux={"scaffold.dc/x": [3.0]})]
    x1 = run_round(strategy, x0, 0, ups)
    assert x1["x"][0] == pytest.approx(4.0)  # 1 + (2 + 4) / 2, num_examples ignored
    assert strategy.client_tensors(1)["scaffold.c/x"][0] == pytest.approx(1.0)  # 2/4 * 2


def test_weighted_option_weights_only_the_model_step() -> None:
    strategy = Scaffold(num_clients=2, weighted=True)
    ups = [upd("a", {"x": [2.0]}, 1, aux={"scaffold.dc/x": [1.0]}),
           upd("b", {"x": [4.0]}, 3, aux={"scaffold.dc/x": [3.0]})]
    x1 = run_round(strategy, {"x": np.array([0.0])}, 0, ups)
    assert x1["x"][0] == pytest.approx(3.5)
    assert strategy.state_dict()["c"]["x"][0] == pytest.approx(2.0)


def test_client_tensors_names_and_dtype() -> None:
    strategy = Scaffold(num_clients=3)
    assert strategy.client_tensors(0) == {}  # before the server has seen the model: c = 0
    model = small_model(np.float32)
    strategy.begin(model, 0)
    sent = strategy.client_tensors(0)
    assert set(sent) == {"scaffold.c/layer.w", "scaffold.c/layer.b"}
    assert all(v.dtype == np.float32 and not v.any() for v in sent.values())
    assert strategy.client_config(0) == {"scaffold": True}


def test_update_without_control_deltas_is_refused_and_round_untouched() -> None:
    strategy = Scaffold(num_clients=3)
    strategy.begin({"x": np.array([0.0]), "y": np.array([0.0])}, 0)
    with pytest.raises(StrategyError, match=r"scaffold\.dc/y"):
        strategy.accumulate(upd("a", {"x": [1.0], "y": [1.0]}, aux={"scaffold.dc/x": [1.0]}))
    assert strategy.num_accumulated == 0
    with pytest.raises(StrategyError, match="shape"):
        strategy.accumulate(upd("a", {"x": [1.0], "y": [1.0]},
                                aux={"scaffold.dc/x": [1.0], "scaffold.dc/y": [1.0, 2.0]}))
    assert strategy.num_accumulated == 0


def test_documented_client_contract_reaches_the_global_optimum() -> None:
    # Prepare: quadratic clients L_i = c_i/2 ||y - a_i||², K local GD steps, option II.
    a = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])
    curv = np.array([1.0, 4.0, 0.5])
    optimum = (curv[:, None] * a).sum(0) / curv.sum()
    steps, lr = 5, 0.1
    strategy = Scaffold(num_clients=3, server_lr=1.0)
    c_local = np.zeros_like(a)
    x = {"x": np.zeros(2)}
    # Execute
    for r in range(200):
        c = strategy.client_tensors(r).get("scaffold.c/x", np.zeros(2))
        ups = []
        for i in range(3):
            y = x["x"].copy()
            for _ in range(steps):
                y = y - lr * (curv[i] * (y - a[i]) - c_local[i] + c)
            c_plus = c_local[i] - c + (x["x"] - y) / (steps * lr)
            ups.append(upd(f"c{i}", {"x": y - x["x"]}, aux={"scaffold.dc/x": c_plus - c_local[i]}))
            c_local[i] = c_plus
        x = run_round(strategy, x, r, ups)
    # Assert: drift corrected, the fixed point is the global optimum.
    np.testing.assert_allclose(x["x"], optimum, atol=1e-6)


def test_state_roundtrips_and_resume_is_identical() -> None:
    model = small_model()
    rounds = scaffold_rounds(model, 5, 3, seed=32)
    strategy = Scaffold(num_clients=5)
    run_round(strategy, model, 0, rounds[0])
    back = codec_roundtrip(strategy.state_dict())
    np.testing.assert_array_equal(back["c"]["layer.w"], strategy.state_dict()["c"]["layer.w"])
    assert_sync_resume_identical(lambda: Scaffold(num_clients=5, server_lr=0.5), model, rounds, 3)
