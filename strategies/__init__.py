"""Aggregation and client-selection strategies for fedbus: pure, synchronous numpy code."""

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
from strategies.registry import SELECTORS, STRATEGIES, WRAPPERS, make_selector, make_strategy
from strategies.reliability import ReliabilitySelector
from strategies.robust import Bulyan, Krum, Median, MultiKrum, TrimmedMean
from strategies.scaffold import Scaffold
from strategies.selection import AllSelector, InFlightSelector, RandomSelector
from strategies.tiered import TieredSelector

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
