"""Test-only digits tasks for the store's must-show checks: a poisoned trainer that learns on
flipped labels, and two groups of trainers whose data come from disjoint label sets.

``make_task(mode="flip", poisoned=[4])``: an even random split of the training set; the
partitions in ``poisoned`` train on labels ``9 - y``. ``make_task(mode="groups")``: the first
half of the partitions hold only labels 0-4, the second half only 5-9. ``local_test=True``
evaluates on the held-out examples of the partition's own labels (its local accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from examples.digits.task import build_model, load_split
from fedbus.torch_task import TorchTask

GROUPS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def group_of(partition: int, num_partitions: int) -> int:
    return 0 if partition < num_partitions // 2 else 1


def make_task(*, partition: int | None, num_partitions: int, seed: int = 0,
              mode: str = "flip", poisoned: Sequence[int] = (), hidden: int = 32,
              epochs: int = 1, lr: float = 0.1, local_test: bool = False,
              **_: Any) -> TorchTask:
    x_tr, y_tr, x_te, y_te = load_split(seed)
    rng = np.random.default_rng(seed)
    test_x, test_y = x_te, y_te
    if partition is None:
        train_x, train_y = x_tr[:0], y_tr[:0]
    elif mode == "flip":
        idx = np.array_split(rng.permutation(len(y_tr)), num_partitions)[partition]
        train_x, train_y = x_tr[idx], y_tr[idx]
        if partition in poisoned:
            train_y = 9 - train_y
    elif mode == "groups":
        g = group_of(partition, num_partitions)
        members = [p for p in range(num_partitions) if group_of(p, num_partitions) == g]
        pool = rng.permutation(np.flatnonzero(np.isin(y_tr, GROUPS[g])))
        idx = np.array_split(pool, len(members))[members.index(partition)]
        train_x, train_y = x_tr[idx], y_tr[idx]
        if local_test:
            keep = np.isin(y_te, GROUPS[g])
            test_x, test_y = x_te[keep], y_te[keep]
    else:
        raise ValueError(f"mode {mode!r}: use flip or groups")
    torch.manual_seed(seed)
    return TorchTask(build_model(hidden),
                     (torch.from_numpy(train_x), torch.from_numpy(train_y)),
                     (torch.from_numpy(test_x), torch.from_numpy(test_y)),
                     epochs=epochs, lr=lr, batch_size=32, seed=seed, partition=partition)
