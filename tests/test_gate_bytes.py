"""The upload gate depends on the update's size, not on the chunk size: a bigger
``broker.chunk_bytes`` must not let every trainer upload at once (flat aggregator RSS)."""

from __future__ import annotations

from typing import Any

import pytest

from fedbus.manifest import parse_manifest
from fedbus.node import UPLOAD_GATE_BYTES, upload_gate_bytes


def _manifest(broker: dict[str, Any] | None) -> Any:
    doc: dict[str, Any] = {
        "version": 1, "job": "gate", "rounds": 1, "strategy": "fedavg",
        "task": {"ref": "examples.toy.task:make_task", "params": {"size": 8}},
        "nodes": [{"id": "aggregator", "role": "aggregator"}],
        "trainers": {"count": 2, "prefix": "t", "parent": "aggregator"},
    }
    if broker is not None:
        doc["broker"] = broker
    return parse_manifest(doc, "test_gate_bytes")


@pytest.mark.parametrize(("chunk", "expected"), [
    (8_000_000, UPLOAD_GATE_BYTES),  # bigger chunks: gated updates travel whole, still gated
    (1_000_000, 1_000_000),  # the default: unchanged
    (262_144, 262_144),  # smaller chunks: anything chunked is gated, as before
])
def test_gate_is_one_chunk_at_most_one_megabyte(chunk: int, expected: int) -> None:
    # Prepare
    m = _manifest({"host": "127.0.0.1", "port": 1883, "chunk_bytes": chunk})
    # Execute
    gate = upload_gate_bytes(m)
    # Assert
    assert gate == expected
