"""The metadata store: workload latency from the warm store vs the naive path, the store's
memory against its cache size, and the aggregator's round time with and without a store.

    .venv/bin/python -m benchmarks.bench_store                # 50 clients x 1M params
    .venv/bin/python -m benchmarks.bench_store --quick        # 10 clients x 100k, < 1 min
    .venv/bin/python -m benchmarks.bench_store --skip-rounds  # latency only

1. Latency. ``--rounds`` rounds of ``--clients`` synthetic updates of ``--params`` float32
   parameters (two groups of clients pulling different ways, client c0 pushing against them)
   are written through the store's own write path (updates, sketches, models, records). The
   warm path is ``Workloads.run`` on that store, whose LRU holds the rounds it just wrote. The
   naive path is FLStore's baseline: load every client update of the round(s) a workload
   needs from files (one codec frame per client and round, as an aggregator could dump them;
   read back from the OS page cache, so this baseline is *faster* than an object store) and
   compute the same answer from full updates. Median of ``--reps`` runs each.
2. Rounds. A real mosquitto, the aggregator and the trainers as separate processes (as in
   bench_rounds.py), ``--round-rounds`` rounds each, alternating without and with a store
   process (``fedbus serve --node store``); the aggregator's ``round_finished`` seconds,
   median over the rounds after the first, and the span from the first round's end to the
   last one's (between-round work included); the store's peak RSS (VmHWM) against its
   ``cache_mb``; the extra bytes the broker sent to the store. ``--feed updates`` (the store
   is sent every update, full updates kept for 2 rounds) or ``--feed sketches`` (no full
   updates: the aggregator sketches and publishes one record a round; its sketching CPU
   seconds and publish time come from its ``sketches_published`` log lines).
3. ``--cos-error``: the sketch cosine to the aggregate against the exact one, on the
   latency part's synthetic updates (what a store fed sketches reports as ``cos``).

Progress on stderr, markdown on stdout. Every process started here is stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_rounds import JOB_HEAD, Child, LogReader, Sampler, _pin, _serve, read_mem
from fedbus.broker import spawn_mosquitto
from fedbus.codec import NO_COMPRESSION, Envelope, decode, encode
from fedbus.store import RoundStore, Sketcher, Workloads, analysis
from fedbus.store.repository import Retention
from fedbus.store.sketch import norm

MIB = 1 << 20


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- 1. latency ------------------------------------------------------------------------------

def _layers(params: int) -> dict[str, tuple[int, ...]]:
    half = params // 2
    return {"l0.weight": (half // 500, 500), "l1.weight": (params - (half // 500) * 500,)}


def synthesize(root: Path, naive: Path, clients: int, params: int, rounds: int,
               cache_mb: int) -> tuple[RoundStore, dict[str, np.ndarray], float]:
    """Write ``rounds`` rounds into a store and as naive per-client files."""
    rng = np.random.default_rng(0)
    shapes = _layers(params)
    target = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    groups = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
              for _ in range(2)]
    store = RoundStore(root, "bench", cache_bytes=cache_mb * MIB, fsync=False,
                       retention=Retention(full_update_rounds=rounds))
    sketcher = Sketcher(2048, 0)
    model = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    started = time.monotonic()
    for r in range(1, rounds + 1):
        store.write_model(r, model)
        (naive / f"r{r}").mkdir(parents=True)
        (naive / f"r{r}" / "model.fb").write_bytes(encode(Envelope(
            kind="model", job="bench", sender="agg", round=r, tensors=model), NO_COMPRESSION))
        info: dict[str, Any] = {}
        acc = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
        for i in range(clients):
            g = groups[i % 2]
            sign = -1.0 if i == 0 else 1.0
            upd = {k: (sign * 0.05 * (target[k] - model[k] + 0.5 * g[k]
                                      + 0.3 * rng.normal(size=shapes[k]))).astype(np.float32)
                   for k in shapes}
            cid = f"c{i}"
            store.write_update(r, cid, upd)
            sk = sketcher.sketch(upd)
            store.write_sketch(r, cid, sk, {"norm": norm(upd)})
            (naive / f"r{r}" / f"{cid}.fb").write_bytes(encode(Envelope(
                kind="update", job="bench", sender=cid, round=r,
                meta={"num_examples": 100 + i}, tensors=upd), NO_COMPRESSION))
            info[cid] = {"num_examples": 100 + i, "norm": norm(upd), "full": True,
                         "metrics": {"train_loss": float(1.0 + 0.01 * i)}, "arrival": i + 1}
            for k in acc:
                acc[k] += (100 + i) * upd[k]
        total = sum(100 + i for i in range(clients))
        agg = {k: (acc[k] / total).astype(np.float32) for k in acc}
        sk_agg = sketcher.sketch(agg)
        for cid in info:
            info[cid]["cos"] = analysis_cos(store, r, cid, sk_agg)
        new = {k: model[k] + agg[k] for k in model}
        store.write_record(r, {"round": r, "layers": sorted(shapes), "clients": info,
                               "report": {"accuracy": 0.5 + 0.1 * r - (0.2 if r == rounds
                                                                        else 0.0)}})
        model = new
        _eprint(f"  wrote round {r}/{rounds} ({time.monotonic() - started:.1f}s)")
    return store, target, time.monotonic() - started


def analysis_cos(store: RoundStore, r: int, cid: str, sk_agg: np.ndarray) -> float:
    s = store.cache.get(f"rounds/{r:08d}/clients/c_{cid}/sketch.fb")
    from fedbus.store.sketch import cosine

    return cosine(s, sk_agg) if s is not None else 0.0


def load_round(naive: Path, r: int) -> tuple[dict[str, np.ndarray], list[str],
                                                list[dict[str, np.ndarray]], list[float]]:
    """The naive path: every client update of round ``r`` read and decoded from its file."""
    model = dict(decode((naive / f"r{r}" / "model.fb").read_bytes()).tensors)
    names, ups, ex = [], [], []
    for path in sorted((naive / f"r{r}").glob("c*.fb"), key=lambda p: int(p.stem[1:])):
        env = decode(path.read_bytes())
        names.append(env.sender)
        ups.append(dict(env.tensors))
        ex.append(float(env.meta["num_examples"]))
    return model, names, ups, ex


def _flat(ups: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.stack([np.concatenate([u[k].ravel() for k in sorted(u)]) for u in ups])


def naive_workloads(naive: Path, rounds: int, utility: Callable[..., float],
                    perms: int) -> dict[str, Callable[[], Any]]:
    last = rounds
    window = list(range(max(1, rounds - 2), rounds + 1))

    def scheduling() -> Any:
        scores: dict[str, list[float]] = {}
        for r in window:
            _, names, ups, ex = load_round(naive, r)
            x = _flat(ups)
            agg = (x * np.array(ex)[:, None]).sum(0) / sum(ex)
            for n, row in zip(names, x, strict=True):
                scores.setdefault(n, []).append(float(row @ agg / np.linalg.norm(row)
                                                      / np.linalg.norm(agg)))
        return sorted(scores, key=lambda n: -np.mean(scores[n]))

    def malicious() -> Any:
        out = {}
        for r in range(1, rounds + 1):
            _, names, ups, ex = load_round(naive, r)
            res = analysis.round_outliers(_flat(ups), np.array(ex))
            out[r] = dict(zip(names, res["z_cos"].tolist(), strict=True))
        return out

    def clustering() -> Any:
        acc = None
        for r in range(1, rounds + 1):
            ups = load_round(naive, r)[2]
            x = _flat(ups).astype(np.float64)
            unit = x / np.linalg.norm(x, axis=1, keepdims=True)
            c = unit - unit.mean(0)
            c /= np.linalg.norm(c, axis=1, keepdims=True)
            acc = c if acc is None else acc + c
        assert acc is not None
        return analysis.kmeans(acc, 2).labels

    def lineage() -> Any:
        return {r: load_round(naive, r)[1] for r in range(1, rounds + 1)}

    def game(r: int) -> analysis.FedAvgGame:
        model, _, ups, ex = load_round(naive, r)
        return analysis.FedAvgGame(model, ups, ex, utility)

    def debugging() -> Any:
        return analysis.leave_one_out(game(last))

    def contribution() -> Any:
        g = game(last)
        return analysis.leave_one_out(g), analysis.tmc_shapley(g, permutations=perms)

    def personalization() -> Any:
        labels = clustering()
        g = game(last)
        return [g.model_of([i for i, lab in enumerate(labels) if lab == j]) for j in (0, 1)]

    return {"scheduling": scheduling, "malicious": malicious, "clustering": clustering,
            "lineage": lineage, "debugging": debugging, "contribution": contribution,
            "personalization": personalization}


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_latency(clients: int, params: int, rounds: int, reps: int, perms: int,
                  cache_mb: int) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="fedbus-bench-store-"))
    try:
        store, target, setup_s = synthesize(work / "store", work / "naive", clients, params,
                                            rounds, cache_mb)

        def utility(w: dict[str, np.ndarray]) -> float:
            return -float(sum(np.mean((w[k] - target[k]) ** 2) for k in w))

        warm = Workloads(store, utility, seed=0)
        naive = naive_workloads(work / "naive", rounds, utility, perms)
        args: dict[str, dict[str, Any]] = {
            "scheduling": {}, "malicious": {}, "clustering": {"window": rounds},
            "lineage": {}, "debugging": {"round": rounds},
            "contribution": {"round": rounds, "permutations": perms},
            "personalization": {"window": rounds},
        }
        rows = []
        loop = asyncio.new_event_loop()
        try:
            for name, fn in naive.items():
                def run_warm(name: str = name, fresh: bool = False) -> Any:
                    if fresh:  # computed on request: nothing precomputed or cached
                        warm.derived.clear()
                    coro: Awaitable[Any] = warm.run(name, args[name])
                    return loop.run_until_complete(coro)

                run_warm()  # first call: warms what a long-running store would have warm
                row: dict[str, Any] = {"workload": name}
                if name in ("debugging", "contribution"):
                    # What the store does in idle time once the round closes...
                    t_pre = _median_time(lambda: (warm.derived.clear(), loop.run_until_complete(
                        warm.precompute(rounds, permutations=perms))), reps)
                    # ...and the same query computed on request from the warm cache
                    t_req = _median_time(lambda name=name: run_warm(name, fresh=True), reps)
                    row.update(precompute_s=t_pre, on_request_s=t_req)
                    loop.run_until_complete(warm.precompute(rounds, permutations=perms))
                t_warm = _median_time(run_warm, reps)
                t_naive = _median_time(fn, reps)
                row.update(warm_s=t_warm, naive_s=t_naive, speedup=t_naive / t_warm)
                rows.append(row)
                extra = (f"  on request {row['on_request_s']:8.4f}s  precompute "
                         f"{row['precompute_s']:8.4f}s" if "on_request_s" in row else "")
                _eprint(f"  {name:16s} warm {t_warm:8.4f}s  naive {t_naive:8.4f}s  "
                        f"x{t_naive / t_warm:.1f}{extra}")
        finally:
            loop.close()
        t_load = _median_time(lambda: load_round(work / "naive", rounds), reps)
        rows.append({"workload": "(naive load of one round)", "naive_s": t_load})
        _eprint(f"  naive load of one round: {t_load:.4f}s")
        cache = store.cache.stats()
        rows.append({"workload": "(cache)", "bytes": cache["bytes"],
                     "capacity": cache["capacity"], "setup_s": setup_s,
                     "rss": (read_mem(os.getpid()) or (0, 0))[0]})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- 2. rounds with and without a store -------------------------------------------------------

_MANIFEST = "# written by benchmarks/bench_store.py\n" + JOB_HEAD + """\
round: {{deadline_s: 600, quorum: 1.0, min_clients: {n}, start_timeout_s: 180}}
evaluate: {{where: none}}
codec: {{level: 0}}
broker: {{host: "{host}", port: {port}}}
task:
  ref: "examples.toy.task:make_task"
  params: {{size: {size}, lr: 0.5}}
nodes:
  - {{id: aggregator, role: aggregator}}
{store_node}
trainers: {{count: {n}, prefix: "t", parent: aggregator}}
{store_section}
"""


def run_rounds(n: int, params: int, rounds: int, with_store: bool, cache_mb: int,
               backlog_mb: int, timeout_s: float, nice: int = 0,
               work_nice: int = 0, feed: str = "updates",
               start_store: bool = True) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fedbus-bench-store-rounds-"))
    broker = asyncio.run(spawn_mosquitto())
    children: list[Child] = []
    try:
        manifest = work / "m.yaml"
        manifest.write_text(_MANIFEST.format(
            rounds=rounds, n=n, size=params, host=broker.host, port=broker.port,
            store_node="  - {id: store, role: store}" if with_store else "",
            store_section=(f"store: {{dir: \"{work / 'store'}\", cache_mb: {cache_mb}, "
                           f"backlog_mb: {backlog_mb}, "
                           f"full_update_rounds: {2 if feed == 'updates' else 0}, "
                           f"feed: {feed}, "
                           f"work_nice: {work_nice}, evaluate: false}}") if with_store
                          else ""))
        agg = Child("aggregator", _serve(manifest, "aggregator", json_log=True,
                                         stderr=subprocess.PIPE, log_level="info"))
        children.append(agg)
        assert agg.proc.stderr is not None
        reader = LogReader(agg.proc.stderr)
        reader.start()
        store_reader = store_sampler = None
        store: Child | None = None
        if with_store and start_store:
            store = Child("store", _serve(manifest, "store", json_log=True,
                                          stderr=subprocess.PIPE, log_level="info"))
            if nice:
                os.setpriority(os.PRIO_PROCESS, store.pid, nice)
            children.append(store)
            assert store.proc.stderr is not None
            store_reader = LogReader(store.proc.stderr)
            store_reader.start()
            store_sampler = Sampler(store.pid)
            store_sampler.start()
            deadline = time.monotonic() + 60
            while store_reader.first("store_started") is None:  # subscribed before round 1
                if time.monotonic() > deadline or store.proc.poll() is not None:
                    raise RuntimeError(f"store did not start: {store_reader.other[-5:]}")
                time.sleep(0.05)
        with open(work / "trainers.log", "wb") as log:
            trainers = Child("trainers", _serve(manifest, "t*", json_log=False, stderr=log,
                                                log_level="warning"))
        children.append(trainers)
        _pin(trainers.pid, 2)
        if not agg.reap(timeout_s):
            raise TimeoutError(f"aggregator still running after {timeout_s}s")
        reader.join()
        finished = reader.named("round_finished")
        round_s = [float(e["seconds"]) for e in finished]
        ends = [t for t, e in reader.events if e.get("event") == "round_finished"]
        published = reader.named("sketches_published")
        out: dict[str, Any] = {"store": with_store, "feed": feed, "round_s": round_s,
                               "median_s": statistics.median(round_s[1:] or round_s),
                               "span_s": ends[-1] - ends[0] if len(ends) > 1 else 0.0,
                               "agg_cpu_s": agg.cpu_s,
                               "sketch_cpu_s": sum(float(e["sketch_cpu_s"]) for e in published),
                               "publish_s": sum(float(e["publish_s"]) for e in published),
                               "record_bytes": sum(int(e["bytes"]) for e in published)}
        if store is not None and store_reader is not None and store_sampler is not None:
            store.reap(120)
            store_sampler.stop()
            store_reader.join()
            stopped = store_reader.named("store_stopped")
            stats = stopped[-1] if stopped else {}
            out.update(store_peak=store_sampler.last_hwm, store_stats=stats,
                       store_rounds=len(store_reader.named("store_round_recorded")),
                       store_cpu_s=store.cpu_s)
        # trainers on an anonymous broker do not trust `done`: stopped, not waited for
        trainers.reap(5)
        out["trainers_cpu_s"] = trainers.cpu_s
        return out
    finally:
        for child in reversed(children):
            child.stop()
        asyncio.run(broker.stop())
        shutil.rmtree(work, ignore_errors=True)


def cos_error(clients: int, params: int, dim: int = 2048) -> dict[str, float]:
    """Sketch cosine vs exact cosine of each update to the round's FedAvg aggregate, on the
    latency part's synthetic updates (two groups pulling different ways, c0 against them)."""
    rng = np.random.default_rng(0)
    shapes = _layers(params)
    target = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    groups = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
              for _ in range(2)]
    sketcher = Sketcher(dim, 0)
    ups, sks = [], []
    agg = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    total = sum(100.0 + i for i in range(clients))
    for i in range(clients):
        sign = -1.0 if i == 0 else 1.0
        upd = {k: (sign * 0.05 * (target[k] + 0.5 * groups[i % 2][k]
                                  + 0.3 * rng.normal(size=shapes[k]))).astype(np.float32)
               for k in shapes}
        for k in agg:
            agg[k] += (100.0 + i) / total * upd[k]
        ups.append(_flat([upd])[0])  # float32: 4 MB an update at 1M
        sks.append(sketcher.sketch(upd).astype(np.float64))
    agg32 = {k: v.astype(np.float32) for k, v in agg.items()}
    agg_flat = _flat([agg32])[0].astype(np.float64)
    agg_sk = sketcher.sketch(agg32).astype(np.float64)
    exact = np.array([u.astype(np.float64) @ agg_flat / np.linalg.norm(u.astype(np.float64))
                      / np.linalg.norm(agg_flat) for u in ups])
    approx = np.array([s @ agg_sk / np.linalg.norm(s) / np.linalg.norm(agg_sk) for s in sks])
    err = np.abs(approx - exact)
    return {"dim": float(sketcher.dim), "max_abs": float(err.max()),
            "mean_abs": float(err.mean()), "exact_min": float(exact.min()),
            "exact_max": float(exact.max())}


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}, "
            f"load {os.getloadavg()[0]:.2f}")


def _report_latency(a: argparse.Namespace) -> list[dict[str, Any]]:
    lat = bench_latency(a.clients, a.params, a.rounds, a.reps, a.permutations, a.cache_mb)
    print(f"\n### Workload latency, {a.clients} clients x {a.params:,} params "
          f"({a.rounds} rounds)\n")
    print("| workload | warm store (s) | naive: load round(s) from files (s) | speed-up | "
          "on request from the warm cache (s) | its speed-up | idle-time precompute (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in lat:
        if "warm_s" in row:
            req = (f"{row['on_request_s']:.4f} | {row['naive_s'] / row['on_request_s']:.1f}x | "
                   f"{row['precompute_s']:.4f}" if "on_request_s" in row else "– | – | –")
            print(f"| {row['workload']} | {row['warm_s']:.4f} | {row['naive_s']:.4f} | "
                  f"{row['speedup']:.1f}x | {req} |")
    load = next(r for r in lat if r["workload"].startswith("(naive load"))
    print(f"\nReading and decoding one round's {a.clients} update files alone (the naive "
          f"path's floor per round): {load['naive_s']:.4f}s")
    cache = lat[-1]
    print(f"\nLRU after the workloads: {cache['bytes'] / MIB:.0f} MiB of "
          f"{cache['capacity'] / MIB:.0f} MiB")
    return lat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3, help="rounds written for the latency part")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--permutations", type=int, default=4, help="Shapley permutations")
    p.add_argument("--cache-mb", type=int, default=512)
    p.add_argument("--round-rounds", type=int, default=5)
    p.add_argument("--trials", type=int, default=2, help="with/without pairs for rounds")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-rounds", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--store-nice", type=int, default=0,
                   help="run the store process at this nice value (19: lowest priority)")
    p.add_argument("--work-nice", type=int, default=0,
                   help="store.work_nice: nice value of the store's recording thread")
    p.add_argument("--feed", choices=("updates", "sketches"), default="updates",
                   help="how the store gets each update (docs/store.md)")
    p.add_argument("--absent-store", action="store_true",
                   help="declare the store but never start it (what the feed alone costs)")
    p.add_argument("--cos-error", action="store_true",
                   help="sketch cosine vs exact cosine on the synthetic updates")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.quick:
        a.clients, a.params, a.round_rounds, a.trials, a.reps = 10, 100_000, 3, 1, 1
    _eprint(f"machine: {_machine()}")
    _eprint(f"latency: {a.clients} clients x {a.params} params x {a.rounds} rounds")
    results: dict[str, Any] = {"machine": _machine(), "date": time.strftime("%Y-%m-%d"),
                               "args": vars(a)}
    if a.cos_error:
        ce = cos_error(a.clients, a.params)
        results["cos_error"] = ce
        print(f"\nsketch vs exact cosine to the aggregate, {a.clients} updates x "
              f"{a.params:,} params, sketch dim {ce['dim']:.0f}: max |error| "
              f"{ce['max_abs']:.4f}, mean {ce['mean_abs']:.4f} (exact cosines "
              f"{ce['exact_min']:.3f}..{ce['exact_max']:.3f})")
    if not a.skip_latency:
        results["latency"] = _report_latency(a)
    if not a.skip_rounds:
        rounds = []
        for trial in range(a.trials):
            for with_store in (False, True):
                _eprint(f"rounds: trial {trial + 1}, store={with_store}")
                row = run_rounds(a.clients, a.params, a.round_rounds, with_store,
                                 cache_mb=256, backlog_mb=256, timeout_s=900,
                                 nice=a.store_nice, work_nice=a.work_nice, feed=a.feed,
                                 start_store=not a.absent_store)
                _eprint(f"  median round {row['median_s']:.3f}s, span {row['span_s']:.2f}s, "
                        f"aggregator CPU {row['agg_cpu_s']:.2f}s (sketching "
                        f"{row['sketch_cpu_s']:.3f}s), load {os.getloadavg()[0]:.2f}")
                rounds.append(row)
        results["rounds"] = rounds
        base = [r["median_s"] for r in rounds if not r["store"]]
        withs = [r["median_s"] for r in rounds if r["store"]]
        print(f"\n### Aggregator round time, {a.clients} trainers x {a.params:,} params, "
              f"mosquitto, {a.round_rounds} rounds a run, feed {a.feed}, store nice "
              f"{a.store_nice}, work_nice {a.work_nice}\n")
        cpu_b = [r["agg_cpu_s"] for r in rounds if not r["store"]]
        cpu_w = [r["agg_cpu_s"] for r in rounds if r["store"]]
        span_b = [r["span_s"] for r in rounds if not r["store"]]
        span_w = [r["span_s"] for r in rounds if r["store"]]
        sk_w = [r["sketch_cpu_s"] for r in rounds if r["store"]]
        st_w = [r.get("store_cpu_s", 0.0) for r in rounds if r["store"]]
        print("| pair | round without store (s) | with store (s) | ratio | span ratio | "
              "aggregator CPU-s without / with (sketching) | store CPU-s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for i, (b, w) in enumerate(zip(base, withs, strict=True)):
            print(f"| {i + 1} | {b:.3f} | {w:.3f} | {w / b:.3f} | "
                  f"{span_w[i] / span_b[i]:.3f} | {cpu_b[i]:.2f} / {cpu_w[i]:.2f} "
                  f"({sk_w[i]:.3f}) | {st_w[i]:.2f} |")
        ratios = [w / b for b, w in zip(base, withs, strict=True)]
        spans = [w / b for b, w in zip(span_b, span_w, strict=True)]
        print(f"\nspan (first to last round's end): median of the paired ratios "
              f"{statistics.median(spans):.3f}, ratio of medians "
              f"{statistics.median(span_w) / statistics.median(span_b):.3f}")
        print(f"\nmedian round without {statistics.median(base):.3f}s, with "
              f"{statistics.median(withs):.3f}s: ratio of medians "
              f"{statistics.median(withs) / statistics.median(base):.3f}, median of the "
              f"{len(ratios)} paired ratios {statistics.median(ratios):.3f} (min "
              f"{min(ratios):.3f}, max {max(ratios):.3f})")
        for r in rounds:
            if r["store"] and "store_stats" in r:
                st = r["store_stats"]
                per_round = st.get("bytes_in", 0) / max(1, r["store_rounds"])
                print(f"\nstore: peak RSS {r['store_peak'] / MIB:.0f} MiB (cache 256 MiB + "
                      f"backlog 256 MiB), recorded {r['store_rounds']} rounds, dropped "
                      f"{st.get('dropped', 0)} (+{st.get('dropped_by_bus', 0)} by the bus), "
                      f"extra broker bytes to the store "
                      f"{per_round / 1e6:.1f} MB/round (updates into the aggregator: "
                      f"{a.clients * a.params * 4 / 1e6:.1f} MB/round), CPU "
                      f"{r['store_cpu_s']:.1f}s; sketch records "
                      f"{r['record_bytes'] / max(1, len(r['round_s'])) / 1e3:.0f} kB/round, "
                      f"aggregator sketching {r['sketch_cpu_s']:.3f} CPU-s and publishing "
                      f"{r['publish_s']:.3f} s over the run")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
