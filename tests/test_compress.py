"""Update compression modes (fedbus.compress): round trips, error feedback, hostile packings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from fedbus.codec import Compression, Envelope, Limits, decode, encode
from fedbus.compress import (
    META_KEY,
    MODEL_META_KEY,
    LocalDelta,
    PackedDelta,
    UpdateCodec,
    UpdateCompressor,
    decode_model,
    decode_update,
    encode_model,
)
from fedbus.door import check_update_tensors, model_limits
from fedbus.errors import ManifestError, UpdateRejected
from fedbus.manifest import parse_manifest


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(64, 33)).astype(np.float32),
            "b": rng.normal(size=(33,)).astype(np.float32),
            "steps": np.array([7], dtype=np.int64)}


def _roundtrip(codec: UpdateCodec, delta: dict[str, np.ndarray],
               comp: UpdateCompressor | None = None) -> dict[str, np.ndarray]:
    sent, meta = (comp or UpdateCompressor(codec)).encode(delta)
    return decode_update(sent, meta, delta)


@pytest.mark.parametrize(("mode", "tol"), [("none", 0.0), ("fp16", 1e-3), ("int8", 0.02)])
def test_dense_modes_round_trip_within_their_precision(mode: str, tol: float) -> None:
    delta = _model()
    out = _roundtrip(UpdateCodec(mode=mode), delta)
    for name, d in delta.items():
        assert out[name].dtype == d.dtype and out[name].shape == d.shape
        scale = float(np.abs(d).max())
        assert float(np.abs(out[name] - d).max()) <= tol * scale + 1e-12, name


def test_int8_stochastic_rounding_is_unbiased() -> None:
    # Prepare: one small value in a block whose scale is set by a big one
    delta = {"w": np.array([127.0] + [0.3] * 9999, dtype=np.float32)}
    comp = UpdateCompressor(UpdateCodec(mode="int8", block=10_000), seed=1)
    # Execute: average many stochastic roundings
    mean = np.mean([_roundtrip(comp.codec, delta, comp)["w"][1:] for _ in range(20)])
    nearest = _roundtrip(UpdateCodec(mode="int8", block=10_000, stochastic=False), delta)["w"]
    # Assert: nearest rounding loses 0.3 entirely; stochastic keeps it on average
    assert float(nearest[1]) == 0.0
    assert abs(float(mean) - 0.3) < 0.02


@pytest.mark.parametrize("block", [1, 256, 300_000, 1 << 20])
def test_int8_packs_any_block_size_within_one_step(block: int) -> None:
    # Prepare: a 2^19-value tensor (two pack segments), a short last block, both signs
    rng = np.random.default_rng(3)
    delta = {"w": (rng.normal(size=(1 << 19) + 7) * 3).astype(np.float32)}
    for stochastic in (True, False):
        codec = UpdateCodec(mode="int8", block=block, stochastic=stochastic)
        # Execute
        sent, meta = UpdateCompressor(codec, seed=1).encode(delta)
        out = decode_update(sent, meta, delta)["w"]
        # Assert: every value within one step of its block's scale; extremes never wrap
        blocks = -(-delta["w"].size // block)
        scales = sent["w"][: 4 * blocks].view("<f4")
        step = np.repeat(scales, block)[: delta["w"].size]
        assert np.all(np.abs(out - delta["w"]) <= step * (1.0 + 1e-5))
        q = sent["w"][4 * blocks:].view(np.int8)
        assert q.min() >= -127 and q.max() <= 127


@pytest.mark.parametrize("block", [1, 7, 256, 300, 1 << 17])
def test_packed_int8_reads_as_its_dense_decode(block: int) -> None:
    # Prepare: an int8 update kept packed, beside a tensor sent dense (an int buffer)
    rng = np.random.default_rng(4)
    ref = {"w": np.zeros((1 << 17) + 13, np.float32), "f": np.zeros(5, np.float64),
           "steps": np.zeros(1, np.int64)}
    delta = {"w": rng.normal(size=ref["w"].shape).astype(np.float32),
             "f": rng.normal(size=5), "steps": np.array([3], np.int64)}
    sent, meta = UpdateCompressor(UpdateCodec(mode="int8", block=block), seed=2).encode(delta)
    # Execute
    got = decode_update(sent, meta, ref)
    # Assert: packed until indexed; any range reads the same float32 values as the dense
    # decode, bit for bit; the norm is the dense tensor's
    assert isinstance(got, PackedDelta) and got.packed("w") and not got.packed("steps")
    assert list(got) == ["w", "f", "steps"] and got.shape_of("w") == ref["w"].shape
    assert got.nbytes == sum(v.nbytes for v in sent.values())  # nothing decoded yet
    norm = check_update_tensors(ref, got)
    out = np.empty(ref["w"].size, np.float32)
    pieces = [got.read("w", a, b, out[: b - a]).copy()
              for a, b in [(0, 5), (5, 70_000), (70_000, 70_001), (70_001, ref["w"].size)]]
    dense = got["w"]  # decoded once, kept
    assert got["w"] is dense and dense.dtype == np.float32
    np.testing.assert_array_equal(np.concatenate(pieces), dense)
    assert got["f"].dtype == np.float64 and got.read("f", 1, 4, out[:3]).tolist() == \
        got["f"][1:4].astype(np.float32).tolist()
    np.testing.assert_array_max_ulp(got.read("w", 9, 20, out[:11], weight=3.0),
                                    dense[9:20] * np.float32(3.0), maxulp=1)
    dense_norm = check_update_tensors(ref, {k: got[k] for k in got})
    assert norm == pytest.approx(dense_norm, rel=1e-5)


@pytest.mark.parametrize("mode", ["none", "fp16", "int8", "topk"])
def test_a_trainers_delta_packs_as_its_dense_difference(mode: str) -> None:
    # Prepare: trained weights and the model they started from (int buffer included)
    base = _model(1)
    local = {k: (v + 0.5).astype(v.dtype) if v.dtype.kind == "f" else v + 1
             for k, v in base.items()}
    local["big"] = np.linspace(-3, 3, (1 << 18) + 99, dtype=np.float32)
    base["big"] = np.zeros_like(local["big"])
    dense = {k: (local[k] - base[k]).astype(base[k].dtype) for k in base}
    codec = UpdateCodec(mode=mode, block=300)
    # Execute: the same stream of random numbers both ways
    lazy, _ = UpdateCompressor(codec, seed=5).encode(LocalDelta(local, base))
    eager, _ = UpdateCompressor(codec, seed=5).encode(dense)
    # Assert: int8 subtracts on the way, to the same bytes; a read gives the difference
    assert lazy.keys() == eager.keys()
    for k in eager:
        np.testing.assert_array_equal(lazy[k], eager[k])
    view = LocalDelta(local, base)
    assert view.pair("big") is not None and view.pair("steps") is None
    np.testing.assert_array_equal(view["big"], dense["big"])
    assert view.pair("big") is None  # made: read from now on


def test_int8_scale_that_would_decode_to_inf_is_refused() -> None:
    ref = {"b": np.zeros(4, np.float32)}
    huge = np.concatenate([np.array([3e37], "<f4").view(np.uint8), np.ones(4, np.uint8)])
    with pytest.raises(UpdateRejected, match="overflows float32") as err:
        decode_update({"b": huge}, {META_KEY: {"mode": "int8", "block": 256}}, ref)
    assert err.value.reason == "bad_update_codec"


def test_topk_sends_a_fraction_and_error_feedback_delivers_the_rest() -> None:
    # Prepare
    delta = _model()
    comp = UpdateCompressor(UpdateCodec(mode="topk", fraction=0.1))
    zero = {k: np.zeros_like(v) for k, v in delta.items()}
    # Execute: the delta once, then nine empty rounds
    first = _roundtrip(comp.codec, delta, comp)
    total = {k: v.copy() for k, v in first.items()}
    for _ in range(9):
        for k, v in _roundtrip(comp.codec, zero, comp).items():
            total[k] = total[k] + v
    # Assert: ~10% per round; after ten rounds everything has been sent exactly once
    assert np.count_nonzero(first["w"]) == int(np.ceil(0.1 * delta["w"].size))
    np.testing.assert_allclose(total["w"], delta["w"], rtol=0, atol=0)
    assert first["steps"][0] == 7  # integer tensors travel untouched


@pytest.mark.parametrize("mode", ["fp16", "int8", "topk"])
def test_compressed_update_is_smaller_and_fits_the_model_limits(mode: str) -> None:
    # Prepare: an update envelope as the trainer builds it
    model = _model()
    sent, meta = UpdateCompressor(UpdateCodec(mode=mode)).encode(model)
    env = Envelope(kind="update", job="j", sender="t", round=1, meta=meta, tensors=sent)
    dense = Envelope(kind="update", job="j", sender="t", round=1, meta={}, tensors=model)
    raw = Compression(level=0)
    # Execute: decode within the limits the aggregator derives from the model
    frame = encode(env, raw)
    back = decode(frame, model_limits(model, 1, Limits()))
    # Assert
    assert len(frame) * 1.9 < len(encode(dense, raw))
    assert decode_update(back.tensors, back.meta, model)["w"].shape == (64, 33)


@pytest.mark.parametrize(("mode", "tensor", "why"), [
    ("fp16", np.zeros((3,), np.float16), "fp16 expects"),
    ("int8", np.zeros(10, np.uint8), "int8 packing"),
    ("topk", np.zeros(12, np.uint8), "topk packing"),
    ("topk", np.concatenate([np.array([9_999_999], "<u4").view(np.uint8),
                             np.zeros(4, np.uint8)]), "topk index"),
    ("int8", np.zeros((2, 2), np.uint8), "flat uint8"),
])
def test_hostile_packings_are_refused(mode: str, tensor: np.ndarray, why: str) -> None:
    ref = {"b": np.zeros(33, np.float32)}
    with pytest.raises(UpdateRejected, match=why) as err:
        decode_update({"b": tensor}, {META_KEY: {"mode": mode, "block": 256}}, ref)
    assert err.value.reason == "bad_update_codec"


def test_bad_meta_and_bad_scales_are_refused() -> None:
    ref = {"b": np.zeros(4, np.float32)}
    with pytest.raises(UpdateRejected):
        decode_update({"b": np.zeros(4, np.float16)}, {META_KEY: {"mode": "zip"}}, ref)
    nan_scale = np.concatenate([np.array([np.nan], "<f4").view(np.uint8), np.zeros(4, np.uint8)])
    with pytest.raises(UpdateRejected, match="scales"):
        decode_update({"b": nan_scale}, {META_KEY: {"mode": "int8", "block": 256}}, ref)


def test_manifest_codec_update() -> None:
    base = {"version": 1, "job": "j", "rounds": 1,
            "task": {"ref": "examples.toy.task:make_task"},
            "nodes": [{"id": "a", "role": "aggregator"},
                      {"id": "t", "role": "trainer", "parent": "a"}]}
    m = parse_manifest({**base, "codec": {"update": {"mode": "topk", "fraction": 0.2}}})
    assert m.codec.update == UpdateCodec(mode="topk", fraction=0.2)
    assert parse_manifest({**base, "codec": {"update": "int8"}}).codec.update.mode == "int8"
    assert parse_manifest(base).codec.update.mode == "none"
    with pytest.raises(ManifestError, match=r"codec\.update"):
        parse_manifest({**base, "codec": {"update": "zip"}})
    with pytest.raises(ManifestError, match=r"codec\.update\.fraction"):
        parse_manifest({**base, "codec": {"update": {"mode": "topk", "fraction": 0.9}}})


# --- the broadcast model (codec.model) --------------------------------------------------------

@pytest.mark.parametrize(("mode", "tol"), [("fp16", 1e-3), ("int8", 0.01)])
def test_model_round_trips_within_its_precision_with_shapes_and_dtypes(mode: str,
                                                                      tol: float) -> None:
    # Prepare: float32 and float64 tensors, an integer buffer, an empty tensor
    model = {**_model(), "d": np.linspace(-3, 3, 70).reshape(7, 10),
             "e": np.zeros((0, 4), np.float32)}
    # Execute
    sent, meta = encode_model(model, UpdateCodec(mode=mode, stochastic=False))
    back = decode_model(sent, meta)
    # Assert: same names, shapes and dtypes; values within the mode's precision
    assert {k: (v.shape, v.dtype) for k, v in back.items()} == \
        {k: (v.shape, v.dtype) for k, v in model.items()}
    for k in ("w", "b", "d"):
        scale = float(np.abs(model[k]).max())
        np.testing.assert_allclose(back[k], model[k], rtol=0, atol=tol * scale)
    assert back["steps"][0] == 7
    assert sum(v.nbytes for v in sent.values()) * 1.9 < sum(v.nbytes for v in model.values())


def test_model_none_is_the_model_itself() -> None:
    model = _model()
    sent, meta = encode_model(model, UpdateCodec())
    assert meta == {} and all(sent[k] is model[k] for k in model)
    assert decode_model(sent, {}) == sent


@pytest.mark.parametrize(("declared", "tensor", "why"), [
    ({"w": ["<f4", [4, 4]]}, np.zeros(10, np.uint8), "int8 packing"),
    ({"w": ["<f4", [1 << 40]]}, np.zeros(10, np.uint8), "int8 packing"),  # no 4 TB allocation
    ({"w": ["|O", [2]]}, np.zeros(10, np.uint8), "float dtype"),
    ({"w": ["<f4", [-1]]}, np.zeros(10, np.uint8), "float dtype"),
    ({"w": ["<f4", [2], "x"]}, np.zeros(10, np.uint8), "float dtype"),
    ({"w": ["<f4", [12]]}, np.zeros((2, 8), np.uint8), "flat uint8"),
    ({"v": ["<f4", [4]]}, np.zeros(8, np.uint8), "not sent"),
])
def test_hostile_model_packings_are_refused(declared: dict[str, list[object]],
                                            tensor: np.ndarray, why: str) -> None:
    meta = {MODEL_META_KEY: {"mode": "int8", "block": 256, "tensors": declared}}
    with pytest.raises(UpdateRejected, match=why) as err:
        decode_model({"w": tensor}, meta)
    assert err.value.reason == "bad_model_codec"


@pytest.mark.parametrize("spec", [{"mode": "topk", "tensors": {}}, {"mode": "int8"},
                                  {"mode": "int8", "block": 0, "tensors": {}}, "int8"])
def test_bad_model_codec_meta_is_refused(spec: object) -> None:
    with pytest.raises(UpdateRejected) as err:
        decode_model({"w": np.zeros(4, np.float32)}, {MODEL_META_KEY: spec})
    assert err.value.reason == "bad_model_codec"


def test_manifest_codec_model() -> None:
    base = {"version": 1, "job": "j", "rounds": 1,
            "task": {"ref": "examples.toy.task:make_task"},
            "nodes": [{"id": "a", "role": "aggregator"},
                      {"id": "t", "role": "trainer", "parent": "a"}]}
    assert parse_manifest(base).codec.model == UpdateCodec(mode="none", stochastic=False)
    m = parse_manifest({**base, "codec": {"model": "int8"}})
    assert m.codec.model == UpdateCodec(mode="int8", stochastic=False)
    with pytest.raises(ManifestError, match=r"codec\.model\.mode"):
        parse_manifest({**base, "codec": {"model": "topk"}})


def test_threads_of_one_process_quantize_at_most_one_per_slot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: two slots (two cores, say) and a pack_int8 / dequantization that counts how
    # many run beside it; eight threads each packing and unpacking
    from fedbus import compress

    monkeypatch.setattr(compress, "_SLOTS", threading.BoundedSemaphore(2))
    lock, now, peak = threading.Lock(), [0], [0]

    def counting(real: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def run(*args: Any) -> np.ndarray:
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.01)
            try:
                return real(*args)
            finally:
                with lock:
                    now[0] -= 1
        return run

    monkeypatch.setattr(compress, "pack_int8", counting(compress.pack_int8))
    monkeypatch.setattr(compress, "_dequant_int8", counting(compress._dequant_int8))
    model = _model()
    codec = UpdateCodec(mode="int8")
    sent, meta = encode_model(model, codec)

    def work(seed: int) -> None:
        UpdateCompressor(codec, seed=seed).encode(model)
        decode_model(sent, meta)

    # Execute
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))
    # Assert: packing and unpacking overlapped, but never on more than the two slots
    assert peak[0] == 2
