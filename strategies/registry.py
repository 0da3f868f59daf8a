"""Names the manifest may use for strategies and selectors, resolved lazily.

A name is either one of the built-ins below, a ``module:attr`` reference, or an entry point in
the ``fedbus.strategies`` / ``fedbus.selectors`` groups (third-party packages plug in there).
Parameters are checked against the constructor's signature so a typo gets a clear error.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from strategies._params import type_problems
from strategies.base import AsyncStrategy, Selector, Strategy, StrategyError

__all__ = ["SELECTORS", "STRATEGIES", "WRAPPERS", "make_selector", "make_strategy", "resolve"]

# name -> "module:Class". Modules are imported only when named, so a Pi running FedAvg never
# imports what it does not use.
STRATEGIES: dict[str, str] = {
    "fedavg": "strategies.fedavg:FedAvg",
    "fedavgm": "strategies.fedavgm:FedAvgM",
    "fedprox": "strategies.fedprox:FedProx",
    "qfedavg": "strategies.qfedavg:QFedAvg",
    "fedadam": "strategies.fedopt:FedAdam",
    "fedyogi": "strategies.fedopt:FedYogi",
    "fedadagrad": "strategies.fedopt:FedAdagrad",
    "feddyn": "strategies.feddyn:FedDyn",
    "scaffold": "strategies.scaffold:Scaffold",
    "fedasync": "strategies.fedasync:FedAsync",
    "fedbuff": "strategies.fedbuff:FedBuff",
    "median": "strategies.robust:Median",
    "trimmed_mean": "strategies.robust:TrimmedMean",
    "krum": "strategies.robust:Krum",
    "multi_krum": "strategies.robust:MultiKrum",
    "bulyan": "strategies.robust:Bulyan",
}

# Wrappers take the wrapped strategy as `strategy: {name, params}` in the manifest.
WRAPPERS: dict[str, str] = {
    "dp_fixed": "strategies.dp:DPFixedClipping",
    "dp_adaptive": "strategies.dp:DPAdaptiveClipping",
    "dp_client": "strategies.dp:DPClientSide",
}

SELECTORS: dict[str, str] = {
    "all": "strategies.selection:AllSelector",
    "random": "strategies.selection:RandomSelector",
    "oort": "strategies.oort:OortSelector",
    "tiered": "strategies.tiered:TieredSelector",
    "reliability": "strategies.reliability:ReliabilitySelector",
    "inflight": "strategies.selection:InFlightSelector",
    "ranked": "strategies.ranked:RankedSelector",
}


def resolve(name: str, table: Mapping[str, str], group: str) -> Any:
    """Turn a built-in name, ``module:attr`` or entry-point name into the object it names."""
    if name in table:
        ref = table[name]
    elif ":" in name:
        ref = name
    else:
        from importlib.metadata import entry_points  # 1-2 MiB of email parsing: on demand

        eps = {ep.name: ep for ep in entry_points(group=group)}
        if name in eps:
            return eps[name].load()
        known = sorted(table) + sorted(eps)
        raise StrategyError(f"unknown name {name!r}; known: {', '.join(known)} "
                            f"(or 'package.module:Class')")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise StrategyError(f"cannot load {ref!r}: {exc}") from None


def _construct(cls: Any, params: Mapping[str, Any], what: str) -> Any:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return cls(**params)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [n for n, p in sig.parameters.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(params) - set(allowed))
    if unknown and not accepts_kwargs:
        raise StrategyError(f"{what} {getattr(cls, 'name', '') or cls.__name__}: unknown "
                            f"parameter(s) {unknown}; allowed: {allowed}")
    wrong = type_problems(cls, params)
    if wrong:
        raise StrategyError(f"{what} {getattr(cls, 'name', '') or cls.__name__}: "
                            + "; ".join(wrong))
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"{what} {cls.__name__}: {exc}") from None


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy | AsyncStrategy:
    # Wrappers (DP) resolve like strategies; their constructor accepts the wrapped strategy as
    # an instance or as the manifest's {name, params} mapping and builds it through here.
    cls = resolve(name, {**STRATEGIES, **WRAPPERS}, "fedbus.strategies")
    obj = _construct(cls, dict(params or {}), "strategy")
    if not isinstance(obj, (Strategy, AsyncStrategy)):
        raise StrategyError(f"{name!r} is not a Strategy or AsyncStrategy")
    return obj  # type: ignore[no-any-return]


def make_selector(name: str, params: Mapping[str, Any] | None = None) -> Selector:
    cls = resolve(name, SELECTORS, "fedbus.selectors")
    obj = _construct(cls, dict(params or {}), "selector")
    if not isinstance(obj, Selector):
        raise StrategyError(f"{name!r} is not a Selector")
    return obj  # type: ignore[no-any-return]
