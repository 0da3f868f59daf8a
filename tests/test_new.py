"""`fedbus new NAME` writes a project that validates and runs as written (issue #13)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import FEDBUS, ROOT

pytestmark = [pytest.mark.broker, pytest.mark.torch]


def test_new_project_runs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    # PYTHONPATH: this checkout's fedbus, as an installed one would be; no $FEDBUS_RUNS_DIR
    # (the test session sets one): the project's own ./runs is what a user gets
    env = {k: v for k, v in os.environ.items() if k != "FEDBUS_RUNS_DIR"}
    env["PYTHONPATH"] = str(ROOT)

    def fedbus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FEDBUS, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=180)

    # Execute: fedbus new demo && cd demo && fedbus run manifest.yaml
    made = fedbus("new", "demo", cwd=tmp_path)
    project = tmp_path / "demo"
    checked = fedbus("validate", "manifest.yaml", cwd=project)
    ran = fedbus("run", "manifest.yaml", cwd=project)
    again = fedbus("new", "demo", cwd=tmp_path)
    # Assert
    assert made.returncode == 0, made.stderr
    assert {p.name for p in project.iterdir()} >= {"task.py", "manifest.yaml", "README.md"}
    assert checked.returncode == 0, checked.stderr
    assert ran.returncode == 0, ran.stderr[-3000:]
    last = ran.stdout.strip().splitlines()[-1]
    assert last.startswith("final accuracy=")
    assert float(last.split("=")[1]) > 0.7  # four clusters, chance is 0.25
    (run,) = (project / "runs/demo").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert again.returncode == 1 and "not empty" in again.stderr
