"""What ``fedbus run`` (for a manifest with ``population:``) and ``fedbus worker`` do."""

from __future__ import annotations

import dataclasses

from fedbus.errors import ManifestError
from fedbus.manifest import Manifest
from fedbus.progress import final_line, format_round
from fedbus.services.aggregator import RoundReport
from fedbus.sim.runner import SimResult, run_simulation, run_workers

__all__ = ["simulate", "worker"]


async def simulate(m: Manifest, *, rounds: int | None, memory: bool, workers: int | None,
                   remote_workers: int, quiet: bool = False) -> int:
    """Run a population manifest; print one line a round (unless quiet) and the final
    metric."""
    if rounds is not None:
        m = dataclasses.replace(m, rounds=rounds)
    if memory:
        m = dataclasses.replace(m, broker=None)
    elif m.broker is None:
        raise ManifestError(m.source, "broker", "remote simulation workers join through a "
                            "broker: add broker: {host, port} or pass --broker HOST:PORT")

    def on_report(report: RoundReport) -> None:
        if not quiet:
            print(format_round(report.as_meta(), m.rounds), flush=True)

    result = await run_simulation(m, workers=workers, remote_workers=remote_workers,
                                  on_report=on_report)
    return _final(result)


def _final(result: SimResult) -> int:
    s = result.stats
    print(f"simulation updates={s.updates} dropouts={s.dropouts} "
          f"virtual_time={s.virtual_time:.2f}s workers={len(s.workers)}", flush=True)
    if result.best_round is not None and result.best_score is not None:
        print(f"best round={result.best_round} score={result.best_score:.4f}", flush=True)
    return final_line(result.history, strict=True)


async def worker(m: Manifest, count: int) -> int:
    done = await run_workers(m, count)
    print(f"workers done: {', '.join(f'{k}={v}' for k, v in sorted(done.items()))}", flush=True)
    return 0
