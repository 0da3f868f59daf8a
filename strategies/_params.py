"""Check manifest parameters against a constructor's or factory's annotations before calling it.

A value of the wrong kind (``eta: "abc"``) would otherwise surface as a raw numpy error deep in
the constructor; this turns it into "eta must be a number, got 'abc' (str)". Only plain kinds
are checked (numbers, bool, str, None, sequences, mappings); anything else is accepted.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["declared_params", "type_problems"]

_SIMPLE: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    type(None): ("null", lambda v: v is None),
}
_CONTAINERS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    list: ("a list", lambda v: isinstance(v, (list, tuple))),
    tuple: ("a list", lambda v: isinstance(v, (list, tuple))),
    Sequence: ("a list", lambda v: isinstance(v, (list, tuple))),
    dict: ("a mapping", lambda v: isinstance(v, Mapping)),
    Mapping: ("a mapping", lambda v: isinstance(v, Mapping)),
}


def declared_params(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """Keyword-usable parameter names of ``fn`` and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return [], True
    names = [n for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _checks(hint: Any) -> list[tuple[str, Callable[[Any], bool]]] | None:
    """What a value must be for ``hint``; None when the hint is not one we can check."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: list[tuple[str, Callable[[Any], bool]]] = []
        for arg in typing.get_args(hint):
            sub = _checks(arg)
            if sub is None:
                return None
            out += sub
        return out
    if hint in _SIMPLE:
        return [_SIMPLE[hint]]
    key = origin if origin is not None else hint
    if key in _CONTAINERS:
        return [_CONTAINERS[key]]
    return None


def type_problems(fn: Callable[..., Any], params: Mapping[str, Any]) -> list[str]:
    """One message per parameter whose value does not fit ``fn``'s annotation."""
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations (TYPE_CHECKING imports): nothing to check
        return []
    problems = []
    for name, value in params.items():
        if name not in hints:
            continue
        checks = _checks(hints[name])
        if checks is None or any(ok(value) for _, ok in checks):
            continue
        wanted = " or ".join(dict.fromkeys(label for label, _ in checks))
        problems.append(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")
    return problems
