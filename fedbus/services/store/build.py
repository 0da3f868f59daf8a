"""Building a store from its manifest: the one translation of ``store:`` and the wiring into
the store's settings (``StoreConfig``)."""

from __future__ import annotations

from fedbus.bus import Bus
from fedbus.codec import Compression, Limits
from fedbus.manifest import Manifest, NodeSpec, store_feed, thaw
from fedbus.services.store.config import StoreConfig
from fedbus.services.store.service import StoreService
from fedbus.store.cache import RedisCache
from fedbus.store.repository import open_round_store
from fedbus.store.workloads import TaskUtility, Workloads
from fedbus.task import Task

__all__ = ["store_from_manifest"]


def store_from_manifest(m: Manifest, node: NodeSpec, bus: Bus, task: Task | None, *,
                        limits: Limits, compression: Compression) -> StoreService:
    """The store service a manifest declares (``task``: the evaluation copy, or None)."""
    assert node.parent is not None  # validation gives every store a parent
    spec = m.store
    redis = (RedisCache(spec.redis_url, f"fedbus:store:{m.job}:{node.parent}:")
             if spec.redis_url else None)
    store = open_round_store(m, node, limits=limits, redis=redis)
    utility = TaskUtility(task) if task is not None else None
    config = StoreConfig(
        job=m.job, node_id=node.id, aggregator=node.parent,
        trainers=frozenset(t.id for t in m.children_of(node.parent)), seed=m.seed,
        population=((m.population.prefix, m.population.clients)
                    if m.population is not None and node.parent == m.aggregator.id else None),
        sketch_dim=spec.sketch_dim, full_updates=spec.full_update_rounds > 0,
        feed=store_feed(m),
        backlog_bytes=spec.backlog_mb << 20, exit_on_done=spec.exit_on_done, rounds=m.rounds,
        asynchronous=_asynchronous(m),
        work_nice=spec.work_nice, precompute=spec.precompute,
        precompute_permutations=spec.precompute_permutations,
        limits=limits, compression=compression)
    return StoreService(config, bus, store, workloads=Workloads(store, utility, seed=m.seed),
                        model=task.get_weights() if task is not None else None)


def _asynchronous(m: Manifest) -> bool:
    """Does ``m``'s root run an asynchronous strategy (FedBuff, FedAsync)?"""
    from strategies import AsyncStrategy, make_strategy

    return isinstance(make_strategy(m.strategy.name, thaw(m.strategy.params)), AsyncStrategy)
