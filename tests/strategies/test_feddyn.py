"""FedDyn server state h and model update (Acar et al. 2021, Algorithm 1)."""

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

from strategies import FedAvg, FedDyn, StrategyError


def test_h_and_model_over_rounds_by_hand() -> None:
    # Prepare: m = 4 clients, α = 0.5, scalar model θ^0 = 1.
    strategy = FedDyn(num_clients=4, alpha=0.5)
    theta0 = {"x": np.array([1.0])}
    # Execute / Assert, round 1: P = {a, b}, Δ = 2, 4 (num_examples must not matter).
    theta1 = run_round(strategy, theta0, 0, [upd("a", {"x": [2.0]}, 1), upd("b", {"x": [4.0]}, 99)])
    # h1 = 0 - 0.5 * (1/4) * (2 + 4) = -0.75; θ1 = mean(θ_k) - h1/α = (1 + 3) + 1.5 = 5.5
    assert strategy.state_dict()["h"]["x"][0] == pytest.approx(-0.75)
    assert theta1["x"][0] == pytest.approx(5.5)
    # Round 2: P = {c}, Δ = -1. h2 = -0.75 - 0.5 * (1/4) * (-1) = -0.625
    # θ2 = (5.5 - 1) - (-0.625 / 0.5) = 4.5 + 1.25 = 5.75
    theta2 = run_round(strategy, theta1, 1, [upd("c", {"x": [-1.0]}, 3)])
    assert strategy.state_dict()["h"]["x"][0] == pytest.approx(-0.625)
    assert theta2["x"][0] == pytest.approx(5.75)


def test_matches_algorithm_1_written_on_models() -> None:
    # Prepare: the paper's form, on client models θ_k = θ^{t-1} + Δ_k, varying participants.
    model = small_model()
    rounds = random_rounds(model, 5, 3, seed=21)
    rounds[1] = rounds[1][:1]
    m, alpha = 5, 0.1
    strategy = FedDyn(num_clients=m, alpha=alpha)
    theta = {k: v.copy() for k, v in model.items()}
    h = {k: np.zeros_like(v) for k, v in model.items()}
    w = model
    for r, ups in enumerate(rounds):
        # Execute
        w = run_round(strategy, w, r, ups)
        # Reference
        local = [{k: theta[k] + u.delta[k] for k in theta} for u in ups]
        for k in theta:
            h[k] = h[k] - alpha / m * sum(lk[k] - theta[k] for lk in local)
            theta[k] = sum(lk[k] for lk in local) / len(local) - h[k] / alpha
        # Assert
        for k in model:
            np.testing.assert_allclose(w[k], theta[k], atol=1e-9)
            np.testing.assert_allclose(strategy.state_dict()["h"][k], h[k], atol=1e-12)


def quadratic_federation():
    """Clients with L_k(θ) = c_k/2 ||θ - a_k||²; the global optimum is Σ c_k a_k / Σ c_k."""
    a = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])
    c = np.array([1.0, 4.0, 0.5])
    return a, c, (c[:, None] * a).sum(0) / c.sum()


def test_documented_client_contract_reaches_the_global_optimum() -> None:
    # Prepare: clients follow the docstring exactly (exact local minimisation, g_k state).
    a, c, optimum = quadratic_federation()
    alpha = 1.0
    strategy = FedDyn(num_clients=3, alpha=alpha)
    fedavg = FedAvg(weighted=False)
    g = np.zeros_like(a)
    theta = {"x": np.zeros(2)}
    theta_avg = {"x": np.zeros(2)}
    # Execute
    for r in range(300):
        ups = []
        for k in range(3):
            # argmin c/2||θ-a||² - <g, θ> + α/2||θ - θ_g||²
            local = (c[k] * a[k] + g[k] + alpha * theta["x"]) / (c[k] + alpha)
            delta = local - theta["x"]
            g[k] = g[k] - alpha * delta
            ups.append(upd(f"c{k}", {"x": delta}))
        theta = run_round(strategy, theta, r, ups)
        avg_ups = [upd(f"c{k}", {"x": (c[k] * a[k] + alpha * theta_avg["x"]) / (c[k] + alpha)
                                 - theta_avg["x"]}) for k in range(3)]
        theta_avg = run_round(fedavg, theta_avg, r, avg_ups)
    # Assert: FedDyn converges to the optimum; FedAvg with the same proximal step does not.
    np.testing.assert_allclose(theta["x"], optimum, atol=1e-6)
    assert np.abs(theta_avg["x"] - optimum).max() > 0.1


def test_client_config_and_empty_round() -> None:
    strategy = FedDyn(num_clients=3, alpha=0.2)
    assert strategy.client_config(4) == {"feddyn_alpha": 0.2}
    model = small_model()
    w = run_round(strategy, model, 0, random_rounds(model, 1, 2)[0])
    h = codec_roundtrip(strategy.state_dict())["h"]
    w2 = run_round(strategy, w, 1, [])
    for k in model:
        np.testing.assert_array_equal(w2[k], w[k])
        np.testing.assert_array_equal(strategy.state_dict()["h"][k], h[k])


def test_more_updates_than_clients_is_refused() -> None:
    strategy = FedDyn(num_clients=1)
    strategy.begin({"x": np.zeros(1)}, 0)
    strategy.accumulate(upd("a", {"x": [1.0]}))
    with pytest.raises(StrategyError, match="num_clients"):
        strategy.accumulate(upd("b", {"x": [1.0]}))
