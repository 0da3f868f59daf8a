"""Shared helpers for the strategy tests: small models, updates, codec round trips, resume."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedbus.codec import Envelope, decode, encode, flatten_tree, unflatten_tree
from strategies.base import AsyncStrategy, ClientUpdate, Strategy, Weights

Round = Sequence[ClientUpdate]


def small_model(dtype: Any = np.float64) -> Weights:
    """Two tensors with distinct shapes and values."""
    return {
        "layer.w": np.arange(6, dtype=np.float64).reshape(2, 3).astype(dtype) / 10,
        "layer.b": np.array([0.5, -1.0, 2.0], dtype=dtype),
    }


def upd(sender: str, delta: Mapping[str, Any], n: int = 1, *, staleness: int = 0,
        base_round: int = 0, aux: Mapping[str, Any] | None = None,
        dtype: Any = np.float64) -> ClientUpdate:
    return ClientUpdate(
        sender=sender,
        delta={k: np.asarray(v, dtype=dtype) for k, v in delta.items()},
        num_examples=n,
        base_round=base_round,
        staleness=staleness,
        aux={k: np.asarray(v, dtype=dtype) for k, v in (aux or {}).items()},
    )


def random_rounds(model: Weights, num_rounds: int, clients: int, seed: int = 0,
                  scale: float = 1.0) -> list[list[ClientUpdate]]:
    """Deterministic rounds of updates with random deltas and example counts."""
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(num_rounds):
        rounds.append([
            upd(f"c{i}", {k: rng.normal(0, scale, v.shape) for k, v in model.items()},
                int(rng.integers(1, 50)))
            for i in range(clients)
        ])
    return rounds


def codec_roundtrip(tree: Any) -> Any:
    """flatten_tree -> Envelope -> encode -> decode -> unflatten_tree, as a checkpoint does."""
    meta, tensors = flatten_tree(tree)
    env = Envelope(kind="checkpoint", job="test", sender="agg", round=0,
                   meta={"state": meta}, tensors=tensors)
    back = decode(encode(env))
    return unflatten_tree(back.meta["state"], back.tensors)


def run_round(strategy: Strategy, weights: Weights, round: int, updates: Round) -> Weights:
    strategy.begin(weights, round)
    for u in updates:
        strategy.accumulate(u)
    return strategy.finish()


def assert_trees_equal(a: Any, b: Any, path: str = "") -> None:
    """Exact equality of two state trees (arrays compared bitwise, dtypes included)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), path
        for k in a:
            assert_trees_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def assert_sync_resume_identical(factory: Callable[[], Strategy], model: Weights,
                                 rounds: Sequence[Round], stop_after: int) -> None:
    """A strategy checkpointed after ``stop_after`` rounds (state and model through the codec)
    and restored into a fresh instance produces bit-identical later rounds."""
    # Prepare: one run without a stop, one that stops and is restored.
    steady = factory()
    w_steady = model
    steady_out = []
    for r, ups in enumerate(rounds):
        w_steady = run_round(steady, w_steady, r, ups)
        steady_out.append(w_steady)
    first = factory()
    w = model
    for r in range(stop_after):
        w = run_round(first, w, r, rounds[r])
    checkpoint = codec_roundtrip({"strategy": first.state_dict(), "model": w})
    # Execute
    resumed = factory()
    resumed.load_state_dict(checkpoint["strategy"])
    w = checkpoint["model"]
    # Assert
    for r in range(stop_after, len(rounds)):
        w = run_round(resumed, w, r, rounds[r])
        assert_trees_equal(w, steady_out[r], f"round {r}")
    assert_trees_equal(codec_roundtrip(resumed.state_dict()), steady.state_dict())


def assert_async_resume_identical(factory: Callable[[], AsyncStrategy], model: Weights,
                                  updates: Sequence[ClientUpdate], stop_after: int) -> None:
    """Same as the synchronous version, one update at a time; the model lives in the state."""
    steady = factory()
    steady.init(model)
    steady_out = [steady.submit(u) for u in updates]
    first = factory()
    first.init(model)
    for u in updates[:stop_after]:
        first.submit(u)
    checkpoint = codec_roundtrip(first.state_dict())
    resumed = factory()
    resumed.load_state_dict(checkpoint)
    for i in range(stop_after, len(updates)):
        out = resumed.submit(updates[i])
        if steady_out[i] is None:
            assert out is None, f"update {i}"
        else:
            assert out is not None, f"update {i}"
            assert_trees_equal(out, steady_out[i], f"update {i}")
    assert resumed.version == steady.version
    assert_trees_equal(codec_roundtrip(resumed.state_dict()), steady.state_dict())
