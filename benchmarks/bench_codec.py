"""Codec benchmark: fedbus frames vs pickle, torch.save and memcpy on a ResNet-18-sized state.

Run ``python -m benchmarks.bench_codec`` (``--json PATH`` to keep the figures, ``--reps N``,
``--scale F`` to shrink the tensors for a smoke run). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import pickle  # baseline only: never on the wire
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import numpy as np
import zstandard

from fedbus.codec import Compression, Envelope, decode, encode

GB = 1e9
State = dict[str, np.ndarray]


# --- workloads -----------------------------------------------------------------------------


def resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of a torchvision-style ResNet-18 state_dict (11.69M floats)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{leaf}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()  # int64 0-d, as in torch

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    c_in = 64
    for layer, c in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            first_in = c_in if block == 0 else c
            shapes[f"{p}.conv1.weight"] = (c, first_in, 3, 3)
            bn(f"{p}.bn1", c)
            shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
            bn(f"{p}.bn2", c)
            if block == 0 and first_in != c:
                shapes[f"{p}.downsample.0.weight"] = (c, first_in, 1, 1)
                bn(f"{p}.downsample.1", c)
        c_in = c
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _scaled(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    if not shape or scale >= 1:
        return shape
    return (max(1, round(shape[0] * scale)), *shape[1:])


def full_model(rng: np.random.Generator, scale: float) -> State:
    """float32 weights at He-init scale: what trained weights look like to a compressor."""
    out: State = {}
    for name, shape in resnet18_shapes().items():
        shape = _scaled(shape, scale)
        if name.endswith("num_batches_tracked"):
            out[name] = np.array(1000, dtype=np.int64)
        elif name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            out[name] = (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        elif len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(
                np.sqrt(2 / fan_in))
        else:
            out[name] = 0.01 * rng.standard_normal(shape, dtype=np.float32)
    return out


def fp16_update(model: State, rng: np.random.Generator) -> State:
    """A client's delta after local training, sent as float16 (halves the bytes)."""
    return {n: (1e-3 * rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float16)
            for n, a in model.items() if a.dtype == np.float32}


def sparse_delta(model: State, rng: np.random.Generator) -> State:
    """float32 delta with 90% exact zeros (top-10% sparsification, dense on the wire)."""
    out: State = {}
    for n, a in model.items():
        if a.dtype != np.float32:
            continue
        d = 1e-3 * rng.standard_normal(a.shape, dtype=np.float32)
        d[rng.random(a.shape) < 0.9] = 0
        out[n] = d
    return out


# --- methods -------------------------------------------------------------------------------

Codec = tuple[Callable[[State], Any], Callable[[Any], Any]]


def fedbus_codec(compression: Compression) -> Codec:
    def enc(state: State) -> bytes:
        env = Envelope(kind="model", job="bench", sender="agg", round=1, tensors=state)
        return encode(env, compression)

    def dec(frame: bytes) -> Any:
        return decode(frame).tensors

    return enc, dec


def pickle_codec() -> Codec:
    # BASELINE ONLY. fedbus never unpickles: loads() runs code chosen by the sender.
    return (lambda s: pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)), pickle.loads


def torch_codec() -> Codec | None:
    try:
        import torch
    except ImportError:
        return None

    def enc(state: State) -> bytes:
        buf = io.BytesIO()
        # from_numpy shares memory: the conversion is free, the save is what is timed
        torch.save({n: torch.from_numpy(a) for n, a in state.items()}, buf)
        return buf.getvalue()

    def dec(blob: bytes) -> Any:
        return torch.load(io.BytesIO(blob), weights_only=True)

    return enc, dec


@dataclass
class Row:
    workload: str
    method: str
    raw_bytes: int
    wire_bytes: int
    enc_s: float
    dec_s: float
    enc_min_s: float
    dec_min_s: float

    @property
    def enc_gbps(self) -> float:
        return self.raw_bytes / self.enc_s / GB

    @property
    def dec_gbps(self) -> float:
        return self.raw_bytes / self.dec_s / GB


def _median_time(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    """(median, min, last result); the min says what an idle core would do."""
    times = []
    result: Any = None
    for _ in range(reps):
        result = None  # drop the last result before timing the next one
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), result


def bench_codec(workload: str, method: str, codec: Codec, state: State, reps: int) -> Row:
    enc, dec = codec
    raw = sum(a.nbytes for a in state.values())
    enc_s, enc_min, blob = _median_time(lambda: enc(state), reps)
    dec_s, dec_min, out = _median_time(lambda: dec(blob), reps)
    for name, arr in state.items():  # a benchmark of a wrong codec is worthless
        if not np.array_equal(np.asarray(out[name]), arr):
            raise AssertionError(f"{method} did not round-trip {name}")
    return Row(workload, method, raw, len(blob), enc_s, dec_s, enc_min, dec_min)


def bench_memcpy(workload: str, state: State, reps: int) -> list[Row]:
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for a in state.values()])
    dst = np.empty_like(flat)
    copy_s, copy_min, _ = _median_time(lambda: np.copyto(dst, flat), reps)
    fresh_s, fresh_min, _ = _median_time(flat.tobytes, reps)
    n = flat.nbytes
    return [
        Row(workload, "memcpy: np.copyto into existing buffer", n, n, copy_s, copy_s, copy_min,
            copy_min),
        Row(workload, "memcpy: tobytes() into fresh memory", n, n, fresh_s, fresh_s, fresh_min,
            fresh_min),
    ]


def run(reps: int, scale: float, progress: Callable[[str], None]) -> list[Row]:
    rng = np.random.default_rng(0)
    model = full_model(rng, scale)
    workloads = {
        "full model fp32": model,
        "update fp16": fp16_update(model, rng),
        "delta fp32 90% zeros": sparse_delta(model, rng),
    }
    methods: list[tuple[str, Codec | None]] = [
        ("fedbus raw", fedbus_codec(Compression(level=0))),
        ("fedbus zstd-1", fedbus_codec(Compression(level=1))),
        ("fedbus zstd-1 + shuffle", fedbus_codec(Compression(level=1, shuffle=True))),
        ("fedbus zstd-3", fedbus_codec(Compression(level=3))),
        ("pickle (baseline only)", pickle_codec()),
        ("torch.save / load(weights_only)", torch_codec()),
    ]
    rows: list[Row] = []
    for wname, state in workloads.items():
        progress(f"{wname}: {sum(a.size for a in state.values()) / 1e6:.2f}M values")
        rows += bench_memcpy(wname, state, reps)
        for mname, codec in methods:
            if codec is None:
                progress(f"  {mname}: skipped (not installed)")
                continue
            t0 = time.perf_counter()
            rows.append(bench_codec(wname, mname, codec, state, reps))
            progress(f"  {mname}: {time.perf_counter() - t0:.1f}s")
    return rows


# --- report --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal"))
            info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | method | MB raw | MB wire | raw/wire | enc GB/s | dec GB/s "
        "| enc × memcpy | dec × memcpy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    memcpy = {r.workload: r.enc_s for r in rows if r.method.startswith("memcpy: np.copyto")}
    for r in rows:
        base = memcpy[r.workload]
        lines.append(
            f"| {r.workload} | {r.method} | {r.raw_bytes / 1e6:.1f} | {r.wire_bytes / 1e6:.1f} "
            f"| {r.raw_bytes / r.wire_bytes:.2f} | {r.enc_gbps:.2f} | {r.dec_gbps:.2f} "
            f"| {r.enc_s / base:.1f} | {r.dec_s / base:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=3,
                    help="repetitions; the median is reported (3 keeps a 2-core run near 1 min)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink every tensor's first dim by this factor (smoke runs)")
    ap.add_argument("--json", metavar="PATH", help="also write machine info and rows as JSON")
    args = ap.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = run(max(1, args.reps), args.scale, progress)
    elapsed = time.perf_counter() - t0
    info = machine()
    info["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"\nfedbus codec benchmark, median of {args.reps}, {elapsed:.0f}s, "
          f"{info['nproc']} cores, {info.get('cpu')}, 1-min load before/after "
          f"{info['loadavg_1min'][0]}/{info['loadavg_1min'][1]}\n")
    print(table(rows))
    print("\n× memcpy = time / time of np.copyto of the same bytes into an existing buffer.")
    if args.json:
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.bench_codec",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "reps": args.reps,
            "scale": args.scale,
            "elapsed_s": round(elapsed, 1),
            "machine": info,
            "rows": [asdict(r) | {"enc_gbps": r.enc_gbps, "dec_gbps": r.dec_gbps} for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
