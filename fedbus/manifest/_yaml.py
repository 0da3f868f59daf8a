"""YAML reading for manifests: a SafeLoader that rejects duplicate keys, and ``${VAR}`` expansion.

Private to ``fedbus.manifest``; both report problems as ``ManifestError`` with line or field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import yaml

from fedbus.errors import ManifestError

__all__ = ["MAX_ALIASES", "MAX_BYTES", "VAR_NAME", "Expanded", "expand", "load_yaml"]


class Expanded(str):
    """A string that came out of ``${...}`` expansion; typed fields may convert it."""


#: A manifest is a few kilobytes; a megabyte is already absurd.
MAX_BYTES: Final = 1 << 20
#: Aliases (``*name``) in one manifest: a handful is normal; nested aliases can make a
#: 300-byte document expand to gigabytes when walked (a "billion laughs").
MAX_ALIASES: Final = 64
#: Values in the document with every alias expanded: a 10,000-node list is ~90,000.
MAX_VALUES: Final = 200_000


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one, and
    more than ``MAX_ALIASES`` aliases before anything is expanded."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):  # type: ignore[no-untyped-call]
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_ALIASES} aliases (*name): a manifest does "
                    "not need them, and nested ones expand without bound",
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
        return super().compose_node(parent, index)  # type: ignore[no-untyped-call]


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
    if len(text) > MAX_BYTES:
        raise ManifestError(source, "(yaml)", f"{len(text):,} characters: a manifest is at "
                            f"most {MAX_BYTES:,} (it describes a job, it holds no data)")
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = (exc.problem or "syntax error") + (f" ({exc.context})" if exc.context else "")
        raise ManifestError(source, "(yaml)", f"invalid YAML at {where}{what}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(source, "(yaml)", f"invalid YAML: {exc}") from None
    return _bounded(data, source)


def _bounded(data: Any, source: str) -> Any:
    """``data`` if walking it with every alias expanded visits at most ``MAX_VALUES``
    values (aliases share objects, so the document is small in memory until walked)."""
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ManifestError(source, "(yaml)", f"more than {MAX_VALUES:,} values once its "
                                "aliases are expanded: a manifest does not need that")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return data


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
