"""What signed messages cost a round: CPU seconds to sign and to check one update and one
broadcast of a P-parameter model, and what that adds to a round of N trainers.

In a synchronous round the aggregator signs one broadcast and checks N updates; each trainer
checks the broadcast and signs its update. So a round costs (N + 1) signatures and 2N checks
of model-sized payloads, spread over N + 1 processes.

    python -m benchmarks.bench_signing                 # 1M and 11M, 7 trials each
    python -m benchmarks.bench_signing --sizes 1M --trials 3 --json signing.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from typing import Any

import numpy as np
from blake3 import blake3

from fedbus.codec import Compression, Envelope, encode
from fedbus.signing import Signer, Verifier, generate_key


def _cpu(fn: Any, *args: Any) -> float:
    started = time.thread_time()
    fn(*args)
    return time.thread_time() - started


def measure(params: int, trials: int) -> dict[str, Any]:
    key, pub = generate_key()
    signer = Signer("t0", key)
    verifier = Verifier({"t0": pub}, required=True)
    env = Envelope(kind="update", job="bench", sender="t0", round=1,
                   meta={"num_examples": 100},
                   tensors={"m/w": np.random.default_rng(0).standard_normal(params,
                                                                            np.float32)})
    payload = encode(env, Compression(level=0))
    signed = signer.sign(payload)
    sign_s = [_cpu(signer.sign, payload) for _ in range(trials)]
    check_s = [_cpu(verifier.verify, signed) for _ in range(trials)]
    sha_s = [_cpu(lambda: hashlib.sha256(payload).digest()) for _ in range(trials)]
    b3_s = [_cpu(lambda: blake3(payload).digest()) for _ in range(trials)]
    return {"params": params, "bytes": len(payload), "trials": trials,
            "sign_cpu_s": statistics.median(sign_s), "check_cpu_s": statistics.median(check_s),
            "sha256_cpu_s": statistics.median(sha_s),
            "blake3_cpu_s": statistics.median(b3_s),
            "sign_spread": [min(sign_s), max(sign_s)],
            "check_spread": [min(check_s), max(check_s)]}


def per_round(row: dict[str, Any], trainers: int) -> float:
    """CPU seconds a synchronous round spends on signatures, all processes together."""
    return (trainers + 1) * row["sign_cpu_s"] + 2 * trainers * row["check_cpu_s"]


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
    print(f"signing cost (load {load:.1f}, {args.trials} trials, medians of thread CPU)")
    print("params       bytes      sign s   check s  blake3 s  sha256 s  round of "
          f"{args.trainers} (CPU s)")
    for params in sizes:
        row = measure(params, args.trials)
        row["round_cpu_s"] = per_round(row, args.trainers)
        row["load"] = load
        rows.append(row)
        print(f"{params:>9,} {row['bytes']:>11,} {row['sign_cpu_s']:>9.4f} "
              f"{row['check_cpu_s']:>9.4f} {row['blake3_cpu_s']:>9.4f} "
              f"{row['sha256_cpu_s']:>9.4f} "
              f"{row['round_cpu_s']:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
