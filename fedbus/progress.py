"""The console view of a running federation: one live display (rich) on a terminal, one plain
line a round otherwise (pipes, CI, tests), nothing with ``--quiet``.

Both views get the same ``RoundView`` rows; the final ``final accuracy=...`` line is printed by
the runner after the display stops, so it is always the last line of stdout.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Display", "DisplayMode", "ProgressState", "final_line", "format_round",
           "make_display"]

DisplayMode = Literal["auto", "live", "plain", "none"]


@dataclass(slots=True)
class ProgressState:
    """What the display shows; the runner updates it, the display reads it."""

    job: str
    rounds: int
    started: float = field(default_factory=time.monotonic)
    first_round_start: float | None = None
    last: dict[str, Any] = field(default_factory=dict)
    done: int = 0
    rejected_total: int = 0
    #: Live reading of who is online (the aggregator's view), if available.
    online: Callable[[], int] | None = None
    trainers: int = 0
    status: str = "starting"

    def update(self, row: Mapping[str, Any]) -> None:
        now = time.monotonic()
        if self.first_round_start is None:
            self.first_round_start = now - float(row.get("seconds", 0.0))
        self.last = dict(row)
        self.done = int(row.get("round", self.done + 1))
        self.rejected_total += sum(row.get("rejected", {}).values())
        self.status = "running"

    def eta_s(self) -> float | None:
        if self.first_round_start is None or self.done <= 0:
            return None
        per = (time.monotonic() - self.first_round_start) / self.done
        return max(0.0, per * (self.rounds - self.done))


def _clock(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def format_round(meta: Mapping[str, Any], rounds: int) -> str:
    """One plain line for a round report (``fedbus watch`` and non-terminal ``run``)."""
    parts = [f"round {meta['round']:>3}/{rounds}",
             f"participants {meta['participants']}/{meta['selected']}"]
    for key in ("train_loss", "loss", "accuracy"):
        if isinstance(meta.get(key), (int, float)):
            parts.append(f"{key} {meta[key]:.4f}")
    lost = meta.get("lost")
    if isinstance(meta.get("dropouts"), int):
        # a simulation: its clients' dropouts are expected, a count says enough
        if meta["dropouts"]:
            parts.append(f"dropouts {meta['dropouts']}")
    elif lost:
        # names for a few, a count for a simulated population's dropouts
        parts.append(f"lost {','.join(lost)}" if len(lost) <= 5 else f"lost {len(lost)}")
    if meta.get("rejected"):
        parts.append(f"rejected {sum(meta['rejected'].values())}")
    if not meta.get("aggregated", True):
        parts.append("NOT AGGREGATED")
    parts.append(f"{meta['seconds']:.2f}s")
    return "  ".join(parts)


class Display(Protocol):
    def start(self) -> None: ...
    def round(self, row: Mapping[str, Any]) -> None: ...
    def stop(self) -> None: ...


class _Quiet:
    def start(self) -> None: ...
    def round(self, row: Mapping[str, Any]) -> None: ...
    def stop(self) -> None: ...


class _Plain:
    def __init__(self, state: ProgressState) -> None:
        self.state = state

    def start(self) -> None: ...

    def round(self, row: Mapping[str, Any]) -> None:
        s = self.state
        line = format_round(row, s.rounds)
        line += f"  elapsed {_clock(time.monotonic() - s.started)}  eta {_clock(s.eta_s())}"
        print(line, flush=True)

    def stop(self) -> None: ...


class _Live:
    """A rich ``Live`` panel redrawn a few times a second (the clock keeps moving between
    rounds); log lines written to stderr meanwhile scroll above it."""

    def __init__(self, state: ProgressState) -> None:
        from rich.console import Console
        from rich.live import Live

        self.state = state
        self.console = Console()
        self.live = Live(_Panel(state), console=self.console, refresh_per_second=4,
                         transient=False, redirect_stderr=True, redirect_stdout=False)

    def start(self) -> None:
        self.live.start()

    def round(self, row: Mapping[str, Any]) -> None:
        self.live.refresh()

    def stop(self) -> None:
        self.live.refresh()
        self.live.stop()


class _Panel:
    def __init__(self, state: ProgressState) -> None:
        self.state = state

    def __rich__(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = self.state
        last = s.last
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True)
        bar = ProgressBar(total=max(s.rounds, 1), completed=s.done, width=30)
        head = Table.grid(padding=(0, 1))
        head.add_row(f"[bold]{s.job}[/]", f"round {s.done}/{s.rounds}", bar,
                     f"elapsed {_clock(time.monotonic() - s.started)}",
                     f"eta {_clock(s.eta_s())}")
        grid.add_row(head)
        online = s.online() if s.online is not None else None
        people = (f"participants {last.get('participants', '-')}/{last.get('selected', '-')}"
                  if last else "waiting for the first round")
        if online is not None:
            people += f"   online {online}/{s.trainers}"
        metrics = "   ".join(f"{k} {last[k]:.4f}" for k in ("train_loss", "loss", "accuracy")
                             if isinstance(last.get(k), (int, float)))
        trouble = f"rejected {s.rejected_total}"
        if isinstance(last.get("dropouts"), int):  # a simulation: counted, as on one line
            trouble += f"   dropouts {last['dropouts']}" if last["dropouts"] else ""
        elif last.get("lost"):
            lost = last["lost"]
            trouble += f"   lost {', '.join(lost)}" if len(lost) <= 5 else f"   lost {len(lost)}"
        grid.add_row(f"{people}   {trouble}")
        if metrics:
            grid.add_row(metrics)
        return grid


def make_display(state: ProgressState, mode: DisplayMode) -> Display:
    if mode == "none":
        return _Quiet()
    if mode == "live" or (mode == "auto" and sys.stdout.isatty()):
        try:
            return _Live(state)
        except ImportError:  # rich is a dependency, but a broken install should not stop a run
            pass
    return _Plain(state)


def final_line(history: Sequence[Any], *, strict: bool) -> int:
    """Print a job's machine-readable last line of stdout; its exit code. A job whose last
    round aggregated nothing says so on stderr; ``strict`` (a simulation, where every client
    is the job's own) makes that exit 1: a simulation that lost its workers used to print the
    last good model and exit 0. A deployment's last round can fail to a lost device or, on
    an open broker, to forged traffic, and the job still ran its rounds: exit 0."""
    last = history[-1] if history else None
    if last is None:
        print("final rounds=0", flush=True)
        return 1
    if last.eval is not None and "accuracy" in last.eval.metrics:
        print(f"final accuracy={last.eval.metrics['accuracy']:.4f}", flush=True)
    elif last.eval is not None:
        print(f"final loss={last.eval.loss:.6g}", flush=True)
    else:
        print(f"final rounds={last.round}", flush=True)
    if not last.aggregated:
        failed = sum(1 for r in history if not r.aggregated)
        print(f"fedbus: the job's last round ({last.round}) aggregated nothing ({failed} of "
              f"{len(history)} rounds failed): the model above is an earlier round's",
              file=sys.stderr, flush=True)
        return 1 if strict else 0
    return 0
