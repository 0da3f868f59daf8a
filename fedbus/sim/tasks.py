"""One task object serving many virtual clients.

A population task is an ordinary ``Task`` that may also offer:

* ``use_partition(index)``: switch its training data to client ``index`` (cheap; the model,
  optimizer settings and test data stay). Without it, the worker builds the task again from
  its factory for every client, which is correct but slower.
* ``client_state()`` / ``load_client_state(state)``: the client-side strategy state (SCAFFOLD,
  FedDyn) as named numpy arrays, saved to the ``ClientStateStore`` between a client's turns.
* ``rehearse(weights)`` (server copy only): a training step on server data after aggregation.

The factory gets the manifest's ``task.params`` plus ``partition_scheme`` and ``alpha`` from
``population:`` (a factory that takes ``**kwargs`` may ignore them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedbus.manifest import Manifest, thaw
from fedbus.task import Task, load_task, search_paths

__all__ = ["ClientTasks", "StatefulTask", "VirtualTask", "open_population_task"]


@runtime_checkable
class VirtualTask(Protocol):
    def use_partition(self, partition: int) -> None: ...


@runtime_checkable
class StatefulTask(Protocol):
    def client_state(self) -> dict[str, np.ndarray]: ...

    def load_client_state(self, state: Mapping[str, np.ndarray]) -> None: ...


def open_population_task(m: Manifest, partition: int | None) -> Task:
    """The task for client ``partition`` (None: the server's evaluation copy)."""
    assert m.population is not None
    p = m.population
    params: dict[str, Any] = {"partition_scheme": p.partition, "alpha": p.alpha,
                              **thaw(m.task.params)}
    return load_task(m.task.ref, partition=partition, num_partitions=p.clients, seed=m.seed,
                     params=params, search_paths=search_paths(m))


class ClientTasks:
    """Hands out the task for a client: one object switched between partitions when it can,
    else a fresh one per client (the previous one is dropped, so one model at a time)."""

    def __init__(self, m: Manifest) -> None:
        self._m = m
        self._task: Task = open_population_task(m, 0)
        self._partition = 0

    @property
    def reusable(self) -> bool:
        return isinstance(self._task, VirtualTask)

    def for_client(self, partition: int) -> Task:
        if partition != self._partition:
            if isinstance(self._task, VirtualTask):
                self._task.use_partition(partition)
            else:
                self._task = open_population_task(self._m, partition)
            self._partition = partition
        return self._task
