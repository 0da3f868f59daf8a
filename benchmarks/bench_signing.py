"""What signed messages cost a round: CPU seconds the bus spends to send and to receive one
model-sized payload with signing off and on, and what the difference adds to a round.

In a synchronous round the aggregator signs one broadcast and checks N updates; each trainer
checks the broadcast and signs its update: (N + 1) sends and 2N receives of model-sized
payloads, spread over N + 1 processes. What is timed is the bus's own work on a payload, as
``MqttBus``/``MemoryBus`` do it (fedbus.bus._chunking): a send frames every chunk (with
signing off, after one crc32 pass; with signing on, after one BLAKE3 pass and an Ed25519
signature, the trailer framed beside the payload); a receive feeds every frame to a
reassembler (off: a crc32 of each chunk; on: each chunk hashed as it is fed, then one
Ed25519 check of the joined payload against its split-off trailer). The sockets and the
broker are the same either way and are not timed.

    python -m benchmarks.bench_signing                 # 1M and 11M, 7 trials each
    python -m benchmarks.bench_signing --sizes 1M --trials 3 --json signing.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
from blake3 import blake3

from fedbus.bus._chunking import Reassembler, Tailed, plan
from fedbus.codec import Compression, Envelope, encode
from fedbus.signing import Signer, Verifier, generate_key

CHUNK = 1_000_000  # broker.chunk_bytes's default


def _cpu(fn: Any, *args: Any) -> float:
    started = time.thread_time()
    fn(*args)
    return time.thread_time() - started


def _send(payload: bytes, signer: Signer | None) -> list[bytes]:
    tail = signer.trailer(payload) if signer is not None else b""
    transfer = plan(payload, CHUNK, tail=tail)
    assert transfer is not None
    return [transfer.frame(i) for i in range(transfer.count)]


def _receive(frames: list[bytes], verifier: Verifier | None) -> None:
    r = Reassembler()
    for frame in frames:
        whole = r.feed("u/t0", memoryview(frame))
    if verifier is not None:
        assert isinstance(whole, Tailed)
        verifier.verify_tail(whole.payload, whole.tail, whole.hashed)
    else:
        assert isinstance(whole, bytes)


def measure(params: int, trials: int) -> dict[str, Any]:
    key, pub = generate_key()
    signer = Signer("t0", key)
    verifier = Verifier({"t0": pub}, required=True)
    env = Envelope(kind="update", job="bench", sender="t0", round=1,
                   meta={"num_examples": 100},
                   tensors={"m/w": np.random.default_rng(0).standard_normal(params,
                                                                            np.float32)})
    payload = encode(env, Compression(level=0))
    plain, signed = _send(payload, None), _send(payload, signer)
    row: dict[str, Any] = {"params": params, "bytes": len(payload), "trials": trials}
    runs: dict[str, list[float]] = {k: [] for k in ("send_off", "send_on", "recv_off",
                                                    "recv_on", "blake3")}
    for _ in range(trials):  # interleaved, so a busy moment hits both sides
        runs["send_off"].append(_cpu(_send, payload, None))
        runs["send_on"].append(_cpu(_send, payload, signer))
        runs["recv_off"].append(_cpu(_receive, plain, None))
        runs["recv_on"].append(_cpu(_receive, signed, verifier))
        runs["blake3"].append(_cpu(lambda: blake3(payload).digest()))
    for k, v in runs.items():
        row[f"{k}_cpu_s"] = statistics.median(v)
        row[f"{k}_spread"] = [min(v), max(v)]
    return row


def per_round(row: dict[str, Any], trainers: int, on: str) -> float:
    """CPU seconds the bus spends a synchronous round on model-sized payloads, all
    processes together, with signing ``on`` ("on") or off ("off")."""
    return ((trainers + 1) * row[f"send_{on}_cpu_s"]
            + 2 * trainers * row[f"recv_{on}_cpu_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,11M", help="comma-separated parameter counts")
    ap.add_argument("--trainers", type=int, default=10)
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    sizes = [int(float(s.rstrip("M")) * 1_000_000) if s.endswith("M") else int(s)
             for s in args.sizes.split(",")]
    load = os.getloadavg()[0]
    rows = []
    print(f"the bus's work on one model-sized payload, signing off / on (load {load:.1f}, "
          f"{args.trials} trials interleaved, medians of thread CPU, ms)")
    print(f"{'params':>11} {'bytes':>11} {'send off':>9} {'send on':>8} {'recv off':>9} "
          f"{'recv on':>8} {'blake3':>7}  a round of {args.trainers}: off / on CPU s (+%)")
    for params in sizes:
        row = measure(params, args.trials)
        off = per_round(row, args.trainers, "off")
        on = per_round(row, args.trainers, "on")
        row.update(round_off_cpu_s=off, round_on_cpu_s=on, load=load)
        rows.append(row)
        ms = {k: 1e3 * row[f"{k}_cpu_s"] for k in ("send_off", "send_on", "recv_off",
                                                   "recv_on", "blake3")}
        print(f"{params:>11,} {row['bytes']:>11,} {ms['send_off']:>9.1f} {ms['send_on']:>8.1f} "
              f"{ms['recv_off']:>9.1f} {ms['recv_on']:>8.1f} {ms['blake3']:>7.1f}  "
              f"{off:.3f} / {on:.3f} ({100 * (on - off) / off:+.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
