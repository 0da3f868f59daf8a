"""The ``strategy:`` and ``selector:`` sections (and a relay's group strategy): a registry name
and its parameters, checked by constructing the plugin once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedbus.manifest.model import PluginSpec, thaw
from fedbus.manifest.parse.reader import Reader
from strategies.base import StrategyError

__all__ = ["parse_plugin"]


def parse_plugin(read: Reader, value: Any, field: str, make: Callable[..., Any]) -> PluginSpec:
    if isinstance(value, str):
        value = {"name": value}
    t = read.table(value, field, ("name", "params"), required=("name",))
    spec = PluginSpec(name=read.string(t["name"], f"{field}.name"),
                      params=read.params(t.get("params"), f"{field}.params"))
    try:
        make(spec.name, thaw(spec.params))
    except StrategyError as exc:
        read.fail(field, str(exc))
    return spec
