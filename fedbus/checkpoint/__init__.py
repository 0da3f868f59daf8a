"""Checkpoints: an aggregator's state as one codec frame, and where frames are kept.

``state`` turns an aggregator's round, model, strategy and selector state into an envelope
(and back) through the codec — no pickle. ``stores`` keeps frames on disk (atomic,
checksummed, the last K) and in Redis, with disk backing Redis up.
"""

from fedbus.checkpoint.state import CHECKPOINT, AggregatorState, state_envelope, state_from
from fedbus.checkpoint.stores import CheckpointStore, DiskStore, RedisStore, TieredStore

__all__ = [
    "CHECKPOINT",
    "AggregatorState",
    "CheckpointStore",
    "DiskStore",
    "RedisStore",
    "TieredStore",
    "state_envelope",
    "state_from",
]
