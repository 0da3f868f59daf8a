"""Compression modes (``codec.update``, ``codec.model``) on the digits example: bytes and
accuracy.

    .venv/bin/python -m benchmarks.bench_update_codec              # every mode, 20 rounds
    .venv/bin/python -m benchmarks.bench_update_codec --modes none,int8 --seeds 0,1

For each mode (and seed) the digits job (examples/digits/manifest.yaml: 10 trainers, FedAvg,
server-side evaluation) runs in this process on the memory bus, exactly as
``fedbus run ... --memory`` runs it, with only ``codec.update``, ``codec.model`` (and
``seed``) changed. Every payload a trainer publishes on its update topic, and every one the
aggregator publishes on its model topic, is counted (as sent, after zstd level 1, i.e. the
bytes the broker would carry, before its fan-out to the 10 trainers). Printed: update and
model bytes per round, their ratios to ``none``,
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
_INT8 = {"mode": "int8", "block": 256}
#: name -> (codec.update, codec.model)
MODES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "none": ({"mode": "none"}, {"mode": "none"}),
    "fp16": ({"mode": "fp16"}, {"mode": "none"}),
    "int8": (_INT8, {"mode": "none"}),
    "topk 0.1": ({"mode": "topk", "fraction": 0.1}, {"mode": "none"}),
    "topk 0.25": ({"mode": "topk", "fraction": 0.25}, {"mode": "none"}),
    "model fp16": ({"mode": "none"}, {"mode": "fp16"}),
    "model int8": ({"mode": "none"}, _INT8),
    "int8 both ways": (_INT8, _INT8),
}


def run_once(codecs: tuple[dict[str, Any], dict[str, Any]],
             seed: int) -> tuple[int, float, float, int, int]:
    """(update bytes sent, final accuracy, seconds, rounds, model bytes broadcast) of one
    digits run."""
    data = yaml.safe_load(MANIFEST.read_text())
    data = copy.deepcopy(data)
    data["seed"] = seed
    data.setdefault("codec", {})["update"] = codecs[0]
    data["codec"]["model"] = codecs[1]
    m = parse_manifest(data, str(MANIFEST))
    sent = model = 0
    original = MemoryBus.publish

    async def counting(self: MemoryBus, topic: str, payload: bytes, *,
                       retain: bool = False) -> None:
        nonlocal sent, model
        if f"/update/{'aggregator'}/" in topic:
            sent += len(payload)
        elif topic.endswith("/model/aggregator"):
            model += len(payload)
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
    return sent, float(found.group(1)), seconds, m.rounds, model


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
    results: dict[str, list[tuple[int, float, float, int, int]]] = {}
    for mode in modes:
        for seed in seeds:
            results.setdefault(mode, []).append(run_once(MODES[mode], seed))
            b, acc, s, r, mb = results[mode][-1]
            print(f"  {mode} seed {seed}: {b / r / 1e3:,.0f} kB/round up, {mb / r / 1e3:,.0f} "
                  f"kB/round model, accuracy {acc:.4f}, {s / r:.2f} s/round",
                  file=sys.stderr, flush=True)
    base = results.get("none")
    print("| update / model mode | update kB/round | model kB/round | update bytes vs none "
          "| model bytes vs none | s/round | final accuracy (mean of seeds) "
          "| accuracy vs none (points) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        kb = statistics.mean(row[0] / row[3] for row in rows) / 1e3
        model_kb = statistics.mean(row[4] / row[3] for row in rows) / 1e3
        acc = statistics.mean(row[1] for row in rows)
        sec = statistics.mean(row[2] / row[3] for row in rows)
        ratio = model_ratio = diff = "–"
        if base is not None:
            ratio, model_ratio = (
                f"{statistics.mean(r[i] for r in base) / statistics.mean(r[i] for r in rows):.2f}x"
                for i in (0, 4))
            diff = f"{100 * (acc - statistics.mean(r[1] for r in base)):+.2f}"
        print(f"| {mode} | {kb:,.1f} | {model_kb:,.1f} | {ratio} | {model_ratio} | {sec:.2f} "
              f"| {acc:.4f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
