"""Chunk + reassemble throughput of ``fedbus.bus._chunking`` (no bus, no broker, one core).

    .venv/bin/python -m benchmarks.bench_chunking             # 1 MB and 46 MB payloads
    .venv/bin/python -m benchmarks.bench_chunking --reps 3    # best of 3 (default 5)

For each payload size the sender side (``frames``: header, per-chunk crc32 and whatever
whole-payload check the frame carries) and the receiving side (``Reassembler.feed`` for every
frame, ending in the joined payload and its whole-payload check) are timed separately, best of
``--reps``, with a small ``chunk_bytes`` (256 KiB) and the MQTT bus's default (1 MB; a 1 MB payload
then travels whole, so that row is skipped).
MB/s is payload MB over the time of that side; one sender feeds N receivers in a round, so
the receive column is what the aggregator's broadcast costs each trainer.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

from fedbus.bus._chunking import FRAME_VERSION, Reassembler, frames

MB = 1_000_000
SIZES: tuple[int, ...] = (1 * MB, 4 * MB, 46 * MB)
CHUNKS: tuple[int, ...] = (256 * 1024, 1_000_000)


def _best(fn: object, reps: int) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(size: int, chunk_bytes: int, reps: int) -> tuple[float, float]:
    """Seconds (best of ``reps``) to frame ``size`` bytes, and to reassemble those frames."""
    payload = os.urandom(size)
    parts = list(frames(payload, chunk_bytes))

    def send() -> None:
        for _ in frames(payload, chunk_bytes):
            pass

    def receive() -> None:
        r = Reassembler()
        out = None
        for p in parts:
            out = r.feed("t", p)
        assert out == payload

    return _best(send, reps), _best(receive, reps)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, frame version {FRAME_VERSION}", file=sys.stderr)
    print("| payload | chunk_bytes | frame MB/s | reassemble MB/s |")
    print("|---|---|---|---|")
    for size in SIZES:
        for chunk in CHUNKS:
            if chunk >= size:
                continue  # it would travel whole, untouched: nothing to measure
            send, recv = measure(size, chunk, args.reps)
            print(f"| {size // MB} MB | {chunk:,} | {size / MB / send:,.0f} "
                  f"| {size / MB / recv:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
