"""The wire benchmark's trivial training, the same on both sides: each client returns the
model plus a constant (``benchmarks/flower/wire_flower.py`` does the same in Flower).

One float32 vector of ``size`` parameters, no copies beyond the one addition: the trainer
hands ``set_weights`` a freshly decoded array, ``fit`` makes the new one, ``get_weights``
returns it as it is. Examples are 1 per client, so FedAvg is a plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus.task import EvalResult, FitResult

__all__ = ["AddTask", "make_task"]

STEP = np.float32(0.01)


class AddTask:
    def __init__(self, size: int) -> None:
        self.w = np.zeros(size, dtype=np.float32)  # lazily backed by the OS until written

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        w = weights["w"]
        if set(weights) != {"w"} or w.shape != self.w.shape or w.dtype != self.w.dtype:
            raise ValueError(f"model is one float32 vector of {self.w.shape}")
        self.w = w

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        self.w = self.w + STEP
        return FitResult(num_examples=1)

    def evaluate(self) -> EvalResult:
        return EvalResult(num_examples=1, loss=float(np.float32(self.w[0])))


def make_task(*, partition: int | None, num_partitions: int, seed: int = 0,
              size: int = 1_000_000) -> AddTask:
    del partition, num_partitions, seed  # every client does the same
    return AddTask(size)
