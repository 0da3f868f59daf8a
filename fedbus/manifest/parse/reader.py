"""The primitives every manifest section is read with: one ``Reader`` per file that checks a
value's type and range and turns any mistake into one ``ManifestError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NoReturn, cast

import yaml

from fedbus import topics
from fedbus.errors import BusError, ManifestError
from fedbus.manifest._yaml import Expanded

__all__ = ["Reader", "field_names", "kind"]

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _join(field: str, key: object) -> str:
    return f"{field}.{key}" if field else str(key)


def kind(value: Any) -> str:
    """How an error names a wrong value: ``null``, ``a list``, ``int 3``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(str(value) if isinstance(value, str) else value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _freeze(value: Any) -> Any:
    """Deep read-only copy of free-form params; expanded strings read as YAML scalars."""
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Expanded):
        try:
            scalar = yaml.safe_load(value) if value.strip() else str(value)
        except yaml.YAMLError:
            return str(value)
        return scalar if isinstance(scalar, (str, int, float, bool)) else str(value)
    return value


class Reader:
    """Checks raw values of one manifest file; every failure is one ManifestError."""

    def __init__(self, source: str) -> None:
        self.src = source

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ManifestError(self.src, field or "(top level)", problem)

    def table(self, value: Any, field: str, allowed: Sequence[str],
              required: Sequence[str] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping with keys {', '.join(allowed)}; "
                             f"got {kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(field, f"keys must be strings, got {kind(key)}")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(_join(field, key),
                          f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(_join(field, key), f"required key {key!r} is missing")
        return value

    def integer(self, value: Any, field: str, lo: int | None = None,
                hi: int | None = None) -> int:
        if isinstance(value, Expanded):
            try:
                value = int(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer{_range(lo, hi)}, got {kind(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(field, f"must be an integer{_range(lo, hi)}, got {value}")
        return value

    def number(self, value: Any, field: str, check: Callable[[float], bool],
               allowed: str) -> float:
        if isinstance(value, Expanded):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"expected a number {allowed}, got {kind(value)}")
        if not math.isfinite(value) or not check(float(value)):
            self.fail(field, f"must be a number {allowed}, got {value}")
        return float(value)

    def boolean(self, value: Any, field: str) -> bool:
        if isinstance(value, Expanded) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {kind(value)}")
        return value

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"expected a non-empty string, got {kind(value)}")
        return str(value)

    def opt_string(self, value: Any, field: str) -> str | None:
        # `${VAR:-}` that expands to nothing means "not set", so one file serves both cases.
        if value is None or (isinstance(value, Expanded) and not value.strip()):
            return None
        return self.string(value, field)

    def ident(self, value: Any, field: str) -> str:
        text = self.string(value, field)
        try:
            return topics.validate_id(text, field)
        except BusError as exc:
            self.fail(field, str(exc))

    def choice(self, value: Any, field: str, allowed: Sequence[str], note: str = "") -> str:
        text = self.string(value, field)
        if text not in allowed:
            close = difflib.get_close_matches(text, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(field, f"{text!r} is not allowed{hint}; allowed: {', '.join(allowed)}{note}")
        return text

    def params(self, value: Any, field: str) -> Mapping[str, Any]:
        if value is None:
            return MappingProxyType({})
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping of parameter names to values, got {kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(field, f"parameter names must be strings, got {kind(key)}")
        return cast(Mapping[str, Any], _freeze(value))

    # -- sections ------------------------------------------------------------


def field_names(cls: type) -> tuple[str, ...]:
    """A spec dataclass's fields: the keys its section allows."""
    return tuple(f.name for f in dataclasses.fields(cls))


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""

