"""FedProx: FedAvg on the server, proximal_mu sent to the clients (Li et al. 2020)."""

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

from strategies import FedAvg, FedProx


def test_client_config_carries_proximal_mu_every_round() -> None:
    strategy = FedProx(proximal_mu=0.1)
    assert strategy.client_config(0) == {"proximal_mu": 0.1}
    assert strategy.client_config(7) == {"proximal_mu": 0.1}
    assert strategy.client_tensors(0) == {}


def test_server_side_is_weighted_fedavg_over_rounds() -> None:
    # Prepare
    model = small_model()
    rounds = random_rounds(model, 3, 4, seed=4)
    prox, avg = FedProx(proximal_mu=0.5), FedAvg()
    # Execute / Assert
    wp = wa = model
    for r, ups in enumerate(rounds):
        wp, wa = run_round(prox, wp, r, ups), run_round(avg, wa, r, ups)
        for k in model:
            np.testing.assert_array_equal(wp[k], wa[k])


def test_hand_built_weighted_and_unweighted() -> None:
    model = {"x": np.array([1.0])}
    ups = [upd("a", {"x": [2.0]}, 1), upd("b", {"x": [4.0]}, 3)]
    assert run_round(FedProx(), model, 0, ups)["x"][0] == pytest.approx(1 + 3.5)
    assert run_round(FedProx(weighted=False), model, 0, ups)["x"][0] == pytest.approx(1 + 3.0)


def test_state_is_empty_and_roundtrips() -> None:
    strategy = FedProx()
    assert codec_roundtrip(strategy.state_dict()) == {}
