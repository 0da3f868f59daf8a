"""Update compression modes (fedbus.compress): round trips, error feedback, hostile packings."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus.codec import Compression, Envelope, Limits, decode, encode
from fedbus.compress import META_KEY, UpdateCodec, UpdateCompressor, decode_update
from fedbus.errors import ManifestError, UpdateRejected
from fedbus.manifest import parse_manifest
from fedbus.services.intake import model_limits


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
