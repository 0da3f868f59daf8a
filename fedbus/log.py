"""Logging set-up for entry points (the CLI). The library itself never configures logging.

Console output for people, ``--log-json`` for machines; both go to stderr so stdout stays
free for the progress display and the final result line. ``fedbus run`` also attaches a run
folder: every event then lands in ``logs/<node>.jsonl`` there, whatever reaches the console.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import IO, Any, Final

import structlog

__all__ = ["LEVELS", "LogSink", "configure_logging", "worth_a_line"]

LEVELS: Final = ("debug", "info", "warning", "error")


def worth_a_line(count: int) -> bool:
    """Should the ``count``-th occurrence of one refusal be logged? The first ten and then
    every thousandth (each line carries the running total): a flood of forged messages is
    counted in full but written as a few lines, not one a message (~50 us each, enough at
    40,000 messages/s to starve a node's event loop)."""
    return count <= 10 or count % 1000 == 0


def _level(name: str) -> int:
    return logging.getLevelNamesMapping()[name.upper()]


class LogSink:
    """The last structlog processor: writes each event where it belongs, then drops it.

    ``taps`` see every event dict first (the run's progress uses them, e.g. trainers' fit
    times); a tap may lower an event's ``level`` (a simulation's expected dropouts), which
    decides where it goes.
    """

    def __init__(self, *, console_level: int, file_level: int, json_console: bool) -> None:
        self.console_level = console_level
        self.file_level = file_level
        self.json_console = json_console
        self.directory: Path | None = None
        self.taps: list[Callable[[MutableMapping[str, Any]], None]] = []
        self._files: dict[str, IO[str]] = {}
        self._console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def attach(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.directory = None

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        for tap in self.taps:
            tap(event)
        level = _level(str(event.get("level", "info")))
        if self.directory is not None and level >= self.file_level:
            self._file(str(event.get("node") or "fedbus")).write(
                json.dumps(event, default=str) + "\n")
        if level >= self.console_level:
            # sys.stderr is looked up each time: a live display may have redirected it.
            if self.json_console:
                print(json.dumps(event, default=str), file=sys.stderr, flush=True)
            else:
                shown = dict(event)
                shown["timestamp"] = str(shown.get("timestamp", ""))[11:19]
                print(self._console(logger, method, shown), file=sys.stderr, flush=True)
        raise structlog.DropEvent

    def _file(self, node: str) -> IO[str]:
        f = self._files.get(node)
        if f is None:
            assert self.directory is not None
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in node)[:80]
            f = open(self.directory / f"{safe}.jsonl", "a", encoding="utf-8", buffering=1)
            self._files[node] = f
        return f


def configure_logging(*, json: bool = False, level: str = "info",
                      console_level: str | None = None) -> LogSink:
    """Configure structlog once. ``console_level`` (default ``level``) can be stricter than
    ``level``, which is what the run folder's log files get."""
    lvl = _level(level)
    sink = LogSink(console_level=_level(console_level or level), file_level=lvl,
                   json_console=json)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if json else structlog.processors.format_exc_info,
            sink,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiomqtt/paho log through stdlib logging: keep them quiet unless debugging.
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)
    return sink
