"""Message kinds the services exchange, how tensors are named inside them, and the presence
envelope. What is checked on arrival lives in ``fedbus.door``.

Tensors of a model or update travel as ``m/<param>``; strategy extras (SCAFFOLD's control
variates) as ``a/<name>``, so a parameter can never be confused with an extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from fedbus.codec import Envelope
from fedbus.compress import decode_model
from fedbus.errors import UpdateRejected

__all__ = [
    "DONE",
    "GRANT",
    "LEASE",
    "METRICS",
    "PRESENCE",
    "READY",
    "ROUND",
    "UPDATE",
    "join_tensors",
    "presence",
    "split_model",
    "split_tensors",
]

ROUND: Final = "round"  # aggregator -> trainers: global model + who is selected + config
UPDATE: Final = "update"  # trainer -> aggregator: delta + example count + metrics
METRICS: Final = "metrics"  # aggregator -> anyone: per-round metrics
DONE: Final = "done"  # aggregator -> trainers: the job is over
READY: Final = "ready"  # trainer -> aggregator: a large update is ready, asks for a slot
GRANT: Final = "grant"  # aggregator -> one trainer (control/<trainer>): upload it now
PRESENCE: Final = "presence"  # retained online/offline, the offline one as last will
LEASE: Final = "lease"  # an instance of a node that wants to be its active one, and its ticket

_MODEL: Final = "m/"
_AUX: Final = "a/"


def join_tensors(
    model: Mapping[str, np.ndarray], aux: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    out = {_MODEL + k: v for k, v in model.items()}
    out.update({_AUX + k: v for k, v in (aux or {}).items()})
    return out


def split_tensors(
    tensors: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    model: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    for k, v in tensors.items():
        if k.startswith(_MODEL):
            model[k[len(_MODEL) :]] = v
        elif k.startswith(_AUX):
            aux[k[len(_AUX) :]] = v
        else:
            raise UpdateRejected("bad_tensor_name", f"tensor {k!r} is neither m/ nor a/")
    return model, aux


def split_model(env: Envelope) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A broadcast's (or order's) model, dense whatever ``codec.model`` sent, and its
    extras. Raises ``UpdateRejected`` for misnamed tensors or a packing that does not fit."""
    model, aux = split_tensors(env.tensors)
    return decode_model(model, env.meta), aux


def presence(job: str, node: str, role: str, status: str) -> Envelope:
    return Envelope(kind=PRESENCE, job=job, sender=node, round=0,
                    meta={"status": status, "role": role})
