"""The strategy contract: pure, synchronous, I/O-free aggregation and selection.

Synchronous strategies stream: ``begin`` / ``accumulate`` (one update at a time) / ``finish``,
so the aggregator holds O(model) memory, not O(clients x model). Strategies whose math needs
every update at once (robust statistics) set ``needs_all_updates`` and bound how many they keep.
Asynchronous strategies take one update at a time and say when the global model moved.

Everything a strategy remembers between rounds lives in ``state_dict()``: a tree of dicts,
lists, numbers, strings and numpy arrays (no objects), which the codec carries without pickle.
This package never imports ``fedbus``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeGuard, runtime_checkable

import numpy as np

__all__ = [
    "AsyncStrategy",
    "ChunkedDelta",
    "ClientUpdate",
    "Feedback",
    "Selector",
    "Strategy",
    "StrategyError",
    "Weights",
    "check_compatible",
    "is_chunked",
    "positive_count",
    "positive_number",
    "rng_from_state",
    "rng_state",
]

Weights = dict[str, np.ndarray]


class StrategyError(ValueError):
    """Bad strategy/selector name, parameter or input. The message lists what is allowed."""


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """One client's contribution to a round.

    ``delta`` is ``local_weights - global_weights`` for the model the client started from,
    with exactly the global model's names, shapes and dtypes (the aggregator checks this
    before a strategy sees it). ``aux`` carries strategy-specific tensors (SCAFFOLD's control
    variate delta, ...). ``staleness`` is how many model versions old ``base_round`` is.

    ``count`` > 1 (asynchronous only: a relay's pre-aggregate, fedbus.services.relay) means
    the update stands for ``count`` updates trained from ``base_round`` whose mean is
    ``delta``; an ``AsyncStrategy`` treats it as that many updates arriving back to back.

    ``delta`` may also be a ``ChunkedDelta`` (an int8 packing kept packed): indexing it gives
    the dense tensor all the same. A strategy may keep an update's arrays until ``finish``;
    whoever hands it an update does not change them after.
    """

    sender: str
    delta: Mapping[str, np.ndarray]
    num_examples: int
    base_round: int = 0
    staleness: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    aux: Mapping[str, np.ndarray] = field(default_factory=dict)
    count: int = 1


@runtime_checkable
class ChunkedDelta(Protocol):
    """A delta that can be read a flat range at a time without making the dense tensor (an
    int8 packing, ``fedbus.compress.PackedDelta``): the streaming mean folds it from the
    packing, reading a byte a parameter, not four."""

    def read(self, name: str, start: int, stop: int, out: np.ndarray,
             weight: float = 1.0) -> np.ndarray:
        """``weight`` x values ``start:stop`` of tensor ``name`` flattened, written into
        ``out`` (float32 or float64, ``stop - start`` long) and returned."""
        ...

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Tensor ``name``'s shape, without making it dense."""
        ...

    @property
    def nbytes(self) -> int:
        """The bytes it holds."""
        ...


def is_chunked(delta: Mapping[str, np.ndarray]) -> TypeGuard[ChunkedDelta]:
    """``isinstance(delta, ChunkedDelta)``, at the cost of two attribute lookups (the
    protocol's own check inspects every member each time)."""
    cls = type(delta)
    return hasattr(cls, "read") and hasattr(cls, "shape_of")


def check_compatible(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> None:
    """Raise ``StrategyError`` unless ``delta`` has the names and shapes of ``weights``."""
    if weights.keys() != delta.keys():
        missing = sorted(set(weights) - set(delta))
        extra = sorted(set(delta) - set(weights))
        raise StrategyError(
            f"update tensors differ from the model: missing {missing}, extra {extra}"
        )
    chunked = delta if is_chunked(delta) else None
    for name, w in weights.items():
        shape = chunked.shape_of(name) if chunked is not None else delta[name].shape
        if shape != w.shape:
            raise StrategyError(f"tensor {name!r}: update shape {shape} != {w.shape}")


def positive_number(name: str, value: float) -> float:
    """``value`` as a float; ``StrategyError`` unless it is a finite number > 0."""
    if not (np.isfinite(value) and value > 0):
        raise StrategyError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def positive_count(name: str, value: int) -> int:
    """``value`` as an int; ``StrategyError`` unless it is an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise StrategyError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def _refuse_state(obj: object, state: Mapping[str, Any]) -> None:
    """A stateless plug-in given state means a checkpoint and a plug-in that do not match:
    saying so beats resuming silently from the wrong state."""
    if state:
        raise StrategyError(f"{type(obj).__name__} is stateless but got state {sorted(state)}")


def _require_state_pair(cls: type[_PlugIn]) -> None:
    """A plug-in that saves state must also restore it: one that overrides ``state_dict`` but
    inherits the base ``load_state_dict`` would resume from a checkpoint without its state."""
    saves = cls.state_dict is not _PlugIn.state_dict
    loads = cls.load_state_dict is not _PlugIn.load_state_dict
    if saves and not loads:
        raise TypeError(f"{cls.__qualname__} overrides state_dict() but not load_state_dict(): "
                        "a checkpoint could not restore it; implement both")


class _PlugIn:
    """What every strategy and selector has: a registry name, and state for checkpoints.

    Everything a plug-in remembers across rounds is in ``state_dict()`` (``{}`` for a stateless
    one); one that overrides ``state_dict`` must override ``load_state_dict`` too.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _require_state_pair(cls)

    def state_dict(self) -> dict[str, Any]:
        """Everything remembered across rounds; stateless plug-ins return ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _refuse_state(self, state)


class Strategy(_PlugIn, ABC):
    """A synchronous, round-based aggregation strategy."""

    #: True when ``finish`` needs every update of the round (robust aggregators); the
    #: aggregator then bounds the round by ``max_updates`` in memory.
    needs_all_updates: ClassVar[bool] = False

    def client_config(self, round: int) -> dict[str, Any]:
        """Scalars sent to trainers with the model (e.g. FedProx's ``proximal_mu``)."""
        return {}

    def client_tensors(self, round: int) -> Weights:
        """Extra tensors sent to trainers with the model (e.g. SCAFFOLD's server control)."""
        return {}

    @abstractmethod
    def begin(self, weights: Weights, round: int) -> None:
        """Start a round from the current global ``weights`` (not modified in place)."""

    @abstractmethod
    def accumulate(self, update: ClientUpdate) -> None:
        """Fold one accepted update into the round."""

    @abstractmethod
    def finish(self) -> Weights:
        """Close the round and return the new global weights (fresh arrays)."""

    #: How many model-sized sets of auxiliary tensors an update carries besides its delta
    #: (SCAFFOLD's control-variate delta: 1). The aggregator bounds an update's size by
    #: ``(1 + aux_models) x model`` before decoding a byte of it.
    aux_models: ClassVar[int] = 0
    #: The same for what goes to clients with the model (``client_tensors``).
    client_aux_models: ClassVar[int] = 0

    @property
    def num_accumulated(self) -> int:
        """Updates folded into the round so far (read by the aggregator's round report)."""
        return int(getattr(self, "_count", 0))

    def report(self) -> dict[str, Any]:
        """What the strategy says about the round it just finished (DP wrappers: clip and
        noise used), as msgpack-safe scalars. Default: nothing."""
        return {}


class AsyncStrategy(_PlugIn, ABC):
    """An asynchronous strategy: updates arrive one at a time, from any model version."""

    def client_config(self, version: int) -> dict[str, Any]:
        return {}

    @abstractmethod
    def init(self, weights: Weights, version: int = 0) -> None:
        """Set the starting global model."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Current global model version; increments each time the model changes."""

    @property
    @abstractmethod
    def weights(self) -> Weights:
        """Current global model (read-only view)."""

    @abstractmethod
    def submit(self, update: ClientUpdate) -> Weights | None:
        """Take one update (``staleness`` = version - base_round). Return the new global
        model when this update moved it, else ``None`` (buffered).

        Only a strategy that sets ``takes_counts`` is given ``update.count`` > 1; it must
        treat such an update as ``count`` updates of ``delta`` arriving back to back (each
        one's staleness the version it meets minus ``base_round``). The aggregator submits
        a counted update to any other strategy ``count`` times, one by one."""

    #: True when ``submit`` honours ``ClientUpdate.count`` itself (FedBuff, FedAsync).
    takes_counts: ClassVar[bool] = False

    def room(self, versions: int) -> int | None:
        """How many updates this strategy takes before it has made ``versions`` more model
        versions (so a counted update never carries a job past its last one); ``None``
        when it cannot say."""
        return None

    def staleness_scale(self, staleness: int) -> float:
        """How much this strategy weighs an update ``staleness`` versions old, relative to a
        fresh one (FedBuff 1/sqrt(1 + s), FedAsync s(s)); a relay pre-aggregating updates
        from several versions weighs each member by it. Default: 1 (no weighting)."""
        return 1.0

    #: Updates staler than this many versions are refused (``None``: any staleness). The
    #: aggregator reads this to reject too-stale updates before decoding them fully.
    max_staleness: int | None = None

    def report(self) -> dict[str, Any]:
        """What the strategy says about the model version it just produced. Default: nothing."""
        return {}


@dataclass(frozen=True, slots=True)
class Feedback:
    """What a round said about one node: did it deliver, how long it took, its utility (e.g.
    OORT's sqrt(sum of squared losses)); ``None`` where unknown."""

    node: str
    round: int
    completed: bool
    duration_s: float | None = None
    utility: float | None = None


class Selector(_PlugIn, ABC):
    """Chooses which available clients take part in a round. Pure and seeded.

    Selectors that learn from how rounds went override ``observe``, which ``report`` calls
    with one ``Feedback`` record.
    """

    @abstractmethod
    def select(self, available: Sequence[str], round: int) -> list[str]:
        """Return a subset of ``available`` (sorted or ranked; no duplicates)."""

    def report(
        self,
        node: str,
        round: int,
        *,
        completed: bool,
        duration_s: float | None = None,
        utility: float | None = None,
    ) -> None:
        """Feedback after a round (what the aggregator calls): hands ``observe`` the
        ``Feedback`` record."""
        self.observe(Feedback(node, round, completed, duration_s, utility))

    def observe(self, feedback: Feedback) -> None:
        """Learn from one node's round. Default: ignored."""


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """A codec-safe copy of a numpy Generator's state (big ints are handled by the codec)."""
    state = dict(rng.bit_generator.state)
    return {"bit_generator": state["bit_generator"], "state": dict(state["state"]),
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": state["bit_generator"],
        "state": dict(state["state"]),
        "has_uint32": state["has_uint32"],
        "uinteger": state["uinteger"],
    }
    return rng
