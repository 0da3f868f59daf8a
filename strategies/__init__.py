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
from strategies.fedasync import FedAsync
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedbuff import FedBuff
from strategies.feddyn import FedDyn
from strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from strategies.fedprox import FedProx
from strategies.registry import SELECTORS, STRATEGIES, make_selector, make_strategy
from strategies.scaffold import Scaffold

__all__ = [
    "SELECTORS",
    "STRATEGIES",
    "AsyncStrategy",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedDyn",
    "FedProx",
    "FedYogi",
    "Scaffold",
    "Selector",
    "Strategy",
    "StrategyError",
    "Weights",
    "check_compatible",
    "make_selector",
    "make_strategy",
]
