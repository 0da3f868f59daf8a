"""A numpy-only task for simulated populations (no torch): memory flat in the client count.

Client ``p`` pulls a vector toward its own target ``center + spread * noise_p``, where the
noise is drawn from (seed, p) when the client is used: nothing is stored per client, so 10,000
clients cost what 10 do. ``partition_scheme: dirichlet`` skews clients harder (the spread
grows as alpha shrinks), standing in for label skew. The server evaluates the distance to the
center, the optimum of the population.

``stateful: true`` gives every client a piece of state kept between its turns (how often it
trained, which damps its step), saved in the simulation's client-state store the way SCAFFOLD's
or FedDyn's client state is. ``fit_s`` makes every fit take that long (a stand-in for real
training time, so a test can stop a worker in the middle of a round).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.toy.task import vector_weights
from fedbus.task import EvalResult, FitResult

__all__ = ["PopulationTask", "make_task"]


class PopulationTask:
    def __init__(self, *, size: int, seed: int, lr: float, spread: float, epochs: int,
                 stateful: bool = False, broken: tuple[int, ...] = (),
                 fit_s: float = 0.0) -> None:
        self.stateful = bool(stateful)
        self.fit_s = float(fit_s)
        #: Clients whose training raises (to test how a simulation survives a bad client).
        self.broken = frozenset(int(b) for b in broken)
        self.visits = 0
        self.size = int(size)
        self.seed = int(seed)
        self.lr = float(lr)
        self.spread = float(spread)
        self.epochs = int(epochs)
        self.center = np.random.default_rng([seed, 0]).normal(size=self.size).astype(np.float32)
        self.w = np.zeros(self.size, dtype=np.float32)
        self.partition: int | None = None
        self.target = self.center
        self.num_examples = 0

    def use_partition(self, partition: int) -> None:
        rng = np.random.default_rng([self.seed, 1, partition])
        noise = rng.normal(size=self.size).astype(np.float32)
        self.target = (self.center + np.float32(self.spread) * noise).astype(np.float32)
        self.num_examples = 10 + int(rng.integers(0, 90))
        self.partition = partition

    def get_weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w.copy()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.w = vector_weights(self.w, weights, "population")

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        if self.partition is None:
            return FitResult(num_examples=0)
        if self.partition in self.broken:
            raise RuntimeError(f"client {self.partition} is broken (task parameter `broken`)")
        if self.fit_s > 0:
            time.sleep(self.fit_s)
        lr = np.float32(config.get("lr", self.lr))
        if self.stateful:
            lr = np.float32(lr / (1 + self.visits))
            self.visits += 1
        loss = float(np.mean((self.w - self.target) ** 2))
        for _ in range(self.epochs):
            self.w += lr * (self.target - self.w)
        return FitResult(num_examples=self.num_examples, metrics={"train_loss": loss})

    def client_state(self) -> dict[str, np.ndarray]:
        return {"visits": np.array([self.visits], dtype=np.int64)} if self.stateful else {}

    def load_client_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.visits = int(state["visits"][0]) if "visits" in state else 0

    def evaluate(self) -> EvalResult:
        loss = float(np.mean((self.w - self.center) ** 2))
        return EvalResult(num_examples=1, loss=loss, metrics={"distance": float(np.sqrt(loss))})

    def rehearse(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Server-side rehearsal: one small step toward the server's data (the center)."""
        w = np.asarray(weights["w"], dtype=np.float32)
        return {"w": (w + np.float32(0.1) * (self.center - w)).astype(np.float32)}


def make_task(
    *,
    partition: int | None,
    num_partitions: int,
    seed: int = 0,
    size: int = 1000,
    lr: float = 0.5,
    epochs: int = 1,
    spread: float = 1.0,
    partition_scheme: str = "iid",
    alpha: float = 0.5,
    stateful: bool = False,
    broken: tuple[int, ...] = (),
    fit_s: float = 0.0,
    **_: Any,
) -> PopulationTask:
    if partition_scheme == "dirichlet":
        spread = spread / float(np.sqrt(alpha))  # smaller alpha: clients further apart
    task = PopulationTask(size=size, seed=seed, lr=lr, spread=spread, epochs=epochs,
                          stateful=stateful, broken=tuple(broken), fit_s=fit_s)
    if partition is not None:
        task.use_partition(partition)
    return task
