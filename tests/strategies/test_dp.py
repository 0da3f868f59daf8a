"""Differential-privacy wrappers and the client-side clip-and-noise function."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from strategy_testkit import assert_sync_resume_identical, codec_roundtrip, run_round, upd

from strategies import (
    DPAdaptiveClipping,
    DPFixedClipping,
    FedAvg,
    Median,
    StrategyError,
    clip_and_noise,
    make_strategy,
)
from strategies.base import ClientUpdate, Strategy, Weights
from strategies.dp import l2_norm

MODEL: Weights = {"w": np.zeros((4, 5)), "b": np.zeros(3)}


class Recorder(Strategy):
    """Inner strategy that remembers what the wrapper forwarded; returns the model unchanged."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[ClientUpdate] = []
        self._w: Weights = {}

    def begin(self, weights, round):
        self._w = weights

    def accumulate(self, update):
        self.seen.append(update)

    def finish(self):
        return {k: v.copy() for k, v in self._w.items()}


def scaled_update(sender: str, norm: float, seed: int, n: int = 10) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    d = {k: rng.normal(size=v.shape) for k, v in MODEL.items()}
    s = norm / l2_norm(d)
    return upd(sender, {k: v * s for k, v in d.items()}, n=n)


def test_clipping_bounds_each_contribution_and_drops_weights():
    # Prepare
    inner = Recorder()
    dp = DPFixedClipping(inner, noise_multiplier=0.0, clipping_norm=1.0)
    updates = [scaled_update(f"c{i}", norm, i) for i, norm in enumerate([0.3, 1.0, 5.0, 80.0])]
    # Execute
    run_round(dp, MODEL, 0, updates)
    # Assert
    norms = [l2_norm(u.delta) for u in inner.seen]
    assert norms == pytest.approx([0.3, 1.0, 1.0, 1.0])
    assert all(u.num_examples == 1 for u in inner.seen)
    np.testing.assert_array_equal(inner.seen[0].delta["w"], updates[0].delta["w"])
    assert dp.last_report["num_clipped"] == 2


def test_without_noise_fixed_clipping_is_the_mean_of_clipped_deltas():
    # Prepare
    updates = [scaled_update(f"c{i}", norm, i, n=i + 1) for i, norm in enumerate([0.5, 2, 4])]
    dp = DPFixedClipping({"name": "fedavg"}, noise_multiplier=0.0, clipping_norm=1.0)
    # Execute
    out = run_round(dp, MODEL, 0, updates)
    # Assert: McMahan et al. 2018 with sigma = 0, unweighted.
    for k in MODEL:
        clipped = [u.delta[k] * min(1.0, 1.0 / l2_norm(u.delta)) for u in updates]
        np.testing.assert_allclose(out[k], MODEL[k] + sum(clipped) / 3, atol=1e-12)


@pytest.mark.parametrize(("num_sampled", "expected_m"), [(None, 4), (10, 10)])
def test_noise_std_is_sigma_c_over_m(num_sampled, expected_m):
    # Prepare: zero deltas, so the model change is pure noise.
    model = {"x": np.zeros(40_000)}
    zeros = [upd(f"c{i}", {"x": np.zeros(40_000)}) for i in range(4)]
    dp = DPFixedClipping(FedAvg(), noise_multiplier=1.5, clipping_norm=0.8,
                         num_sampled_clients=num_sampled, seed=3)
    # Execute
    out = run_round(dp, model, 0, zeros)
    # Assert: sample std of 40k draws is within ~1% (3% is > 8 standard errors).
    expected = 1.5 * 0.8 / expected_m
    assert float(np.std(out["x"])) == pytest.approx(expected, rel=0.03)
    assert abs(float(np.mean(out["x"]))) < 5 * expected / math.sqrt(40_000)
    assert dp.last_report["noise_stddev"] == pytest.approx(expected)
    assert dp.last_report["noise_multiplier"] == 1.5
    assert dp.last_report["clipping_norm"] == 0.8
    assert dp.last_report["denominator"] == expected_m


def test_adaptive_clip_moves_toward_the_target_quantile():
    # Prepare: every round the same 20 clients with norms 1..10; the median norm is 5.5.
    norms = np.linspace(1, 10, 20)
    updates = [scaled_update(f"c{i:02d}", float(n), i) for i, n in enumerate(norms)]
    dp = DPAdaptiveClipping(FedAvg(), noise_multiplier=0.0, initial_clipping_norm=0.1,
                            target_clipped_quantile=0.5, clip_norm_lr=0.2, clipped_count_stddev=0)
    history = []
    # Execute
    w = MODEL
    for r in range(80):
        w = run_round(dp, w, r, updates)
        history.append(dp.last_report["next_clipping_norm"])
    # Assert: clip grows geometrically from 0.1, then settles around the median.
    assert history[0] == pytest.approx(0.1 * math.exp(0.2 * 0.5))
    assert all(b > a for a, b in itertools.pairwise(history[:11]))
    assert 4.5 < history[-1] < 6.5
    share = np.mean(norms <= history[-1])
    assert 0.4 <= share <= 0.6


def test_adaptive_clip_shrinks_when_too_large_and_splits_the_noise():
    # Prepare: all norms 1, clip 10, target 0.2 -> the clip must fall.
    updates = [scaled_update(f"c{i}", 1.0, i) for i in range(20)]
    dp = DPAdaptiveClipping(FedAvg(), noise_multiplier=1.0, num_sampled_clients=20,
                            initial_clipping_norm=10.0, target_clipped_quantile=0.2, seed=1)
    # Execute
    run_round(dp, MODEL, 0, updates)
    report = dp.last_report
    # Assert: sigma_b = m/20 = 1, z_delta = (1 - 1/4)^-1/2 (Andrew et al. 2021, Sec. 3.1).
    assert report["clipped_count_stddev"] == 1.0
    assert report["noise_multiplier"] == pytest.approx((1 - 0.25) ** -0.5)
    assert report["clipping_norm"] == 10.0
    assert report["next_clipping_norm"] < 10.0
    assert dp.clipping_norm == report["next_clipping_norm"]


@pytest.mark.parametrize("params", [{"num_sampled_clients": 5}, {"clipped_count_stddev": 0.4}])
def test_adaptive_refuses_a_count_noise_too_small_for_the_budget(params):
    with pytest.raises(StrategyError, match="clipped_count_stddev"):
        DPAdaptiveClipping(FedAvg(), noise_multiplier=1.0, **params)


def test_make_strategy_builds_wrappers_from_the_manifest_form():
    # Execute
    dp = make_strategy("dp_fixed", {"strategy": {"name": "fedavg"}, "noise_multiplier": 1.0,
                                    "clipping_norm": 1.0})
    adaptive = make_strategy("dp_adaptive", {
        "strategy": {"name": "median", "params": {"max_updates": 7}},
        "noise_multiplier": 0.5, "num_sampled_clients": 20})
    # Assert
    assert isinstance(dp, DPFixedClipping) and isinstance(dp.strategy, FedAvg)
    assert isinstance(adaptive, DPAdaptiveClipping) and isinstance(adaptive.strategy, Median)
    assert adaptive.needs_all_updates and adaptive.max_updates == 7
    assert not dp.needs_all_updates


@pytest.mark.parametrize(("params", "message"), [
    ({"strategy": {"name": "fedavg"}, "noise_multiplier": 1.0, "clipping_norm": 1.0,
      "sigma": 2}, "unknown parameter"),
    ({"strategy": {"name": "fedavg", "params": {"bogus": 1}}, "noise_multiplier": 1.0,
      "clipping_norm": 1.0}, "bogus"),
    ({"strategy": {"nme": "fedavg"}, "noise_multiplier": 1.0, "clipping_norm": 1.0},
     "name, params"),
    ({"strategy": {"name": "fedasync"}, "noise_multiplier": 1.0, "clipping_norm": 1.0},
     "synchronous Strategy"),
    ({"strategy": {"name": "fedavg"}, "noise_multiplier": -1.0, "clipping_norm": 1.0},
     "noise_multiplier"),
    ({"strategy": {"name": "fedavg"}, "noise_multiplier": 1.0, "clipping_norm": 0.0},
     "clipping_norm"),
])
def test_bad_wrapper_parameters_give_strategy_error(params, message):
    with pytest.raises(StrategyError, match=message):
        make_strategy("dp_fixed", params)


def random_rounds(num_rounds: int, clients: int) -> list[list[ClientUpdate]]:
    rng = np.random.default_rng(5)
    return [[upd(f"c{i}", {k: rng.normal(0, 2, v.shape) for k, v in MODEL.items()}, n=3)
             for i in range(clients)] for _ in range(num_rounds)]


@pytest.mark.parametrize("factory", [
    lambda: DPFixedClipping(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, seed=9),
    lambda: DPAdaptiveClipping({"name": "fedavg"}, noise_multiplier=0.5, seed=9,
                               initial_clipping_norm=0.5, clipped_count_stddev=1.0),
], ids=["fixed", "adaptive"])
def test_restored_wrapper_continues_identically(factory):
    # Noise draws, clip norm and the inner state all survive the codec.
    assert_sync_resume_identical(factory, MODEL, random_rounds(5, 6), stop_after=2)


def test_state_dict_reports_noise_and_clip():
    dp = DPAdaptiveClipping(FedAvg(), noise_multiplier=0.5, clipped_count_stddev=1.0)
    run_round(dp, MODEL, 0, random_rounds(1, 4)[0])
    state = codec_roundtrip(dp.state_dict())
    assert state["clipping_norm"] == dp.clipping_norm
    assert state["last_report"]["noise_multiplier"] == dp.last_report["noise_multiplier"]
    assert state["last_report"]["clipping_norm"] == 0.1


# --- client side ---------------------------------------------------------------------------

def test_clip_and_noise_clips_without_touching_the_input():
    # Prepare
    delta = {"w": np.full((3, 3), 2.0, dtype=np.float32), "steps": np.array([7], dtype=np.int64)}
    before = {k: v.copy() for k, v in delta.items()}
    # Execute
    out, report = clip_and_noise(delta, clipping_norm=1.5, noise_multiplier=0.0,
                                 rng=np.random.default_rng(0))
    # Assert
    assert l2_norm(out) == pytest.approx(1.5, rel=1e-6)
    assert out["w"].dtype == np.float32 and out["steps"].dtype == np.int64
    np.testing.assert_array_equal(out["steps"], [7])
    for k in delta:
        np.testing.assert_array_equal(delta[k], before[k])
    assert report == {"norm": pytest.approx(6.0), "clipped": True, "scale": pytest.approx(0.25),
                      "clipping_norm": 1.5, "noise_multiplier": 0.0, "noise_stddev": 0.0}


def test_clip_and_noise_adds_sigma_c_noise_reproducibly():
    # Prepare
    delta = {"x": np.zeros(40_000)}
    # Execute
    a, report = clip_and_noise(delta, 0.5, 2.0, np.random.default_rng(11))
    b, _ = clip_and_noise(delta, 0.5, 2.0, np.random.default_rng(11))
    # Assert
    assert float(np.std(a["x"])) == pytest.approx(1.0, rel=0.03)
    assert report["noise_stddev"] == 1.0 and not report["clipped"]
    np.testing.assert_array_equal(a["x"], b["x"])
