"""`fedbus new NAME` writes a project that validates and runs as written (issue #13): the
commands of docs/write-your-own-task.md, step 1, run in one shell as a user types them."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs import block_with
from tests.test_cli import FEDBUS, ROOT

pytestmark = [pytest.mark.broker, pytest.mark.torch]


def test_new_project_runs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    # PYTHONPATH: this checkout's fedbus, as an installed one would be; no $FEDBUS_RUNS_DIR
    # (the test session sets one): the project's own ./runs is what a user gets
    env = {k: v for k, v in os.environ.items() if k != "FEDBUS_RUNS_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    lines = block_with(ROOT / "docs/write-your-own-task.md", "fedbus new ")
    assert lines[0] == "fedbus new mytask" and lines[1] == "cd mytask"
    fedbus = f'fedbus() {{ {shlex.quote(sys.executable)} -m fedbus.cli "$@"; }}\n'

    # Execute: the guide's block, then `fedbus new` again on the same name
    ran = subprocess.run(["bash", "-c", fedbus + "set -e\n" + "\n".join(lines)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    again = subprocess.run([*FEDBUS, "new", "mytask"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    # Assert
    project = tmp_path / "mytask"
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert {p.name for p in project.iterdir()} >= {"task.py", "manifest.yaml", "README.md"}
    assert "imported  the task" in ran.stdout  # fedbus validate
    last = ran.stdout.strip().splitlines()[-1]
    assert last.startswith("final accuracy=")
    assert float(last.split("=")[1]) > 0.7  # four clusters, chance is 0.25
    (run,) = (project / "runs/mytask").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert again.returncode == 1 and "not empty" in again.stderr
