"""Nodes as local processes in a test: a set of them that is never left running, their exit
codes, and what a finished job's aggregator printed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

Procs = dict[str, asyncio.subprocess.Process]


@contextlib.asynccontextmanager
async def reaped() -> AsyncIterator[Procs]:
    """A dict to start processes into, by name; whichever still runs on the way out (the test
    failed or timed out) is killed and waited for."""
    procs: Procs = {}
    try:
        yield procs
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()


async def exit_codes(procs: Mapping[str, asyncio.subprocess.Process],
                     timeout: float = 60) -> dict[str, int]:
    return {n: await asyncio.wait_for(p.wait(), timeout) for n, p in procs.items()}


def assert_job_finished(codes: Mapping[str, int], out: bytes | str, rounds: int,
                        last: str = "final ") -> None:
    """Every node exited cleanly and the aggregator printed ``rounds`` rounds, then its
    result (a line starting with ``last``)."""
    assert set(codes.values()) == {0}, codes
    text = out.decode() if isinstance(out, bytes) else out
    lines = text.strip().splitlines()
    assert sum(line.startswith("round ") for line in lines) == rounds
    assert lines[-1].startswith(last)
