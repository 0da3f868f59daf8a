"""The store's workloads: gather what each needs from the store (records, sketches, layers),
then run the math (``fedbus.store.analysis``) in a worker thread. Results are JSON-ready.

Arguments arrive from the bus, so every one is checked (type and range) before use; a bad one
is a ``StoreError`` naming the argument and what is allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedbus.store import analysis
from fedbus.store.cache import StoreError
from fedbus.store.repository import RoundStore
from fedbus.task import Task

_T = TypeVar("_T")

__all__ = ["WORKLOADS", "Result", "RoundValues", "TaskUtility", "Workloads", "digest"]

Weights = dict[str, np.ndarray]
Utility = Callable[[Weights], float]


#: Per-round values kept (each a few floats per client).
_MAX_DERIVED = 1024


@dataclass(frozen=True, slots=True)
class RoundValues:
    """One round's per-client values (leave-one-out: v(N) - v(N minus i); Shapley: phi),
    with standard errors for Shapley, v(N), and the models evaluated to get them."""

    clients: list[str]
    values: np.ndarray
    stderr: np.ndarray | None
    full: float
    evaluations: int


@dataclass(slots=True)
class Result:
    data: dict[str, Any]
    #: Models that go with the answer (personalization), named ``<model>/<layer>``.
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def digest(weights: Mapping[str, np.ndarray]) -> str:
    """A short content hash of a model: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(weights):
        arr = np.ascontiguousarray(weights[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]
    return h.hexdigest()


def _arg(args: Mapping[str, Any], name: str, kind: type, default: Any,
         lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = ()) -> Any:
    value = args.get(name, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise StoreError(f"argument {name!r} must be {kind.__name__}, got {value!r:.40}")
    if choices and value not in choices:
        raise StoreError(f"argument {name!r} is {value!r}; allowed: {', '.join(choices)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):  # type: ignore[operator]
        raise StoreError(f"argument {name!r}={value} out of range [{lo}, {hi}]")
    return value


def _f(x: float) -> float:
    return round(float(x), 6)


class Workloads:
    """Runs the named workloads against ``store``. ``utility`` scores a model on the server's
    validation set (accuracy, else minus the loss); without it, the workloads that evaluate
    models (leave-one-out, Shapley) say so instead of guessing."""

    def __init__(self, store: RoundStore, utility: Utility | None = None, seed: int = 0) -> None:
        self.store = store
        self.utility = utility
        self.seed = seed
        #: Per-round values already computed (idle-time precomputation or an earlier query),
        #: by (kind, round, parameters); a closed round's updates never change.
        self.derived: OrderedDict[tuple[Any, ...], RoundValues] = OrderedDict()
        #: Set to stop a precomputation between two evaluations (the store is stopping);
        #: queries are not affected.
        self.stopping = threading.Event()

    async def round_values(self, r: int, shapley: tuple[int, float] | None = None, *,
                           executor: Executor | None = None,
                           stop: threading.Event | None = None, duty: float = 1.0,
                           ) -> tuple[RoundValues, RoundValues | None, int]:
        """Leave-one-out (and with ``shapley`` = (permutations, tolerance), truncated Monte-
        Carlo Shapley) values of round ``r``: from ``derived`` when there, else computed
        from the round's full updates (in ``executor``) and kept. Also says how many models
        this call evaluated (0: all of it was already there)."""
        loo_key = ("loo", r)
        sh_key = ("shapley", r, *shapley) if shapley is not None else None
        loo = self.derived.get(loo_key)
        sh = self.derived.get(sh_key) if sh_key is not None else None
        if loo is not None and (sh_key is None or sh is not None):
            return loo, sh, 0
        base, clients, deltas, examples = await self._round_updates(r)
        utility = self._need_utility()

        def checked(weights: Weights) -> float:
            if stop is not None and stop.is_set():
                raise StoreError("the store is stopping: evaluation abandoned")
            started = time.perf_counter()
            value = utility(weights)
            if duty < 1.0:  # idle work: rest (GIL released) so it uses at most `duty` of a core
                time.sleep((time.perf_counter() - started) * (1.0 - duty) / duty)
            return value

        game = analysis.FedAvgGame(base, deltas, examples, checked)
        seed = self.seed + r

        def compute() -> tuple[RoundValues, RoundValues | None]:
            out_loo = loo
            if out_loo is None:
                values = analysis.leave_one_out(game)
                out_loo = RoundValues(clients, values, None, game.value_full(),
                                      game.evaluations)
            out_sh = sh
            if shapley is not None and out_sh is None:
                before = game.evaluations
                phi, se = analysis.tmc_shapley(game, permutations=shapley[0],
                                               tolerance=shapley[1], seed=seed)
                out_sh = RoundValues(clients, phi, se, game.value_full(),
                                     game.evaluations - before)
            return out_loo, out_sh

        loop = asyncio.get_running_loop()
        new_loo, new_sh = await loop.run_in_executor(executor, compute)
        self._keep(loo_key, new_loo)
        if sh_key is not None and new_sh is not None:
            self._keep(sh_key, new_sh)
        return new_loo, new_sh, game.evaluations

    def _keep(self, key: tuple[Any, ...], value: RoundValues) -> None:
        self.derived[key] = value
        self.derived.move_to_end(key)
        while len(self.derived) > _MAX_DERIVED:
            self.derived.popitem(last=False)

    async def precompute(self, r: int, *, permutations: int, tolerance: float = 0.01,
                         executor: Executor | None = None, duty: float = 1.0) -> int:
        """What a debugging or contribution query of round ``r`` with these parameters will
        look up; returns how many models were evaluated."""
        _, _, evaluated = await self.round_values(r, (permutations, tolerance),
                                                  executor=executor, stop=self.stopping,
                                                  duty=duty)
        return evaluated

    @property
    def utility_name(self) -> str:
        """What ``utility`` measures (``accuracy``, or ``-loss`` for tasks without one)."""
        return str(getattr(self.utility, "name", "utility"))

    async def run(self, name: str, args: Mapping[str, Any]) -> Result:
        fn = WORKLOADS.get(name)
        if fn is None:
            raise StoreError(f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}")
        if not isinstance(args, Mapping):
            raise StoreError("workload arguments must be a mapping")
        return await fn(self, args)

    # --- helpers ----------------------------------------------------------------------------
    def _rounds(self, args: Mapping[str, Any], window_default: int | None) -> list[int]:
        closed = self.store.rounds()
        if not closed:
            raise StoreError("the store holds no finished round yet")
        last = _arg(args, "round", int, closed[-1], lo=1)
        if last not in self.store.records:
            raise StoreError(f"round {last} is not in the store; it holds rounds "
                             f"{closed[0]}..{closed[-1]}")
        window = _arg(args, "window", int, window_default, lo=1, hi=100_000)
        upto = [r for r in closed if r <= last]
        return upto[-window:] if window else upto

    def _need_utility(self) -> Utility:
        if self.utility is None:
            raise StoreError("this workload evaluates models on the server's validation set, "
                             "but the store has no task to evaluate with (store.evaluate: "
                             "false, or evaluate.where: none)")
        return self.utility

    @property
    def sketches_only(self) -> bool:
        """The store keeps no full update (``store.full_update_rounds: 0``)."""
        return self.store.retention.full_update_rounds == 0

    def _need_full(self, what: str) -> None:
        if self.sketches_only:
            raise StoreError(f"{what} needs full updates, and this store keeps sketches only "
                             "(store.full_update_rounds: 0); set store.full_update_rounds to 1 "
                             "or more (the store is then sent every update: docs/store.md)")

    async def _round_updates(self, r: int) -> tuple[Weights, list[str], list[Weights],
                                                    list[float]]:
        self._need_full("this workload (FedAvg of the round's updates)")
        base = await self.store.model(r)
        if base is None:
            raise StoreError(f"the global model of round {r} is no longer kept "
                             "(store.model_rounds)")
        clients, deltas, examples = await self._kept(r, self.store.update)
        if not clients:
            raise StoreError(f"round {r} has no full updates left (store.full_update_rounds "
                             "keeps the last K rounds); pick a recent round")
        return base, clients, deltas, examples

    async def _sketches(self, r: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        names, sketches, ex = await self._kept(r, self.store.sketch)
        rows = [np.asarray(s, dtype=np.float64) for s in sketches]
        return names, (np.array(rows) if rows else np.zeros((0, 0))), np.array(ex)

    async def _kept(self, r: int, load: Callable[[int, str], Awaitable[_T | None]]
                    ) -> tuple[list[str], list[_T], list[float]]:
        """Round ``r``'s clients whose ``load(r, client)`` the store still keeps (retention
        drops old ones), in id order: their ids, what was loaded, their example counts."""
        rec = self.store.records[r]
        clients: list[str] = []
        kept: list[_T] = []
        examples: list[float] = []
        for cid in sorted(rec.get("clients", {})):
            item = await load(r, cid)
            if item is not None:
                clients.append(cid)
                kept.append(item)
                examples.append(float(rec["clients"][cid]["num_examples"]))
        return clients, kept, examples


Workload = Callable[[Workloads, Mapping[str, Any]], Awaitable[Result]]
WORKLOADS: dict[str, Workload] = {}


def workload(name: str) -> Callable[[Workload], Workload]:
    def register(fn: Workload) -> Workload:
        WORKLOADS[name] = fn
        return fn
    return register


# --- summary and lineage ------------------------------------------------------------------

@workload("summary")
async def _summary(w: Workloads, args: Mapping[str, Any]) -> Result:
    rounds = w.store.rounds()
    last = w.store.records[rounds[-1]] if rounds else {}
    return Result({"rounds": rounds, "last": last, "stats": w.store.stats()})


@workload("lineage")
async def _lineage(w: Workloads, args: Mapping[str, Any]) -> Result:
    """Which clients and rounds the global model produced by ``round`` came from."""
    wanted = _arg(args, "digest", str, None)
    rounds = w.store.rounds()
    if wanted is not None:
        hits = [r for r in rounds if w.store.records[r].get("result_digest") == wanted]
        if not hits:
            raise StoreError(f"no round in the store produced a model with digest {wanted}")
        args = {**args, "round": hits[0]}
    chain = w._rounds(args, None)
    target = chain[-1]
    steps: list[dict[str, Any]] = []
    clients: dict[str, dict[str, Any]] = {}
    for r in chain:
        rec = w.store.records[r]
        info = rec.get("clients", {})
        total = sum(float(c["num_examples"]) for c in info.values()) or 1.0
        shares = {cid: float(c["num_examples"]) / total for cid, c in info.items()}
        steps.append({"round": r, "started_from": rec.get("model_digest"),
                      "produced": rec.get("result_digest"), "clients": sorted(info),
                      "shares": {k: _f(v) for k, v in sorted(shares.items())},
                      "aggregate": rec.get("aggregate", {}).get("source")})
        for cid, share in shares.items():
            c = clients.setdefault(cid, {"rounds": [], "share": 0.0})
            c["rounds"].append(r)
            c["share"] += share / len(chain)
    missing = [r for r in range(1, target + 1) if r not in w.store.records]
    for c in clients.values():
        c["share"] = _f(c["share"])
    return Result({"round": target, "model_digest": w.store.records[target].get("result_digest"),
                   "rounds": steps, "clients": dict(sorted(clients.items())),
                   "missing_rounds": missing})


# --- scheduling ---------------------------------------------------------------------------

@workload("scheduling")
async def _scheduling(w: Workloads, args: Mapping[str, Any]) -> Result:
    """Rank clients for the next round by similarity to the aggregate, loss or accuracy."""
    by = _arg(args, "by", str, "similarity", choices=("similarity", "loss", "accuracy"))
    order = _arg(args, "order", str, "desc", choices=("desc", "asc"))
    rounds = w._rounds(args, 3)
    values: dict[str, list[float]] = {}
    for r in rounds:
        for cid, c in w.store.records[r].get("clients", {}).items():
            if by == "similarity":
                v = c.get("cos")
            else:
                v = c.get("metrics", {}).get("train_loss" if by == "loss" else "accuracy",
                                             c.get("metrics", {}).get(by))
            if isinstance(v, (int, float)) and np.isfinite(v):
                values.setdefault(cid, []).append(float(v))
    scores = {cid: float(np.mean(v)) for cid, v in values.items()}
    ranked = sorted(scores, key=lambda c: (-scores[c] if order == "desc" else scores[c], c))
    return Result({"by": by, "order": order, "rounds": rounds,
                   "ranking": [{"client": c, "score": _f(scores[c]), "rounds": len(values[c])}
                               for c in ranked],
                   "scores": {c: _f(scores[c]) for c in ranked}})


# --- malicious-client detection -------------------------------------------------------------

@workload("malicious")
async def _malicious(w: Workloads, args: Mapping[str, Any]) -> Result:
    """Direction and norm outliers over rounds (from sketches), as one score per client."""
    threshold = _arg(args, "threshold", float, 3.0, lo=0.0)
    rounds = w._rounds(args, None)
    per: dict[str, list[dict[str, float]]] = {}
    for r in rounds:
        names, s, ex = await w._sketches(r)
        if len(names) < 3:
            continue  # two updates cannot outvote each other
        out = await asyncio.to_thread(analysis.round_outliers, s, ex)
        for i, cid in enumerate(names):
            zc, zn = float(out["z_cos"][i]), float(out["z_norm"][i])
            per.setdefault(cid, []).append({
                "round": r, "cos_others": _f(out["cos_others"][i]), "z_cos": _f(zc),
                "norm": _f(out["norm"][i]), "z_norm": _f(zn),
                # Pointing away from the others counts fully; an unusual norm only beyond
                # 3 robust sigmas (honest non-IID clients differ in size).
                "suspicion": _f(max(0.0, -zc) + max(0.0, abs(zn) - 3.0)),
            })
    clients = {}
    for cid, ev in per.items():
        score = float(np.mean([e["suspicion"] for e in ev]))
        worst = sorted(ev, key=lambda e: -e["suspicion"])[:3]
        clients[cid] = {"score": _f(score), "flagged": score >= threshold,
                        "rounds": len(ev), "evidence": worst}
    ranked = sorted(clients, key=lambda c: -clients[c]["score"])
    return Result({"threshold": threshold, "rounds": rounds,
                   "flagged": [c for c in ranked if clients[c]["flagged"]],
                   "clients": {c: clients[c] for c in ranked}})


# --- debugging ----------------------------------------------------------------------------

@workload("debugging")
async def _debugging(w: Workloads, args: Mapping[str, Any]) -> Result:
    """Which round's accuracy dropped, and which clients' updates caused it."""
    min_drop = _arg(args, "min_drop", float, 0.0, lo=0.0)
    rounds = w.store.rounds()
    series: dict[int, float] = {}
    metric = "accuracy"
    for r in rounds:
        rep = w.store.records[r].get("report", {})
        if isinstance(rep.get("accuracy"), (int, float)):
            series[r] = float(rep["accuracy"])
        elif isinstance(rep.get("loss"), (int, float)):
            series[r], metric = -float(rep["loss"]), "-loss"
    drops = []
    prev: tuple[int, float] | None = None
    for r in sorted(series):
        if prev is not None and series[r] < prev[1] - min_drop:
            drops.append({"round": r, "before": _f(prev[1]), "after": _f(series[r]),
                          "drop": _f(prev[1] - series[r])})
        prev = (r, series[r])
    target = args.get("round")
    if target is None and drops:
        target = max(drops, key=lambda d: d["drop"])["round"]
    out: dict[str, Any] = {"metric": metric, "series": {str(k): _f(v) for k, v in series.items()},
                           "drops": drops, "round": target}
    if target is None:
        out["note"] = "no round lowered the metric"
        return Result(out)
    target = w._rounds({"round": target}, 1)[-1]
    rec = w.store.records[target]
    info = rec.get("clients", {})
    names = sorted(info)
    if len(names) >= 3:
        norms = np.array([info[c].get("norm", 0.0) for c in names], dtype=np.float64)
        cos = np.array([info[c].get("cos", 0.0) or 0.0 for c in names], dtype=np.float64)
        zn = analysis.robust_z(np.log(np.maximum(norms, 1e-30)), 0.05)
        zc = analysis.robust_z(cos, 0.05)
        out["outliers"] = {c: {"norm": _f(norms[i]), "z_norm": _f(zn[i]), "cos": _f(cos[i]),
                               "z_cos": _f(zc[i]), "outlier": bool(zc[i] < -3 or abs(zn[i]) > 3)}
                           for i, c in enumerate(names)}
    if w.utility is None:
        out["note"] = "no task to evaluate with: leave-one-out skipped"
        return Result(out)
    if w.sketches_only:  # the outliers above come from the record; leave-one-out cannot
        out["note"] = ("leave-one-out needs full updates: this store keeps sketches only "
                       "(store.full_update_rounds: 0)")
        return Result(out)
    values, _, evaluated = await w.round_values(target)
    clients, loo, full = values.clients, values.values, values.full
    # loo[i] = v(N) - v(N without i): negative means the round is better without client i.
    out["values"] = "computed" if evaluated else "precomputed"
    out["evaluations"] = evaluated
    out["utility_all"] = _f(full)
    out["leave_one_out"] = {c: {"utility_without": _f(full - loo[i]), "gain_if_removed":
                                _f(-loo[i])} for i, c in enumerate(clients)}
    out["culprits"] = [c for c, i in sorted(((c, i) for i, c in enumerate(clients)),
                                            key=lambda t: loo[t[1]]) if loo[i] < 0]
    return Result(out)


# --- clustering and personalization ---------------------------------------------------------

async def _features(w: Workloads, rounds: list[int]) -> tuple[list[str], np.ndarray]:
    """Per client: the mean over ``rounds`` of its update's direction relative to the round's
    mean direction (centred unit sketches), so the common drift does not hide the groups."""
    acc: dict[str, np.ndarray] = {}
    for r in rounds:
        names, s, _ = await w._sketches(r)
        if len(names) < 2:
            continue
        unit = s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-30)
        centred = unit - unit.mean(axis=0)
        centred /= np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-30)
        for i, cid in enumerate(names):
            acc[cid] = acc.get(cid, 0) + centred[i]
    names = sorted(acc)
    if not names:
        raise StoreError(f"no round among {rounds} has sketches of two or more clients")
    x = np.array([acc[c] / max(float(np.linalg.norm(acc[c])), 1e-30) for c in names])
    return names, x


@workload("clustering")
async def _clustering(w: Workloads, args: Mapping[str, Any]) -> Result:
    k = _arg(args, "k", int, 2, lo=1, hi=64)
    rounds = w._rounds(args, 5)
    names, x = await _features(w, rounds)
    if k > len(names):
        raise StoreError(f"k={k} exceeds the {len(names)} clients with sketches")
    res = await asyncio.to_thread(analysis.kmeans, x, k, seed=w.seed)
    sil = await asyncio.to_thread(analysis.silhouette, x, res.labels)
    members = [[c for c, lab in zip(names, res.labels.tolist(), strict=True) if lab == j]
               for j in range(k)]
    return Result({"k": k, "rounds": rounds, "silhouette": _f(sil),
                   "clusters": {c: int(lab) for c, lab in zip(names, res.labels.tolist(),
                                                                strict=True)},
                   "members": members})


@workload("personalization")
async def _personalization(w: Workloads, args: Mapping[str, Any]) -> Result:
    """A model per cluster: the round's global model plus the example-weighted mean of that
    cluster's updates. With ``client``, the answer carries that client's cluster model."""
    w._need_full("personalization (each cluster's FedAvg model)")
    clustered = (await _clustering(w, args)).data
    client = _arg(args, "client", str, None)
    with_models = _arg(args, "with_models", bool, False)
    r = clustered["rounds"][-1]
    base, clients, deltas, examples = await w._round_updates(r)
    index = {c: i for i, c in enumerate(clients)}
    models: dict[int, Weights] = {}
    info = []
    for j, members in enumerate(clustered["members"]):
        have = [index[c] for c in members if c in index]
        if not have:
            info.append({"cluster": j, "members": members, "updates": 0})
            continue
        game = analysis.FedAvgGame(base, [deltas[i] for i in have],
                                   [examples[i] for i in have], lambda m: 0.0)
        model = game.model_of(range(len(have)))
        models[j] = model
        entry: dict[str, Any] = {"cluster": j, "members": members, "updates": len(have),
                                 "digest": digest(model)}
        if w.utility is not None:
            entry["server_" + w.utility_name] = _f(await asyncio.to_thread(w.utility, model))
        info.append(entry)
    tensors: dict[str, np.ndarray] = {}
    if client is not None:
        if client not in clustered["clusters"]:
            raise StoreError(f"client {client!r} has no sketch in rounds {clustered['rounds']}")
        j = clustered["clusters"][client]
        tensors = {f"cluster{j}/{k}": v for k, v in models.get(j, {}).items()}
    elif with_models:
        tensors = {f"cluster{j}/{k}": v for j, m in models.items() for k, v in m.items()}
    return Result({"round": r, "base": "global model round started from",
                   "clusters": clustered["clusters"], "models": info,
                   "silhouette": clustered["silhouette"], "client": client}, tensors)


# --- contribution and incentives --------------------------------------------------------------

@workload("contribution")
async def _contribution(w: Workloads, args: Mapping[str, Any]) -> Result:
    """Leave-one-out and truncated Monte-Carlo Shapley values on the server's validation set,
    per round with full updates, summed; and ``budget`` tokens split by Shapley value."""
    permutations = _arg(args, "permutations", int, 32, lo=1, hi=10_000)
    tolerance = _arg(args, "tolerance", float, 0.01, lo=0.0, hi=1.0)
    budget = _arg(args, "budget", float, 100.0, lo=0.0)
    w._need_full("contribution (leave-one-out and Shapley values)")
    w._need_utility()
    if args.get("round") is not None:
        rounds = w._rounds(args, 1)
    else:
        rounds = [r for r in w.store.rounds()
                  if any(c.get("full") for c in w.store.records[r].get("clients", {}).values())]
        rounds = rounds[-_arg(args, "window", int, 3, lo=1):]
    if not rounds:
        raise StoreError("no round with full updates is kept; raise store.full_update_rounds")
    loo_sum: dict[str, float] = {}
    phi_sum: dict[str, float] = {}
    var_sum: dict[str, float] = {}
    per_round = []
    evaluations = 0
    looked_up = 0
    for r in rounds:
        loo_v, sh_v, evaluated = await w.round_values(r, (permutations, tolerance))
        assert sh_v is not None
        clients, loo, phi, se = loo_v.clients, loo_v.values, sh_v.values, sh_v.stderr
        assert se is not None
        looked_up += evaluated == 0
        evaluations += evaluated
        for i, c in enumerate(clients):
            loo_sum[c] = loo_sum.get(c, 0.0) + float(loo[i])
            phi_sum[c] = phi_sum.get(c, 0.0) + float(phi[i])
            var_sum[c] = var_sum.get(c, 0.0) + float(se[i]) ** 2
        per_round.append({"round": r, "clients": clients,
                          "shapley": {c: _f(phi[i]) for i, c in enumerate(clients)}})
    ranked = sorted(phi_sum, key=lambda c: -phi_sum[c])
    tokens = analysis.token_split(phi_sum, budget)
    return Result({"utility": w.utility_name, "rounds": rounds, "permutations": permutations,
                   "tolerance": tolerance, "evaluations": evaluations,
                   "precomputed_rounds": looked_up,
                   "shapley": {c: _f(phi_sum[c]) for c in ranked},
                   "shapley_stderr": {c: _f(np.sqrt(var_sum[c])) for c in ranked},
                   "leave_one_out": {c: _f(loo_sum[c]) for c in ranked},
                   "lowest": ranked[-1], "tokens": {c: _f(tokens[c]) for c in ranked},
                   "per_round": per_round})


class TaskUtility:
    """Scores a model on the server's validation set (the task's evaluation copy, as the
    aggregator has): accuracy when the task reports it, else minus the loss. One model at a
    time: setting weights and evaluating must not interleave between threads."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.name = "accuracy"
        self._lock = threading.Lock()

    def __call__(self, weights: dict[str, np.ndarray]) -> float:
        with self._lock:
            self.task.set_weights(weights)
            result = self.task.evaluate()
        acc = result.metrics.get("accuracy")
        if acc is not None:
            return float(acc)
        self.name = "-loss"
        return -float(result.loss)
