"""Checks beyond the manifest's own schema, run by ``fedbus validate`` and before ``fedbus run``:
the task reference imports and its parameters fit what the factory declares, and the files the
manifest names (TLS certificates) exist. Each failure is a ``ManifestError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from fedbus.errors import ManifestError, TaskError
from fedbus.manifest import BrokerSpec, Manifest, thaw
from fedbus.task import param_problems, resolve_factory

__all__ = ["check_files", "check_manifest", "check_task", "search_paths"]


def search_paths(m: Manifest) -> list[Path]:
    """Where a task module is looked for: the working directory, the manifest's folder and up."""
    out = [Path.cwd()]
    if m.source and not m.source.startswith("<"):
        here = Path(m.source).resolve().parent
        out += [here, *here.parents]
    return out


def check_task(m: Manifest) -> None:
    """Import ``task.ref`` (not calling it) and check ``task.params`` against its signature."""
    try:
        factory = resolve_factory(m.task.ref, search_paths(m))
    except TaskError as exc:
        raise ManifestError(m.source, "task.ref", str(exc)) from None
    problem = param_problems(factory, m.task.ref, thaw(m.task.params))
    if problem is not None:
        raise ManifestError(m.source, "task.params", problem)


def _candidates(m: Manifest, value: str) -> list[Path]:
    path = Path(value)
    if path.is_absolute():
        return [path]
    # Relative paths belong to the manifest's folder (the credentials' rule); a path that is
    # only found from the working directory is accepted too, as older manifests meant it.
    here = [Path(m.source).resolve().parent / path] \
        if m.source and not m.source.startswith("<") else []
    return [*here, Path.cwd() / path]


def check_files(m: Manifest, nodes: Sequence[str] = ()) -> None:
    """Every certificate, key or password file the broker section names must exist and be
    readable. A per-node path (with ``{node}``) is checked for ``nodes`` only: on a real
    deployment each machine holds its own node's files, so ``validate`` cannot demand all."""
    specs = [("broker", m.broker, list(nodes))] if not m.brokers else [
        # several brokers: each entry's files, per-node ones for the nodes on that broker
        (f"brokers.{b.name}", b.spec, [n for n in nodes if m.node(n).broker == b.name])
        for b in m.brokers.values()]
    for field_name, spec, on_it in specs:
        if spec is not None:
            _check_spec_files(m, field_name, spec, on_it)


def _check_spec_files(m: Manifest, field_name: str, spec: BrokerSpec,
                      nodes: Sequence[str]) -> None:
    for f in dataclasses.fields(spec):
        if not (f.name.startswith("tls") or f.name.endswith(("_file", "_cert", "_key"))):
            continue
        value = getattr(spec, f.name)
        if not isinstance(value, str) or not value:
            continue
        values = [value.replace("{node}", n) for n in nodes] if "{node}" in value else [value]
        for v in values:
            found = [p for p in _candidates(m, v) if p.is_file()]
            where = f"{field_name}.{f.name}"
            if not found:
                raise ManifestError(m.source, where,
                                    f"file {v!r} does not exist (looked in "
                                    f"{', '.join(str(p) for p in _candidates(m, v))}); create "
                                    "it or fix the path")
            if not os.access(found[0], os.R_OK):
                raise ManifestError(m.source, where, f"file {found[0]} is not readable by "
                                                     "this user")


def check_manifest(m: Manifest, nodes: Sequence[str] = ()) -> None:
    check_files(m, nodes)
    check_task(m)
