"""`fedbus run` of a population manifest as a user sees it: the same run folder as any run
(so `fedbus ls`/`show`/`plot` read it), dropouts counted in the round line rather than warned
about one by one, and a SIGTERM that leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_sim import manifest

ROOT = Path(__file__).resolve().parents[1]


def _fedbus(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_a_simulation_writes_the_run_folder_that_ls_show_and_plot_read(tmp_path: Path) -> None:
    # Prepare: many dropouts (a third of each round), runs under $FEDBUS_RUNS_DIR.
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(manifest(rounds=4, dropout=0.3)))
    env = {**os.environ, "FEDBUS_RUNS_DIR": str(tmp_path / "runs")}
    # Execute
    out = _fedbus("run", str(path), "--workers", "2", "--display", "plain", env=env)
    # Assert: the run folder, as `fedbus run` writes it
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "sim").iterdir()
    names = {p.name for p in run.iterdir()}
    assert {"manifest.yaml", "metrics.jsonl", "summary.json", "model-final.safetensors",
            "model-best.safetensors", "logs"} <= names
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_done"] == 4
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # dropouts: a count in each round line and row, no warning a client on the console
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("round ")]
    assert sum(r["dropouts"] for r in rows) == sum(len(r["lost"]) for r in rows) > 0
    assert all(f"dropouts {r['dropouts']}" in ln for r, ln in zip(rows, lines, strict=True)
               if r["dropouts"])
    assert "node_lost" not in out.stderr
    assert "node_lost" in "".join(p.read_text() for p in (run / "logs").iterdir())
    # ls, show and plot find and read it
    listed = _fedbus("ls", env=env)
    assert listed.returncode == 0 and run.name in listed.stdout
    shown = _fedbus("show", "sim", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "4/4 rounds" in shown.stdout and "model-final.safetensors" in shown.stdout
    pytest.importorskip("matplotlib")
    plotted = _fedbus("plot", "sim", "--out", str(tmp_path / "plots"), env=env)
    assert plotted.returncode == 0, plotted.stderr
    assert any(p.suffix == ".png" for p in (tmp_path / "plots").iterdir())


def test_sigterm_stops_a_simulation_cleanly(tmp_path: Path) -> None:
    # Prepare: a job far too long to finish, its temporary folders in a folder of the test.
    data = manifest(rounds=10_000)
    data["task"]["params"]["fit_s"] = 0.01
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(data))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "FEDBUS_RUNS_DIR": str(tmp_path / "runs"), "TMPDIR": str(temp)}
    proc = subprocess.Popen([sys.executable, "-m", "fedbus.cli", "run", str(path), "--workers",
                             "2", "--display", "plain"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Execute: SIGTERM once the first round is done
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("round "):
                break
        assert list(temp.iterdir()), "the simulation's client-state folder is in TMPDIR"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Assert: 128+SIGTERM, one line saying so, no folder left, the run folder says stopped.
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert list(temp.iterdir()) == []
    (run,) = (tmp_path / "runs" / "sim").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["rounds_done"] >= 1
