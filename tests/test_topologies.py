"""Every topology example reaches the star's accuracy on the same data (issue #9).

Each ``examples/topologies/*.yaml`` other than ``star.yaml`` is run with ``fedbus run`` as a
user would (the command starts the broker or brokers the manifest names, every node, and
prints ``final accuracy=...`` last); its accuracy must be within 2 points of the star's, which
is run once for the session. A new topology example is tested by adding its manifest there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "topologies"
TOLERANCE = 0.02  # two accuracy points
TIMEOUT_S = 300


def run_example(manifest: Path, runs_dir: Path) -> tuple[float, list[str]]:
    """``fedbus run MANIFEST``: the final accuracy it prints and its output lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedbus.cli", "run", str(manifest), "--runs-dir", str(runs_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, (manifest.name, lines[-5:], proc.stderr[-2000:])
    assert lines and lines[-1].startswith("final accuracy="), (manifest.name, lines[-3:])
    return float(lines[-1].split("=", 1)[1]), lines


@pytest.fixture(scope="module")
def star_accuracy(tmp_path_factory: pytest.TempPathFactory) -> float:
    accuracy, _ = run_example(EXAMPLES / "star.yaml", tmp_path_factory.mktemp("runs"))
    return accuracy


# (a compose manifest names its brokers by service name: `fedbus compose` runs it, tested in
# tests/test_compose_generated.py and tests/deploy)
EXAMPLE_MANIFESTS = sorted(p for p in EXAMPLES.glob("*.yaml")
                           if p.name != "star.yaml" and "compose" not in p.name)


def test_the_star_reference_learns(star_accuracy: float) -> None:
    # Assert: the yardstick itself is meaningful (digits, ten non-IID trainers)
    assert star_accuracy >= 0.90


@pytest.mark.parametrize("manifest", EXAMPLE_MANIFESTS, ids=[p.stem for p in EXAMPLE_MANIFESTS])
def test_topology_example_reaches_the_star_accuracy(
    manifest: Path, star_accuracy: float, tmp_path: Path
) -> None:
    # Execute: the example, exactly as its header comment tells a user to run it
    accuracy, lines = run_example(manifest, tmp_path / "runs")
    # Assert
    assert abs(accuracy - star_accuracy) <= TOLERANCE, (manifest.name, accuracy, star_accuracy,
                                                        lines[-4:])
