"""FedBuff: K staleness-weighted deltas per server step (Nguyen et al. 2022, Algorithm 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from strategy_testkit import assert_async_resume_identical, codec_roundtrip, small_model, upd

from strategies import FedBuff, StrategyError


def test_hand_built_buffer() -> None:
    # Prepare
    strategy = FedBuff(buffer_size=3, server_lr=0.5)
    strategy.init({"x": np.array([1.0])}, version=4)
    # Execute: staleness 0, 3, 8 -> weights 1, 1/2, 1/3
    r1 = strategy.submit(upd("a", {"x": [3.0]}, staleness=0))
    r2 = strategy.submit(upd("b", {"x": [4.0]}, staleness=3))
    r3 = strategy.submit(upd("c", {"x": [6.0]}, staleness=8))
    # Assert: w = 1 + 0.5 * (3 + 2 + 2) / 3
    assert r1 is None and r2 is None and r3 is not None
    assert r3["x"][0] == pytest.approx(1 + 0.5 * 7 / 3)
    assert strategy.version == 5 and strategy.num_buffered == 0


def test_several_buffers_match_algorithm_1() -> None:
    # Prepare
    model = small_model()
    k_size, lr = 4, 0.7
    strategy = FedBuff(buffer_size=k_size, server_lr=lr)
    strategy.init(model)
    rng = np.random.default_rng(51)
    expected = {k: v.copy() for k, v in model.items()}
    buffer = {k: np.zeros_like(v) for k, v in model.items()}
    for i in range(11):
        s = int(rng.integers(0, 5))
        delta = {k: rng.normal(0, 1, v.shape) for k, v in model.items()}
        # Execute
        out = strategy.submit(upd(f"c{i}", delta, staleness=s))
        # Reference
        for k in model:
            buffer[k] = buffer[k] + delta[k] / math.sqrt(1 + s)
        if (i + 1) % k_size == 0:
            for k in model:
                expected[k] = expected[k] + lr * buffer[k] / k_size
                buffer[k] = np.zeros_like(buffer[k])
            # Assert
            assert out is not None
            for k in model:
                np.testing.assert_allclose(out[k], expected[k], atol=1e-12)
        else:
            assert out is None
        for k in model:
            np.testing.assert_allclose(strategy.state_dict()["buffer_sum"][k], buffer[k],
                                       atol=1e-12)
    assert strategy.version == 2 and strategy.num_buffered == 3


def test_without_staleness_weighting_and_with_max_staleness() -> None:
    strategy = FedBuff(buffer_size=2, staleness_weighting=False, max_staleness=5)
    strategy.init({"x": np.array([0.0])})
    assert strategy.submit(upd("a", {"x": [2.0]}, staleness=4)) is None
    assert strategy.submit(upd("z", {"x": [100.0]}, staleness=6)) is None  # dropped
    assert strategy.num_buffered == 1
    out = strategy.submit(upd("b", {"x": [4.0]}, staleness=1))
    assert out is not None and out["x"][0] == pytest.approx(3.0)


def test_checkpoint_mid_buffer_resumes_identically() -> None:
    model = small_model(np.float32)
    rng = np.random.default_rng(52)
    updates = [upd(f"c{i}", {k: rng.normal(0, 1, v.shape) for k, v in model.items()},
                   staleness=int(rng.integers(0, 4)), dtype=np.float32) for i in range(10)]
    # stop after 4 updates: one step taken (K = 3) and one update in the buffer
    assert_async_resume_identical(lambda: FedBuff(buffer_size=3), model, updates, 4)
    strategy = FedBuff(buffer_size=3)
    strategy.init(model)
    strategy.submit(updates[0])
    state = codec_roundtrip(strategy.state_dict())
    assert state["buffer_count"] == 1 and state["weights"]["layer.w"].dtype == np.float32


def test_restore_with_smaller_buffer_is_refused() -> None:
    strategy = FedBuff(buffer_size=3)
    strategy.init({"x": np.array([0.0])})
    strategy.submit(upd("a", {"x": [1.0]}))
    strategy.submit(upd("b", {"x": [1.0]}))
    other = FedBuff(buffer_size=2)
    with pytest.raises(StrategyError, match="buffer_size"):
        other.load_state_dict(codec_roundtrip(strategy.state_dict()))


def test_bad_inputs() -> None:
    strategy = FedBuff()
    strategy.init({"x": np.array([1.0])})
    with pytest.raises(StrategyError, match="staleness"):
        strategy.submit(upd("a", {"x": [1.0]}, staleness=-2))
    assert strategy.num_buffered == 0
