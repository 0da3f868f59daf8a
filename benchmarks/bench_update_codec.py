"""Update compression modes (``codec.update``) on the digits example: bytes and accuracy.

    .venv/bin/python -m benchmarks.bench_update_codec              # every mode, 20 rounds
    .venv/bin/python -m benchmarks.bench_update_codec --modes none,int8 --seeds 0,1

For each mode (and seed) the digits job (examples/digits/manifest.yaml: 10 trainers, FedAvg,
server-side evaluation) runs in this process on the memory bus, exactly as
``fedbus run ... --memory`` runs it, with only ``codec.update`` (and ``seed``) changed. Every
payload a trainer publishes on its update topic is counted (as sent, after zstd level 1, i.e.
the bytes the broker would carry). Printed: update bytes per round, the ratio to ``none``,
the wall time per round (after one warm-up run), and the final accuracy with its
difference to ``none`` (same seeds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import io
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedbus.bus.memory import MemoryBus
from fedbus.log import configure_logging
from fedbus.manifest import parse_manifest
from fedbus.runner import RunOptions, run_federation

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "examples" / "digits" / "manifest.yaml"
MODES: dict[str, dict[str, Any]] = {
    "none": {"mode": "none"},
    "fp16": {"mode": "fp16"},
    "int8": {"mode": "int8", "block": 256},
    "topk 0.1": {"mode": "topk", "fraction": 0.1},
    "topk 0.25": {"mode": "topk", "fraction": 0.25},
}


def run_once(update: dict[str, Any], seed: int) -> tuple[int, float, float, int]:
    """(update bytes sent, final accuracy, seconds, rounds) of one digits run."""
    data = yaml.safe_load(MANIFEST.read_text())
    data = copy.deepcopy(data)
    data["seed"] = seed
    data.setdefault("codec", {})["update"] = update
    m = parse_manifest(data, str(MANIFEST))
    sent = 0
    original = MemoryBus.publish

    async def counting(self: MemoryBus, topic: str, payload: bytes, *,
                       retain: bool = False) -> None:
        nonlocal sent
        if f"/update/{'aggregator'}/" in topic:
            sent += len(payload)
        await original(self, topic, payload, retain=retain)

    out = io.StringIO()
    MemoryBus.publish = counting  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            rc = asyncio.run(run_federation(m, RunOptions(memory=True, display="none"), None))
        seconds = time.perf_counter() - t0
    finally:
        MemoryBus.publish = original  # type: ignore[method-assign]
    found = re.search(r"final accuracy=([0-9.]+)", out.getvalue())
    if rc != 0 or found is None:
        raise SystemExit(f"digits run failed (rc {rc}): {out.getvalue()[-500:]}")
    return sent, float(found.group(1)), seconds, m.rounds


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    p.add_argument("--seeds", default="0", help="comma-separated manifest seeds")
    args = p.parse_args(argv)
    configure_logging(level="error")
    modes = [m.strip() for m in args.modes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          file=sys.stderr)
    run_once(MODES["none"], seeds[0])  # warm-up: imports and first-use costs off the clock
    results: dict[str, list[tuple[int, float, float, int]]] = {}
    for mode in modes:
        for seed in seeds:
            results.setdefault(mode, []).append(run_once(MODES[mode], seed))
            b, acc, s, r = results[mode][-1]
            print(f"  {mode} seed {seed}: {b / r / 1e3:,.0f} kB/round, accuracy {acc:.4f}, "
                  f"{s / r:.2f} s/round", file=sys.stderr, flush=True)
    base = results.get("none")
    print("| update mode | update kB/round | bytes vs none | s/round | final accuracy "
          "(mean of seeds) | accuracy vs none (points) |")
    print("|---|---|---|---|---|---|")
    for mode, rows in results.items():
        kb = statistics.mean(b / r for b, _, _, r in rows) / 1e3
        acc = statistics.mean(a for _, a, _, _ in rows)
        sec = statistics.mean(s / r for _, _, s, r in rows)
        ratio = diff = "–"
        if base is not None:
            mean_bytes = statistics.mean(b for b, *_ in rows)
            ratio = f"{statistics.mean(b for b, *_ in base) / mean_bytes:.2f}x"
            diff = f"{100 * (acc - statistics.mean(a for _, a, _, _ in base)):+.2f}"
        print(f"| {mode} | {kb:,.1f} | {ratio} | {sec:.2f} | {acc:.4f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
