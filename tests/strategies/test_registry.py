"""Strategy and selector lookup: built-in names, module:attr references, entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from strategies import (
    FedAdagrad,
    FedAdam,
    FedAsync,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedDyn,
    FedProx,
    FedYogi,
    Scaffold,
    StrategyError,
    make_selector,
    make_strategy,
)
from strategies.fedopt import FedOpt
from strategies.registry import SELECTORS, STRATEGIES, WRAPPERS


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_builtin_strategy_name_resolves(name: str) -> None:
    params = {"num_clients": 10} if name in {"feddyn", "scaffold"} else {}
    assert make_strategy(name, params).name == name


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_builtin_selector_name_resolves(name: str) -> None:
    assert make_selector(name).name == name


def test_wrappers_take_a_strategy_spec() -> None:
    for name in WRAPPERS:
        params = {"strategy": {"name": "fedavg"}, "noise_multiplier": 0.0}
        if name != "dp_adaptive":
            params["clipping_norm"] = 1.0
        assert make_strategy(name, params).name == name


def test_module_attr_reference_loads_a_class() -> None:
    assert isinstance(make_strategy("strategies.fedavg:FedAvg"), FedAvg)


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(StrategyError, match="fedadam") as err:
        make_strategy("fedavgg")
    assert "module:Class" in str(err.value)


def test_unknown_parameter_lists_the_allowed_ones() -> None:
    with pytest.raises(StrategyError, match=r"unknown parameter\(s\) \['eta_typo'\]"):
        make_strategy("fedadam", {"eta_typo": 0.1})


def test_third_party_strategy_plugs_in_by_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an installed-looking distribution that declares a fedbus.strategies entry point
    (tmp_path / "acme_fl.py").write_text(
        "from strategies.fedavg import FedAvg\n"
        "class AcmeAvg(FedAvg):\n"
        "    name = 'acme'\n"
    )
    dist = tmp_path / "acme_fl-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-fl\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fedbus.strategies]\nacme = acme_fl:AcmeAvg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Execute
    strategy = make_strategy("acme", {"weighted": False})
    # Assert
    assert type(strategy).__name__ == "AcmeAvg" and strategy.name == "acme"
    sys.modules.pop("acme_fl", None)


FEDOPTS = {"fedadagrad": FedAdagrad, "fedadam": FedAdam, "fedyogi": FedYogi}

# (name, parameters, what the built strategy must be)
BUILT: list[tuple[str, dict[str, Any], Callable[[Any], bool]]] = [
    ("fedavgm", {"server_lr": 0.5, "momentum": 0.7},
     lambda s: isinstance(s, FedAvgM) and s.momentum == 0.7),
    ("feddyn", {"num_clients": 20, "alpha": 0.1},
     lambda s: isinstance(s, FedDyn) and s.num_clients == 20),
    ("fedprox", {"proximal_mu": 0.3},
     lambda s: isinstance(s, FedProx) and s.client_config(0) == {"proximal_mu": 0.3}),
    ("scaffold", {"num_clients": 10, "server_lr": 0.5},
     lambda s: isinstance(s, Scaffold) and s.server_lr == 0.5),
    ("fedbuff", {"buffer_size": 5, "server_lr": 0.1},
     lambda s: isinstance(s, FedBuff) and s.buffer_size == 5),
    ("fedasync", {"alpha": 0.9, "staleness": "hinge", "a": 10, "b": 4},
     lambda s: isinstance(s, FedAsync) and s.mixing_weight(6) == pytest.approx(0.9 / 21)),
    *((name, {"eta": 0.2, "eta_l": 0.01, "beta1": 0.5, "tau": 1e-4},
       lambda s, cls=cls: isinstance(s, cls) and isinstance(s, FedOpt)
       and s.client_config(0) == {"lr": 0.01})
      for name, cls in FEDOPTS.items()),
]


@pytest.mark.parametrize(("name", "params", "check"), BUILT, ids=[b[0] for b in BUILT])
def test_parameters_reach_the_built_strategy(name: str, params: dict[str, Any],
                                             check: Callable[[Any], bool]) -> None:
    assert check(make_strategy(name, params))


# (make, name, parameters, what the StrategyError says)
REFUSED: list[tuple[Callable[..., Any], str, dict[str, Any], str]] = [
    (make_strategy, "fedavgm", {"beta": 0.9}, "unknown parameter"),
    (make_strategy, "fedavgm", {"momentum": 1.0}, "momentum"),
    (make_strategy, "feddyn", {"num_clients": 20, "mu": 0.1}, "unknown parameter"),
    (make_strategy, "feddyn", {}, "num_clients"),
    (make_strategy, "feddyn", {"num_clients": 2, "alpha": 0}, "alpha"),
    (make_strategy, "fedprox", {"mu": 0.3}, "unknown parameter"),
    (make_strategy, "fedprox", {"proximal_mu": -1}, "proximal_mu"),
    (make_strategy, "scaffold", {"num_clients": 10, "eta_g": 0.5}, "unknown parameter"),
    (make_strategy, "scaffold", {"num_clients": 0}, "num_clients"),
    (make_strategy, "fedbuff", {"k": 5}, "unknown parameter"),
    (make_strategy, "fedbuff", {"buffer_size": 0}, "buffer_size"),
    (make_strategy, "fedasync", {"beta": 0.5}, "unknown parameter"),
    (make_strategy, "fedasync", {"staleness": "exponential"}, "staleness function"),
    (make_strategy, "fedasync", {"alpha": 0}, "alpha"),
    *((make_strategy, name, params, message) for name in FEDOPTS for params, message in [
        ({"epsilon": 1e-8}, "unknown parameter"), ({"tau": 0}, "tau"),
        ({"beta2": 1.5}, "beta2")]),
    (make_strategy, "krum", {"g": 1}, "unknown parameter"),
    (make_strategy, "trimmed_mean", {"beta": 0.5}, "beta must be"),
    (make_strategy, "bulyan", {"f": -1}, "f .* must be an int"),
    (make_strategy, "multi_krum", {"m": 0}, "m must be"),
    (make_strategy, "median", {"max_updates": 0}, "max_updates"),
    (make_selector, "oort", {"num_clients": 5, "alpha": 2}, "unknown parameter"),
    (make_selector, "oort", {"cutoff": 0}, "cutoff"),
    (make_selector, "tiered", {"num_tiers": 2, "tier_probabilities": [1.0]},
     "tier_probabilities"),
    (make_selector, "reliability", {"threshold": 1.5}, "threshold"),
    (make_selector, "inflight", {"concurrency": 0}, "concurrency"),
]


@pytest.mark.parametrize(("make", "name", "params", "message"), REFUSED,
                         ids=[f"{r[1]}-{next(iter(r[2]), 'none')}" for r in REFUSED])
def test_bad_parameters_give_strategy_error(make: Callable[..., Any], name: str,
                                            params: dict[str, Any], message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        make(name, params)
