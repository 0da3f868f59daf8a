"""Update compression by choice: fewer bytes per update, decoded before any strategy sees it.

The manifest picks one mode for the trainers' updates (``codec.update``)::

    codec: {level: 1, update: {mode: int8, block: 256, stochastic: true}}
    codec: {update: fp16}
    codec: {update: {mode: topk, fraction: 0.1}}

- ``none``: the float delta as is (the default).
- ``fp16``: each float tensor as float16 (2x fewer bytes than float32).
- ``int8``: each float tensor in blocks of ``block`` values, one float32 scale per block
  (absmax / 127) and one int8 per value, rounded stochastically by default (unbiased: the
  average of many clients' rounding errors tends to zero, which nearest rounding does not
  promise). ~4x fewer bytes than float32.
- ``topk``: per tensor, the ``fraction`` of values largest in magnitude, as uint32 indices and
  float32 values; the rest is kept in the trainer and added to its next delta (error
  feedback), so nothing is lost, only delayed. 8 bytes per kept value: 5x fewer at 0.1.

Only float tensors are compressed; integer buffers travel as they are. A compressed tensor
keeps its name and travels as ONE tensor (fp16: float16 of the same shape; int8 and topk: a
flat uint8 array packing scales and values, or indices and values), never bigger than the
dense tensor, so the aggregator's decode limits derived from the model (``model_limits``: bytes
and tensor count) hold for compressed updates unchanged. The envelope's ``meta["update_codec"]``
names the mode; ``decode_update`` checks every packed length and index against the global
model before allocating the dense tensor, and refuses what does not fit (``UpdateRejected``).

The broadcast model can be compressed too (``codec.model: fp16`` or ``{mode: int8}``, int8
rounded to nearest by default): the aggregator keeps the exact model and sends a lossy view
of it, with each tensor's dtype and shape in ``meta["model_codec"]`` (``encode_model``,
``decode_model``, at the end of this module).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from fedbus.errors import UpdateRejected

__all__ = ["META_KEY", "MODEL_META_KEY", "MODEL_MODES", "MODES", "LocalDelta", "PackedDelta",
           "UpdateCodec", "UpdateCompressor", "check_model", "decode_model", "decode_update",
           "encode_model", "pack_int8"]

MODES: Final = ("none", "fp16", "int8", "topk")
#: The broadcast model (``codec.model``): topk would drop most of the model, not delay it.
MODEL_MODES: Final = ("none", "fp16", "int8")
META_KEY: Final = "update_codec"
MODEL_META_KEY: Final = "model_codec"
_MAX_BLOCK: Final = 1 << 20
#: Values per step of ``pack_int8``: 256K float32 = 1 MiB of scratch. Per 1M values, 2^16
#: took 1.2x and 2^20 1.15x as long as 2^18 (fewer numpy calls against a buffer past L2).
_SEGMENT: Final = 1 << 18


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


#: Threads of one process that quantize or dequantize at once: one per core. The passes are
#: memory-bound numpy; the trainers of one process (``fedbus serve --node 't*'``, a
#: simulation worker) run them from asyncio's pool of cores + 4 threads, which interleaved
#: on 2 cores evicted each other's scratch: 50 x 1M int8 both ways in one process, 0.63 s
#: a round (spread 0.53-0.72), 0.56 (0.52-0.61) with the passes one per core.
_SLOTS = threading.BoundedSemaphore(_cores())


@functools.cache
def _dither() -> np.ndarray:
    """``pack_int8``'s stochastic-rounding dither: a permutation of (k + 1/2) / 2^18, twice,
    so any window of up to 2^18 values starting in the first half is contiguous. Made on
    first use: ``numpy.random`` is 7 MiB that a node which never packs int8 does not load."""
    return np.tile(((np.random.default_rng(0x5EED).permutation(_SEGMENT) + 0.5)
                    / _SEGMENT).astype(np.float32), 2)


@dataclass(frozen=True, slots=True)
class UpdateCodec:
    """How a trainer compresses its delta (manifest ``codec.update``)."""

    mode: str = "none"
    #: int8: values per scale.
    block: int = 256
    #: int8: stochastic (unbiased) rounding instead of round-to-nearest.
    stochastic: bool = True
    #: topk: share of each tensor's values sent per round, in (0, 0.5].
    fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"update mode {self.mode!r} is not one of {MODES}")
        if not 1 <= self.block <= _MAX_BLOCK:
            raise ValueError(f"int8 block {self.block} is not in [1, {_MAX_BLOCK}]")
        # above one half, 8 bytes per kept value would outweigh the dense float32 tensor
        if not 0 < self.fraction <= 0.5:
            raise ValueError(f"topk fraction {self.fraction} is not in (0, 0.5]")

    def packed_bytes(self, tensors: Mapping[str, np.ndarray]) -> int:
        """The bytes of the tensors this codec sends for a delta shaped like ``tensors``."""
        total = 0
        for a in tensors.values():
            if self.mode == "none" or not _compressible(a):
                total += a.nbytes
            elif self.mode == "fp16":
                total += 2 * a.size
            elif self.mode == "int8":
                total += a.size + 4 * -(-a.size // self.block)
            else:
                total += 8 * max(1, math.ceil(self.fraction * a.size))
        return total


class LocalDelta(Mapping[str, np.ndarray]):
    """A trainer's delta, ``local - base`` (its trained weights minus the model it started
    from, in the model's dtype), each tensor made the first time it is read. The int8
    packing takes the two instead (``pair``) and subtracts a segment at a time: for 1M
    parameters that is one model-sized float32 array not written and read back twice."""

    __slots__ = ("_base", "_local", "_made")

    def __init__(self, local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> None:
        self._local, self._base = local, base
        self._made: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        got = self._made.get(name)
        if got is None:
            base = self._base[name]
            got = self._made[name] = (self._local[name] - base).astype(base.dtype, copy=False)
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)

    def pair(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(local, base) for tensor ``name`` when subtracting them is the whole delta (same
        float32 dtype and shape, not made yet); else None."""
        local, base = self._local[name], self._base[name]
        if name in self._made or local.dtype != np.float32 or base.dtype != np.float32 \
                or local.shape != base.shape:
            return None
        return local, base


def _compressible(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" and a.size > 0


class UpdateCompressor:
    """The trainer's side: compresses each delta; for ``topk`` it keeps the error feedback
    (what was not sent yet) between rounds, so it lives as long as the trainer."""

    def __init__(self, codec: UpdateCodec, seed: int = 0) -> None:
        self.codec = codec
        self._rng = np.random.default_rng(seed)
        #: topk: per tensor, what was not sent yet (the client's state between rounds; a
        #: simulated client keeps it in its saved state, fedbus.clientside).
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray], *,
               rng: np.random.Generator | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The tensors to send instead of ``delta`` and the meta entries that describe them.
        ``rng`` (int8's stochastic rounding) defaults to the compressor's own stream."""
        mode = self.codec.mode
        if mode == "none":
            return dict(delta), {}
        rng = rng if rng is not None else self._rng
        out: dict[str, np.ndarray] = {}
        local = delta if isinstance(delta, LocalDelta) and mode == "int8" else None
        with _SLOTS:
            for name in delta:
                pair = local.pair(name) if local is not None else None
                if pair is not None:  # int8 of local - base, subtracted on the way
                    out[name] = pack_int8(pair[0], self.codec.block,
                                          rng if self.codec.stochastic else None, pair[1])
                    continue
                d = delta[name]
                if not _compressible(d):
                    out[name] = d
                elif mode == "fp16":
                    out[name] = d.astype(np.float16)
                elif mode == "int8":
                    out[name] = pack_int8(d, self.codec.block,
                                          rng if self.codec.stochastic else None)
                else:
                    out[name] = self._topk(name, d)
        return out, {META_KEY: {"mode": mode, "block": self.codec.block}}

    def _topk(self, name: str, d: np.ndarray) -> np.ndarray:
        flat = d.reshape(-1).astype(np.float32)
        residual = self.residual.get(name)
        if residual is not None and residual.shape == flat.shape:
            flat = flat + residual
        k = max(1, int(np.ceil(self.codec.fraction * flat.size)))
        idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        idx.sort()  # ascending indices: friendlier to zstd and to the scatter on decode
        values = flat[idx]
        rest = flat.copy()
        rest[idx] = 0.0
        self.residual[name] = rest
        return np.concatenate([idx.astype("<u4").view(np.uint8),
                               values.astype("<f4").view(np.uint8)])


def pack_int8(d: np.ndarray, block: int, rng: np.random.Generator | None,
              minus: np.ndarray | None = None) -> np.ndarray:
    """``d`` (or ``d - minus``, subtracted a segment at a time: no model-sized difference
    is written and read back) as one flat uint8 array: a float32 scale per ``block`` values
    (absmax / 127, a hair over: see ``_HEADROOM``), then one int8 per value, rounded
    stochastically with ``rng`` or to nearest without it."""
    flat = d.reshape(-1)
    n = flat.size
    blocks = -(-n // block)
    out = np.empty(4 * blocks + n, np.uint8)
    scales = out[: 4 * blocks].view("<f4")
    values = out[4 * blocks :].view(np.int8)
    # A segment of whole blocks at a time through one cache-sized scratch buffer: a model-
    # sized float32 temporary per step (~10 of them) cost 8.3 ms per 1M parameters, and at
    # 11M each was a fresh mmap to fault in (docs/benchmarks.md "The wire").
    per = max(1, _SEGMENT // block)
    scratch = np.empty(min(n, per * block), np.float32)
    sub = None if minus is None else minus.reshape(-1)
    diff = None if sub is None else np.empty_like(scratch)
    for first in range(0, blocks, per):
        count = min(per, blocks - first)
        lo, hi = first * block, min(n, (first + count) * block)
        src = flat[lo:hi]
        if sub is not None and diff is not None:
            src = np.subtract(src, sub[lo:hi], out=diff[: hi - lo])
        _pack_segment(src, block, scratch[: hi - lo], scales[first : first + count],
                      values[lo:hi], rng)
    return out


#: The stored scale is absmax / 127 times this, so that every scaled value is strictly
#: inside (-127, 127) after float32 rounding (at most a few ulps, ~1e-7 relative): rounding
#: then never reaches +-128 and needs no clipping pass. Decoding multiplies by the stored
#: scale, so the rounding stays unbiased; the cost is 2^-19 of the int8 range.
_HEADROOM: Final = np.float32(1 + 2.0**-19)


def _pack_segment(src: np.ndarray, block: int, part: np.ndarray, scales: np.ndarray,
                  values: np.ndarray, rng: np.random.Generator | None) -> None:
    """One segment of ``pack_int8``: ``src`` (whole blocks, the last maybe short) into its
    ``scales`` and ``values`` through ``part`` (float32, ``src``'s size). Five passes over
    the values (abs, max, scale, dither, round-and-narrow), four without the dither; the old
    eight (copy, max, min, scale, dither, round, clip, narrow) cost 1.3x as long."""
    whole = src.size // block
    head, tail = src[: whole * block], src[whole * block :]
    amax = np.empty(scales.size, np.float32)
    if whole:  # |x| through the scratch buffer, then one reduction: cheaper than max and min
        np.abs(head, out=part[: whole * block], casting="same_kind")
        part[: whole * block].reshape(whole, block).max(axis=1, out=amax[:whole])
    if tail.size:
        amax[whole] = np.abs(tail).max()
    np.multiply(amax, _HEADROOM / np.float32(127.0), out=scales)
    inv = scales.copy()
    inv[inv == 0] = 1.0
    np.reciprocal(inv, out=inv)
    if whole:  # scaled straight from the source: no copy into the scratch buffer first
        np.multiply(head.reshape(whole, block), inv[:whole, None],
                    out=part[: whole * block].reshape(whole, block),
                    casting="same_kind")
    if tail.size:
        np.multiply(tail, inv[whole], out=part[whole * block :], casting="same_kind")
    if rng is not None:
        # The dither is a window of a fixed random permutation of the 2^18 points
        # (k + 1/2) / 2^18, at an offset drawn from ``rng`` per 2^18 values: each value's
        # dither is uniform on that grid (unbiased to 2^-19 of a step) and independent of
        # the data, and a whole window uses every point once. Drawing 1M fresh uniforms
        # instead cost more than the rest of the packing together (1.6 ms per 1M), holding
        # the GIL. A segment is longer than a window only for blocks over 2^18 values.
        dither = _dither()
        for off in range(0, part.size, _SEGMENT):
            window = part[off : off + _SEGMENT]
            start = int(rng.integers(_SEGMENT))
            window += dither[start : start + window.size]
        np.floor(part, out=values, casting="unsafe")  # integral, in [-127, 127]: exact
    else:
        np.rint(part, out=values, casting="unsafe")


def _reject(name: str, detail: str, reason: str = "bad_update_codec") -> UpdateRejected:
    return UpdateRejected(reason, f"{name}: {detail}")


def decode_update(
    delta: Mapping[str, np.ndarray], meta: Mapping[str, Any],
    reference: Mapping[str, np.ndarray],
) -> Mapping[str, np.ndarray]:
    """The delta (shapes and dtypes of ``reference``, the global model) from what a trainer
    sent; an uncompressed update is returned as it came, an int8 one as a ``PackedDelta``
    (dense when indexed). Raises ``UpdateRejected`` for a packing that does not fit the model
    (checked before anything is allocated)."""
    spec = meta.get(META_KEY)
    if spec is None:
        return dict(delta)
    if not isinstance(spec, Mapping) or spec.get("mode") not in MODES[1:]:
        raise UpdateRejected("bad_update_codec", f"meta {META_KEY}={spec!r}")
    mode = spec["mode"]
    block = spec.get("block", 256)
    if mode == "int8" and (not isinstance(block, int) or isinstance(block, bool)
                           or not 1 <= block <= _MAX_BLOCK):
        raise UpdateRejected("bad_update_codec", f"int8 block {block!r}")
    out: dict[str, np.ndarray] = {}
    packed: dict[str, tuple[np.ndarray, tuple[int, ...], np.dtype[Any]]] = {}
    for name, sent in delta.items():
        ref = reference.get(name)
        if ref is None or not _compressible(ref) or (
                sent.dtype == ref.dtype and sent.shape == ref.shape):
            out[name] = sent  # not ours to decode; the intake's checks judge it
        elif mode == "fp16":
            if sent.dtype != np.float16 or sent.shape != ref.shape:
                raise _reject(name, f"fp16 expects float16 {ref.shape}, got {sent.dtype} "
                              f"{sent.shape}")
            out[name] = sent.astype(ref.dtype)
        elif sent.dtype != np.uint8 or sent.ndim != 1:
            raise _reject(name, f"{mode} expects flat uint8, got {sent.dtype} {sent.shape}")
        elif mode == "int8":
            _check_int8(name, sent, ref.size, block, "bad_update_codec")
            packed[name] = (sent, ref.shape, ref.dtype)
        else:
            out[name] = _from_topk(name, sent, ref)
    return PackedDelta(list(delta), out, packed, block) if packed else out


#: The largest int8 scale whose products (up to 127 x scale) stay finite in float32.
_MAX_SCALE: Final = float(np.finfo(np.float32).max) / 127


def _check_int8(name: str, packed: np.ndarray, n: int, block: int, reason: str) -> None:
    blocks = -(-n // block)
    if packed.size != 4 * blocks + n:
        raise _reject(name, f"int8 packing of {packed.size} bytes, expected {4 * blocks + n}",
                      reason)
    scale = packed[: 4 * blocks].view("<f4")
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise _reject(name, "int8 scales must be finite and >= 0", reason)
    if scale.size and float(scale.max()) > _MAX_SCALE:  # 127 x scale would decode to Inf
        raise _reject(name, f"int8 scale {float(scale.max()):.3g} overflows float32", reason)


def _split_int8(packed: np.ndarray, n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A checked packing's float32 scales (one a block) and int8 values."""
    blocks = -(-n // block)
    return packed[: 4 * blocks].view("<f4"), packed[4 * blocks :].view(np.int8)


def _dequant_into(coef: np.ndarray, values: np.ndarray, block: int, start: int, stop: int,
                  out: np.ndarray) -> np.ndarray:
    """``out`` (float, ``stop - start`` long) = values ``start:stop`` times their blocks'
    ``coef`` (the scales, of ``out``'s dtype, perhaps times a weight): with the float32
    scales themselves, the same products as a whole-tensor decode. Widened first, then
    scaled in place (one int8 x float32 ufunc pass took 1.15x as long as the two)."""
    out[...] = values[start:stop]
    pos, at = start, -(-start // block) * block  # the first block boundary at or after start
    if at > start:  # the head: the rest of a block
        end = min(at, stop)
        out[: end - start] *= coef[start // block]
        pos = end
    whole = (stop - pos) // block
    if whole:
        first, span = pos // block, whole * block
        out[pos - start : pos - start + span].reshape(whole, block)[...] *= \
            coef[first : first + whole, None]
        pos += span
    if pos < stop:  # the tail: the start of a block
        out[pos - start : stop - start] *= coef[pos // block]
    return out


def _dequant_int8(packed: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any],
                  block: int) -> np.ndarray:
    """A packing ``_check_int8`` passed, as a dense tensor."""
    n = math.prod(shape)
    scales, values = _split_int8(packed, n, block)
    dense = _dequant_into(scales, values, block, 0, n, np.empty(n, np.float32))
    return dense.reshape(shape).astype(dtype, copy=False)


#: Values a ``PackedDelta`` decodes at a time for its norm: 256 KiB of float32, in cache.
_CHUNK: Final = 1 << 16


class PackedDelta(Mapping[str, np.ndarray]):
    """An update whose int8 tensors stay packed until something needs them dense.

    Indexing gives the dense tensor (decoded once, then kept), so any strategy reads it as a
    plain delta. The streaming mean (``strategies.fedavg``) instead reads it a range at a
    time (``read``, ``strategies.base.ChunkedDelta``) and the intake takes its norm the same
    way (``sq_norm``): for 1M parameters that is 1 MB read from memory, not a 4 MB float32
    copy written, scaled, read for the norm and read again for the fold. Checked on
    construction (``decode_update``). Its content never changes after; what it caches (a
    decoded tensor, the last read's scaled coefficients) is set by one assignment each, so
    threads may share it (the store's feed decodes in its pool while the fold reads)."""

    __slots__ = ("_block", "_coef", "_dense", "_names", "_packed")

    def __init__(self, names: list[str], dense: dict[str, np.ndarray],
                 packed: Mapping[str, tuple[np.ndarray, tuple[int, ...], np.dtype[Any]]],
                 block: int) -> None:
        self._names = names
        self._dense = dense
        self._packed = dict(packed)
        self._block = block
        #: (name, weight, dtype, the scales times weight) of the last ``read``: a fold reads
        #: one tensor with one weight, block after block
        self._coef: tuple[str, float, np.dtype[Any], np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        got = self._dense.get(name)
        if got is None:
            sent, shape, dtype = self._packed[name]  # KeyError: not a tensor of this update
            got = self._dense[name] = _dequant_int8(sent, shape, dtype, self._block)
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def packed(self, name: str) -> bool:
        """Is tensor ``name`` an int8 packing (its shape and dtype the model's)?"""
        return name in self._packed

    def shape_of(self, name: str) -> tuple[int, ...]:
        entry = self._packed.get(name)
        return entry[1] if entry is not None else self._dense[name].shape

    @property
    def nbytes(self) -> int:
        return (sum(sent.nbytes for sent, _, _ in self._packed.values())
                + sum(d.nbytes for d in self._dense.values()))

    def read(self, name: str, start: int, stop: int, out: np.ndarray,
             weight: float = 1.0) -> np.ndarray:
        entry = self._packed.get(name)
        if entry is None:
            np.multiply(self[name].reshape(-1)[start:stop], weight, out=out, dtype=out.dtype)
            return out
        sent, shape, _ = entry
        scales, values = _split_int8(sent, math.prod(shape), self._block)
        memo = self._coef
        if memo is None or memo[:3] != (name, weight, out.dtype):
            coef = scales.astype(out.dtype)
            if weight != 1.0:
                coef *= weight
            memo = self._coef = (name, weight, out.dtype, coef)
        return _dequant_into(memo[3], values, self._block, start, stop, out)

    def sq_norm(self, name: str) -> float:
        """The squared L2 norm of packed tensor ``name``, a cache-sized range at a time: per
        block, the sum of its squared int8 values (exact in float32 up to 1,040 values a
        block) times its squared scale."""
        sent, shape, _ = self._packed[name]
        n, block = math.prod(shape), self._block
        scales, values = _split_int8(sent, n, block)
        step = _CHUNK if _CHUNK % block == 0 else block * max(1, _CHUNK // block)
        buf = np.empty(min(n, step), np.float32)
        total = 0.0
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            for start in range(0, n, step):
                stop = min(n, start + step)
                part = buf[: stop - start]
                part[...] = values[start:stop]
                whole, first = (stop - start) // block, start // block
                if whole:
                    rows = part[: whole * block].reshape(whole, block)
                    per = np.einsum("ij,ij->i", rows, rows)
                    scale = scales[first : first + whole]
                    total += float(np.dot(per, scale * scale))
                if whole * block < stop - start:  # the last, shorter block
                    rest = part[whole * block :]
                    total += float(np.dot(rest, rest)) * float(scales[first + whole]) ** 2
        return total


def _from_topk(name: str, packed: np.ndarray, ref: np.ndarray) -> np.ndarray:
    n = ref.size
    if packed.size % 8 or not 0 < packed.size // 8 <= n:
        raise _reject(name, f"topk packing of {packed.size} bytes for {n} values")
    k = packed.size // 8
    idx = packed[: 4 * k].view("<u4")
    if int(idx.max()) >= n:
        raise _reject(name, f"topk index {int(idx.max())} >= {n}")
    dense = np.zeros(n, ref.dtype)
    dense[idx] = packed[4 * k :].view("<f4")
    return dense.reshape(ref.shape)


# --- the downlink: the global model as broadcast (manifest ``codec.model``) --------------------
#
# The aggregator keeps its model exact and broadcasts a lossy view of it; trainers train from
# that view and send their delta from it, which the aggregator adds to the exact model. So the
# rounding error of one broadcast never enters the next (nothing accumulates) and nobody needs
# state from an earlier round: a trainer that missed rounds, a relay, a store or a simulation
# worker decodes any broadcast on its own. Only the broadcast's model tensors are compressed;
# a strategy's extras (SCAFFOLD's control variates) travel dense.

_MODEL_DTYPES: Final[dict[str, np.dtype[Any]]] = {t: np.dtype(t) for t in ("<f2", "<f4", "<f8")}
_MAX_DIMS: Final = 32


def encode_model(weights: Mapping[str, np.ndarray], codec: UpdateCodec,
                 rng: np.random.Generator | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors to broadcast instead of ``weights`` and the meta entries that describe
    them. int8 rounds to nearest unless ``codec.stochastic`` (then with ``rng``)."""
    if codec.mode == "none":
        return dict(weights), {}
    if codec.mode not in MODEL_MODES:
        raise ValueError(f"model mode {codec.mode!r} is not one of {MODEL_MODES}")
    out: dict[str, np.ndarray] = {}
    declared: dict[str, list[Any]] = {}
    for name, w in weights.items():
        dtype = w.dtype.newbyteorder("<").str
        if not _compressible(w) or dtype not in _MODEL_DTYPES:
            out[name] = w
            continue
        declared[name] = [dtype, list(w.shape)]
        if codec.mode == "fp16":
            out[name] = w.astype(np.float16)
        else:
            out[name] = pack_int8(w, codec.block, (rng or np.random.default_rng())
                                  if codec.stochastic else None)
    return out, {MODEL_META_KEY: {"mode": codec.mode, "block": codec.block,
                                  "tensors": declared}}


def decode_model(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]
                 ) -> dict[str, np.ndarray]:
    """The dense model from a broadcast; a broadcast without ``model_codec`` is returned as
    it came. Everything the meta declares is checked against the bytes that arrived before
    a dense tensor is allocated (no bigger than 8 bytes per byte received), and a mismatch
    raises ``UpdateRejected("bad_model_codec")``."""
    out = dict(tensors)
    plan = _model_plan(tensors, meta)
    if not plan:
        return out
    with _SLOTS:
        for name, mode, dtype, shape, block in plan:
            sent = tensors[name]
            out[name] = (sent.astype(dtype) if mode == "fp16"
                         else _dequant_int8(sent, shape, dtype, block))
    return out


def check_model(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """What ``decode_model`` checks, without building the dense model: a receiver can judge
    a broadcast at once and decode it later, off its event loop."""
    _model_plan(tensors, meta)


def _model_plan(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]
                ) -> list[tuple[str, str, np.dtype[Any], tuple[int, ...], int]]:
    """(name, mode, dtype, shape, block) of every packed tensor, each checked."""
    spec = meta.get(MODEL_META_KEY)
    if spec is None:
        return []
    reason = "bad_model_codec"
    if not isinstance(spec, Mapping) or spec.get("mode") not in MODEL_MODES[1:] \
            or not isinstance(spec.get("tensors"), Mapping):
        raise UpdateRejected(reason, f"meta {MODEL_META_KEY}={str(spec)[:200]!r}")
    mode, block, declared = spec["mode"], spec.get("block", 256), spec["tensors"]
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= _MAX_BLOCK:
        raise UpdateRejected(reason, f"int8 block {block!r}")
    plan = []
    for name, entry in declared.items():
        sent = tensors.get(name)
        if sent is None:
            raise _reject(str(name)[:100], "declared but not sent", reason)
        dtype, shape = _declared(name, entry)
        if mode == "fp16":
            if sent.dtype != np.float16 or sent.shape != shape:
                raise _reject(name, f"fp16 expects float16 {shape}, got {sent.dtype} "
                              f"{sent.shape}", reason)
        elif sent.dtype != np.uint8 or sent.ndim != 1:
            raise _reject(name, f"int8 expects flat uint8, got {sent.dtype} {sent.shape}",
                          reason)
        else:
            _check_int8(name, sent, math.prod(shape), block, reason)
        plan.append((name, mode, dtype, shape, block))
    return plan


def _declared(name: str, entry: Any) -> tuple[np.dtype[Any], tuple[int, ...]]:
    reason = "bad_model_codec"
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in _MODEL_DTYPES
            and isinstance(entry[1], list) and len(entry[1]) <= _MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                    for d in entry[1])):
        raise _reject(str(name)[:100], f"declared as {str(entry)[:100]!r}, expected "
                      "[float dtype, shape]", reason)
    return _MODEL_DTYPES[entry[0]], tuple(entry[1])
