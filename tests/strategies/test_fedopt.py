"""FedAdagrad / FedAdam / FedYogi against Algorithm 2 of Reddi et al. 2021."""

from __future__ import annotations

import math

import numpy as np
import pytest
from strategy_testkit import (
    assert_sync_resume_identical,
    codec_roundtrip,
    random_rounds,
    run_round,
    small_model,
    upd,
)

from strategies import FedAdagrad, FedAdam, FedYogi, StrategyError, make_strategy

VARIANTS = {"fedadagrad": FedAdagrad, "fedadam": FedAdam, "fedyogi": FedYogi}


def reference(variant, model, rounds, eta, beta1, beta2, tau, v0, weighted=True):
    """Algorithm 2, written coordinate by coordinate in plain Python floats."""
    w = {k: [float(x) for x in v.ravel()] for k, v in model.items()}
    m = {k: [0.0] * len(x) for k, x in w.items()}
    v = {k: [v0] * len(x) for k, x in w.items()}
    out = []
    for ups in rounds:
        weights = [float(u.num_examples) if weighted else 1.0 for u in ups]
        for k in w:
            for i in range(len(w[k])):
                d = sum(c * float(u.delta[k].ravel()[i]) for c, u in zip(weights, ups, strict=True))
                d /= sum(weights)
                m[k][i] = beta1 * m[k][i] + (1 - beta1) * d
                if variant == "fedadagrad":
                    v[k][i] = v[k][i] + d * d
                elif variant == "fedadam":
                    v[k][i] = beta2 * v[k][i] + (1 - beta2) * d * d
                else:
                    diff = v[k][i] - d * d
                    sign = (diff > 0) - (diff < 0)
                    v[k][i] = v[k][i] - (1 - beta2) * d * d * sign
                w[k][i] = w[k][i] + eta * m[k][i] / (math.sqrt(v[k][i]) + tau)
        out.append({k: np.array(x).reshape(model[k].shape) for k, x in w.items()})
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("weighted", [True, False])
def test_matches_algorithm_2_over_rounds(variant: str, weighted: bool) -> None:
    # Prepare: deltas of mixed size so Yogi's sign(v - Δ²) takes both signs across rounds.
    model = small_model()
    rounds = random_rounds(model, 6, 3, seed=11, scale=0.05)
    rounds[2] = random_rounds(model, 1, 3, seed=12, scale=3.0)[0]
    strategy = VARIANTS[variant](eta=0.05, beta1=0.8, beta2=0.95, tau=1e-2, weighted=weighted)
    expected = reference(variant, model, rounds, 0.05, 0.8, 0.95, 1e-2, 1e-4, weighted)
    # Execute
    w = model
    for r, ups in enumerate(rounds):
        w = run_round(strategy, w, r, ups)
        # Assert
        for k in model:
            np.testing.assert_allclose(w[k], expected[r][k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_initial_v_zero_matches_reference(variant: str) -> None:
    model = small_model()
    rounds = random_rounds(model, 3, 2, seed=13, scale=0.1)
    strategy = VARIANTS[variant](eta=0.1, tau=1e-3, initial_v=0.0)
    expected = reference(variant, model, rounds, 0.1, 0.9, 0.99, 1e-3, 0.0)
    w = model
    for r, ups in enumerate(rounds):
        w = run_round(strategy, w, r, ups)
        for k in model:
            np.testing.assert_allclose(w[k], expected[r][k], atol=1e-6, rtol=0)


def test_fedadam_first_step_by_hand_has_no_bias_correction() -> None:
    # Prepare: Δ = 1, m = 0.1, v = 0.99 * tau² + 0.01 = 0.01000099 (tau = 1e-3)
    strategy = FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # Execute
    w = run_round(strategy, {"x": np.array([0.0])}, 0, [upd("a", {"x": [1.0]}, 1)])
    # Assert: with bias correction the step would be 0.1 * 1 / (1 + 1e-3), about ten times more.
    v = 0.99 * 1e-6 + 0.01
    assert w["x"][0] == pytest.approx(0.1 * 0.1 / (math.sqrt(v) + 1e-3), rel=1e-12)


def test_fedyogi_state_by_hand_over_two_rounds() -> None:
    strategy = FedYogi(eta=1.0, beta1=0.5, beta2=0.5, tau=0.5)
    model = {"x": np.array([0.0])}
    w = run_round(strategy, model, 0, [upd("a", {"x": [2.0]}, 1)])
    # v0 = 0.25 < Δ² = 4: v = 0.25 + 0.5 * 4 = 2.25; m = 1; step = 1 / (1.5 + 0.5) = 0.5
    assert strategy.state_dict()["v"]["x"][0] == pytest.approx(2.25)
    assert w["x"][0] == pytest.approx(0.5)
    w = run_round(strategy, w, 1, [upd("a", {"x": [1.0]}, 1)])
    # v = 2.25 > 1: v = 2.25 - 0.5 = 1.75; m = 0.5 + 0.5 = 1; step = 1 / (sqrt(1.75) + 0.5)
    assert strategy.state_dict()["v"]["x"][0] == pytest.approx(1.75)
    assert strategy.state_dict()["m"]["x"][0] == pytest.approx(1.0)
    assert w["x"][0] == pytest.approx(0.5 + 1 / (math.sqrt(1.75) + 0.5))


def test_client_lr_only_when_given() -> None:
    assert FedAdam().client_config(0) == {}
    assert FedYogi(eta_l=0.05).client_config(3) == {"lr": 0.05}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_empty_round_changes_nothing(variant: str) -> None:
    model = small_model()
    strategy = VARIANTS[variant]()
    w = run_round(strategy, model, 0, random_rounds(model, 1, 2)[0])
    before = codec_roundtrip(strategy.state_dict())
    w2 = run_round(strategy, w, 1, [])
    for k in model:
        np.testing.assert_array_equal(w2[k], w[k])
        np.testing.assert_array_equal(strategy.state_dict()["m"][k], before["m"][k])
        np.testing.assert_array_equal(strategy.state_dict()["v"][k], before["v"][k])


def test_float32_model_stays_float32() -> None:
    model = small_model(np.float32)
    ups = [upd("a", {k: np.ones(v.shape) for k, v in model.items()}, 2, dtype=np.float32)]
    out = run_round(FedAdam(), model, 0, ups)
    assert {v.dtype for v in out.values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("variant", ["fedadam", "fedyogi"])
def test_bias_correction_scales_the_step_like_adam(variant: str) -> None:
    # Prepare: the same rounds with and without the correction, v starting at 0 (Flower).
    model = small_model()
    rounds = random_rounds(model, 3, clients=3, seed=5, scale=0.1)
    params = {"eta": 0.1, "tau": 1e-9, "initial_v": 0.0, "beta1": 0.9, "beta2": 0.99}
    plain, corrected = VARIANTS[variant](**params), VARIANTS[variant](bias_correction=True,
                                                                       **params)
    w_plain = w_corr = model
    for t, ups in enumerate(rounds, start=1):
        before_plain, before_corr = w_plain, w_corr
        w_plain = run_round(plain, w_plain, t, ups)
        w_corr = run_round(corrected, w_corr, t, ups)
        if t == 1:
            # Execute + Assert: same moments, step scaled by sqrt(1 - b2^t) / (1 - b1^t).
            factor = math.sqrt(1 - 0.99**t) / (1 - 0.9**t)
            for k in model:
                np.testing.assert_allclose(w_corr[k] - before_corr[k],
                                           factor * (w_plain[k] - before_plain[k]), rtol=1e-9)
    assert corrected.state_dict()["t"] == 3


def test_bias_correction_is_refused_for_adagrad_and_survives_a_restart() -> None:
    with pytest.raises(StrategyError, match="fedadam and fedyogi"):
        make_strategy("fedadagrad", {"bias_correction": True})
    model = small_model()
    assert_sync_resume_identical(lambda: FedAdam(eta=0.05, bias_correction=True), model,
                                 random_rounds(model, 4, clients=3, seed=2), 2)


def test_fedadam_with_flowers_offset_gives_flowers_models() -> None:
    # Prepare: what Flower 1.42's FedAdam made of three rounds (tests/strategies/data)
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "data" / "flower_fedadam.json").read_text())
    strategy = make_strategy("fedadam", {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3,
                                         "initial_v": 0.0, "bias_correction": True,
                                         "bias_offset": 1})
    weights = {"w": np.asarray(ref["w0"], np.float32)}
    for t, r in enumerate(ref["rounds"], start=1):
        # Execute: the same client models, as fedbus deltas
        ups = [upd(f"c{i}", {"w": np.asarray(local, np.float32) - weights["w"]}, n,
                   dtype=np.float32) for i, (local, n) in enumerate(r["clients"])]
        weights = run_round(strategy, weights, t, ups)
        # Assert: Flower's model, to float32 rounding (Flower keeps m and v in float32)
        np.testing.assert_allclose(weights["w"], np.asarray(r["after"]), rtol=2e-5, atol=2e-6)
    # and without the offset the first step is larger than Flower's
    plain = make_strategy("fedadam", {"eta": 0.1, "tau": 1e-3, "initial_v": 0.0,
                                      "bias_correction": True})
    first = run_round(plain, {"w": np.asarray(ref["w0"], np.float32)}, 1,
                      [upd(f"c{i}", {"w": np.asarray(local, np.float32)
                                     - np.asarray(ref["w0"], np.float32)}, n, dtype=np.float32)
                       for i, (local, n) in enumerate(ref["rounds"][0]["clients"])])
    assert not np.allclose(first["w"], np.asarray(ref["rounds"][0]["after"]), rtol=1e-3)
