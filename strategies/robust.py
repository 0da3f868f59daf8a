"""Byzantine-robust aggregation of client deltas: coordinate-wise median, trimmed mean, Krum,
Multi-Krum and Bulyan. Each needs every update of the round at once, so each bounds how many.

All five work on deltas and return ``global + aggregate(deltas)``. They are unweighted by
design: a weight is something a Byzantine client could inflate, so ``num_examples`` is ignored.
Updates are ordered by sender before aggregating, so ties (Krum) break the same way whatever
order the updates arrived in, which a restart from a checkpoint relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from strategies.base import ClientUpdate, Strategy, StrategyError, Weights, check_compatible

__all__ = ["Bulyan", "Krum", "Median", "MultiKrum", "TrimmedMean"]

# Coordinate-wise statistics are computed over column blocks of this many coordinates, so the
# float64 scratch space is O(n x block) rather than O(n x model).
_BLOCK = 1 << 14


class _RobustBase(Strategy):
    """Buffers the round's deltas as one flat row each; subclasses reduce the (n, d) matrix."""

    needs_all_updates: ClassVar[bool] = True

    def __init__(self, max_updates: int = 256) -> None:
        if int(max_updates) < 1:
            raise StrategyError(f"max_updates must be >= 1, got {max_updates}")
        self.max_updates = int(max_updates)
        self._global: Weights = {}
        self._rows: list[tuple[str, np.ndarray]] = []
        self._examples: dict[str, int] = {}
        #: ``num_examples`` of the rows handed to ``_aggregate``, in their order.
        self._row_examples = np.zeros(0)
        self._dtype: np.dtype[Any] = np.dtype(np.float64)

    @property
    def num_accumulated(self) -> int:
        return len(self._rows)

    def begin(self, weights: Weights, round: int) -> None:
        self._global = weights
        self._rows = []
        self._examples = {}
        # Rows keep float32 for float32 models (half the memory); reductions run in float64.
        floats = [v.dtype for v in weights.values() if v.dtype.kind == "f"]
        self._dtype = np.dtype(np.float64) if any(d.itemsize > 4 for d in floats) \
            else np.dtype(np.float32)

    def accumulate(self, update: ClientUpdate) -> None:
        if len(self._rows) >= self.max_updates:
            raise StrategyError(
                f"{type(self).__name__} holds at most max_updates={self.max_updates} updates "
                f"per round; refusing the update from {update.sender!r} (raise max_updates or "
                f"select fewer clients)")
        if any(s == update.sender for s, _ in self._rows):
            raise StrategyError(f"{type(self).__name__}: second update from {update.sender!r} "
                                f"in one round; robust bounds count each client once")
        check_compatible(self._global, update.delta)
        row = np.concatenate([np.ravel(update.delta[k]).astype(self._dtype, copy=False)
                              for k in self._global]) if self._global else \
            np.zeros(0, self._dtype)
        if not np.all(np.isfinite(row)):
            raise StrategyError(f"update from {update.sender!r} has non-finite values")
        self._rows.append((update.sender, row))
        self._examples[update.sender] = int(update.num_examples)

    def finish(self) -> Weights:
        ordered = sorted(self._rows, key=lambda sr: sr[0])
        rows = [r for _, r in ordered]
        self._row_examples = np.array([self._examples[s] for s, _ in ordered], dtype=np.float64)
        self._rows = []
        if not rows:
            return {k: w.copy() for k, w in self._global.items()}
        agg = self._aggregate(np.stack(rows))
        out: Weights = {}
        offset = 0
        for k, w in self._global.items():
            part = agg[offset:offset + w.size].reshape(w.shape)
            offset += w.size
            out[k] = (w + part).astype(w.dtype)
        return out

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        """Reduce the (n, d) matrix of deltas to one float64 delta of length d."""
        raise NotImplementedError


def _columnwise(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.empty(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[1], _BLOCK):
        out[start:start + _BLOCK] = fn(x[:, start:start + _BLOCK].astype(np.float64))
    return out


def _sq_distances(x: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances of the rows, float64, accumulated over column blocks."""
    n = x.shape[0]
    gram = np.zeros((n, n), dtype=np.float64)
    for start in range(0, x.shape[1], _BLOCK):
        b = x[:, start:start + _BLOCK].astype(np.float64)
        # ||a-b||^2 = ||a||^2 + ||b||^2 - 2ab through one BLAS product: n^2 d flops at matmul
        # speed. In float64 the cancellation error is ~1e-16 ||a||^2, far below any honest gap.
        gram += b @ b.T
    sq = np.diag(gram)
    d2: np.ndarray = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(d2, 0.0)
    return d2


def _krum_scores(d2: np.ndarray, f: int) -> np.ndarray:
    """Blanchard et al. 2017, Sec. 4: s(i) = sum of squared distances to the n - f - 2 closest
    other vectors. Clamped to at least one neighbour (Bulyan's last Krum runs on small sets)."""
    n = d2.shape[0]
    k = max(n - f - 2, 1)
    if n == 1:
        return np.zeros(1)
    others = np.sort(d2 + np.diag(np.full(n, np.inf)), axis=1)[:, :min(k, n - 1)]
    scores: np.ndarray = others.sum(axis=1)
    return scores


def _check_f(f: int) -> int:
    if int(f) != f or f < 0:
        raise StrategyError(f"f (number of Byzantine clients tolerated) must be an int >= 0, "
                            f"got {f}")
    return int(f)


class Median(_RobustBase):
    """Coordinate-wise median of the deltas (Yin et al. 2018, "Byzantine-Robust Distributed
    Learning", Option I: g = med{g_i}, per coordinate).

    Needs all updates (``needs_all_updates``); more than ``max_updates`` in a round raise
    ``StrategyError``.

    Args:
        max_updates: most updates held in memory per round.
    """

    name: ClassVar[str] = "median"

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        return _columnwise(x, lambda b: np.median(b, axis=0))


class TrimmedMean(_RobustBase):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018, Option II, Definition 2): per
    coordinate drop the ``floor(beta * n)`` largest and smallest values, average the rest.

    Needs all updates; more than ``max_updates`` in a round raise ``StrategyError``.

    Args:
        beta: fraction trimmed from each end, in [0, 0.5).
        max_updates: most updates held in memory per round.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, beta: float = 0.1, max_updates: int = 256) -> None:
        if not 0 <= beta < 0.5:
            raise StrategyError(f"beta must be in [0, 0.5), got {beta}")
        super().__init__(max_updates)
        self.beta = float(beta)

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        k = int(np.floor(self.beta * n))

        def trim(b: np.ndarray) -> np.ndarray:
            mean: np.ndarray = np.sort(b, axis=0)[k:n - k].mean(axis=0)
            return mean

        return _columnwise(x, trim)


class _Byzantine(_RobustBase):
    """A robust aggregator that tolerates ``f`` Byzantine clients (Krum, Bulyan).

    Needs all updates; more than ``max_updates`` in a round raise ``StrategyError``.

    Args:
        f: number of Byzantine clients tolerated.
        max_updates: most updates held in memory per round.
    """

    def __init__(self, f: int = 1, max_updates: int = 256) -> None:
        super().__init__(max_updates)
        self.f = _check_f(f)


class Krum(_Byzantine):
    """Krum (Blanchard et al. 2017, "Machine Learning with Adversaries", Sec. 4): the single
    delta whose summed squared distance to its n - f - 2 nearest neighbours is smallest.
    Requires n > 2f + 2 updates; ``f`` Byzantine clients tolerated, at most ``max_updates``
    updates held a round.
    """

    name: ClassVar[str] = "krum"

    def _require(self, n: int) -> None:
        if n <= 2 * self.f + 2:
            raise StrategyError(f"{type(self).__name__}(f={self.f}) needs n > 2f+2 = "
                                f"{2 * self.f + 2} updates, got {n}; lower f or select more "
                                f"clients")

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        self._require(x.shape[0])
        scores = _krum_scores(_sq_distances(x), self.f)
        best: np.ndarray = x[int(np.argmin(scores))].astype(np.float64)
        return best


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017, Sec. 5): the mean of the ``m`` deltas with the best
    Krum scores. ``m = 1`` is Krum; ``m = n`` is the plain mean. Requires n > 2f + 2.

    Needs all updates; more than ``max_updates`` in a round raise ``StrategyError``.

    ``weighted=True`` averages the chosen deltas by ``num_examples`` instead of equally (what
    Flower's ``MultiKrum`` does); the choice itself never looks at the weights, but a Byzantine
    client that is chosen can then inflate its say, so the default stays unweighted.

    Args:
        f: number of Byzantine clients tolerated.
        m: how many deltas to average; ``None`` means n - f.
        max_updates: most updates held in memory per round.
        weighted: example-weighted mean of the chosen deltas.
    """

    name: ClassVar[str] = "multi_krum"

    def __init__(self, f: int = 1, m: int | None = None, max_updates: int = 256,
                 weighted: bool = False) -> None:
        super().__init__(f, max_updates)
        if m is not None and int(m) < 1:
            raise StrategyError(f"m must be >= 1 or None (n - f), got {m}")
        self.m = None if m is None else int(m)
        self.weighted = bool(weighted)

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        self._require(n)
        m = n - self.f if self.m is None else min(self.m, n)
        scores = _krum_scores(_sq_distances(x), self.f)
        # Stable sort: equal scores keep sender order.
        chosen = np.argsort(scores, kind="stable")[:m]
        if self.weighted:
            w = self._row_examples[chosen]
            if w.sum() <= 0:
                raise StrategyError("weighted MultiKrum: the chosen updates report 0 examples")
            weighted: np.ndarray = (w @ x[chosen].astype(np.float64)) / w.sum()
            return weighted
        mean: np.ndarray = x[chosen].astype(np.float64).mean(axis=0)
        return mean


class Bulyan(_Byzantine):
    """Bulyan (El Mhamdi et al. 2018, "The Hidden Vulnerability...", Sec. 4): pick
    theta = n - 2f deltas by repeated Krum (each pick removed, Krum rerun on the rest), then per
    coordinate average the beta = theta - 2f values closest to the median. Requires n >= 4f + 3;
    ``f`` Byzantine clients tolerated, at most ``max_updates`` updates held a round.

    ``selection: one_shot`` picks the theta lowest Krum scores of one pass over all n instead
    (Multi-Krum), as Flower 1.42's serverapp ``Bulyan`` does; the paper's repeated Krum is the
    default (``iterative``). They can pick different sets (n = 7, f = 1 already).
    """

    name: ClassVar[str] = "bulyan"

    def __init__(self, f: int = 1, max_updates: int = 256,
                 selection: str = "iterative") -> None:
        super().__init__(f, max_updates)
        if selection not in ("iterative", "one_shot"):
            raise StrategyError(f"selection must be 'iterative' or 'one_shot', got "
                                f"{selection!r}")
        self.selection = selection

    def _aggregate(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n < 4 * self.f + 3:
            raise StrategyError(f"Bulyan(f={self.f}) needs n >= 4f+3 = {4 * self.f + 3} "
                                f"updates, got {n}; lower f or select more clients")
        theta = n - 2 * self.f
        beta = theta - 2 * self.f
        d2 = _sq_distances(x)
        selected: list[int] = []
        if self.selection == "one_shot":  # Multi-Krum: the theta best scores of one pass
            selected = np.argsort(_krum_scores(d2, self.f), kind="stable")[:theta].tolist()
        remaining = list(range(n))
        while len(selected) < theta:
            sub = d2[np.ix_(remaining, remaining)]
            best = remaining[int(np.argmin(_krum_scores(sub, self.f)))]
            selected.append(best)
            remaining.remove(best)
        chosen = x[selected]

        def closest_to_median(b: np.ndarray) -> np.ndarray:
            med = np.median(b, axis=0)
            order = np.argsort(np.abs(b - med), axis=0, kind="stable")[:beta]
            closest: np.ndarray = np.take_along_axis(b, order, axis=0)
            mean: np.ndarray = closest.mean(axis=0)
            return mean

        return _columnwise(chosen, closest_to_median)
