"""Aggregation and client-selection strategies for fedbus: pure, synchronous numpy code.

The interface (``strategies.base``) and the registry load with the package; each strategy
module loads when first named (``strategies.FedAvg``, or a manifest naming it through the
registry), so a node running FedAvg never imports Krum, SCAFFOLD or the DP wrappers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from strategies.base import (
    AsyncStrategy,
    ClientUpdate,
    Feedback,
    Selector,
    Strategy,
    StrategyError,
    Weights,
    check_compatible,
)
from strategies.registry import SELECTORS, STRATEGIES, WRAPPERS, make_selector, make_strategy

if TYPE_CHECKING:
    from strategies.dp import DPAdaptiveClipping, DPFixedClipping, clip_and_noise
    from strategies.fedasync import FedAsync
    from strategies.fedavg import FedAvg
    from strategies.fedavgm import FedAvgM
    from strategies.fedbuff import FedBuff
    from strategies.feddyn import FedDyn
    from strategies.fedopt import FedAdagrad, FedAdam, FedYogi
    from strategies.fedprox import FedProx
    from strategies.oort import OortSelector, statistical_utility
    from strategies.qfedavg import QFedAvg
    from strategies.reliability import ReliabilitySelector
    from strategies.robust import Bulyan, Krum, Median, MultiKrum, TrimmedMean
    from strategies.scaffold import Scaffold
    from strategies.selection import AllSelector, InFlightSelector, RandomSelector
    from strategies.tiered import TieredSelector

#: name -> the module that defines it, imported on first use (PEP 562)
_LAZY: dict[str, str] = {
    "AllSelector": "strategies.selection",
    "Bulyan": "strategies.robust",
    "DPAdaptiveClipping": "strategies.dp",
    "DPFixedClipping": "strategies.dp",
    "FedAdagrad": "strategies.fedopt",
    "FedAdam": "strategies.fedopt",
    "FedAsync": "strategies.fedasync",
    "FedAvg": "strategies.fedavg",
    "FedAvgM": "strategies.fedavgm",
    "FedBuff": "strategies.fedbuff",
    "FedDyn": "strategies.feddyn",
    "FedProx": "strategies.fedprox",
    "FedYogi": "strategies.fedopt",
    "InFlightSelector": "strategies.selection",
    "Krum": "strategies.robust",
    "Median": "strategies.robust",
    "MultiKrum": "strategies.robust",
    "OortSelector": "strategies.oort",
    "QFedAvg": "strategies.qfedavg",
    "RandomSelector": "strategies.selection",
    "ReliabilitySelector": "strategies.reliability",
    "Scaffold": "strategies.scaffold",
    "TieredSelector": "strategies.tiered",
    "TrimmedMean": "strategies.robust",
    "clip_and_noise": "strategies.dp",
    "statistical_utility": "strategies.oort",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "SELECTORS",
    "STRATEGIES",
    "WRAPPERS",
    "AllSelector",
    "AsyncStrategy",
    "Bulyan",
    "ClientUpdate",
    "DPAdaptiveClipping",
    "DPFixedClipping",
    "FedAdagrad",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedDyn",
    "FedProx",
    "FedYogi",
    "Feedback",
    "InFlightSelector",
    "Krum",
    "Median",
    "MultiKrum",
    "OortSelector",
    "QFedAvg",
    "RandomSelector",
    "ReliabilitySelector",
    "Scaffold",
    "Selector",
    "Strategy",
    "StrategyError",
    "TieredSelector",
    "TrimmedMean",
    "Weights",
    "check_compatible",
    "clip_and_noise",
    "make_selector",
    "make_strategy",
    "statistical_utility",
]
