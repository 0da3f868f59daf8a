"""A round as the store records it: the bookkeeping of an open round, its rejections, and
the record written when it closes (the aggregate, and each update's cosine to it)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from fedbus.door import Rejections
from fedbus.store.repository import RoundStore
from fedbus.store.sketch import Sketcher, cosine, dot, dot32, norm
from fedbus.store.workloads import digest

__all__ = ["Members", "OpenRound", "RoundRejections", "finite", "finite_metrics_capped",
           "round_record"]

_MAX_METRICS: Final = 64
_MAX_REJECTION_LOG: Final = 100


@dataclass(slots=True)
class OpenRound:
    """A round the store has seen start and not yet closed."""

    number: int
    model: dict[str, np.ndarray]
    digest: str
    started: float = field(default_factory=time.monotonic)
    selected: set[str] = field(default_factory=set)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    sketches: dict[str, np.ndarray] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    rejections: list[dict[str, str]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    #: The model the round (version) produced, once broadcast.
    next_model: dict[str, np.ndarray] | None = None
    #: Its digest (it is the next round's starting model: hashed once, not twice).
    next_digest: str | None = None
    #: Fed sketches: the aggregator's record of this round has been recorded.
    fed: bool = False


class RoundRejections(Rejections):
    """The shared rejection counter, also filed under the round being recorded."""

    def __init__(self, node: str, current: Callable[[], OpenRound | None]) -> None:
        super().__init__(node)
        self._current = current

    def reject(self, reason: str, detail: str, **context: Any) -> None:
        super().reject(reason, detail, **context)
        state = self._current()
        if state is not None:
            state.rejected[reason] += 1
            if len(state.rejections) < _MAX_REJECTION_LOG:
                state.rejections.append({"sender": str(context.get("sender", "")),
                                         "reason": reason})


class Members:
    """A membership test as a container (a simulated population is not listed node by
    node)."""

    def __init__(self, test: Callable[[str], bool]) -> None:
        self._test = test

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and self._test(item)


async def round_record(state: OpenRound, next_model: Mapping[str, np.ndarray] | None, *,
                       store: RoundStore, sketcher: Sketcher,
                       work: Callable[..., Awaitable[Any]], feed: str) -> dict[str, Any]:
    """Finish a round's record: the aggregate (exact from the next model when known, else
    the example-weighted mean of what arrived) and each update's cosine to it."""
    r = state.number
    agg_full: dict[str, np.ndarray] | None = None
    if next_model is not None and next_model.keys() == state.model.keys():
        # float32 like the models: no model-sized float64 copy
        agg_full = {k: np.subtract(next_model[k], state.model[k], dtype=np.float32)
                    for k in state.model}
        source = "model"
        agg_sketch = await work(sketcher.sketch, agg_full)
    else:
        source = "fedavg_estimate"
        total = sum(ci["num_examples"] for ci in state.clients.values()) or 1
        agg_sketch = np.zeros(sketcher.dim, dtype=np.float64)
        for cid, s in state.sketches.items():
            agg_sketch += s * (state.clients[cid]["num_examples"] / total)
    agg_norm = (await work(norm, agg_full) if agg_full is not None
                else float(np.linalg.norm(agg_sketch)))
    for cid, ci in state.clients.items():
        full = await store.update(r, cid) if agg_full is not None and ci["full"] else None
        if full is not None and agg_full is not None:
            # the update's norm is known: one dot product per update, not three
            ci["cos"] = round(await work(cos_known, full, agg_full, ci["norm"], agg_norm), 6)
            ci["cos_source"] = "exact"
        else:
            ci["cos"] = round(cosine(state.sketches[cid], agg_sketch), 6)
            ci["cos_source"] = "sketch"
    result_digest = state.next_digest if next_model is state.next_model else None
    if result_digest is None and next_model is not None:
        result_digest = await work(digest, next_model)
    record: dict[str, Any] = {
        "round": r,
        "selected": sorted(state.selected),
        "model_digest": state.digest,
        "result_digest": result_digest,
        "layers": sorted(state.model),
        "params": int(sum(v.size for v in state.model.values())),
        "clients": state.clients,
        "missing": sorted(state.selected - set(state.clients)),
        "rejected": dict(state.rejected),
        "rejections": state.rejections,
        "report": state.report or {},
        "aggregate": {"source": source, "norm": round(agg_norm, 8)},
        "sketch_dim": sketcher.dim,
        "feed": feed,
    }
    return record


def finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def finite_metrics_capped(metrics: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in list(metrics.items())[:_MAX_METRICS]:
        f = finite(v)
        if isinstance(k, str) and len(k) <= 64 and f is not None:
            out[k] = f
    return out


def cos_known(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], norm_a: float,
               norm_b: float) -> float:
    """Cosine of two updates whose norms are already known."""
    if norm_a <= 0 or norm_b <= 0:
        return 0.0
    ab = 0.0
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        ab += dot32(x, y) if x.dtype == y.dtype == np.float32 else dot(x, y)
    return max(-1.0, min(1.0, ab / (norm_a * norm_b)))


