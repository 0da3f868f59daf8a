"""Robust aggregators against references written from the papers, and under attack."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from strategy_testkit import assert_sync_resume_identical, random_rounds, run_round, upd

from strategies import (
    Bulyan,
    FedAvg,
    Krum,
    Median,
    MultiKrum,
    StrategyError,
    TrimmedMean,
    make_strategy,
)
from strategies.base import ClientUpdate, Weights

MODEL: Weights = {"w": np.linspace(-1, 1, 12).reshape(3, 4), "b": np.array([0.5, -0.5, 2.0])}


def flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(delta[k]) for k in MODEL])


def unflat(vec: np.ndarray) -> dict[str, np.ndarray]:
    out, off = {}, 0
    for k, w in MODEL.items():
        out[k] = vec[off:off + w.size].reshape(w.shape)
        off += w.size
    return out


def honest_updates(n: int, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(0, 1, v.shape) for k, v in MODEL.items()}
    return [upd(f"h{i:02d}", {k: d + rng.normal(0, 0.1, d.shape) for k, d in direction.items()},
                n=int(rng.integers(1, 100)))
            for i in range(n)]


# --- references straight from the papers' formulas -----------------------------------------

def ref_median(updates):
    return np.median(np.stack([flat(u.delta) for u in updates]), axis=0)


def ref_trimmed(updates, beta):
    x = np.stack([flat(u.delta) for u in updates])
    n, b = len(updates), int(np.floor(beta * len(updates)))
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        col = sorted(x[:, j])
        out[j] = sum(col[b:n - b]) / (n - 2 * b)
    return out


def ref_krum_scores(vecs, f):
    n = len(vecs)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((vecs[i] - vecs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[:n - f - 2]))
    return scores


def ref_krum(updates, f):
    ordered = sorted(updates, key=lambda u: u.sender)
    vecs = [flat(u.delta) for u in ordered]
    scores = ref_krum_scores(vecs, f)
    return vecs[scores.index(min(scores))]


def ref_multi_krum(updates, f, m):
    ordered = sorted(updates, key=lambda u: u.sender)
    vecs = [flat(u.delta) for u in ordered]
    scores = ref_krum_scores(vecs, f)
    best = sorted(range(len(vecs)), key=lambda i: scores[i])[:m]
    return sum(vecs[i] for i in best) / m


def ref_bulyan(updates, f):
    ordered = sorted(updates, key=lambda u: u.sender)
    rest = [flat(u.delta) for u in ordered]
    theta = len(rest) - 2 * f
    picked = []
    while len(picked) < theta:
        n = len(rest)
        scores = []
        for i in range(n):
            dists = sorted(float(np.sum((rest[i] - rest[j]) ** 2)) for j in range(n) if j != i)
            scores.append(sum(dists[:max(n - f - 2, 1)]))
        picked.append(rest.pop(scores.index(min(scores))))
    x = np.stack(picked)
    beta = theta - 2 * f
    out = np.empty(x.shape[1])
    for j in range(x.shape[1]):
        med = np.median(x[:, j])
        closest = sorted(x[:, j], key=lambda v: abs(v - med))[:beta]
        out[j] = np.mean(closest)
    return out


CASES = [
    (lambda: Median(), ref_median),
    (lambda: TrimmedMean(beta=0.2), lambda u: ref_trimmed(u, 0.2)),
    (lambda: Krum(f=2), lambda u: ref_krum(u, 2)),
    (lambda: MultiKrum(f=2, m=4), lambda u: ref_multi_krum(u, 2, 4)),
    (lambda: Bulyan(f=2), lambda u: ref_bulyan(u, 2)),
]


@pytest.mark.parametrize(("factory", "reference"), CASES,
                         ids=["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_matches_reference(factory, reference):
    # Prepare: eleven noisy updates in scrambled arrival order.
    updates = honest_updates(11, seed=3)
    scrambled = [updates[i] for i in np.random.default_rng(1).permutation(11)]
    strategy = factory()
    # Execute
    out = run_round(strategy, MODEL, 0, scrambled)
    # Assert
    expected = unflat(flat(MODEL) + reference(updates))
    for k in MODEL:
        np.testing.assert_allclose(out[k], expected[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("attack", ["scaled_x100", "sign_flipped_x100"])
@pytest.mark.parametrize("factory", [Median, lambda: TrimmedMean(beta=0.2), lambda: Krum(f=3),
                                     lambda: MultiKrum(f=3), lambda: Bulyan(f=3)],
                         ids=["median", "trimmed_mean", "krum", "multi_krum", "bulyan"])
def test_minority_of_poisoned_updates_does_not_move_the_model(factory, attack):
    # Prepare: 12 honest clients, 3 attackers (n = 15 = 4f + 3 for Bulyan).
    honest = honest_updates(12, seed=7)
    honest_mean = np.mean([flat(u.delta) for u in honest], axis=0)
    factor = 100.0 if attack == "scaled_x100" else -100.0
    poisoned = [upd(f"z{i}", {k: factor * v for k, v in honest[i].delta.items()}, n=1000)
                for i in range(3)]
    updates = honest + poisoned

    # Execute
    robust = run_round(factory(), MODEL, 0, updates)
    plain = run_round(FedAvg(weighted=False), MODEL, 0, updates)

    # Assert: the robust step stays near the honest mean; FedAvg's is dragged far away.
    def err(w):
        return float(np.linalg.norm(flat(w) - flat(MODEL) - honest_mean))

    assert err(robust) < 0.2 * np.linalg.norm(honest_mean)
    assert err(plain) > 10 * np.linalg.norm(honest_mean)


@pytest.mark.parametrize(("strategy", "n", "message"), [
    (Krum(f=2), 6, "n > 2f+2 = 6"),
    (MultiKrum(f=1), 4, "n > 2f+2 = 4"),
    (Bulyan(f=2), 10, "n >= 4f+3 = 11"),
])
def test_too_few_updates_for_f_is_a_clear_error(strategy, n, message):
    # Prepare
    updates = honest_updates(n)
    # Execute / Assert
    with pytest.raises(StrategyError, match=message.replace("+", r"\+")):
        run_round(strategy, MODEL, 0, updates)


def test_max_updates_bounds_what_is_held():
    # Prepare
    strategy = Median(max_updates=3)
    strategy.begin(MODEL, 0)
    for u in honest_updates(3):
        strategy.accumulate(u)
    # Execute / Assert
    assert type(strategy).needs_all_updates
    with pytest.raises(StrategyError, match="max_updates=3"):
        strategy.accumulate(upd("extra", {k: np.zeros_like(v) for k, v in MODEL.items()}))
    assert strategy.num_accumulated == 3


def test_bad_inputs_are_refused():
    # Prepare
    strategy = Median()
    strategy.begin(MODEL, 0)
    good = honest_updates(1)[0]
    strategy.accumulate(good)
    bad = {k: np.full(v.shape, np.nan) for k, v in MODEL.items()}
    # Execute / Assert
    with pytest.raises(StrategyError, match="second update"):
        strategy.accumulate(good)
    with pytest.raises(StrategyError, match="non-finite"):
        strategy.accumulate(upd("nan", bad))
    with pytest.raises(StrategyError, match="missing"):
        strategy.accumulate(upd("short", {"w": np.zeros((3, 4))}))


def test_registry_builds_each_robust_strategy():
    for name, cls in [("median", Median), ("trimmed_mean", TrimmedMean), ("krum", Krum),
                      ("multi_krum", MultiKrum), ("bulyan", Bulyan)]:
        assert type(make_strategy(name, {"max_updates": 10})) is cls


def test_float32_model_keeps_its_dtype_and_no_updates_keeps_the_model():
    # Prepare
    model32 = {k: v.astype(np.float32) for k, v in MODEL.items()}
    ups = [upd(u.sender, u.delta, dtype=np.float32) for u in honest_updates(7)]
    # Execute
    out = run_round(Krum(f=1), model32, 0, ups)
    empty = run_round(Bulyan(f=1), model32, 1, [])
    # Assert
    assert all(out[k].dtype == np.float32 for k in out)
    for k in model32:
        np.testing.assert_array_equal(empty[k], model32[k])


def test_multi_krum_with_m_equal_n_is_the_plain_mean():
    updates = honest_updates(6)
    out = run_round(MultiKrum(f=1, m=6), MODEL, 0, updates)
    mean = run_round(FedAvg(weighted=False), MODEL, 0, updates)
    for k in MODEL:
        np.testing.assert_allclose(out[k], mean[k], atol=1e-12)


@pytest.mark.parametrize("factory", [Median, lambda: Bulyan(f=1)])
def test_resume_is_identical(factory):
    rounds = random_rounds(MODEL, 4, clients=7, seed=2)
    assert_sync_resume_identical(factory, MODEL, rounds, stop_after=2)


def test_large_model_is_processed_in_blocks():
    # More coordinates than one block: the blocked median equals the direct one.
    model = {"big": np.zeros(40_000)}
    rng = np.random.default_rng(0)
    ups = [upd(f"c{i}", {"big": rng.normal(size=40_000)}) for i in range(5)]
    out = run_round(Median(), model, 0, ups)
    np.testing.assert_allclose(out["big"], np.median([u.delta["big"] for u in ups], axis=0))
    assert list(itertools.islice(out, 1)) == ["big"]


def test_weighted_multi_krum_averages_the_chosen_by_examples() -> None:
    # Prepare: four honest clients near each other with different example counts, one outlier.
    model = {"w": np.zeros(2)}
    honest = [("a", [1.0, 0.0], 1), ("b", [1.1, 0.0], 3), ("c", [0.9, 0.1], 6),
              ("d", [1.0, 0.1], 10)]
    ups = [upd(s, {"w": np.array(d)}, n) for s, d, n in honest]
    ups.append(upd("z", {"w": np.array([50.0, -50.0])}, 1000))
    # Execute
    weighted = run_round(MultiKrum(f=1, m=4, weighted=True), model, 1, ups)["w"]
    plain = run_round(MultiKrum(f=1, m=4), model, 1, ups)["w"]
    # Assert: the outlier is out either way; the weighted mean uses the counts.
    counts = np.array([n for _, _, n in honest], dtype=float)
    deltas = np.array([d for _, d, _ in honest])
    np.testing.assert_allclose(weighted, counts @ deltas / counts.sum(), rtol=1e-12)
    np.testing.assert_allclose(plain, deltas.mean(axis=0), rtol=1e-12)


def test_bulyan_one_shot_selection_gives_flowers_serverapp_result() -> None:
    # Prepare: Flower 1.42's serverapp Bulyan steps on 7 client models, f = 1, where the
    # paper's repeated Krum picks another set (tests/strategies/data/flower_bulyan.json)
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "data" / "flower_bulyan.json").read_text())
    global_w = np.zeros(10, np.float32)  # deltas are the weights themselves
    ups = [upd(f"c{i}", {"w": np.asarray(w, np.float32) - global_w}, 1, dtype=np.float32)
           for i, w in enumerate(ref["weights"])]
    one_shot = make_strategy("bulyan", {"f": 1, "selection": "one_shot"})
    paper = make_strategy("bulyan", {"f": 1})
    # Execute
    got = run_round(one_shot, {"w": global_w}, 1, ups)["w"]
    iterative = run_round(paper, {"w": global_w}, 1, ups)["w"]
    # Assert: Flower's result to float32 rounding; the paper's selection gives another
    np.testing.assert_allclose(got, np.asarray(ref["out"]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(iterative, np.asarray(ref["out"]), rtol=1e-4)
    with pytest.raises(StrategyError, match="one_shot"):
        make_strategy("bulyan", {"f": 1, "selection": "multi"})
