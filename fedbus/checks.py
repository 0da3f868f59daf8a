"""Checks beyond the manifest's own schema, run by ``fedbus validate`` and before ``fedbus run``:
the task reference imports and its parameters fit what the factory declares, and the files the
manifest names (TLS certificates) exist. Each failure is a ``ManifestError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fedbus.errors import ManifestError, TaskError
from fedbus.manifest import Manifest, thaw
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


def check_files(m: Manifest) -> None:
    """Every certificate/key file the broker section names must exist and be readable."""
    if m.broker is None:
        return
    for f in dataclasses.fields(m.broker):
        if not (f.name.startswith("tls") or f.name.endswith(("_file", "_cert", "_key"))):
            continue
        value = getattr(m.broker, f.name)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value)
        where = f"broker.{f.name}"
        if not path.is_file():
            raise ManifestError(m.source, where,
                                f"file {value!r} does not exist (relative paths start at the "
                                f"working directory {Path.cwd()}); create it or fix the path")
        if not os.access(path, os.R_OK):
            raise ManifestError(m.source, where, f"file {value!r} is not readable by this user")


def check_manifest(m: Manifest) -> None:
    check_files(m)
    check_task(m)
