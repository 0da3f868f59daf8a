"""A small CNN on scikit-learn's 8x8 digits, for a simulated population of 1,000+ clients.

The digits set has 1,437 training images, fewer than the clients, so clients are generated:
client ``p`` draws its label mix from Dirichlet(alpha) (``partition_scheme: dirichlet``; the
training set's label frequencies for ``iid``), then 16-48 images of those labels from the
training split, each shifted by up to one pixel. Everything is drawn from (seed, p) when the
client is used, so a worker holds one client's data at a time and memory does not grow with
the population. The server evaluates on the held-out stratified test split (360 images, never
seen by any client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from examples.digits.task import load_split
from fedbus.torch_task import TorchTask

__all__ = ["DigitsPopulationTask", "build_cnn", "client_data", "make_task"]

_CLIENT_STREAM = 7


def build_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(128, 10),
    )


def client_data(partition: int, *, seed: int, scheme: str, alpha: float,
                min_size: int = 16, max_size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Client ``partition``'s images (n, 64) float32 and labels (n,) int64."""
    x_tr, y_tr, _, _ = load_split(seed)
    rng = np.random.default_rng([seed, _CLIENT_STREAM, partition])
    freq = np.bincount(y_tr, minlength=10) / len(y_tr)
    mix = rng.dirichlet(np.full(10, alpha)) if scheme == "dirichlet" else freq
    n = int(rng.integers(min_size, max_size + 1))
    labels = rng.choice(10, size=n, p=mix)
    by_label = [np.flatnonzero(y_tr == c) for c in range(10)]
    idx = np.array([by_label[c][rng.integers(len(by_label[c]))] for c in labels])
    images = x_tr[idx].reshape(n, 8, 8)
    shifts = rng.integers(-1, 2, size=(n, 2))
    shifted = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts,
                                                                              strict=True)])
    return shifted.reshape(n, 64).astype(np.float32), y_tr[idx].astype(np.int64)


class DigitsPopulationTask(TorchTask):
    """A ``TorchTask`` whose training data is switched per virtual client."""

    def __init__(self, *args: Any, scheme: str, alpha: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheme = scheme
        self.alpha = float(alpha)

    def use_partition(self, partition: int) -> None:
        x, y = client_data(partition, seed=self.seed, scheme=self.scheme, alpha=self.alpha)
        with self._lock:
            self.train_x, self.train_y = torch.from_numpy(x), torch.from_numpy(y)
            self.partition = partition

    def rehearse(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Server-side rehearsal is not offered: the server holds only the test split."""
        raise NotImplementedError("the digits server holds no training data")


def make_task(
    *,
    partition: int | None,
    num_partitions: int,
    seed: int = 0,
    epochs: int = 2,
    lr: float = 0.05,
    batch_size: int = 16,
    momentum: float = 0.0,
    partition_scheme: str = "dirichlet",
    alpha: float = 0.5,
    **_: Any,
) -> DigitsPopulationTask:
    _, _, x_te, y_te = load_split(seed)
    torch.manual_seed(seed)  # every worker and the server start from the same model
    empty = (torch.zeros(0, 64), torch.zeros(0, dtype=torch.int64))
    task = DigitsPopulationTask(
        build_cnn(), empty, (torch.from_numpy(x_te), torch.from_numpy(y_te)),
        epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, seed=seed,
        partition=partition, scheme=partition_scheme, alpha=alpha)
    if partition is not None:
        task.use_partition(partition)
    return task
