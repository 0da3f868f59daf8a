"""An aggregator's state after a committed round, as one envelope the codec carries.

What makes a resume exact for a synchronous strategy: the last committed round, the global
model, the strategy's and the selector's ``state_dict`` (optimizer moments, control variates,
RNG state, client statistics). A round in flight when the aggregator died is not kept: the
restarted aggregator runs it again from the committed model, so nothing accepted before the
crash is counted twice, and deterministic trainers send the same updates again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from fedbus.codec import Envelope, flatten_tree, unflatten_tree
from fedbus.errors import CodecError
from fedbus.wire import join_tensors, split_tensors

__all__ = ["CHECKPOINT", "AggregatorState", "state_envelope", "state_from"]

CHECKPOINT: Final = "checkpoint"
_STATE_PREFIX: Final = "s/"


@dataclass(frozen=True, slots=True)
class AggregatorState:
    job: str
    node: str
    #: The last committed round (synchronous) or model version (asynchronous).
    round: int
    weights: Mapping[str, np.ndarray]
    strategy: Mapping[str, Any] = field(default_factory=dict)
    selector: Mapping[str, Any] = field(default_factory=dict)
    #: Small facts for people and tools (the strategy's name, the last round's metrics).
    info: Mapping[str, Any] = field(default_factory=dict)


def state_envelope(state: AggregatorState) -> Envelope:
    """The state as an envelope: model as ``m/*``, strategy/selector trees as ``a/s/*``."""
    meta, tensors = flatten_tree({"strategy": dict(state.strategy),
                                  "selector": dict(state.selector)}, _STATE_PREFIX)
    return Envelope(kind=CHECKPOINT, job=state.job, sender=state.node, round=state.round,
                    meta={"trees": meta, "info": dict(state.info)},
                    tensors=join_tensors(state.weights, tensors))


def state_from(env: Envelope) -> AggregatorState:
    """Inverse of ``state_envelope``; ``CodecError`` when the envelope is not a checkpoint."""
    if env.kind != CHECKPOINT:
        raise CodecError("bad_kind", f"expected a {CHECKPOINT}, got {env.kind!r}")
    try:
        weights, extra = split_tensors(env.tensors)
    except Exception as exc:
        raise CodecError("bad_tensor", str(exc)) from None
    trees = unflatten_tree(env.meta.get("trees", {}), extra)
    if not isinstance(trees, dict):
        raise CodecError("bad_tree", "checkpoint trees are not a mapping")
    info = env.meta.get("info", {})
    return AggregatorState(
        job=env.job, node=env.sender, round=env.round,
        weights={k: np.array(v) for k, v in weights.items()},
        strategy=trees.get("strategy", {}), selector=trees.get("selector", {}),
        info=info if isinstance(info, dict) else {},
    )
