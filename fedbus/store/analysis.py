"""The math behind the store's workloads: pure numpy, no I/O, unit-tested on known answers.

Robust outlier scores, k-means, a federated-averaging cooperative game with leave-one-out and
truncated Monte-Carlo Shapley values (Ghorbani & Zou 2019, "Data Shapley", Alg. 1), an exact
Shapley value for small games (the reference the estimate is tested against), and a token
split proportional to contribution.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "FedAvgGame",
    "Game",
    "KMeansResult",
    "exact_shapley",
    "kmeans",
    "leave_one_out",
    "robust_z",
    "round_outliers",
    "silhouette",
    "tmc_shapley",
    "token_split",
]

Weights = dict[str, np.ndarray]


def robust_z(x: np.ndarray, floor: float) -> np.ndarray:
    """(x - median) / (1.4826 * MAD), the MAD floored at ``floor`` so that a handful of
    nearly identical honest values does not turn noise into huge scores."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    return (x - med) / max(mad, floor)


def round_outliers(sketches: np.ndarray, weights: np.ndarray | None = None,
                   ) -> dict[str, np.ndarray]:
    """Direction and norm evidence for one round's updates (rows of ``sketches``).

    ``cos_others``: cosine of each update with the mean unit direction of the *others* (an
    update cannot vouch for itself, which matters when few clients report). ``z_cos`` and
    ``z_norm`` are robust z-scores across the round (of the cosine, and of the log norm).
    """
    s = np.asarray(sketches, dtype=np.float64)
    n = s.shape[0]
    norms = np.linalg.norm(s, axis=1)
    unit = s / np.where(norms > 0, norms, 1.0)[:, None]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    total = (unit * w[:, None]).sum(axis=0)
    cos = np.zeros(n)
    for i in range(n):
        others = total - w[i] * unit[i]
        no = float(np.linalg.norm(others))
        cos[i] = float(unit[i] @ others / no) if no > 0 and norms[i] > 0 else 0.0
    log_norm = np.log(np.maximum(norms, 1e-30))
    return {"norm": norms, "cos_others": cos, "z_cos": robust_z(cos, 0.05),
            "z_norm": robust_z(log_norm, 0.05)}


# --- clustering --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KMeansResult:
    labels: np.ndarray
    centers: np.ndarray
    inertia: float


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 8,
           max_iter: int = 100) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` starts (seeded)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points ({n})")
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centers = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min([((x - c) ** 2).sum(axis=1) for c in centers], axis=0)
            total = d2.sum()
            idx = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
            centers.append(x[idx])
        c = np.array(centers)
        labels = np.zeros(n, dtype=np.int64)
        for it in range(max_iter):
            d = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
            new = d.argmin(axis=1)
            if it > 0 and np.array_equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                if len(members):
                    c[j] = members.mean(axis=0)
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best.inertia - 1e-12:
            best = KMeansResult(labels=labels.copy(), centers=c.copy(), inertia=inertia)
    assert best is not None
    return _canonical(best)


def _canonical(res: KMeansResult) -> KMeansResult:
    # Number clusters by their first member, so equal partitions get equal labels.
    order: list[int] = []
    for lab in res.labels.tolist():
        if lab not in order:
            order.append(lab)
    remap = {old: new for new, old in enumerate(order)}
    labels = np.array([remap[v] for v in res.labels.tolist()], dtype=np.int64)
    centers = res.centers[order]
    return KMeansResult(labels=labels, centers=centers, inertia=res.inertia)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw 1987) in [-1, 1]; 0 when there is one cluster."""
    x = np.asarray(x, dtype=np.float64)
    if len(set(labels.tolist())) < 2:
        return 0.0
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
    scores = []
    for i in range(len(x)):
        same = labels == labels[i]
        same[i] = False
        if not same.any():
            scores.append(0.0)
            continue
        a = d[i, same].mean()
        b = min(d[i, labels == other].mean() for other in set(labels.tolist())
                if other != labels[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


# --- contribution: a cooperative game over a round's updates ---------------------------------

class Game(Protocol):
    """Players 0..n-1; ``value`` of the empty and the full coalition; ``start`` a coalition
    and ``add`` players one at a time, each returning the coalition's value."""

    n: int

    def value_empty(self) -> float: ...
    def value_full(self) -> float: ...
    def value_without(self, i: int) -> float: ...
    def start(self) -> None: ...
    def add(self, i: int) -> float: ...


class FedAvgGame:
    """v(S) = utility(base + example-weighted mean of the updates in S); v(empty) =
    utility(base). Coalitions grow in place (one model-sized float64 sum), so a permutation
    costs n model additions plus n evaluations, never n^2."""

    def __init__(self, base: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]],
                 examples: Sequence[float], utility: Callable[[Weights], float]) -> None:
        if len(deltas) != len(examples) or not deltas:
            raise ValueError("one example count per update, and at least one update")
        self.n = len(deltas)
        self.base = base
        self.deltas = deltas
        self.examples = [float(e) for e in examples]
        self.utility = utility
        self._acc: dict[str, np.ndarray] = {}
        self._w = 0.0
        self._full: tuple[dict[str, np.ndarray], float] | None = None
        #: v(N) and v(empty), evaluated once: leave-one-out and Shapley both need them.
        self._values: dict[str, float] = {}
        self.evaluations = 0

    def _model(self, acc: Mapping[str, np.ndarray], w: float) -> Weights:
        self.evaluations += 1
        if w <= 0:
            return {k: np.array(v) for k, v in self.base.items()}
        return {k: (v + acc[k] / w).astype(v.dtype, copy=False) for k, v in self.base.items()}

    def _sum(self, members: Sequence[int]) -> tuple[dict[str, np.ndarray], float]:
        acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self.base.items()}
        w = 0.0
        for i in members:
            for k in acc:
                acc[k] += self.examples[i] * self.deltas[i][k]
            w += self.examples[i]
        return acc, w

    def model_of(self, members: Sequence[int]) -> Weights:
        """The coalition's model: base + example-weighted mean of its members' updates."""
        return self._model(*self._sum(members))

    def value_empty(self) -> float:
        if "empty" not in self._values:
            self._values["empty"] = self.utility(self._model({}, 0.0))
        return self._values["empty"]

    def value_full(self) -> float:
        if "full" not in self._values:
            if self._full is None:
                self._full = self._sum(range(self.n))
            self._values["full"] = self.utility(self._model(*self._full))
        return self._values["full"]

    def value_without(self, i: int) -> float:
        # The full sum once, then minus one update: n model additions for all of LOO, not n^2.
        if self._full is None:
            self._full = self._sum(range(self.n))
        acc, w = self._full
        e = self.examples[i]
        return self.utility(self._model({k: acc[k] - e * self.deltas[i][k] for k in acc}, w - e))

    def start(self) -> None:
        self._acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in self.base.items()}
        self._w = 0.0

    def add(self, i: int) -> float:
        for k in self._acc:
            self._acc[k] += self.examples[i] * self.deltas[i][k]
        self._w += self.examples[i]
        return self.utility(self._model(self._acc, self._w))


def leave_one_out(game: Game) -> np.ndarray:
    """v(N) - v(N minus i) for every player."""
    full = game.value_full()
    return np.array([full - game.value_without(i) for i in range(game.n)])


def tmc_shapley(game: Game, *, permutations: int = 64, tolerance: float = 0.01,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truncated Monte-Carlo Shapley values and their standard errors.

    Each permutation adds players one at a time and credits each with its marginal value;
    once the coalition's value is within ``tolerance`` (relative) of the full value, the
    remaining players' marginals are taken as 0 (the truncation that makes it affordable).
    """
    rng = np.random.default_rng(seed)
    v_full = game.value_full()
    v_empty = game.value_empty()
    marginals = np.zeros((permutations, game.n))
    scale = max(abs(v_full), 1e-12)
    for t in range(permutations):
        game.start()
        prev = v_empty
        for i in rng.permutation(game.n):
            if abs(v_full - prev) <= tolerance * scale:
                break  # truncated: the rest add (almost) nothing
            value = game.add(int(i))
            marginals[t, i] = value - prev
            prev = value
    phi = marginals.mean(axis=0)
    stderr = marginals.std(axis=0, ddof=1) / math.sqrt(permutations) if permutations > 1 \
        else np.zeros(game.n)
    return phi, stderr


def exact_shapley(n: int, value: Callable[[frozenset[int]], float]) -> np.ndarray:
    """The exact Shapley value by enumerating subsets (2^n evaluations; small n only)."""
    phi = np.zeros(n)
    cache: dict[frozenset[int], float] = {}

    def v(s: frozenset[int]) -> float:
        if s not in cache:
            cache[s] = value(s)
        return cache[s]

    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for combo in itertools.combinations(others, size):
                s = frozenset(combo)
                phi[i] += weight * (v(s | {i}) - v(s))
    return phi


def token_split(contribution: Mapping[str, float], budget: float) -> dict[str, float]:
    """``budget`` tokens split in proportion to positive contribution (none for harm)."""
    positive = {k: max(0.0, float(v)) for k, v in contribution.items()}
    total = sum(positive.values())
    if total <= 0:
        return {k: 0.0 for k in contribution}
    return {k: budget * v / total for k, v in positive.items()}
