"""FedBuff: K staleness-weighted deltas per server step (Nguyen et al. 2022, Algorithm 1)."""

from __future__ import annotations

import dataclasses
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


def _members(model: dict[str, np.ndarray], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 1, v.shape) for k, v in model.items()} for _ in range(n)]


def test_a_counted_update_is_its_members_one_by_one_when_it_fits_the_buffer() -> None:
    # Prepare: 2 updates already buffered, then 5 from one base version (staleness 3),
    # sent one by one to one FedBuff and as their mean, counted 5, to the other
    model = small_model()
    flat, counted = FedBuff(buffer_size=8, server_lr=0.7), FedBuff(buffer_size=8, server_lr=0.7)
    flat.init(model)
    counted.init(model)
    first = _members(model, 2, 1)
    for i, d in enumerate(first):
        flat.submit(upd(f"a{i}", d, staleness=1))
        counted.submit(upd(f"a{i}", d, staleness=1))
    members = _members(model, 5, 2)
    mean = {k: sum(m[k] for m in members) / 5 for k in model}
    # Execute
    for i, d in enumerate(members):
        out_flat = flat.submit(upd(f"m{i}", d, staleness=3))
    out = counted.submit(dataclasses.replace(upd("relay", mean, staleness=3), count=5))
    # Assert: both still buffer 7 of 8, with the same sum; the 8th moves both alike
    assert out is None and out_flat is None and counted.num_buffered == flat.num_buffered == 7
    for k in model:
        np.testing.assert_allclose(counted.state_dict()["buffer_sum"][k],
                                   flat.state_dict()["buffer_sum"][k], rtol=1e-12, atol=1e-12)
    last = _members(model, 1, 3)[0]
    a, b = flat.submit(upd("z", last)), counted.submit(upd("z", last))
    assert a is not None and b is not None and counted.version == flat.version == 1
    for k in model:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12, atol=1e-12)


def test_a_counted_update_straddling_the_buffer_fills_it_and_opens_the_next_one_staler() -> None:
    # Prepare: buffer 4 holding 3; a pre-aggregate of 3 arrives at staleness 2
    model = small_model()
    strategy = FedBuff(buffer_size=4, server_lr=1.0)
    strategy.init(model)
    before = _members(model, 3, 4)
    for i, d in enumerate(before):
        strategy.submit(upd(f"b{i}", d))
    mean = _members(model, 1, 5)[0]
    # Execute
    out = strategy.submit(dataclasses.replace(upd("relay", mean, staleness=2), count=3))
    # Assert: one of the three completes this version (staleness 2), the other two wait in
    # the next buffer one version staler (staleness 3), as if they had come one by one
    assert out is not None and strategy.version == 1 and strategy.num_buffered == 2
    assert strategy.room(1) == 2 and strategy.room(3) == 10  # updates before 1, 3 more versions
    for k in model:
        step = (sum(d[k] for d in before) + mean[k] / math.sqrt(3)) / 4
        np.testing.assert_allclose(out[k], model[k] + step, atol=1e-12)
        np.testing.assert_allclose(strategy.state_dict()["buffer_sum"][k],
                                   2 * mean[k] / math.sqrt(4), atol=1e-12)


def test_a_count_below_one_is_refused() -> None:
    strategy = FedBuff(buffer_size=2)
    strategy.init(small_model())
    with pytest.raises(StrategyError, match="count"):
        strategy.submit(dataclasses.replace(upd("r", small_model()), count=0))
