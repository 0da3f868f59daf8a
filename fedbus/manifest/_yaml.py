"""YAML reading for manifests: a SafeLoader that rejects duplicate keys, and ``${VAR}`` expansion.

Private to ``fedbus.manifest``; both report problems as ``ManifestError`` with line or field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import yaml

from fedbus.errors import ManifestError

__all__ = ["VAR_NAME", "Expanded", "expand", "load_yaml"]


class Expanded(str):
    """A string that came out of ``${...}`` expansion; typed fields may convert it."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"duplicate key {key!r}", key_node.start_mark)
    loader.flatten_mapping(node)  # type: ignore[no-untyped-call]
    return loader.construct_mapping(node, deep=True)  # type: ignore[no-untyped-call]


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text; syntax errors and duplicate keys name the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = (exc.problem or "syntax error") + (f" ({exc.context})" if exc.context else "")
        raise ManifestError(source, "(yaml)", f"invalid YAML at {where}{what}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(source, "(yaml)", f"invalid YAML: {exc}") from None


_VAR: Final = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
VAR_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def expand(value: Any, field: str, source: str, env: Mapping[str, str]) -> Any:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$`` in every string of a parsed tree."""
    if isinstance(value, dict):
        return {k: expand(v, f"{field}.{k}" if field else str(k), source, env)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, f"{field}[{i}]", source, env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value
    substituted = False

    def sub(match: re.Match[str]) -> str:
        nonlocal substituted
        text = match.group(0)
        if text == "$$":
            return "$"
        if match.group(1) is None:
            raise ManifestError(source, field or "(top level)",
                                f"unclosed '${{' in {value!r}; write ${{VAR}} or $$ for a '$'")
        name, sep, default = match.group(1).partition(":-")
        if not VAR_NAME.match(name):
            raise ManifestError(source, field or "(top level)",
                                f"bad substitution {text!r}: use ${{NAME}} or ${{NAME:-default}}")
        substituted = True
        got = env.get(name)
        if got:
            return got
        if sep:
            return default
        if got is not None:
            return got
        raise ManifestError(source, field or "(top level)",
                            f"environment variable {name} is not set; set it or write "
                            f"${{{name}:-default}}")

    out = _VAR.sub(sub, value)
    return Expanded(out) if substituted else out
