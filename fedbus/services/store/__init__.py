"""The store service: records every round of one aggregator and answers workload queries
(``service.py``: the recording; ``queries.py``: the query desk; ``config.py``: settings)."""

from fedbus.services.store.build import store_from_manifest
from fedbus.services.store.config import QUERY, REPLY, StoreConfig
from fedbus.services.store.service import StoreService

__all__ = ["QUERY", "REPLY", "StoreConfig", "StoreService", "store_from_manifest"]
