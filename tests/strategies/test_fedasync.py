"""FedAsync: x_t = x_{t-1} + α s(staleness) Δ, the delta form of Xie et al. 2019."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from strategy_testkit import assert_async_resume_identical, codec_roundtrip, small_model, upd

from strategies import FedAsync, StrategyError
from strategies.fedasync import staleness_weight


@pytest.mark.parametrize(
    ("kind", "staleness", "expected"),
    [
        ("constant", 0, 1.0),
        ("constant", 9, 1.0),
        ("polynomial", 0, 1.0),
        ("polynomial", 3, 0.5),  # (1 + 3)^-0.5
        ("polynomial", 8, 1 / 3),  # (1 + 8)^-0.5
        ("hinge", 4, 1.0),  # s <= b
        ("hinge", 6, 1 / 21),  # 1 / (10 (6 - 4) + 1)
    ],
)
def test_staleness_functions(kind: str, staleness: int, expected: float) -> None:
    a = 0.5 if kind == "polynomial" else 10.0
    assert staleness_weight(kind, staleness, a, 4.0) == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["constant", "polynomial", "hinge"])
def test_mixing_equation_over_several_updates(kind: str) -> None:
    # Prepare
    model = small_model()
    strategy = FedAsync(alpha=0.6, staleness=kind, a=0.5 if kind == "polynomial" else 2.0, b=1)
    strategy.init(model, version=10)
    rng = np.random.default_rng(41)
    stalenesses = [0, 3, 1, 7, 2]
    expected = {k: v.copy() for k, v in model.items()}
    for i, s in enumerate(stalenesses):
        delta = {k: rng.normal(0, 1, v.shape) for k, v in model.items()}
        # Execute
        out = strategy.submit(upd(f"c{i}", delta, staleness=s, base_round=10 + i - s))
        # Assert: x_t = x_{t-1} + α s(staleness) Δ
        alpha_t = 0.6 * staleness_weight(kind, s, strategy.a, 1.0)
        for k in model:
            expected[k] = expected[k] + alpha_t * delta[k]
            assert out is not None
            np.testing.assert_allclose(out[k], expected[k], atol=1e-12)
        assert strategy.version == 11 + i


def test_fresh_update_equals_paper_mixing_of_models() -> None:
    # Staleness 0: x_new = x + Δ and x_t = (1 - α) x + α x_new exactly (the paper's step).
    model = {"x": np.array([2.0, -1.0])}
    strategy = FedAsync(alpha=0.3, staleness="polynomial")
    strategy.init(model)
    delta = np.array([1.0, 4.0])
    out = strategy.submit(upd("a", {"x": delta}))
    assert out is not None
    np.testing.assert_allclose(out["x"], 0.7 * model["x"] + 0.3 * (model["x"] + delta))


def test_max_staleness_drops_without_moving() -> None:
    strategy = FedAsync(max_staleness=2)
    strategy.init({"x": np.array([1.0])})
    assert strategy.submit(upd("a", {"x": [5.0]}, staleness=3)) is None
    assert strategy.version == 0 and strategy.weights["x"][0] == 1.0


def test_bad_inputs() -> None:
    strategy = FedAsync()
    strategy.init({"x": np.array([1.0])})
    with pytest.raises(StrategyError, match="missing"):
        strategy.submit(upd("a", {"y": [1.0]}))
    with pytest.raises(ValueError, match="read-only"):
        strategy.weights["x"][0] = 3.0


def test_keeps_dtype() -> None:
    strategy = FedAsync()
    strategy.init(small_model(np.float32))
    out = strategy.submit(upd("a", {k: np.ones(v.shape) for k, v in small_model().items()},
                              dtype=np.float32))
    assert out is not None and {v.dtype for v in out.values()} == {np.dtype(np.float32)}


def test_state_roundtrips_and_resume_is_identical() -> None:
    model = small_model()
    rng = np.random.default_rng(42)
    updates = [upd(f"c{i}", {k: rng.normal(0, 1, v.shape) for k, v in model.items()},
                   staleness=int(rng.integers(0, 6))) for i in range(8)]
    strategy = FedAsync()
    strategy.init(model, version=3)
    state = codec_roundtrip(strategy.state_dict())
    assert state["version"] == 3
    assert_async_resume_identical(lambda: FedAsync(alpha=0.5, staleness="hinge", a=3, b=2),
                                  model, updates, 5)


@pytest.mark.parametrize("kind", ["constant", "polynomial"])
def test_a_counted_update_is_its_mean_arriving_count_times(kind: str) -> None:
    # Prepare: 4 members from one base, staleness 2 when they land
    model = small_model()
    flat = FedAsync(alpha=0.5, staleness=kind, a=0.5)
    counted = FedAsync(alpha=0.5, staleness=kind, a=0.5)
    flat.init(model, version=7)
    counted.init(model, version=7)
    rng = np.random.default_rng(3)
    members = [{k: rng.normal(0, 1, v.shape) for k, v in model.items()} for _ in range(4)]
    mean = {k: sum(m[k] for m in members) / 4 for k in model}
    # Execute: one by one each meets one version more; counted, in one submit
    for j, d in enumerate(members):
        last = flat.submit(upd(f"m{j}", d, staleness=2 + j))
    out = counted.submit(dataclasses.replace(upd("relay", mean, staleness=2), count=4))
    # Assert: the same versions; the same model for the constant weighting, and for the
    # others the flat model averaged over the members' arrival order
    assert out is not None and last is not None and counted.version == flat.version == 11
    total = sum(counted.mixing_weight(2 + j) for j in range(4))
    for k in model:
        np.testing.assert_allclose(out[k], model[k] + total * mean[k], atol=1e-12)
        if kind == "constant":
            np.testing.assert_allclose(out[k], last[k], atol=1e-12)
