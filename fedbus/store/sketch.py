"""Compact per-update sketches: norm, and a seeded random projection to ``dim`` dimensions.

The projection is a count sketch (feature hashing: each coordinate goes to one seeded bucket
with a seeded sign), a sparse Johnson-Lindenstrauss transform: inner products and norms are
preserved in expectation, with a relative error of about 1/sqrt(dim). It costs O(params) time
and one int32 a parameter of memory, where a dense Gaussian projection of a 1M-parameter model
to 2,048 dimensions would need 8 GB. The same seed gives the same projection in every process
and round, so sketches of different rounds and clients are comparable.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping

import numpy as np

__all__ = ["Sketcher", "cosine", "dot", "norm"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors; 0.0 when either is zero."""
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)) / (na * nb))


class Sketcher:
    """Projects named tensors (an update, a model delta) onto ``dim`` dimensions."""

    def __init__(self, dim: int, seed: int) -> None:
        if dim < 1:
            raise ValueError(f"sketch dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        # Per (layer, size): bucket in [0, dim) for a + sign, [dim, 2*dim) for a - sign.
        self._tables: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def _table(self, name: str, size: int) -> np.ndarray:
        key = (name, size)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), size])
                table = rng.integers(0, 2 * self.dim, size=size, dtype=np.int32)
                self._tables[key] = table
        return table

    @property
    def table_bytes(self) -> int:
        """Memory held by the cached hash tables (4 bytes per parameter seen)."""
        return sum(t.nbytes for t in self._tables.values())

    def sketch(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float32 sketch of ``tensors`` (names sorted, so the order never matters)."""
        out = np.zeros(2 * self.dim, dtype=np.float64)
        for name in sorted(tensors):
            flat = np.asarray(tensors[name]).reshape(-1)
            if flat.size == 0:
                continue
            table = self._table(name, flat.size)
            out += np.bincount(table, weights=flat.astype(np.float64, copy=False),
                               minlength=2 * self.dim)
        return (out[: self.dim] - out[self.dim :]).astype(np.float32)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """Inner product of two flat vectors, accumulated in float64 without copies."""
    return float(np.einsum("i,i->", a.reshape(-1), b.reshape(-1), dtype=np.float64))


def norm(tensors: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm over every tensor (float64 accumulation)."""
    total = 0.0
    for v in tensors.values():
        flat = np.asarray(v).reshape(-1)
        # float64 accumulation without a float64 copy of the tensor (einsum casts in blocks)
        total += float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    return float(np.sqrt(total))
