"""FedAvg (McMahan et al. 2017, Algorithm 1): the example-weighted mean of client models.

Streamed: w_{t+1} = w_t + sum_k n_k * delta_k / sum_k n_k, accumulated in float64 so memory is
one model-sized running sum (and at most as many bytes of held updates: ``WeightedDeltaMean``)
no matter how many clients report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np

from strategies.base import (
    ChunkedDelta,
    ClientUpdate,
    Strategy,
    StrategyError,
    Weights,
    check_compatible,
    is_chunked,
)

__all__ = ["FedAvg", "MeanRound", "WeightedDeltaMean"]


#: Elements folded at a time: the partial sum and scratch (512 KiB each) stay in cache, where a
#: whole-tensor ``np.multiply(..., dtype=float64)`` would allocate and stream a model-sized
#: temporary.
_BLOCK = 1 << 16
#: Updates held before they are folded together (``WeightedDeltaMean``).
_HOLD = 8

#: Writes ``weight x`` values ``start:stop`` of one delta tensor, flattened, into ``out``.
Reader = Callable[[int, int, np.ndarray], object]


def _dense_reader(delta: np.ndarray, weight: float) -> Reader:
    flat = np.ascontiguousarray(delta).reshape(-1)
    return lambda start, stop, out: np.multiply(flat[start:stop], weight, out=out, dtype=out.dtype)


def _chunk_reader(delta: ChunkedDelta, name: str, weight: float) -> Reader:
    return lambda start, stop, out: delta.read(name, start, stop, out, weight)


def _fold_many(acc: np.ndarray, readers: list[Reader]) -> None:
    """``acc`` (float64) ``+= sum of weight x delta`` over the readers (in order), one cache-
    sized block at a time: the block's terms are summed in a float64 partial sum, added to
    ``acc`` once. So the float64 sum is streamed through memory once for all of them (16 MB
    per 1M parameters, four times what reading a float32 delta costs).

    Not float32 partial sums, though they fold an int8 update in 0.6x the time: a float32
    sum of a few updates depends on which updates are summed together, so the model would
    depend on the order updates arrive in (a resumed aggregator's no longer matched an
    uninterrupted run's, ``tests/test_chaos.py``). In float64 the order shows only far below
    the model's float32 rounding, as it did when each update was folded on arrival."""
    flat_acc = acc.reshape(-1)  # acc is ours and contiguous: a view
    n = flat_acc.size
    partial = np.empty(min(n, _BLOCK), np.float64)
    scratch = np.empty_like(partial)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        total, term = partial[: stop - start], scratch[: stop - start]
        readers[0](start, stop, total)
        for read in readers[1:]:
            read(start, stop, term)
            np.add(total, term, out=total)
        np.add(flat_acc[start:stop], total, out=flat_acc[start:stop])


def _held_bytes(delta: Mapping[str, np.ndarray]) -> int:
    if is_chunked(delta):
        return delta.nbytes
    return sum(v.nbytes for v in delta.values())


class WeightedDeltaMean:
    """Running example-weighted mean of deltas; the building block of the FedAvg family.

    Updates are held (up to ``_HOLD`` of them, and no more bytes than the float64 sum
    itself; a dense float32 one, half that size, is folded on arrival) and folded together
    a block at a time (``_fold_many``): the float64 sum is streamed through memory once for
    all of them, and an int8 update is read from its packing (``ChunkedDelta``), never
    made dense."""

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._weights: Weights = {}
        self._held: list[tuple[Mapping[str, np.ndarray], float]] = []
        self._held_bytes = 0
        self._budget = 0
        self.total_weight = 0.0
        self.count = 0

    def reset(self, weights: Weights) -> None:
        self._weights = weights
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in weights.items()}
        self._held, self._held_bytes = [], 0
        self._budget = sum(v.nbytes for v in self._sum.values())
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        if not np.isfinite(weight) or weight < 0:
            raise StrategyError(f"update weight must be finite and >= 0, got {weight}")
        check_compatible(self._weights, delta)
        size = _held_bytes(delta)
        self._held.append((delta, weight))
        self._held_bytes += size
        self.total_weight += weight
        self.count += 1
        # A dense float32 update is half the sum's size: holding it would keep one more
        # model in memory (44 MB at 11M) to save a little memory traffic; packed ones pay.
        if len(self._held) >= _HOLD or self._held_bytes >= self._budget \
                or (2 * size >= self._budget and not is_chunked(delta)):
            self._flush()

    def _flush(self) -> None:
        held, self._held, self._held_bytes = self._held, [], 0
        if not held:
            return
        for k, acc in self._sum.items():
            _fold_many(acc, [_chunk_reader(d, k, w) if is_chunked(d)
                             else _dense_reader(d[k], w) for d, w in held])

    def mean(self) -> dict[str, np.ndarray]:
        """The weighted mean delta in float64 (zeros when nothing, or only weight 0, came)."""
        self._flush()
        if self.total_weight <= 0:
            return {k: np.zeros_like(v) for k, v in self._sum.items()}
        return {k: v / self.total_weight for k, v in self._sum.items()}


class MeanRound(Strategy):
    """A round that folds every update into one running mean delta, example-weighted when
    ``weighted``: FedAvg's round, and that of the strategies that step from the mean delta
    (``strategies._server_state.MeanDeltaStep``). Subclasses write ``finish``."""

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = bool(weighted)
        self._acc = WeightedDeltaMean()
        self._global: Weights = {}

    @property
    def num_accumulated(self) -> int:
        return self._acc.count

    def begin(self, weights: Weights, round: int) -> None:
        self._global = weights
        self._acc.reset(weights)

    def accumulate(self, update: ClientUpdate) -> None:
        self._acc.add(update.delta, float(update.num_examples) if self.weighted else 1.0)


class FedAvg(MeanRound):
    """Example-weighted averaging of client deltas.

    Args:
        weighted: weight each client by ``num_examples`` (True, the paper) or equally.
    """

    name: ClassVar[str] = "fedavg"

    def finish(self) -> Weights:
        mean = self._acc.mean()
        return {k: (w + mean[k]).astype(w.dtype) for k, w in self._global.items()}
