"""Strategy and selector lookup: built-in names, module:attr references, entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from strategies import FedAvg, StrategyError, make_selector, make_strategy
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
