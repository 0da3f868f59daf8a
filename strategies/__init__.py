"""Aggregation and client-selection strategies for fedbus: pure, synchronous numpy code."""

from strategies.base import (
    AsyncStrategy,
    ClientUpdate,
    Selector,
    Strategy,
    StrategyError,
    Weights,
    check_compatible,
)
from strategies.fedavg import FedAvg
from strategies.registry import SELECTORS, STRATEGIES, make_selector, make_strategy

__all__ = [
    "SELECTORS",
    "STRATEGIES",
    "AsyncStrategy",
    "ClientUpdate",
    "FedAvg",
    "Selector",
    "Strategy",
    "StrategyError",
    "Weights",
    "check_compatible",
    "make_selector",
    "make_strategy",
]
