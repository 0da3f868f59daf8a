"""Tests of the wire codec: round trips, zero-copy decode, and hostile frames.

Every way a peer can lie must end in ``CodecError`` with the right ``reason``, and a zstd bomb
must be refused before a byte of it is inflated.
"""

from __future__ import annotations

import copy
import random
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard

from fedbus.codec import (
    WIRE_VERSION,
    Compression,
    Envelope,
    Limits,
    decode,
    encode,
    flatten_tree,
    unflatten_tree,
)
from fedbus.errors import CodecError, FedbusError

RAW = Compression(level=0)
ZSTD = Compression(level=1, min_bytes=0)
ZSTD_SHUFFLE = Compression(level=1, shuffle=True, min_bytes=0)

ALL_DTYPES = ["<f2", "<f4", "<f8", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "|b1"]


# --- helpers -------------------------------------------------------------------------------


def envelope(tensors: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> Envelope:
    return Envelope(
        kind="update",
        job="job-1",
        sender="client-7",
        round=3,
        msg_id="m-1",
        meta=meta or {},
        tensors=tensors or {},
    )


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind == "f":
        return rng.standard_normal(size=shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)


def split(frame: bytes) -> tuple[int, int, dict[str, Any], bytes]:
    """(version, flags, header, data region) of a frame, for building hostile variants."""
    _magic, version, flags, hlen = struct.unpack_from("<2sBBI", frame)
    header = msgpack.unpackb(frame[8 : 8 + hlen], raw=False)
    return version, flags, header, frame[8 + hlen :]


def build(header: Any, data: bytes = b"", *, flags: int = 0, version: int = WIRE_VERSION,
          magic: bytes = b"FB") -> bytes:
    hb = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<2sBBI", magic, version, flags, len(hb)) + hb + data


def base_header(entries: list[list[Any]], total: int) -> dict[str, Any]:
    return {"k": "update", "j": "job", "s": "c1", "r": 1, "id": "x", "m": {}, "t": entries,
            "n": total}


def rejects(frame: bytes | bytearray | memoryview, reason: str, limits: Limits | None = None
            ) -> None:
    with pytest.raises(CodecError) as info:
        decode(frame, limits or Limits())
    assert info.value.reason == reason, str(info.value)


def valid_frame(compression: Compression = RAW) -> bytes:
    return encode(
        envelope({"w": sample("<f4", (4, 3)), "b": sample("|u1", (5,)), "m": sample("|b1", (2,))},
                 meta={"lr": 0.1, "tags": ["a", "b"]}),
        compression,
    )


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [RAW, ZSTD, ZSTD_SHUFFLE], ids=["raw", "zstd", "shuffle"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_round_trip_every_allowed_dtype(dtype: str, compression: Compression) -> None:
    tensors = {"a": sample(dtype, (7, 5)), "b": sample(dtype, (3,), seed=1)}

    out = decode(encode(envelope(tensors), compression))

    for name, arr in tensors.items():
        assert out.tensors[name].dtype == np.dtype(dtype)
        assert out.tensors[name].shape == arr.shape
        np.testing.assert_array_equal(out.tensors[name], arr)


def test_envelope_fields_round_trip() -> None:
    env = Envelope(kind="model", job="j", sender="agg", round=12, meta={"x": 1})

    out = decode(encode(env))

    assert (out.kind, out.job, out.sender, out.round, out.msg_id, out.version) == (
        "model", "j", "agg", 12, env.msg_id, WIRE_VERSION)
    assert out.meta == {"x": 1}
    assert out.tensors == {}


@pytest.mark.parametrize("compression", [RAW, ZSTD, ZSTD_SHUFFLE], ids=["raw", "zstd", "shuffle"])
def test_zero_dim_and_empty_tensors_keep_their_shape(compression: Compression) -> None:
    tensors = {
        "scalar": np.array(2.5, dtype=np.float32),
        "scalar_i": np.array(-7, dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty2": np.zeros((3, 0, 2), dtype=np.float16),
        "one": np.ones((1,), dtype=np.float64),
    }

    out = decode(encode(envelope(tensors), compression))

    for name, arr in tensors.items():
        assert out.tensors[name].shape == arr.shape, name
        assert out.tensors[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(out.tensors[name], arr)


def test_numpy_scalars_and_lists_are_accepted_as_tensors() -> None:
    out = decode(encode(envelope({"s": np.float32(1.5), "l": [[1, 2], [3, 4]]})))

    assert out.tensors["s"].shape == ()
    assert out.tensors["s"] == np.float32(1.5)
    np.testing.assert_array_equal(out.tensors["l"], [[1, 2], [3, 4]])


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">u8", ">f2"])
def test_big_endian_input_is_normalised_to_little_endian(dtype: str) -> None:
    arr = np.arange(12, dtype=dtype).reshape(3, 4)
    frame = encode(envelope({"a": arr}))

    out = decode(frame)

    assert out.tensors["a"].dtype.str == dtype.replace(">", "<")
    np.testing.assert_array_equal(out.tensors["a"], arr)
    assert split(frame)[2]["t"][0][1] == dtype.replace(">", "<")


@pytest.mark.parametrize("compression", [RAW, ZSTD_SHUFFLE], ids=["raw", "shuffle"])
def test_non_contiguous_input(compression: Compression) -> None:
    base = sample("<f4", (6, 8))
    tensors = {"t": base.T, "s": base[::2, 1::3], "f": np.asfortranarray(base)}

    out = decode(encode(envelope(tensors), compression))

    for name, arr in tensors.items():
        np.testing.assert_array_equal(out.tensors[name], arr)


def test_uncompressed_decode_is_zero_copy_and_read_only() -> None:
    frame = encode(envelope({"w": sample("<f4", (256, 64)), "b": sample("<f8", (10,))}), RAW)

    out = decode(frame)

    whole = np.frombuffer(frame, dtype=np.uint8)
    for arr in out.tensors.values():
        assert np.shares_memory(arr, whole)
        assert not arr.flags.writeable


def test_decode_of_bytearray_gives_read_only_views() -> None:
    buf = bytearray(encode(envelope({"w": sample("<f4", (8,))}), RAW))

    out = decode(buf)

    assert np.shares_memory(out.tensors["w"], np.frombuffer(buf, dtype=np.uint8))
    assert not out.tensors["w"].flags.writeable


def test_decode_accepts_a_memoryview_slice() -> None:
    frame = encode(envelope({"w": sample("<f4", (8,))}), RAW)
    padded = b"xx" + frame + b"yy"

    out = decode(memoryview(padded)[2:-2])

    np.testing.assert_array_equal(out.tensors["w"], sample("<f4", (8,)))


def test_compression_flag_follows_level_and_min_bytes() -> None:
    big = {"w": np.zeros(10_000, dtype=np.float32)}
    small = {"w": np.zeros(10, dtype=np.float32)}

    assert split(encode(envelope(big), RAW))[1] == 0
    assert split(encode(envelope(big), Compression(level=1)))[1] == 1
    assert split(encode(envelope(small), Compression(level=1)))[1] == 0  # below min_bytes
    assert split(encode(envelope(small), ZSTD))[1] == 1


def test_zstd_shrinks_zeros_and_shuffle_marks_entries() -> None:
    tensors = {"w": np.linspace(0, 1, 50_000, dtype=np.float32), "m": np.ones(100, dtype=bool),
               "one": np.array([3.0], dtype=np.float32)}
    raw = encode(envelope(tensors), RAW)
    plain = encode(envelope(tensors), Compression(level=3))
    shuffled = encode(envelope(tensors), Compression(level=3, shuffle=True))

    entries = {e[0]: e for e in split(shuffled)[2]["t"]}

    assert len(plain) < len(raw)
    assert len(shuffled) < len(plain)  # smooth float32: exponent planes compress well
    # bytes and 1-element tensors have nothing to shuffle
    assert (entries["w"][5], entries["m"][5], entries["one"][5]) == (True, False, False)
    assert not any(e[5] for e in split(plain)[2]["t"])
    for frame in (plain, shuffled):
        out = decode(frame)
        for name, arr in tensors.items():
            np.testing.assert_array_equal(out.tensors[name], arr)


def test_meta_with_nested_values() -> None:
    meta = {
        "lr": 0.01,
        "n": 2**64 - 1,
        "neg": -(2**63),
        "flag": True,
        "none": None,
        "blob": b"\x00\xff",
        "text": "Grüße",
        "nested": {"a": [1, 2.5, {"b": [None, "x", b"y"]}], "empty": {}, "list": []},
    }

    out = decode(encode(envelope(meta=meta)))

    assert out.meta == meta


@pytest.mark.parametrize("meta", [{"x": np.float32(1.0)}, {"x": object()}, {"x": 2**70},
                                  {1: "int key"}])
def test_meta_that_msgpack_cannot_carry_is_refused_on_encode(meta: dict[Any, Any]) -> None:
    with pytest.raises(CodecError) as info:
        encode(envelope(meta=meta))
    assert info.value.reason == "bad_meta"


@pytest.mark.parametrize("value", [np.array(["a"]), np.array([1 + 2j]), np.array([object()]),
                                   np.zeros(2, dtype="datetime64[s]"), np.zeros(2, np.longdouble)])
def test_encode_refuses_dtypes_no_peer_accepts(value: np.ndarray) -> None:
    if value.dtype == np.longdouble and value.dtype.itemsize == 8:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(CodecError) as info:
        encode(envelope({"x": value}))
    assert info.value.reason == "bad_dtype"


def test_codec_error_is_a_fedbus_error() -> None:
    err = CodecError("bad_magic", "not a fedbus frame")
    assert isinstance(err, FedbusError)
    assert (err.reason, err.detail) == ("bad_magic", "not a fedbus frame")


# --- torch on encode -----------------------------------------------------------------------


@pytest.mark.torch
def test_torch_tensors_are_accepted_on_encode() -> None:
    torch = pytest.importorskip("torch")
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "w": w,
        "wt": w.t(),  # non-contiguous
        "grad": torch.ones(3, requires_grad=True),
        "h": torch.ones(2, 2, dtype=torch.float16),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(5, dtype=torch.int64),
    }

    out = decode(encode(envelope(tensors), ZSTD_SHUFFLE))

    for name, t in tensors.items():
        np.testing.assert_array_equal(out.tensors[name], t.detach().numpy())
        assert out.tensors[name].shape == tuple(t.shape)


@pytest.mark.torch
def test_decode_as_torch_returns_writable_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    frame = encode(envelope({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))

    out = decode(frame, as_torch=True)

    w = out.tensors["w"]
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.shape == (2, 3)
    w += 1  # writable: a copy, never the frame's memory
    assert torch.equal(w, torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1)


@pytest.mark.torch
def test_torch_bfloat16_is_refused_with_codec_error() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(CodecError) as info:
        encode(envelope({"w": torch.ones(3, dtype=torch.bfloat16)}))
    assert info.value.reason == "bad_dtype"


# --- hostile frames: prefix ----------------------------------------------------------------


@pytest.mark.parametrize("blob", [b"", b"F", b"FB\x01", b"FB\x01\x00\x00\x00\x00"])
def test_shorter_than_prefix(blob: bytes) -> None:
    rejects(blob, "truncated")


def test_random_bytes_are_rejected() -> None:
    rng = random.Random(1)
    for _ in range(200):
        blob = rng.randbytes(rng.randrange(0, 300))
        with pytest.raises(CodecError):
            decode(blob)


def test_wrong_magic_version_flags() -> None:
    _v, _f, header, data = split(valid_frame())

    rejects(build(header, data, magic=b"PK"), "bad_magic")
    rejects(build(header, data, version=0), "bad_version")
    rejects(build(header, data, version=WIRE_VERSION + 1), "bad_version")
    rejects(build(header, data, flags=0x02), "bad_flags")
    rejects(build(header, data, flags=0x81), "bad_flags")


def test_frame_over_max_frame_bytes() -> None:
    rejects(valid_frame(), "too_large", Limits(max_frame_bytes=32))


def test_header_length_beyond_frame_or_limit() -> None:
    frame = bytearray(valid_frame())
    hlen = struct.unpack_from("<I", frame, 4)[0]

    struct.pack_into("<I", frame, 4, len(frame))  # points past the end
    rejects(bytes(frame), "bad_header")
    struct.pack_into("<I", frame, 4, 0xFFFFFFFF)
    rejects(bytes(frame), "bad_header")
    struct.pack_into("<I", frame, 4, hlen)
    rejects(bytes(frame), "bad_header", Limits(max_header_bytes=hlen - 1))


def test_header_not_msgpack_or_with_trailing_bytes() -> None:
    _v, _f, header, _d = split(valid_frame())
    packed = msgpack.packb(header, use_bin_type=True)

    for hb in (b"\xc1", b"\x92\x01", packed + b"\x00", b"\xa3\xff\xfe\xfd"):
        rejects(struct.pack("<2sBBI", b"FB", WIRE_VERSION, 0, len(hb)) + hb, "bad_header")


@pytest.mark.parametrize("header", [[1, 2, 3], "map", 7, None, b"bytes"])
def test_header_not_a_map(header: Any) -> None:
    rejects(build(header), "bad_header")


def test_header_with_non_string_map_keys_is_refused() -> None:
    hb = msgpack.packb({1: "x"})
    rejects(struct.pack("<2sBBI", b"FB", WIRE_VERSION, 0, len(hb)) + hb, "bad_header")


@pytest.mark.parametrize("key", ["k", "j", "s", "r", "id", "m", "t", "n"])
def test_missing_or_mistyped_header_fields(key: str) -> None:
    header = base_header([], 0)

    rejects(build({k: v for k, v in header.items() if k != key}), "bad_header")
    rejects(build({**header, key: 1.5}), "bad_header")
    rejects(build({**header, key: True if key in ("r", "n") else None}), "bad_header")


def test_deeply_nested_header_is_refused_cleanly() -> None:
    hb = b"\x91" * 100_000 + b"\x00"
    rejects(struct.pack("<2sBBI", b"FB", WIRE_VERSION, 0, len(hb)) + hb, "bad_header")


# --- hostile frames: tensor table ----------------------------------------------------------


def one(entry: list[Any], total: int, data: bytes | None = None) -> bytes:
    return build(base_header([entry], total), b"\x00" * total if data is None else data)


def test_too_many_tensors() -> None:
    entries = [[f"t{i}", "|u1", [1], i, 1, False] for i in range(5)]

    rejects(build(base_header(entries, 5), b"\x00" * 5), "too_many_tensors", Limits(max_tensors=4))
    assert len(decode(build(base_header(entries, 5), b"\x00" * 5), Limits(max_tensors=5)).tensors) \
        == 5


def test_too_many_dims() -> None:
    shape = [1] * 9

    rejects(one(["a", "<f4", shape, 0, 4, False], 4), "bad_shape")
    rejects(one(["a", "<f4", [1] * 3, 0, 4, False], 4), "bad_shape", Limits(max_dims=2))


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], ["1"], [None], "4", 4, {"a": 1},
                                   [2**64 - 1, 0], [0, 2**40, 2**40, 2**40]])
def test_bad_shapes(shape: Any) -> None:
    rejects(one(["a", "<f4", shape, 0, 4, False], 4), "bad_shape")


@pytest.mark.parametrize("shape", [[0, 2**64 - 1], [0, 2**40, 2**40, 2**40], [2**31, 2**31, 0]])
def test_empty_tensor_with_absurd_dims(shape: list[int]) -> None:
    # zero bytes, so the size check passes; numpy could not even build the view
    rejects(one(["a", "<f4", shape, 0, 0, False], 0), "bad_shape")


@pytest.mark.parametrize("tag", ["|O", ">f4", "<U1", "|V4", "<c8", "<M8[s]", "|S1", "<f16",
                                 "f4", "float32", "", [1], {"x": 1}, None, 4, b"<f4"])
def test_disallowed_dtype_tags(tag: Any) -> None:
    rejects(one(["a", tag, [1], 0, 4, False], 4), "bad_dtype")


def test_allowed_dtypes_can_be_narrowed() -> None:
    frame = encode(envelope({"a": np.zeros(2, np.float64)}))

    rejects(frame, "bad_dtype", Limits(allowed_dtypes=frozenset({"<f4"})))


@pytest.mark.parametrize("entry", [
    ["a", "<f4", [3], 0, 8, False],  # shape x itemsize != nbytes
    ["a", "<f4", [2], 0, 9, False],
    ["a", "<f4", [2], 0, "8", False],
    ["a", "<f4", [2], 0, None, False],
    ["a", "<f4", [2], 0, 8.0, False],
])
def test_lying_shape(entry: list[Any]) -> None:
    rejects(one(entry, 8), "shape_mismatch")


@pytest.mark.parametrize("entry", [
    "not a list", ["a", "<f4", [2], 0, 8], ["a", "<f4", [2], 0, 8, False, "extra"], {"n": "a"},
])
def test_malformed_tensor_entry(entry: Any) -> None:
    rejects(build(base_header([entry], 8), b"\x00" * 8), "bad_tensor")


@pytest.mark.parametrize("name", [None, 1, b"a", ["a"]])
def test_tensor_names_must_be_strings(name: Any) -> None:
    rejects(one([name, "<f4", [2], 0, 8, False], 8), "bad_tensor")


def test_repeated_tensor_names() -> None:
    entries = [["a", "<f4", [1], 0, 4, False], ["a", "<f4", [1], 4, 4, False]]
    rejects(build(base_header(entries, 8), b"\x00" * 8), "bad_tensor")


@pytest.mark.parametrize("offsets", [
    (0, 0),  # overlap
    (0, 2),  # overlap
    (0, 6),  # gap
    (4, 0),  # out of order
    (1, 5),  # leading gap
    (0, -4),
    (0.0, 4),  # float offset equal to the expected one
    (0, 4.0),
    ("0", 4),
    (None, 4),
])
def test_offsets_that_overlap_or_leave_gaps(offsets: tuple[Any, Any]) -> None:
    entries = [["a", "<f4", [1], offsets[0], 4, False], ["b", "<f4", [1], offsets[1], 4, False]]
    rejects(build(base_header(entries, 8), b"\x00" * 8), "bad_tensor")


def test_declared_total_disagrees_with_tensors() -> None:
    entry = ["a", "<f4", [2], 0, 8, False]

    rejects(build(base_header([entry], 12), b"\x00" * 12), "shape_mismatch")
    rejects(build(base_header([entry], 4), b"\x00" * 4), "shape_mismatch")
    rejects(build(base_header([], 4), b"\x00" * 4), "shape_mismatch")


def test_declared_total_beyond_limits() -> None:
    entry = ["a", "<f4", [2], 0, 8, False]

    rejects(build(base_header([entry], -1)), "too_large")
    rejects(build(base_header([entry], 2**40)), "too_large")
    rejects(one(entry, 8), "too_large", Limits(max_decompressed_bytes=7))


def test_data_region_shorter_or_longer_than_declared() -> None:
    entry = ["a", "<f4", [2], 0, 8, False]

    rejects(one(entry, 8, b"\x00" * 7), "truncated")
    rejects(one(entry, 8, b"\x00" * 9), "truncated")
    rejects(one(entry, 8, b""), "truncated")
    assert decode(one(entry, 8)).tensors["a"].shape == (2,)


@pytest.mark.parametrize("compression", [RAW, ZSTD, ZSTD_SHUFFLE], ids=["raw", "zstd", "shuffle"])
def test_truncated_at_every_cut_point(compression: Compression) -> None:
    frame = valid_frame(compression)
    assert decode(frame).tensors["w"].shape == (4, 3)

    for cut in range(len(frame)):
        with pytest.raises(CodecError) as info:
            decode(frame[:cut])
        assert info.value.reason in {"truncated", "bad_header", "bad_compression"}, (cut, info)


def test_extra_bytes_after_a_frame_are_refused() -> None:
    rejects(valid_frame(RAW) + b"\x00", "truncated")
    rejects(valid_frame(ZSTD) + b"\x00", "bad_compression")
    rejects(valid_frame(ZSTD) + valid_frame(ZSTD)[-20:], "bad_compression")


def test_shuffled_flag_on_uncompressed_data_round_trips_bytes() -> None:
    # A peer may set the flag without compression; decode must still be well defined.
    data = np.arange(4, dtype="<u2").tobytes()
    out = decode(one(["a", "<u2", [4], 0, 8, True], 8, data))
    assert out.tensors["a"].shape == (4,)
    empty = decode(one(["a", "<f4", [0, 3], 0, 0, True], 0, b""))
    assert empty.tensors["a"].shape == (0, 3)


# --- hostile frames: zstd ------------------------------------------------------------------

BOMB_SIZE = 256 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """8 KB-ish zstd frame that honestly declares 256 MiB of zeros, made without holding it."""
    zc = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=BOMB_SIZE)
    chunk = bytes(1 << 20)
    parts = [zc.compress(chunk) for _ in range(BOMB_SIZE >> 20)]
    parts.append(zc.flush())
    blob = b"".join(parts)
    assert zstandard.frame_content_size(blob) == BOMB_SIZE
    assert len(blob) < 64 << 10
    return blob


def test_zstd_bomb_is_refused_before_decompressing(bomb: bytes) -> None:
    frame = build(base_header([["a", "<f4", [1], 0, 4, False]], 4), bomb, flags=1)

    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as info:
            decode(frame)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info.value.reason == "too_large"
    assert peak < 10 << 20


def test_honest_bomb_over_the_limit_is_refused_by_the_header(bomb: bytes) -> None:
    entries = [["a", "|u1", [BOMB_SIZE], 0, BOMB_SIZE, False]]
    frame = build(base_header(entries, BOMB_SIZE), bomb, flags=1)

    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as info:
            decode(frame, Limits(max_decompressed_bytes=1 << 20))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info.value.reason == "too_large"
    assert peak < 10 << 20


def test_zstd_frame_without_content_size() -> None:
    data = np.arange(1000, dtype="<f4").tobytes()
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert zstandard.frame_content_size(blob) == -1

    frame = build(base_header([["a", "<f4", [1000], 0, 4000, False]], 4000), blob, flags=1)
    rejects(frame, "bad_compression")


def test_zstd_frame_declaring_less_than_the_header() -> None:
    blob = zstandard.ZstdCompressor().compress(b"\x00" * 4)
    frame = build(base_header([["a", "<f4", [2], 0, 8, False]], 8), blob, flags=1)
    rejects(frame, "bad_compression")


@pytest.mark.parametrize("data", [b"", b"\x00", b"not zstd at all", b"\x28\xb5\x2f"])
def test_data_region_that_is_not_zstd(data: bytes) -> None:
    frame = build(base_header([["a", "<f4", [2], 0, 8, False]], 8), data, flags=1)
    rejects(frame, "bad_compression")


def test_corrupted_zstd_data() -> None:
    data = np.tile(np.arange(64, dtype="<f4"), 200).tobytes()
    blob = bytearray(zstandard.ZstdCompressor(level=3).compress(data))
    hsize = zstandard.frame_header_size(bytes(blob))
    header = base_header([["a", "<f4", [len(data) // 4], 0, len(data), False]], len(data))

    bad_block = bytearray(blob)
    bad_block[hsize] |= 0x06  # block type 3 is reserved: always corrupt
    rejects(build(header, bytes(bad_block), flags=1), "bad_compression")
    rejects(build(header, bytes(blob[:-3]), flags=1), "bad_compression")

    rng = random.Random(5)
    for _ in range(200):  # without a checksum a flip may decode to other bytes: never crash
        mutated = bytearray(blob)
        pos = rng.randrange(hsize, len(mutated))
        mutated[pos] ^= 1 << rng.randrange(8)
        try:
            out = decode(build(header, bytes(mutated), flags=1))
        except CodecError as exc:
            assert exc.reason == "bad_compression"
        else:
            assert out.tensors["a"].nbytes == len(data)


# --- fuzz ----------------------------------------------------------------------------------


def _mutate_bytes(frame: bytes, rng: random.Random) -> bytes:
    buf = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del buf[pos : pos + rng.randint(1, 8)]
        else:
            del buf[pos:]
    return bytes(buf)


_WEIRD: list[Any] = [None, True, 0, -1, 1, 3, 2**63, 2**64 - 1, -(2**63), 1.5, "", "<f4", "|b1",
                     ">f4", "|O", b"x", [], [0], [2, 2], [-1], {}, {"a": 1}, [[1]], 10**6]


def _mutate_header(frame: bytes, rng: random.Random) -> bytes:
    _version, flags, header, data = split(frame)
    for _ in range(rng.randint(1, 3)):
        weird = copy.deepcopy(rng.choice(_WEIRD))
        entries = [e for e in header["t"] if isinstance(e, list)] if isinstance(
            header.get("t"), list) else []
        if rng.random() < 0.6 and entries:
            entry = rng.choice(entries)
            entry[rng.randrange(len(entry))] = weird
        else:
            header[rng.choice(list(header))] = weird
    return build(header, data, flags=flags)


def test_fuzz_decode_returns_an_envelope_or_raises_codec_error() -> None:
    rng = random.Random(20261114)
    seeds = [valid_frame(RAW), valid_frame(ZSTD), valid_frame(ZSTD_SHUFFLE),
             encode(envelope({"z": np.array(1.0, np.float32), "e": np.zeros(0, np.int8)}))]
    mutators: list[Callable[[bytes, random.Random], bytes]] = [_mutate_bytes, _mutate_header]
    outcomes = {"ok": 0, "rejected": 0}
    limits = Limits(max_decompressed_bytes=1 << 20)
    deadline = time.monotonic() + 4.0

    for i in range(4000):
        if time.monotonic() > deadline:
            break
        frame = rng.choice(mutators)(rng.choice(seeds), rng)
        try:
            out = decode(frame, limits)
        except CodecError:
            outcomes["rejected"] += 1
        except Exception as exc:  # pragma: no cover - a failure is the point of the test
            pytest.fail(f"iteration {i}: {type(exc).__name__}: {exc} for frame {frame!r:.300}")
        else:
            assert isinstance(out, Envelope)
            for arr in out.tensors.values():
                assert isinstance(arr, np.ndarray)
                arr.sum()  # touching every byte must be safe
            outcomes["ok"] += 1

    assert outcomes["rejected"] > 100
    assert outcomes["ok"] > 10


# --- trees ---------------------------------------------------------------------------------


def test_tree_round_trip_through_encode_and_decode() -> None:
    rng_state = np.random.default_rng(42).bit_generator.state  # PCG64: ints beyond 2**64
    tree = {
        "round": 7,
        "weights": {"layer1": {"w": sample("<f4", (3, 4)), "b": sample("<f4", (4,))},
                    "head": [sample("<f8", (2,)), sample("|i1", (5,))]},
        "momentum": [np.zeros((0, 2), np.float32), np.array(1.5, np.float64)],
        "scalars": {"f32": np.float32(0.25), "i64": np.int64(-3), "u64": np.uint64(2**64 - 1),
                    "flag": np.bool_(True)},
        "big": [2**64, -(2**63) - 1, 3**100],
        "rng": rng_state,
        "raw": b"\x00\x01",
        "tuple": (1, "two"),
        "none": None,
    }

    meta, tensors = flatten_tree(tree, prefix="state")
    out = decode(encode(envelope(tensors, meta={"state": meta}), ZSTD_SHUFFLE))
    back = unflatten_tree(out.meta["state"], out.tensors)

    assert set(tensors) == {"state/weights/layer1/w", "state/weights/layer1/b",
                            "state/weights/head/0", "state/weights/head/1",
                            "state/momentum/0", "state/momentum/1"}
    np.testing.assert_array_equal(back["weights"]["layer1"]["w"], tree["weights"]["layer1"]["w"])
    np.testing.assert_array_equal(back["weights"]["head"][1], tree["weights"]["head"][1])
    assert back["momentum"][0].shape == (0, 2)
    assert back["momentum"][1].shape == ()
    assert back["scalars"] == {"f32": 0.25, "i64": -3, "u64": 2**64 - 1, "flag": True}
    assert back["big"] == tree["big"]
    assert back["rng"] == rng_state
    assert (back["raw"], back["tuple"], back["none"], back["round"]) == (b"\x00\x01",
                                                                          [1, "two"], None, 7)
    restored = np.random.default_rng()
    restored.bit_generator.state = back["rng"]
    assert restored.random() == np.random.default_rng(42).random()


def test_unflatten_copy_makes_writable_independent_arrays() -> None:
    meta, tensors = flatten_tree({"w": np.arange(3, dtype=np.float32)})
    out = decode(encode(envelope(tensors, meta={"t": meta})))

    copied = unflatten_tree(out.meta["t"], out.tensors)
    viewed = unflatten_tree(out.meta["t"], out.tensors, copy=False)

    assert copied["w"].flags.writeable
    copied["w"][0] = 9
    assert out.tensors["/w"][0] == 0
    assert viewed["w"] is out.tensors["/w"]


@pytest.mark.torch
def test_flatten_tree_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    meta, tensors = flatten_tree({"w": torch.ones(2, 2)})
    np.testing.assert_array_equal(unflatten_tree(meta, tensors)["w"], np.ones((2, 2), np.float32))


@pytest.mark.parametrize("tree", [
    {1: "int key"},
    {"x": object()},
    {"x": {1, 2}},
    {"a/b": np.zeros(1), "a": {"b": np.ones(1)}},  # two arrays on one path
    {"x": {"__tensor__": "/y"}},  # reserved marker used as data
    {"x": {"__bigint__": "5"}},
])
def test_flatten_tree_refuses_what_it_cannot_carry(tree: Any) -> None:
    with pytest.raises(CodecError) as info:
        flatten_tree(tree)
    assert info.value.reason == "bad_tree"


@pytest.mark.parametrize("meta", [
    {"__tensor__": "/missing"},
    {"__tensor__": ["/w"]},
    {"__tensor__": None},
    {"__bigint__": "zz"},
    {"__bigint__": 5},
    {"__bigint__": "9" * 100_000},  # beyond Python's int(str) digit cap
    [{"ok": 1}, {"__bigint__": None}],
])
def test_unflatten_tree_refuses_hostile_meta(meta: Any) -> None:
    with pytest.raises(CodecError) as info:
        unflatten_tree(meta, {"/w": np.zeros(1)})
    assert info.value.reason == "bad_tree"
