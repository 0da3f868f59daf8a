"""Run fedbus's benchmarks in sequence: codec, aggregator rounds, simulation (``make bench``).

    .venv/bin/python -m benchmarks            # full: ~1 min codec + ~8 min rounds, 2 cores
    .venv/bin/python -m benchmarks --quick    # smoke run of both, about a minute
    .venv/bin/python -m benchmarks --json-dir out/   # codec.json, rounds.json, sim.json there

Each benchmark prints its markdown table on stdout and progress on stderr; run one alone with
``python -m benchmarks.bench_codec`` or ``python -m benchmarks.bench_rounds`` for its options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import bench_codec, bench_rounds, bench_sim


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (about a minute)")
    p.add_argument("--json-dir", type=Path, help="write codec.json and rounds.json here")
    args = p.parse_args(argv)
    codec_args = ["--scale", "0.01", "--reps", "1"] if args.quick else []
    rounds_args = ["--quick"] if args.quick else []
    sim_args = ["--quick"] if args.quick else []
    if args.json_dir is not None:
        args.json_dir.mkdir(parents=True, exist_ok=True)
        codec_args += ["--json", str(args.json_dir / "codec.json")]
        rounds_args += ["--json", str(args.json_dir / "rounds.json")]
        sim_args += ["--json", str(args.json_dir / "sim.json")]
    print("## Codec\n", flush=True)
    rc = bench_codec.main(codec_args)
    print("\n## Aggregator rounds\n", flush=True)
    rc = max(rc or 0, bench_rounds.main(rounds_args))
    print("\n## Simulation (virtual clients)\n", flush=True)
    return max(rc, bench_sim.main(sim_args))


if __name__ == "__main__":
    sys.exit(main())
