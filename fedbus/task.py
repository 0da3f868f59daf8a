"""The user's model and data behind a small protocol: get/set weights, fit, evaluate.

Services only see numpy arrays, so the aggregator never needs torch. ``fedbus.torch_task``
adapts a PyTorch model; any object with these four methods works.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedbus.errors import TaskError
from fedbus.manifest import Manifest, NodeSpec, thaw
from strategies._params import declared_params, type_problems

__all__ = [
    "EvalResult",
    "FitResult",
    "Task",
    "load_task",
    "open_task",
    "param_problems",
    "resolve_factory",
    "search_paths",
]

# Passed by fedbus to every factory call, not by the manifest.
_GIVEN = ("partition", "num_partitions", "seed")


@dataclass(frozen=True, slots=True)
class FitResult:
    """What local training produced besides the new weights.

    ``aux`` holds strategy-specific tensors to send back (SCAFFOLD's control-variate delta).
    """

    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    aux: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EvalResult:
    num_examples: int
    loss: float
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    def get_weights(self) -> dict[str, np.ndarray]:
        """Current model weights as named numpy arrays (copies)."""
        ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...

    def fit(self, config: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> FitResult:
        """Train locally. ``config`` comes from the strategy (``lr``, ``proximal_mu``, ...) and
        the aggregator (``round``, ``seed``); ``extra`` holds strategy tensors (SCAFFOLD's c).
        Runs in a worker thread: it may block."""
        ...

    def evaluate(self) -> EvalResult: ...


def resolve_factory(ref: str, search_paths: Sequence[str | Path] = ()) -> Callable[..., Any]:
    """Import ``module:attr`` and return the factory, without calling it.

    ``search_paths`` (the manifest's folder, the working directory) are tried when the module
    is not importable as installed, so examples run from a checkout.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task ref {ref!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise TaskError(f"task module {module_name!r} failed to import: {exc}") from exc
        for extra in search_paths:
            path = str(Path(extra).resolve())
            if path not in sys.path:
                sys.path.append(path)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc2:
            raise TaskError(
                f"cannot import task module {module_name!r}: {exc2}. Run from the folder that "
                "holds it, or install it; trainers need the 'trainer' extra (torch)."
            ) from exc2
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = sorted(n for n, v in vars(module).items()
                        if callable(v) and not n.startswith("_") and n.startswith("make"))
        raise TaskError(f"{ref!r}: {module_name} has no callable {attr!r}"
                        + (f"; it has {', '.join(public)}" if public else ""))
    return factory  # type: ignore[no-any-return]


def param_problems(factory: Callable[..., Any], ref: str, params: Mapping[str, Any]) -> str | None:
    """Why ``params`` do not fit the factory's declaration (names, then plain types), or None.

    A factory that takes ``**kwargs`` accepts any name; a typo (``lrr``) is only caught when
    the factory declares its parameters, which is why the examples do.
    """
    names, open_ended = declared_params(factory)
    allowed = [n for n in names if n not in _GIVEN]
    unknown = sorted(set(params) - set(names))
    if unknown and not open_ended:
        return (f"unknown parameter(s) {', '.join(unknown)} for {ref}; "
                f"allowed: {', '.join(allowed) or 'none'}")
    given = sorted(set(params) & set(_GIVEN))
    if given:
        return f"{', '.join(given)} are set by fedbus for each node; remove them from task.params"
    wrong = type_problems(factory, params)
    return f"{ref}: " + "; ".join(wrong) if wrong else None


def load_task(
    ref: str,
    *,
    partition: int | None,
    num_partitions: int,
    seed: int,
    params: Mapping[str, Any],
    search_paths: Sequence[str | Path] = (),
) -> Task:
    """Import ``module:attr`` and call it to build the task.

    The factory gets ``partition`` (None on the aggregator, which only evaluates),
    ``num_partitions``, ``seed`` and the manifest's ``task.params`` as keyword arguments.
    """
    factory = resolve_factory(ref, search_paths)
    problem = param_problems(factory, ref, params)
    if problem is not None:
        raise TaskError(problem)
    kwargs = {"partition": partition, "num_partitions": num_partitions, "seed": seed, **params}
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise TaskError(f"task factory {ref} does not accept {sorted(kwargs)}: {exc}") from None
    task = factory(**kwargs)
    for method in ("get_weights", "set_weights", "fit", "evaluate"):
        if not callable(getattr(task, method, None)):
            raise TaskError(f"{ref} returned {type(task).__name__}, which has no {method}()")
    return task  # type: ignore[no-any-return]


def search_paths(m: Manifest) -> list[Path]:
    """Where a manifest's ``task.ref`` module is looked for: the working folder, then the
    manifest's folder and its parents."""
    search = [Path.cwd()]
    if m.source and not m.source.startswith("<"):
        here = Path(m.source).resolve().parent
        search += [here, *here.parents]
    return search


def open_task(m: Manifest, node: NodeSpec | None) -> Task:
    """Build ``node``'s task (``node=None``: the server's evaluation copy)."""
    return load_task(
        m.task.ref,
        partition=None if node is None else node.partition,
        num_partitions=m.num_partitions,
        seed=m.seed,
        params=thaw(m.task.params),
        search_paths=search_paths(m),
    )
