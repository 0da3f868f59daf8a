"""Run folders: what a ``fedbus run`` leaves behind, and reading them back (``ls``, ``show``).

Layout: ``<root>/<job>/<run-id>/`` with ``manifest.yaml`` (as run), ``metrics.jsonl`` (one
round report a line), ``model-final.safetensors``, ``model-best.safetensors``, ``logs/``
(one JSON-lines file per node) and ``summary.json``. The root is ``--runs-dir``, else
``$FEDBUS_RUNS_DIR``, else ``./runs``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import yaml

from fedbus.errors import FedbusError
from fedbus.manifest import Manifest
from fedbus.modelfile import write_safetensors

__all__ = ["ENV_VAR", "RunInfo", "RunRecorder", "find_run", "list_runs", "runs_root"]

ENV_VAR: Final = "FEDBUS_RUNS_DIR"
METRICS: Final = "metrics.jsonl"
SUMMARY: Final = "summary.json"
FINAL_MODEL: Final = "model-final.safetensors"
BEST_MODEL: Final = "model-best.safetensors"


def runs_root(flag: str | os.PathLike[str] | None = None) -> Path:
    """Where run folders live: the flag, then ``$FEDBUS_RUNS_DIR``, then ``./runs``."""
    return Path(flag or os.environ.get(ENV_VAR) or "runs")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def manifest_as_run(m: Manifest, overrides: Mapping[str, Any]) -> str:
    """The manifest's source text with command-line overrides applied (comments kept when none)."""
    source = Path(m.source) if m.source and not m.source.startswith("<") else None
    text = source.read_text() if source is not None and source.is_file() else ""
    if not overrides:
        return text
    data = yaml.safe_load(text) if text else {}
    data.update(overrides)
    return "# as run: manifest " + str(source) + " with command-line overrides\n" + \
        yaml.safe_dump(data, sort_keys=False)


class RunRecorder:
    """Writes one run's folder as the rounds come in. Not thread-safe; one per run."""

    def __init__(self, root: Path, m: Manifest, *, overrides: Mapping[str, Any] | None = None,
                 run_id: str | None = None) -> None:
        self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        self.path = root / m.job / self.run_id
        self.path.mkdir(parents=True, exist_ok=False)
        (self.path / "logs").mkdir()
        (self.path / "manifest.yaml").write_text(manifest_as_run(m, overrides or {}))
        self.manifest = m
        self.started = time.time()
        self.rounds = 0
        self.best: dict[str, Any] | None = None
        #: Rounds at which this run resumed from a checkpoint, in this same folder.
        self.resumed: list[dict[str, Any]] = []
        self._metrics = open(self.path / METRICS, "a", encoding="utf-8")
        self._write_summary("running")

    def record(self, row: Mapping[str, Any]) -> bool:
        """Append one round's row; True when it is the best model so far (save it then)."""
        self._metrics.write(json.dumps(row, default=_jsonable) + "\n")
        self._metrics.flush()
        self.rounds += 1
        better = self._rank(row)
        # A run killed outright (kill -9, power) still says how far it got.
        self._write_summary("running")
        return better

    def _rank(self, row: Mapping[str, Any]) -> bool:
        score = _score(row)
        if score is None:
            return False
        if self.best is None or score > self.best["score"]:
            self.best = {"round": row.get("round"), "score": score,
                         "metric": "accuracy" if "accuracy" in row else "loss",
                         "value": row.get("accuracy", row.get("loss"))}
            return True
        return False

    def continue_previous(self, round_: int) -> bool:
        """A job resumed at ``round_`` from a checkpoint continues the folder of the run it
        resumes: the newest other run of the job under the same root, if it did not finish,
        its process is gone and it recorded round 1. Its rows from ``round_`` on (done again
        now) are dropped; rounds the earlier process committed but did not record (it died
        in between) are listed as ``missing`` in ``resumed``. This run's logs so far are
        appended to its logs and this run's own folder is removed. True when that happened
        (``path`` is then that folder).

        Call it before recording anything, with no log file of this folder open.
        """
        others = sorted((p for p in self.path.parent.iterdir()
                         if p.is_dir() and p != self.path and (p / SUMMARY).is_file()),
                        key=lambda p: p.name)
        if self.rounds or not others:
            return False
        prev = _load(others[-1], True)
        if prev.summary.get("status") == "finished" or _alive(prev.summary):
            return False
        rows = [r for r in prev.metrics
                if isinstance(r.get("round"), int) and r["round"] < round_]
        if not rows or min(r["round"] for r in rows) != 1:
            return False
        missing = sorted(set(range(1, round_)) - {r["round"] for r in rows})
        self._metrics.close()
        tmp = prev.path / (METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, prev.path / METRICS)
        for log in sorted((self.path / "logs").glob("*.jsonl")):
            with open(prev.path / "logs" / log.name, "a", encoding="utf-8") as f:
                f.write(log.read_text(encoding="utf-8", errors="replace"))
        shutil.rmtree(self.path, ignore_errors=True)
        self.path, self.run_id = prev.path, prev.path.name
        self.rounds, self.best = 0, None
        for r in rows:
            self.rounds += 1
            self._rank(r)
        with contextlib.suppress(TypeError, ValueError):
            self.started = dt.datetime.fromisoformat(str(prev.summary["started"])).timestamp()
        earlier = prev.summary.get("resumed")
        self.resumed = [*(earlier if isinstance(earlier, list) else []),
                        {"round": round_, "time": _now(), "missing": missing}]
        self._metrics = open(self.path / METRICS, "a", encoding="utf-8")
        self._write_summary("running")
        return True

    def save_model(self, name: str, weights: Mapping[str, np.ndarray], round_: int) -> None:
        write_safetensors(self.path / name, weights,
                          {"job": self.manifest.job, "run": self.run_id, "round": str(round_),
                           "format": "fedbus"})

    def finish(self, status: str, final: Mapping[str, Any] | None) -> dict[str, Any]:
        self._metrics.close()
        return self._write_summary(status, final)

    def _write_summary(self, status: str, final: Mapping[str, Any] | None = None) -> dict[str, Any]:
        m = self.manifest
        summary: dict[str, Any] = {
            "job": m.job, "run": self.run_id, "status": status, "started": _iso(self.started),
            "ended": None if status == "running" else _now(),
            "seconds": round(time.time() - self.started, 3), "rounds_planned": m.rounds,
            "rounds_done": self.rounds, "strategy": m.strategy.name, "task": m.task.ref,
            "trainers": sum(1 for n in m.nodes if n.role == "trainer"),
            "final": dict(final or {}), "best": self.best,
            "host": socket.gethostname(), "pid": os.getpid(),
        }
        if self.resumed:
            summary["resumed"] = self.resumed
        tmp = self.path / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path / SUMMARY)
        return summary


def _alive(summary: Mapping[str, Any]) -> bool:
    """Whether the process that wrote ``summary`` still runs (on this host; another host's
    or an older summary without a pid counts as gone)."""
    pid = summary.get("pid")
    if summary.get("host") != socket.gethostname() or not isinstance(pid, int) \
            or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _score(row: Mapping[str, Any]) -> float | None:
    """Higher is better: accuracy when evaluated, else the negated evaluation loss."""
    acc = row.get("accuracy")
    if isinstance(acc, (int, float)):
        return float(acc)
    loss = row.get("loss")
    if isinstance(loss, (int, float)):
        return -float(loss)
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- reading runs back ------------------------------------------------------------------------

@dataclass(slots=True)
class RunInfo:
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def _load(path: Path, with_metrics: bool) -> RunInfo:
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = {"job": path.parent.name, "run": path.name, "status": "unknown"}
    rows = []
    if with_metrics and (path / METRICS).is_file():
        for line in (path / METRICS).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash; the rest still counts
    return RunInfo(path, summary, rows)


def list_runs(root: Path, job: str | None = None) -> list[RunInfo]:
    """Every run folder under ``root`` (optionally one job), oldest first."""
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob(f"{job or '*'}/*/{SUMMARY}")]
    return [_load(p, False) for p in sorted(found, key=lambda p: p.name)]


def find_run(ref: str, root: Path) -> RunInfo:
    """A run by folder path, ``job/run-id``, run id, run-id prefix, or ``job`` (its latest)."""
    direct = Path(ref)
    if (direct / SUMMARY).is_file() or (direct / METRICS).is_file():
        return _load(direct, True)
    candidates = [r for r in list_runs(root)
                  if ref in (r.name, r.path.name, r.path.parent.name)
                  or r.path.name.startswith(ref)]
    if not candidates:
        known = ", ".join(r.name for r in list_runs(root)[-5:]) or "none yet"
        raise FedbusError(f"no run {ref!r} under {root}/ (latest: {known}); "
                          f"`fedbus ls` lists them, --runs-dir picks another root")
    return _load(candidates[-1].path, True)


def describe_run(run: RunInfo) -> str:
    """What ``fedbus show`` prints: the summary, then a compact per-round table."""
    s = run.summary
    lines = [f"run       {run.name}  ({s.get('status')})", f"folder    {run.path}",
             f"started   {s.get('started')}  took {s.get('seconds')}s",
             f"job       {s.get('job')}: {s.get('rounds_done')}/{s.get('rounds_planned')} rounds, "
             f"{s.get('trainers')} trainers, strategy {s.get('strategy')}, task {s.get('task')}"]
    if s.get("final"):
        lines.append("final     " + "  ".join(f"{k}={_fmt(v)}" for k, v in s["final"].items()))
    if s.get("best"):
        b = s["best"]
        lines.append(f"best      {b['metric']}={_fmt(b['value'])} at round {b['round']}")
    models = [p.name for p in sorted(run.path.glob("*.safetensors"))]
    lines.append("models    " + (", ".join(models) or "none"))
    if run.metrics:
        lines.append("")
        lines.append(f"{'round':>5} {'part.':>6} {'lost':>4} {'rej.':>4} {'loss':>9} "
                     f"{'accuracy':>8} {'seconds':>8} {'MB in':>7}")
        for row in _sample(run.metrics, 30):
            lines.append(
                f"{row.get('round', '?'):>5} {row.get('participants', 0):>3}/"
                f"{row.get('selected', 0):<2} {len(row.get('lost', [])):>4} "
                f"{sum(row.get('rejected', {}).values()):>4} {_fmt(row.get('loss')):>9} "
                f"{_fmt(row.get('accuracy')):>8} {_fmt(row.get('seconds')):>8} "
                f"{row.get('bytes_received', 0) / 1e6:>7.2f}")
    return "\n".join(lines)


def format_logs(run: RunInfo, node: str | None, level: str) -> str:
    """The run's log events (one node's, or all merged by time) at ``level`` or above."""
    order = ("debug", "info", "warning", "error", "critical")
    floor = order.index(level)
    files = [run.path / "logs" / f"{node}.jsonl"] if node else \
        sorted((run.path / "logs").glob("*.jsonl"))
    if node and not files[0].is_file():
        known = ", ".join(p.stem for p in sorted((run.path / "logs").glob("*.jsonl")))
        raise FedbusError(f"run {run.name} has no log of node {node!r}; it has: {known}")
    events = []
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            lvl = str(event.get("level", "info"))
            if lvl in order and order.index(lvl) >= floor:
                events.append(event)
    events.sort(key=lambda e: str(e.get("timestamp", "")))
    out = []
    for e in events:
        rest = "  ".join(f"{k}={v}" for k, v in e.items()
                         if k not in ("timestamp", "level", "event", "node"))
        out.append(f"{str(e.get('timestamp', ''))[11:23]} {e.get('level', ''):<7} "
                   f"{e.get('node', '-'):<12} {e.get('event', '')}  {rest}")
    return "\n".join(out) if out else f"no log events at {level} or above"


def _sample(rows: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    if len(rows) <= limit:
        return list(rows)
    step = len(rows) / limit
    picked = [rows[int(i * step)] for i in range(limit - 1)]
    return [*picked, rows[-1]]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def format_listing(runs: Sequence[RunInfo]) -> str:
    """What ``fedbus ls`` prints: one line a run."""
    if not runs:
        return "no runs yet"
    out = [f"{'RUN':<34} {'STATUS':<9} {'ROUNDS':>7} {'SECONDS':>8}  FINAL"]
    for r in runs:
        s = r.summary
        final = "  ".join(f"{k}={_fmt(v)}" for k, v in (s.get("final") or {}).items())
        out.append(f"{r.name:<34} {s.get('status', '?'):<9} "
                   f"{s.get('rounds_done', '?')!s:>3}/{s.get('rounds_planned', '?')!s:<3} "
                   f"{s.get('seconds', 0):>8}  {final}")
    return "\n".join(out)
