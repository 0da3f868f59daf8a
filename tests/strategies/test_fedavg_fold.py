"""FedAvg's streaming mean folds held updates together, int8 ones from their packing: the
result must be the float64 mean of the dense deltas, rounded once to the model's float32 (an
int8 term, value x scale, is exact in float64 there, where the dense decode rounds it to
float32 first: that much apart, no more)."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus.compress import PackedDelta, UpdateCodec, UpdateCompressor, decode_update
from strategies.base import ChunkedDelta, ClientUpdate
from strategies.fedavg import _HOLD, FedAvg, WeightedDeltaMean


def _updates(model: dict[str, np.ndarray], count: int) -> list[ClientUpdate]:
    """Half dense, half int8 packings (block 300: ranges that cut blocks), weights uneven."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        delta = {k: rng.normal(scale=0.1, size=v.shape).astype(v.dtype) for k, v in model.items()}
        if i % 2:
            codec = UpdateCodec(mode="int8", block=300)
            sent, meta = UpdateCompressor(codec, seed=i).encode(delta)
            delta = decode_update(sent, meta, model)  # type: ignore[assignment]
            assert isinstance(delta, PackedDelta) and isinstance(delta, ChunkedDelta)
        out.append(ClientUpdate(sender=f"t{i}", delta=delta, num_examples=1 + 3 * i))
    return out


@pytest.mark.parametrize("count", [1, _HOLD - 1, 2 * _HOLD + 3])
def test_held_and_packed_updates_fold_to_the_exact_mean(count: int) -> None:
    # Prepare: a tensor bigger than one fold block, a small one
    model = {"w": np.linspace(-1, 1, 200_003, dtype=np.float32),
             "b": np.arange(5, dtype=np.float32)}
    updates = _updates(model, count)
    # Execute
    strategy = FedAvg()
    strategy.begin(model, 1)
    for u in updates:
        strategy.accumulate(u)
    new = strategy.finish()
    # Assert: each dense delta added on arrival in float64, then rounded to float32 once
    acc = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
    mag = {k: np.zeros(v.shape, np.float64) for k, v in model.items()}
    for u in updates:
        for k in acc:
            term = np.asarray(u.delta[k]).astype(np.float64) * float(u.num_examples)
            acc[k] += term
            mag[k] += np.abs(term)
    total = float(sum(u.num_examples for u in updates))
    eps = float(np.finfo(np.float32).eps)
    for k, w in model.items():
        exact = w.astype(np.float64) + acc[k] / total
        bound = np.spacing(np.abs(exact).astype(np.float32)) + eps * mag[k] / total
        assert new[k].dtype == w.dtype
        assert np.all(np.abs(new[k] - exact) <= bound), k
    if count == 1:  # a dense update alone: exactly what folding it on arrival gave
        np.testing.assert_array_equal(new["w"], (model["w"] + acc["w"] / total).astype(np.float32))
    assert strategy.num_accumulated == count


def test_the_order_updates_arrive_in_does_not_change_the_model() -> None:
    # Prepare: 19 updates (two full holds and a rest), and the same in reverse
    model = {"w": np.linspace(-1, 1, 200_003, dtype=np.float32)}
    updates = _updates(model, 2 * _HOLD + 3)
    results = []
    for order in (updates, updates[::-1], updates[5:] + updates[:5]):
        # Execute
        strategy = FedAvg()
        strategy.begin(model, 1)
        for u in order:
            strategy.accumulate(u)
        results.append(strategy.finish()["w"])
    # Assert: a resumed aggregator sees other arrival orders, and must reach the same model
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_dense_float32_updates_are_not_held_packed_ones_are() -> None:
    # Prepare: the float64 sum of a float32 model is twice a dense update's bytes
    model = {"w": np.zeros(100_000, np.float32)}
    dense, packed = _updates(model, 2)
    mean = WeightedDeltaMean()
    mean.reset(model)
    # Execute / Assert: a dense one is folded on arrival (no second model in memory) ...
    mean.add(dense.delta, 1.0)
    assert not mean._held
    # ... a packed one (a quarter of the bytes) waits to be folded with others
    mean.add(packed.delta, 1.0)
    assert len(mean._held) == 1
