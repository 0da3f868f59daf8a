"""Simulation at scale: a population of virtual clients hosted by a few workers, trained by the
real aggregator, strategies and selectors (FLUTE's model: one model per worker, not per client).
"""

from fedbus.sim.coordinator import Coordinator, CoordinatorConfig, SimStats
from fedbus.sim.population import Population
from fedbus.sim.runner import SimResult, default_workers, run_simulation, run_workers
from fedbus.sim.store import ClientStateStore
from fedbus.sim.worker import VirtualWorker, WorkerConfig

__all__ = [
    "ClientStateStore",
    "Coordinator",
    "CoordinatorConfig",
    "Population",
    "SimResult",
    "SimStats",
    "VirtualWorker",
    "WorkerConfig",
    "default_workers",
    "run_simulation",
    "run_workers",
]
