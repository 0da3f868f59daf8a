"""The checks every aggregating service applies to what trainers send, in one place: the
envelope (decode limits, kind, job, spoofed sender, duplicate message ids) and its contents
(example count, tensor names, shapes, dtypes, NaN) before a strategy sees an update.

Each helper either returns what it read or rejects (counted, logged) and returns ``None`` /
raises ``UpdateRejected``, so the services differ only in their round or version bookkeeping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus.codec import Envelope, Limits, decode
from fedbus.errors import CodecError, UpdateRejected
from fedbus.services._wire import (
    PRESENCE,
    UPDATE,
    Rejections,
    SeenIds,
    check_update_tensors,
    split_tensors,
)
from strategies import ClientUpdate

__all__ = ["checked_num_examples", "client_update", "open_update", "presence_status"]


def open_update(
    payload: bytes,
    sender: str,
    *,
    job: str,
    limits: Limits,
    seen: SeenIds,
    rejections: Rejections,
    kinds: tuple[str, ...] = (UPDATE,),
) -> Envelope | None:
    """Decode an update within ``limits`` and check kind, job, sender (the topic's, so a
    node cannot speak for another) and message id; ``None`` when rejected."""
    reject = rejections.reject
    try:
        env = decode(payload, limits)
    except CodecError as exc:
        reject(exc.reason, exc.detail, sender=sender)
        return None
    if env.kind not in kinds or env.job != job:
        reject("bad_kind", f"kind={env.kind!r} job={env.job!r}", sender=sender)
        return None
    if env.sender != sender:
        reject("spoofed_sender", f"envelope says {env.sender!r}", sender=sender)
        return None
    if not seen.add(env.msg_id):
        reject("duplicate", f"message {env.msg_id} seen before", sender=sender)
        return None
    return env


def checked_num_examples(meta: Mapping[str, Any], max_examples: int) -> int:
    """The update's example count: a positive int no larger than ``max_examples``."""
    n = meta.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= max_examples:
        raise UpdateRejected("bad_num_examples", f"num_examples={n!r}")
    return n


def client_update(
    env: Envelope,
    sender: str,
    num_examples: int,
    reference: Mapping[str, np.ndarray],
    *,
    staleness: int = 0,
) -> ClientUpdate:
    """The strategy's view of a checked envelope; raises ``UpdateRejected`` when its tensors
    do not match ``reference`` (the global model) exactly or are not finite."""
    delta, aux = split_tensors(env.tensors)
    check_update_tensors(reference, delta)
    metrics = env.meta.get("metrics", {})
    return ClientUpdate(
        sender=sender,
        delta=delta,
        num_examples=num_examples,
        base_round=env.round,
        staleness=staleness,
        metrics=metrics if isinstance(metrics, dict) else {},
        aux=aux,
    )


def presence_status(
    payload: bytes, node: str, limits: Limits, rejections: Rejections
) -> str | None:
    """``"online"`` / ``"offline"`` (or another string) from ``node``'s presence message;
    ``None`` when it is rejected or carries no status string."""
    try:
        env = decode(payload, limits)
    except CodecError as exc:
        rejections.reject(f"presence_{exc.reason}", exc.detail, sender=node)
        return None
    if env.kind != PRESENCE or env.sender != node:
        rejections.reject("bad_presence", f"kind={env.kind} sender={env.sender}", sender=node)
        return None
    status = env.meta.get("status")
    return status if isinstance(status, str) else None
