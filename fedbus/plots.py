"""``fedbus plot``: PNG charts from run folders' ``metrics.jsonl`` (matplotlib, the 'plot' extra).

Charts: accuracy and loss per round, participation per client, the round-time breakdown and,
for asynchronous runs, the staleness histogram. Several runs share the first and the last, so
strategies can be compared; the per-run charts get one panel per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from fedbus.errors import FedbusError
from fedbus.runs import RunInfo

__all__ = ["SIZE_PX", "plot_runs"]

#: Width and height of every chart in pixels (``figsize`` inches times ``DPI``).
DPI: Final = 100
SIZE_PX: Final = (1000, 600)
_MAX_PANELS: Final = 4


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise FedbusError("`fedbus plot` needs matplotlib: pip install 'fedbus[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _label(run: RunInfo) -> str:
    s = run.summary
    return f"{s.get('job', '?')}/{s.get('run', run.path.name)} ({s.get('strategy', '?')})"


def _series(run: RunInfo, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in run.metrics:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(row["round"]))
            ys.append(float(v))
    return xs, ys


def _figure(plt: Any, rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    fig, axes = plt.subplots(rows, cols, figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI,
                             squeeze=False)
    return fig, axes


def _save(plt: Any, fig: Any, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # rounds are whole numbers
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_runs(runs: Sequence[RunInfo], out: Path) -> list[Path]:
    """Write the charts for ``runs`` into ``out``; returns the files written."""
    if not runs or not any(r.metrics for r in runs):
        raise FedbusError("nothing to plot: the run(s) have no rounds in metrics.jsonl yet")
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = [_metrics_chart(plt, runs, out / "accuracy_loss.png"),
               _participation_chart(plt, runs, out / "participation.png"),
               _time_chart(plt, runs, out / "round_time.png")]
    if any("staleness" in row for r in runs for row in r.metrics):
        written.append(_staleness_chart(plt, runs, out / "staleness.png"))
    return written


def _metrics_chart(plt: Any, runs: Sequence[RunInfo], path: Path) -> Path:
    has_acc = any(_series(r, "accuracy")[0] for r in runs)
    fig, axes = _figure(plt, 1, 2 if has_acc else 1)
    loss_ax = axes[0][-1]
    for run in runs:
        label = _label(run)
        if has_acc:
            axes[0][0].plot(*_series(run, "accuracy"), marker="o", ms=3, label=label)
        line = loss_ax.plot(*_series(run, "loss"), marker="o", ms=3, label=f"{label} eval")
        xs, ys = _series(run, "train_loss")
        if xs:
            loss_ax.plot(xs, ys, ls="--", color=line[0].get_color() if line else None,
                         label=f"{label} train")
    if has_acc:
        axes[0][0].set(title="accuracy per round", xlabel="round", ylabel="accuracy")
        axes[0][0].grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
    loss_ax.set(title="loss per round", xlabel="round", ylabel="loss")
    loss_ax.set_yscale("log")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _participation_chart(plt: Any, runs: Sequence[RunInfo], path: Path) -> Path:
    shown = list(runs)[:_MAX_PANELS]
    fig, axes = plt.subplots(len(shown), 2, figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI),
                             dpi=DPI, squeeze=False, gridspec_kw={"width_ratios": [4, 1]})
    for (ax, bars), run in zip(axes, shown, strict=True):
        clients = sorted({c for row in run.metrics for c in row.get("accepted", [])}
                         | {c for row in run.metrics for c in row.get("lost", [])})
        rounds = [int(row["round"]) for row in run.metrics]
        # 1: update accepted in that round, 0.4: lost in that round, 0: not taking part
        grid = [[0.0] * len(rounds) for _ in clients]
        index = {c: i for i, c in enumerate(clients)}
        for j, row in enumerate(run.metrics):
            for c in row.get("lost", []):
                grid[index[c]][j] = 0.4
            for c in row.get("accepted", []):
                grid[index[c]][j] = 1.0
        counts = [sum(1 for row in run.metrics for a in row.get("accepted", []) if a == c)
                  for c in clients]
        if clients:
            ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="none",
                      extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(clients) - 0.5, -0.5))
            ax.set_yticks(range(len(clients)))
            ax.set_yticklabels(clients, fontsize=6)
            bars.barh(range(len(clients)), counts, color="tab:green")
            bars.set_ylim(len(clients) - 0.5, -0.5)
            bars.set_yticks([])
        ax.set(title=f"participation per client: {_label(run)} (pale: lost)", xlabel="round")
        ax.title.set_fontsize(9)
        bars.set(title=f"updates ({sum(counts)})", xlabel="accepted")
        bars.title.set_fontsize(9)
    return _save(plt, fig, path)


def _time_chart(plt: Any, runs: Sequence[RunInfo], path: Path) -> Path:
    shown = list(runs)[:_MAX_PANELS]
    fig, axes = _figure(plt, len(shown), 1)
    for ax, run in zip((a[0] for a in axes), shown, strict=True):
        rounds, fit, wait, rest = [], [], [], []
        for row in run.metrics:
            seconds = float(row.get("seconds", 0.0))
            wall = float(row.get("wall_s") or seconds)
            f = float(row.get("fit_s_max") or 0.0)
            f = min(f, seconds)
            rounds.append(int(row["round"]))
            fit.append(f)
            wait.append(seconds - f)
            rest.append(max(wall - seconds, 0.0))
        ax.bar(rounds, fit, label="slowest trainer's fit")
        ax.bar(rounds, wait, bottom=fit, label="rest of the round (transfer, waiting)")
        ax.bar(rounds, rest, bottom=[a + b for a, b in zip(fit, wait, strict=True)],
               label="between rounds (aggregate, evaluate)")
        ax.set(title=f"round time: {_label(run)}", xlabel="round", ylabel="seconds")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)


def _staleness_chart(plt: Any, runs: Sequence[RunInfo], path: Path) -> Path:
    fig, axes = _figure(plt)
    ax = axes[0][0]
    from collections import Counter

    from matplotlib.ticker import MaxNLocator

    width = 0.8 / max(len(runs), 1)
    for i, run in enumerate(runs):
        counts = Counter(int(s) for row in run.metrics for s in row.get("staleness", []))
        if counts:
            xs = sorted(counts)
            ax.bar([x + i * width for x in xs], [counts[x] for x in xs], width=width,
                   label=_label(run))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="staleness of accepted updates (model versions behind)",
           xlabel="staleness", ylabel="updates")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)
