"""A numpy-only task for tests, simulations and benchmarks: no torch, any model size.

Each partition pulls the model toward its own target vector; the federated optimum is the
example-weighted mean of the targets, so a test can check the aggregate exactly. ``size``
sets the parameter count (1M, 11M for the round benchmark), ``delay_s`` simulates a slow
device, ``speeds`` gives heterogeneous delays by partition.

Memory: a target is a pattern of at most ``PERIOD`` values repeated to ``size``. Up to
``PERIOD`` parameters the task holds the targets as plain arrays (the tests' sizes); above it,
only the pattern is stored and ``fit``/``evaluate`` walk the model in blocks against one small
tiled block, so a task holds one model-sized array (its weights), not three. Both paths give
bitwise the same weights.

Set-up: by default every task draws all ``num_partitions`` targets at once (one stream, the
values the tests pin), so building one trainer costs O(population): 0.35 s a trainer at
10,000 partitions, an hour for all of them. ``independent: true`` draws partition ``p``'s
target from ``(seed, p)`` alone, O(1) per trainer whatever the population (what
benchmarks/bench_scale.py runs); its optimum (``global_target``, what the server evaluates
against) is summed partition by partition when it is first asked for, never by a trainer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np

from fedbus.task import EvalResult, FitResult

__all__ = ["PERIOD", "ToyTask", "make_task", "vector_weights"]

#: Length of the repeating target pattern.
PERIOD: Final = 1024
# Elements per block in the big-model path (a multiple of PERIOD): 256 KiB of float32.
_BLOCK: Final = 64 * PERIOD


class _Periodic:
    """``np.resize(pattern, size)`` without materialising it: the pattern plus one block."""

    def __init__(self, pattern: np.ndarray, size: int) -> None:
        self.pattern = np.ascontiguousarray(pattern, dtype=np.float32)
        self.size = size
        self.small = size <= len(self.pattern)
        # Blocks start on pattern boundaries, so one tiled block serves every block.
        self.block = (np.resize(self.pattern, size).astype(np.float32) if self.small
                      else np.resize(self.pattern, min(size, _BLOCK)).astype(np.float32))

    def full(self) -> np.ndarray:
        """The whole vector (a fresh array, except for small sizes where it is kept anyway)."""
        return self.block if self.small else np.resize(self.pattern, self.size).astype(np.float32)

    def blocks(self, w: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(segment of ``w``, matching segment of the target) pairs covering ``w``."""
        for start in range(0, self.size, _BLOCK):
            seg = w[start:start + _BLOCK]
            yield seg, self.block[:len(seg)]


def vector_weights(current: np.ndarray, weights: Mapping[str, np.ndarray], what: str
                   ) -> np.ndarray:
    """A copy of ``weights["w"]``, once it is checked to be the one vector a model like
    ``current`` has (``what``: the model's name in the error)."""
    w = weights["w"]
    if set(weights) != {"w"} or w.shape != current.shape or w.dtype != current.dtype:
        raise ValueError(f"{what} model is one float32 vector of {current.shape}")
    return np.array(w, copy=True)


class ToyTask:
    def __init__(self, target: _Periodic, num_examples: int, lr: float, delay_s: float,
                 global_target: _Periodic | Callable[[], _Periodic]) -> None:
        # np.zeros is lazily backed by the OS: no resident memory until written.
        self.w = np.zeros(target.size, dtype=np.float32)
        self._target = target
        self.num_examples = num_examples
        self.lr = lr
        self.delay_s = delay_s
        self._optimum = global_target

    @functools.cached_property
    def _global(self) -> _Periodic:
        """The federated optimum, computed on first use (O(population) to compute)."""
        g = self._optimum
        return g if isinstance(g, _Periodic) else g()

    @property
    def target(self) -> np.ndarray:
        """This partition's target vector (materialised on demand for big sizes)."""
        return self._target.full()

    @property
    def global_target(self) -> np.ndarray:
        """The federated optimum (materialised on demand for big sizes)."""
        return self._global.full()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.w = vector_weights(self.w, weights, "toy")

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        if self.delay_s:
            time.sleep(self.delay_s)
        lr = float(config.get("lr", self.lr))
        if self._target.small:
            t = self._target.block
            loss = float(np.mean((self.w - t) ** 2))
            self.w += lr * (t - self.w)
        else:
            # Same arithmetic per element (float32 t - w, times lr, added), block by block.
            total = 0.0
            for seg, t in self._target.blocks(self.w):
                d = t - seg
                total += float(np.dot(d, d))
                d *= lr
                seg += d
            loss = total / self._target.size
        return FitResult(num_examples=self.num_examples, metrics={"train_loss": loss})

    def evaluate(self) -> EvalResult:
        g = self._global
        if g.small:
            loss = float(np.mean((self.w - g.block) ** 2))
        else:
            total = 0.0
            for seg, t in g.blocks(self.w):
                d = seg - t
                total += float(np.dot(d, d))
            loss = total / g.size
        return EvalResult(num_examples=1, loss=loss, metrics={"distance": float(np.sqrt(loss))})


def make_task(
    *,
    partition: int | None,
    num_partitions: int,
    seed: int = 0,
    size: int = 16,
    lr: float = 0.5,
    delay_s: float = 0.0,
    speeds: Sequence[float] = (),
    independent: bool = False,
) -> ToyTask:
    width = min(size, PERIOD)

    def tile(v: np.ndarray) -> _Periodic:
        return _Periodic(v.astype(np.float32), size)

    def examples(p: int) -> int:
        return 10 + 5 * p

    optimum: Callable[[], _Periodic]
    if independent:
        def own(p: int) -> np.ndarray:
            return np.random.default_rng([seed, p]).normal(size=width).astype(np.float32)

        def optimum() -> _Periodic:
            acc = np.zeros(width, dtype=np.float64)
            for p in range(num_partitions):  # one target at a time: O(size) memory
                acc += own(p) * examples(p)
            return tile(acc / sum(examples(p) for p in range(num_partitions)))

        mine = None if partition is None else own(partition)
    else:
        # One stream for every partition: O(population) per task, nothing of it kept.
        targets = np.random.default_rng(seed).normal(
            size=(num_partitions, width)).astype(np.float32)
        counts = 10 + 5 * np.arange(num_partitions)  # examples(p), all at once
        mean = tile((targets * counts[:, None]).sum(0) / counts.sum())
        mine = None if partition is None else targets[partition].copy()
        del targets

        def optimum() -> _Periodic:
            return mean

    if partition is None or mine is None:
        g = optimum()
        return ToyTask(g, 0, lr, 0.0, g)
    delay = speeds[partition % len(speeds)] if speeds else delay_s
    return ToyTask(tile(mine), examples(partition), lr, float(delay), optimum)
