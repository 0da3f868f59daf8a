"""The workloads' math on inputs with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedbus.store import analysis
from fedbus.store.sketch import Sketcher, cosine


def test_count_sketch_preserves_inner_products_and_is_seeded() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    a = {"x": rng.normal(size=(300, 300)).astype(np.float32), "b": rng.normal(size=77)}
    b = {"x": a["x"] * 0.8 + rng.normal(size=(300, 300)).astype(np.float32) * 0.6,
         "b": rng.normal(size=77)}
    sk = Sketcher(4096, seed=7)
    # Execute
    sa, sb = sk.sketch(a), sk.sketch(b)
    flat_a = np.concatenate([a["b"], a["x"].ravel()])
    flat_b = np.concatenate([b["b"], b["x"].ravel()])
    # Assert: cosine within a few 1/sqrt(dim); same seed, same sketch; other seed, another
    assert abs(cosine(sa, sb) - cosine(flat_a, flat_b)) < 0.05
    assert np.linalg.norm(sa) == pytest.approx(np.linalg.norm(flat_a), rel=0.05)
    np.testing.assert_array_equal(Sketcher(4096, seed=7).sketch(a), sa)
    assert not np.array_equal(Sketcher(4096, seed=8).sketch(a), sa)


def test_sketch_spreads_a_matrix_column_instead_of_piling_it_into_one_bucket() -> None:
    # Prepare: all the mass in one column of a layer whose row length divides 2048 (a
    # power-of-two fold would put the whole column into a single bucket)
    x = np.zeros((3000, 1024), dtype=np.float32)
    x[:, 5] = np.random.default_rng(3).normal(size=3000)
    y = x.copy()
    y[:, 5] += np.random.default_rng(4).normal(size=3000).astype(np.float32)
    sk = Sketcher(2048, seed=1)
    # Execute
    sx, sy = sk.sketch({"w": x}), sk.sketch({"w": y})
    # Assert: the dimension is a prime, norm and cosine survive
    assert sk.dim == 2039 and sx.shape == (2039,)
    assert np.linalg.norm(sx) == pytest.approx(np.linalg.norm(x), rel=0.1)
    assert abs(cosine(sx, sy) - cosine(x.ravel(), y.ravel())) < 0.1


def test_robust_z_floors_the_spread_and_flags_the_odd_one() -> None:
    # Prepare: four identical values and one far away
    x = np.array([0.9, 0.9, 0.9, 0.9, -0.5])
    # Execute
    z = analysis.robust_z(x, floor=0.05)
    # Assert: MAD is 0, so the floor sets the scale
    np.testing.assert_allclose(z, [0, 0, 0, 0, -28.0])


def test_round_outliers_point_at_the_update_going_the_other_way() -> None:
    # Prepare: five updates around one direction, one reversed and larger
    rng = np.random.default_rng(1)
    base = rng.normal(size=64)
    rows = [base + 0.3 * rng.normal(size=64) for _ in range(5)] + [-3 * base]
    # Execute
    out = analysis.round_outliers(np.array(rows))
    # Assert
    assert int(np.argmin(out["cos_others"])) == 5
    assert out["cos_others"][5] < 0 < out["cos_others"][:5].min()
    assert out["z_cos"][5] < -3 and out["z_norm"][5] > 3


def test_kmeans_finds_two_separated_blobs_whatever_the_seed() -> None:
    # Prepare
    rng = np.random.default_rng(2)
    x = np.vstack([rng.normal(0, 0.1, size=(6, 3)), rng.normal(5, 0.1, size=(4, 3))])
    for seed in range(3):
        # Execute
        res = analysis.kmeans(x, 2, seed=seed)
        # Assert: canonical labels (the first point is cluster 0)
        assert res.labels.tolist() == [0] * 6 + [1] * 4
    assert analysis.silhouette(x, res.labels) > 0.9
    with pytest.raises(ValueError, match="k=11"):
        analysis.kmeans(x, 11)


class _AdditiveGame:
    """v(S) = sum of the members' worths: every Shapley value is its player's worth."""

    def __init__(self, worth: list[float]) -> None:
        self.worth = worth
        self.n = len(worth)
        self._s = 0.0

    def value_empty(self) -> float:
        return 0.0

    def value_full(self) -> float:
        return sum(self.worth)

    def value_without(self, i: int) -> float:
        return sum(self.worth) - self.worth[i]

    def start(self) -> None:
        self._s = 0.0

    def add(self, i: int) -> float:
        self._s += self.worth[i]
        return self._s


def test_shapley_of_an_additive_game_is_each_players_worth() -> None:
    # Prepare
    game = _AdditiveGame([3.0, 1.0, -2.0, 0.5])
    # Execute
    phi, se = analysis.tmc_shapley(game, permutations=20, tolerance=0.0)
    loo = analysis.leave_one_out(game)
    # Assert
    np.testing.assert_allclose(phi, game.worth, atol=1e-12)
    np.testing.assert_allclose(loo, game.worth)
    np.testing.assert_allclose(se, 0, atol=1e-12)


def test_tmc_shapley_estimates_the_exact_value_where_loo_does_not() -> None:
    # Prepare: FedAvg game on a 1-d "model", utility = -(distance to a target)^2. Two
    # duplicate good clients: leave-one-out credits each with ~nothing (the other covers),
    # Shapley splits their worth; exact Shapley by enumeration is the reference.
    base = {"w": np.array([0.0])}
    deltas = [{"w": np.array([1.0])}, {"w": np.array([1.0])}, {"w": np.array([-1.0])},
              {"w": np.array([0.5])}]
    examples = [1.0, 1.0, 1.0, 2.0]

    def utility(m: dict[str, np.ndarray]) -> float:
        return -float((m["w"][0] - 1.0) ** 2)

    game = analysis.FedAvgGame(base, deltas, examples, utility)

    def value(s: frozenset[int]) -> float:
        return utility(game.model_of(sorted(s))) if s else utility(base)

    exact = analysis.exact_shapley(4, value)
    # Execute
    phi, se = analysis.tmc_shapley(game, permutations=4000, tolerance=0.0, seed=3)
    # Assert: efficiency (sum = v(N) - v(empty)), agreement within 4 standard errors
    assert exact.sum() == pytest.approx(game.value_full() - game.value_empty())
    assert np.all(np.abs(phi - exact) < 4 * se + 1e-9), (phi, exact, se)
    assert int(np.argmin(phi)) == 2  # the client pulling the wrong way
    assert phi[0] == pytest.approx(phi[1], abs=0.02)


def test_exact_shapley_matches_permutation_definition() -> None:
    # Prepare: a glove game, v(S) = min(left, right) with players 0,1 left and 2 right
    def value(s: frozenset[int]) -> float:
        return float(min(len(s & {0, 1}), len(s & {2})))

    # Execute
    phi = analysis.exact_shapley(3, value)
    by_perm = np.zeros(3)
    perms = list(itertools.permutations(range(3)))
    for p in perms:
        seen: set[int] = set()
        for i in p:
            by_perm[i] += value(frozenset(seen | {i})) - value(frozenset(seen))
            seen.add(i)
    # Assert: 1/6, 1/6, 2/3
    np.testing.assert_allclose(phi, by_perm / len(perms))
    np.testing.assert_allclose(phi, [1 / 6, 1 / 6, 2 / 3])


def test_token_split_is_proportional_and_gives_harm_nothing() -> None:
    # Execute
    tokens = analysis.token_split({"a": 3.0, "b": 1.0, "c": -2.0}, 100.0)
    # Assert
    assert tokens == {"a": 75.0, "b": 25.0, "c": 0.0}
    assert analysis.token_split({"a": -1.0}, 10.0) == {"a": 0.0}
