"""Handwritten digits (scikit-learn's bundled 8x8 set, no download), split non-IID.

Each trainer gets a Dirichlet(alpha) share of every label (alpha=0.5 by default: strongly
skewed), the aggregator a held-out, stratified 20% test set. A small MLP keeps a round cheap
enough for ten trainers on a Raspberry Pi.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedbus.task import FitResult
from fedbus.torch_task import TorchTask

__all__ = ["dirichlet_partition", "load_split", "make_task"]


@functools.cache
def load_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, ...]:
    """Standardised digits, split train/test stratified by label (same split for everyone)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.extend(idx[: round(len(idx) * test_fraction)].tolist())
    test = np.zeros(len(y), dtype=bool)
    test[test_idx] = True
    return x[~test], y[~test].astype(np.int64), x[test], y[test].astype(np.int64)


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed split: for each class, proportions ~ Dirichlet(alpha) over partitions.

    Redrawn (bounded) until every partition has at least ``min_size`` examples, as in
    Hsu et al. 2019 / Li et al. 2021's NIID-Bench.
    """
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def build_model(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class SlowTorchTask(TorchTask):
    """A TorchTask that sleeps ``delay_s`` before each fit: a slower device, for async runs."""

    def __init__(self, *args: Any, delay_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = float(delay_s)

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        time.sleep(self.delay_s)
        return super().fit(config, extra)


def make_task(
    *,
    partition: int | None,
    num_partitions: int,
    seed: int = 0,
    alpha: float = 0.5,
    hidden: int = 64,
    epochs: int = 2,
    lr: float = 0.1,
    batch_size: int = 32,
    momentum: float = 0.0,
    delay_s: float = 0.0,
    speeds: Sequence[float] = (),
) -> TorchTask:
    """Factory named in the manifest (``examples.digits.task:make_task``).

    ``delay_s`` (or ``speeds``, one delay per partition, cycled) makes ``fit`` sleep first,
    to simulate heterogeneous devices; both default to no delay.
    """
    x_tr, y_tr, x_te, y_te = load_split(seed)
    if partition is None:  # the aggregator: evaluation only
        train_x, train_y = x_tr[:0], y_tr[:0]
    else:
        idx = dirichlet_partition(y_tr, num_partitions, alpha, seed)[partition]
        train_x, train_y = x_tr[idx], y_tr[idx]
    torch.manual_seed(seed)  # the initial model is the aggregator's; same seed, same model
    args = (
        build_model(hidden),
        (torch.from_numpy(train_x), torch.from_numpy(train_y)),
        (torch.from_numpy(x_te), torch.from_numpy(y_te)),
    )
    kwargs: dict[str, Any] = {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                              "momentum": momentum, "seed": seed, "partition": partition}
    delay = float(speeds[partition % len(speeds)]) if speeds and partition is not None else delay_s
    if partition is not None and delay > 0:
        return SlowTorchTask(*args, delay_s=delay, **kwargs)
    return TorchTask(*args, **kwargs)
