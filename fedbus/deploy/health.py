"""Container health that means "connected": a file a serving node keeps fresh while it is.

``fedbus serve --health-file PATH`` rewrites PATH every few seconds while every bus of the
process is connected and removes it when one is not; the compose healthcheck runs
``python -m fedbus.deploy.health PATH`` which fails when the file is missing or stale. A node
that is up but cut off from the broker is therefore unhealthy, not just a live process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["check", "keep_health_file", "main"]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def keep_health_file(path: str | os.PathLike[str], buses: Iterable[object],
                           interval_s: float = 5.0) -> None:
    """Until cancelled: PATH exists and is fresh exactly while every bus is connected."""
    target = Path(path)
    watched = list(buses)
    try:
        while True:
            ok = all(getattr(b, "connected", True) for b in watched)
            if ok:
                _write(target, f"connected {time.time():.0f}\n")
            else:
                _remove(target)
            await asyncio.sleep(interval_s)  # a refresh period, not a condition wait
    finally:
        _remove(target)


def check(path: str | os.PathLike[str], max_age_s: float) -> bool:
    try:
        age = time.time() - Path(path).stat().st_mtime
    except OSError:
        return False
    return age <= max_age_s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedbus.deploy.health",
                                description="exit 0 if the node wrote its health file lately")
    p.add_argument("path")
    p.add_argument("--max-age", type=float, default=30.0, help="seconds")
    args = p.parse_args(argv)
    if check(args.path, args.max_age):
        return 0
    print(f"unhealthy: {args.path} missing or older than {args.max_age:g}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
