"""What every strategy of a kind does: the server optimizers, checkpointed mid-job (state and
model through the codec) and restored into a fresh instance, go on bit for bit as if never
stopped; the asynchronous strategies refuse an update before they have a model, and one of
negative staleness."""

from __future__ import annotations

import numpy as np
import pytest
from strategy_testkit import assert_sync_resume_identical, random_rounds, small_model, upd

from strategies import (
    AsyncStrategy,
    FedAdagrad,
    FedAdam,
    FedAsync,
    FedAvgM,
    FedBuff,
    FedDyn,
    FedProx,
    FedYogi,
    StrategyError,
)

# (factory, rounds: (number, clients, seed, scale), stop after round)
RESUMES = {
    "fedavgm": (lambda: FedAvgM(server_lr=0.3, momentum=0.8), (5, 3, 3, 1.0), 2),
    "feddyn": (lambda: FedDyn(num_clients=10, alpha=0.05), (5, 3, 22, 1.0), 2),
    "fedadagrad": (lambda: FedAdagrad(eta=0.03, tau=1e-3), (5, 3, 14, 0.2), 3),
    "fedadam": (lambda: FedAdam(eta=0.03, tau=1e-3), (5, 3, 14, 0.2), 3),
    "fedyogi": (lambda: FedYogi(eta=0.03, tau=1e-3), (5, 3, 14, 0.2), 3),
    "fedprox": (lambda: FedProx(proximal_mu=0.01), (4, 3, 5, 1.0), 2),
}


@pytest.mark.parametrize("name", sorted(RESUMES))
def test_resume_is_identical(name: str) -> None:
    factory, (num_rounds, clients, seed, scale), stop_after = RESUMES[name]
    model = small_model()
    rounds = random_rounds(model, num_rounds, clients, seed=seed, scale=scale)
    assert_sync_resume_identical(factory, model, rounds, stop_after)


@pytest.mark.parametrize("factory", [FedAsync, FedBuff])
def test_async_strategies_refuse_updates_before_init_and_negative_staleness(
        factory: type[AsyncStrategy]) -> None:
    strategy = factory()
    with pytest.raises(StrategyError, match="init"):
        strategy.submit(upd("a", {"x": [1.0]}))
    strategy.init({"x": np.array([1.0])})
    with pytest.raises(StrategyError, match="staleness"):
        strategy.submit(upd("a", {"x": [1.0]}, staleness=-1))
