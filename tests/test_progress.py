"""The console views of a run: the live panel (rich) and the plain one-line-a-round view."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from fedbus.progress import ProgressState, _Panel, make_display

ROW = {"round": 3, "selected": 10, "participants": 9, "lost": ["trainer-4"], "seconds": 0.5,
       "aggregated": True, "rejected": {"bad_magic": 2}, "train_loss": 0.31, "loss": 0.4,
       "accuracy": 0.9012}


def state() -> ProgressState:
    s = ProgressState(job="digits", rounds=20, trainers=10, online=lambda: 9)
    s.started = time.monotonic() - 6.0
    s.update(ROW)
    return s


def test_live_panel_shows_round_eta_participants_metrics_rejections() -> None:
    # Prepare
    console = Console(file=io.StringIO(), width=110, record=True, color_system=None)
    # Execute
    console.print(_Panel(state()))
    text = console.export_text()
    # Assert
    assert "digits" in text and "round 3/20" in text
    assert "elapsed 0:06" in text and "eta 0:" in text
    assert "participants 9/10" in text and "online 9/10" in text
    assert "rejected 2" in text and "lost trainer-4" in text
    assert "accuracy 0.9012" in text and "loss 0.4000" in text


def test_plain_view_prints_one_line_a_round(capsys: pytest.CaptureFixture[str]) -> None:
    display = make_display(state(), "plain")
    display.start()
    display.round(ROW)
    display.stop()
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("round   3/20  participants 9/10")
    assert "accuracy 0.9012" in line and "rejected 2" in line and "lost trainer-4" in line
    assert "eta 0:" in line


def test_quiet_view_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    display = make_display(state(), "none")
    display.start()
    display.round(ROW)
    display.stop()
    assert capsys.readouterr().out == ""


def test_a_simulation_s_dropouts_are_a_count_in_both_views(
        capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a simulated round that lost 40 of its 100 clients
    lost = [f"client-{i}" for i in range(40)]
    row = {**ROW, "selected": 100, "participants": 60, "lost": lost, "dropouts": 40}
    s = state()
    s.update(row)
    console = Console(file=io.StringIO(), width=110, record=True, color_system=None)
    display = make_display(s, "plain")
    # Execute
    console.print(_Panel(s))
    display.round(row)
    # Assert: the count, no names
    text, (line,) = console.export_text(), capsys.readouterr().out.splitlines()
    assert "dropouts 40" in text and "dropouts 40" in line
    assert "client-" not in text and "client-" not in line
