"""Wire codec: envelopes of metadata plus named tensors, as msgpack + raw buffers + zstd.

Pure functions, no I/O, no pickle. Every limit is checked against the frame's header before a
single tensor byte is allocated or decompressed.

Frame layout (all integers little-endian)::

    b"FB" | version:u8 | flags:u8 | header_len:u32 | header (msgpack) | data region

The header is a msgpack map (short keys, see ``_encode_header``). Each tensor entry gives its
name, dtype, shape, offset and byte length inside the *uncompressed* data region, and whether
its bytes are byte-plane shuffled. With the zstd flag the data region is one zstd frame whose
content size must equal the declared total, so a bomb is refused before decompression.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np
import zstandard

from fedbus.errors import CodecError

__all__ = [
    "WIRE_VERSION",
    "Compression",
    "Envelope",
    "Limits",
    "decode",
    "encode",
    "flatten_tree",
    "new_msg_id",
    "peek_data_size",
    "unflatten_tree",
]

WIRE_VERSION: Final = 1
MAGIC: Final = b"FB"
_PREFIX = struct.Struct("<2sBBI")
_FLAG_ZSTD: Final = 0x01

_Spec = tuple[str, np.dtype[Any], tuple[int, ...], int, int, bool]

# Little-endian dtypes a peer may send. bool and integers are allowed for masks, counts and
# quantized updates; object, string and structured dtypes are never accepted.
DEFAULT_DTYPES: Final = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "|b1"}
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied on decode, before anything is allocated."""

    max_frame_bytes: int = 1 << 31
    max_header_bytes: int = 8 << 20
    max_decompressed_bytes: int = 1 << 31
    max_tensors: int = 10_000
    max_dims: int = 8
    allowed_dtypes: frozenset[str] = DEFAULT_DTYPES


@dataclass(frozen=True, slots=True)
class Compression:
    """How the data region is compressed.

    Plain zstd on float32 weights gains ~9%; the byte-plane ``shuffle`` filter groups the
    exponent bytes together and lifts that to ~19% at a CPU cost (see docs/benchmarks.md).
    ``level=0`` means no compression at all.
    """

    level: int = 1
    shuffle: bool = False
    min_bytes: int = 4096  # below this the data region is sent raw: zstd framing costs more


NO_COMPRESSION: Final = Compression(level=0)


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on the bus: who sent what, for which job and round, plus named tensors.

    ``round`` is the round number for synchronous strategies and the model version for
    asynchronous ones. ``msg_id`` is unique per message and makes duplicates detectable.
    """

    kind: str
    job: str
    sender: str
    round: int
    msg_id: str = field(default_factory=lambda: new_msg_id())
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    version: int = WIRE_VERSION


def new_msg_id() -> str:
    return uuid.uuid4().hex


def _as_numpy(value: Any, name: str) -> np.ndarray:
    """Accept numpy arrays and torch tensors (without importing torch)."""
    if isinstance(value, np.ndarray):
        arr = value
    elif hasattr(value, "detach") and hasattr(value, "cpu"):
        try:
            arr = value.detach().cpu().numpy()
        except TypeError as exc:  # torch dtypes numpy lacks (bfloat16, ...)
            raise CodecError("bad_dtype", f"tensor {name!r}: {exc}; cast it first") from None
    else:
        arr = np.asarray(value)
    if arr.dtype.kind not in "fiub":
        raise CodecError("bad_dtype", f"tensor {name!r} has dtype {arr.dtype}: only numbers/bool")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if _dtype_tag(arr.dtype) not in DEFAULT_DTYPES:
        # e.g. float128: encoding it would make a frame every peer refuses
        raise CodecError("bad_dtype", f"tensor {name!r} has dtype {arr.dtype}, allowed: "
                         f"{sorted(DEFAULT_DTYPES)}")
    # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _dtype_tag(dtype: np.dtype[Any]) -> str:
    return dtype.newbyteorder("<").str if dtype.itemsize > 1 else dtype.str


def _shuffle(buf: np.ndarray) -> bytes:
    """Byte-plane shuffle: all first bytes, then all second bytes, ..."""
    size = buf.dtype.itemsize
    return buf.view(np.uint8).reshape(-1, size).T.tobytes()


def _unshuffle(raw: memoryview, itemsize: int) -> bytes:
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
    return planes.T.tobytes()


def encode(env: Envelope, compression: Compression = Compression()) -> bytes:
    """Serialize an envelope to one frame."""
    arrays: list[tuple[str, np.ndarray]] = [(n, _as_numpy(t, n)) for n, t in env.tensors.items()]
    total = sum(a.nbytes for _, a in arrays)
    use_zstd = compression.level > 0 and total >= compression.min_bytes
    entries: list[list[Any]] = []
    buffers: list[bytes | memoryview] = []
    offset = 0
    for name, arr in arrays:
        shuffled = use_zstd and compression.shuffle and arr.dtype.itemsize > 1 and arr.size > 1
        # flat uint8 view first: memoryview.cast refuses 0-d and empty multi-dim arrays
        flat = arr.reshape(-1).view(np.uint8)
        buffers.append(_shuffle(arr) if shuffled else memoryview(flat))  # type: ignore[arg-type]
        entries.append([name, _dtype_tag(arr.dtype), list(arr.shape), offset, arr.nbytes, shuffled])
        offset += arr.nbytes
    try:
        header = msgpack.packb(
            {
                "k": env.kind,
                "j": env.job,
                "s": env.sender,
                "r": int(env.round),
                "id": env.msg_id,
                "m": dict(env.meta),
                "t": entries,
                "n": total,
            },
            use_bin_type=True,
        )
        _check_map_keys(env.meta, "meta")
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError("bad_meta", f"envelope metadata is not msgpack-safe: {exc}; "
                         "pass trees through flatten_tree") from None
    flags = 0
    if use_zstd:
        flags |= _FLAG_ZSTD
        cobj = zstandard.ZstdCompressor(level=compression.level, write_content_size=True)
        zc = cobj.compressobj(size=total)
        data: list[bytes | memoryview] = [zc.compress(b) for b in buffers]
        data.append(zc.flush())
    else:
        data = buffers
    prefix = _PREFIX.pack(MAGIC, env.version, flags, len(header))
    return b"".join([prefix, header, *data])


def _check_map_keys(node: Any, path: str) -> None:
    # decode unpacks with strict_map_key, so a frame with other keys would be refused by peers
    if isinstance(node, Mapping):
        for k, v in node.items():
            if not isinstance(k, (str, bytes)):
                raise TypeError(f"key {k!r} at {path} is not a string")
            _check_map_keys(v, f"{path}/{k!r}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_map_keys(v, f"{path}/{i}")


def _check_header(h: Any, limits: Limits) -> tuple[list[_Spec], int]:
    if not isinstance(h, dict):
        raise CodecError("bad_header", "header is not a map")
    for key, typ in (("k", str), ("j", str), ("s", str), ("r", int), ("id", str), ("m", dict),
                     ("t", list), ("n", int)):
        if not isinstance(h.get(key), typ) or isinstance(h.get(key), bool):
            raise CodecError("bad_header", f"header field {key!r} missing or not {typ.__name__}")
    total = h["n"]
    if total < 0 or total > limits.max_decompressed_bytes:
        raise CodecError(
            "too_large",
            f"data region declares {total} bytes, limit {limits.max_decompressed_bytes}",
        )
    if len(h["t"]) > limits.max_tensors:
        raise CodecError("too_many_tensors", f"{len(h['t'])} tensors, limit {limits.max_tensors}")
    specs: list[_Spec] = []
    end = 0
    names: set[str] = set()
    for i, entry in enumerate(h["t"]):
        if not (isinstance(entry, list) and len(entry) == 6):
            raise CodecError("bad_tensor", f"tensor entry {i} is malformed")
        name, tag, shape, off, nbytes, shuffled = entry
        if not isinstance(name, str) or name in names:
            raise CodecError("bad_tensor", f"tensor entry {i} has a missing or repeated name")
        names.add(name)
        if not isinstance(tag, str) or tag not in limits.allowed_dtypes:
            raise CodecError("bad_dtype", f"tensor {name!r} has dtype {tag!r}, allowed: "
                             f"{sorted(limits.allowed_dtypes)}")
        if not isinstance(shape, list) or len(shape) > limits.max_dims or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CodecError("bad_shape", f"tensor {name!r} has shape {shape!r} "
                             f"(at most {limits.max_dims} non-negative dims)")
        dtype = np.dtype(tag)
        count = span = 1
        for d in shape:
            count *= d
            span *= max(d, 1)
        if span * dtype.itemsize > limits.max_decompressed_bytes:
            # an empty tensor may still carry absurd dims that numpy cannot even reshape to
            raise CodecError("bad_shape", f"tensor {name!r} has shape {shape!r}: dims too large")
        if not isinstance(nbytes, int) or count * dtype.itemsize != nbytes:
            raise CodecError("shape_mismatch", f"tensor {name!r}: shape {shape} x {dtype} needs "
                             f"{count * dtype.itemsize} bytes, header says {nbytes!r}")
        if not isinstance(off, int) or isinstance(off, bool) or off != end:
            raise CodecError("bad_tensor", f"tensor {name!r} offset {off!r}, expected {end}")
        end += nbytes
        specs.append((name, dtype, tuple(shape), off, nbytes, bool(shuffled)))
    if end != total:
        raise CodecError("shape_mismatch", f"tensors add up to {end} bytes, header says {total}")
    return specs, total


def peek_data_size(frame: bytes | bytearray | memoryview) -> int:
    """The uncompressed data size a frame's header declares (0 when it cannot tell). Cheap:
    only the prefix and the msgpack header are read; nothing is checked or decompressed."""
    view = memoryview(frame).cast("B")
    if len(view) < _PREFIX.size:
        return 0
    magic, _version, _flags, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC or _PREFIX.size + hlen > len(view) or hlen > (8 << 20):
        return 0
    try:
        header = msgpack.unpackb(view[_PREFIX.size : _PREFIX.size + hlen], raw=False,
                                 strict_map_key=True)
    except Exception:  # garbage: decode will say why
        return 0
    n = header.get("n") if isinstance(header, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def decode(
    frame: bytes | bytearray | memoryview, limits: Limits = Limits(), *, as_torch: bool = False
) -> Envelope:
    """Parse and validate one frame. Tensors are read-only numpy views into the frame when it
    was not compressed (zero-copy) and into the single decompressed buffer otherwise.

    ``as_torch=True`` returns writable torch tensors instead (one copy each: torch cannot
    wrap read-only memory); torch is imported only then.
    """
    # read-only, so zero-copy tensors never write through into a caller's bytearray
    view = memoryview(frame).cast("B").toreadonly()
    if len(view) > limits.max_frame_bytes:
        raise CodecError("too_large", f"frame is {len(view)} bytes, limit {limits.max_frame_bytes}")
    if len(view) < _PREFIX.size:
        raise CodecError("truncated", f"frame is {len(view)} bytes, shorter than the prefix")
    magic, version, flags, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError("bad_magic", "not a fedbus frame")
    if version != WIRE_VERSION:
        raise CodecError("bad_version", f"wire version {version}, this build speaks {WIRE_VERSION}")
    if flags & ~_FLAG_ZSTD:
        raise CodecError("bad_flags", f"unknown flags {flags:#x}")
    if hlen > limits.max_header_bytes or _PREFIX.size + hlen > len(view):
        raise CodecError("bad_header", f"header length {hlen} does not fit the frame or limits")
    try:
        header = msgpack.unpackb(
            view[_PREFIX.size : _PREFIX.size + hlen],
            raw=False,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError("bad_header", f"header is not valid msgpack: {exc}") from None
    specs, total = _check_header(header, limits)
    data = view[_PREFIX.size + hlen :]
    if flags & _FLAG_ZSTD:
        data = memoryview(_decompress(data, total))
    elif len(data) != total:
        raise CodecError("truncated", f"data region is {len(data)} bytes, header says {total}")
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape, off, nbytes, shuffled in specs:
        raw = data[off : off + nbytes]
        if shuffled:
            raw = memoryview(_unshuffle(raw, dtype.itemsize))
        arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
        tensors[name] = arr
    if as_torch:
        import torch

        tensors = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}  # type: ignore[misc]
    return Envelope(
        kind=header["k"],
        job=header["j"],
        sender=header["s"],
        round=header["r"],
        msg_id=header["id"],
        meta=header["m"],
        tensors=tensors,
        version=version,
    )


def _decompress(data: memoryview, total: int) -> bytes:
    # zstd's max_output_size is ignored when the frame states its content size, so the
    # declared size is checked here first; an unknown size is refused outright (we always
    # write it).
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError("bad_compression", f"data region is not a zstd frame: {exc}") from None
    if size != total:
        raise CodecError("too_large" if size > total else "bad_compression",
                         f"zstd frame declares {size} bytes, header says {total}")
    try:
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=total, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CodecError("bad_compression", f"zstd data is corrupt: {exc}") from None
    if len(out) != total:
        raise CodecError("bad_compression", f"zstd frame gave {len(out)} bytes, expected {total}")
    return out


# --- trees: strategy state and nested metadata through the same codec -----------------------

_TENSOR_REF = "__tensor__"
_BIGINT = "__bigint__"


def flatten_tree(tree: Any, prefix: str = "") -> tuple[Any, dict[str, np.ndarray]]:
    """Split a tree of dict/list/scalars/ndarrays into msgpack-safe metadata and named tensors.

    Arrays are replaced by ``{"__tensor__": path}`` and integers outside 64 bits (numpy RNG
    state) by ``{"__bigint__": "decimal"}`` so that a strategy's ``state_dict`` travels and is
    checkpointed through ``encode`` without pickle.
    """
    tensors: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, np.ndarray) or (hasattr(node, "detach") and hasattr(node, "cpu")):
            if path in tensors:  # {"a/b": x, "a": {"b": y}} would silently lose x
                raise CodecError("bad_tree", f"two arrays map to the path {path!r}; rename a key")
            tensors[path] = _as_numpy(node, path)
            return {_TENSOR_REF: path}
        if isinstance(node, Mapping):
            if set(node) in ({_TENSOR_REF}, {_BIGINT}):
                raise CodecError("bad_tree", f"dict at {path or '/'} uses a reserved key alone")
            out = {}
            for k, v in node.items():
                if not isinstance(k, str):
                    raise CodecError("bad_tree", f"key {k!r} at {path or '/'} is not a string")
                out[k] = walk(v, f"{path}/{k}")
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if isinstance(node, np.generic):
            return node.item()
        if isinstance(node, bool) or node is None or isinstance(node, (float, str, bytes)):
            return node
        if isinstance(node, int):
            return node if -(1 << 63) <= node < (1 << 64) else {_BIGINT: str(node)}
        raise CodecError("bad_tree", f"value at {path or '/'} has unsupported type {type(node)}")

    return walk(tree, prefix), tensors


def unflatten_tree(meta: Any, tensors: Mapping[str, np.ndarray], *, copy: bool = True) -> Any:
    """Inverse of :func:`flatten_tree`. ``copy`` makes arrays writable and independent."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {_TENSOR_REF}:
                ref = node[_TENSOR_REF]
                if not isinstance(ref, str) or ref not in tensors:
                    raise CodecError("bad_tree", f"tree refers to missing tensor {ref!r}")
                arr = tensors[ref]
                return arr.copy() if copy else arr
            if set(node) == {_BIGINT}:
                digits = node[_BIGINT]
                try:
                    if not isinstance(digits, str):
                        raise ValueError("not a string")
                    return int(digits)
                except ValueError as exc:  # also Python's cap on digits in int(str)
                    raise CodecError("bad_tree", f"bad big integer {digits!r:.40}: {exc}") from None
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(meta)

