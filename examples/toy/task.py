"""A numpy-only task for tests, simulations and benchmarks: no torch, any model size.

Each partition pulls the model toward its own target vector; the federated optimum is the
example-weighted mean of the targets, so a test can check the aggregate exactly. ``size``
sets the parameter count (1M, 11M for the round benchmark), ``delay_s`` simulates a slow
device, ``speeds`` gives heterogeneous delays by partition.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbus.task import EvalResult, FitResult

__all__ = ["ToyTask", "make_task"]


class ToyTask:
    def __init__(self, target: np.ndarray, num_examples: int, lr: float, delay_s: float,
                 global_target: np.ndarray) -> None:
        self.w = np.zeros_like(target)
        self.target = target
        self.num_examples = num_examples
        self.lr = lr
        self.delay_s = delay_s
        self.global_target = global_target

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        w = weights["w"]
        if set(weights) != {"w"} or w.shape != self.w.shape or w.dtype != self.w.dtype:
            raise ValueError(f"toy model is one float32 vector of {self.w.shape}")
        self.w = np.array(w, copy=True)

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        if self.delay_s:
            time.sleep(self.delay_s)
        lr = float(config.get("lr", self.lr))
        loss = float(np.mean((self.w - self.target) ** 2))
        self.w += lr * (self.target - self.w)
        return FitResult(num_examples=self.num_examples, metrics={"train_loss": loss})

    def evaluate(self) -> EvalResult:
        loss = float(np.mean((self.w - self.global_target) ** 2))
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
    **_: Any,
) -> ToyTask:
    rng = np.random.default_rng(seed)
    targets = rng.normal(size=(num_partitions, min(size, 1024))).astype(np.float32)
    examples = 10 + np.arange(num_partitions) * 5
    mean = (targets * examples[:, None]).sum(0) / examples.sum()

    def tile(v: np.ndarray) -> np.ndarray:
        return np.resize(v, size).astype(np.float32)

    if partition is None:
        return ToyTask(tile(mean), 0, lr, 0.0, tile(mean))
    delay = speeds[partition % len(speeds)] if speeds else delay_s
    return ToyTask(tile(targets[partition]), int(examples[partition]), lr, float(delay),
                   tile(mean))
