"""Checkpoint size and write/read latency at 1M and 11M float32 parameters.

    .venv/bin/python -m benchmarks.bench_checkpoint [--redis redis://127.0.0.1:6379/0]

The state is what a FedAdam aggregator checkpoints: the model plus the optimizer's first and
second moments (3 model-sized arrays) and a selector state. Disk writes are the real atomic
path (temporary file, fsync, rename, fsync of the folder); the frame is encoded by the codec
without compression, as the aggregator sends it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from fedbus.checkpoint import AggregatorState, DiskStore, RedisStore, state_envelope
from fedbus.codec import Compression, encode


def measure(params: int, store: object, reps: int = 3) -> tuple[int, float, float, float]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=params).astype(np.float32)
    state = AggregatorState(job="bench", node="agg", round=1, weights={"w": w},
                            strategy={"m": {"w": w.copy()}, "v": {"w": w.copy()}, "t": 1},
                            selector={"rng": {"state": 2 ** 70}})
    t0 = time.perf_counter()
    frame = encode(state_envelope(state), Compression(level=0))
    enc = time.perf_counter() - t0
    writes, reads = [], []
    for r in range(reps):
        t0 = time.perf_counter()
        store.save("bench", "agg", r + 1, frame)  # type: ignore[attr-defined]
        writes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.latest("bench", "agg")  # type: ignore[attr-defined]
        reads.append(time.perf_counter() - t0)
    return len(frame), enc, statistics.median(writes), statistics.median(reads)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_checkpoint")
    p.add_argument("--redis", help="also measure a Redis store at this URL")
    args = p.parse_args(argv)
    print("| store | params | checkpoint MB | encode ms | write ms (median of 3) | read ms |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="fedbus-ckpt-") as tmp:
        stores: list[tuple[str, object]] = [("disk", DiskStore(tmp, keep=2))]
        if args.redis:
            stores.append(("redis", RedisStore(args.redis, keep=2)))
        for name, store in stores:
            for params in (1_000_000, 11_000_000):
                size, enc, write, read = measure(params, store)
                print(f"| {name} | {params / 1e6:g}M | {size / 1e6:.1f} | {enc * 1e3:.0f} | "
                      f"{write * 1e3:.0f} | {read * 1e3:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
