"""The metadata store: per-round records, updates and sketches on disk (round -> client ->
layer), caches in front, and the workloads served from them (see docs/store.md)."""

from fedbus.store.cache import ByteLRU, RedisCache, StoreError
from fedbus.store.disk import DiskStore
from fedbus.store.repository import Retention, RoundStore
from fedbus.store.sketch import Sketcher, cosine
from fedbus.store.workloads import WORKLOADS, Result, Workloads, digest

__all__ = [
    "WORKLOADS",
    "ByteLRU",
    "DiskStore",
    "RedisCache",
    "Result",
    "Retention",
    "RoundStore",
    "Sketcher",
    "StoreError",
    "Workloads",
    "cosine",
    "digest",
]
