"""A node imports only what its role needs (issue: one house; benchmarks/bench_idle.py
measures the memory this keeps off every device). A fresh interpreter loads the CLI and the
runner and builds one node as `fedbus serve` does; the modules it must not have loaded are
each a few MiB, or a whole other role."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_BUILD = """
import json, sys
import fedbus.cli, fedbus.runner
from fedbus.bus import MemoryBroker
from fedbus.connect import make_bus
from fedbus.manifest import parse_manifest
from fedbus.node import build_node
m = parse_manifest({"version": 1, "job": "lean", "rounds": 1,
                    "task": {"ref": "examples.toy.task:make_task", "params": {"size": 4}},
                    "nodes": [{"id": "agg", "role": "aggregator"},
                              {"id": "ckpt", "role": "checkpointer"}],
                    "trainers": {"count": 1, "prefix": "t", "parent": "agg"}})
build_node(m, sys.argv[1], make_bus(m, m.node(sys.argv[1]), memory=MemoryBroker()))
print(json.dumps(sorted(sys.modules)))
"""

#: Never in a serving node: the progress display's rich (structlog would import it), the
#: simulation, the deployment generators, other roles' services, unused strategies.
NEVER = ("rich", "pygments", "fedbus.sim", "fedbus.deploy.compose", "fedbus.deploy.units",
         "fedbus.services.store", "fedbus.services.ring", "strategies.robust",
         "strategies.scaffold", "importlib.metadata")


@pytest.mark.parametrize("node", ["agg", "ckpt"])
def test_a_node_imports_only_what_its_role_needs(node: str) -> None:
    out = subprocess.run([sys.executable, "-c", _BUILD, node], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert not [m for m in NEVER if m in loaded], sorted(m for m in NEVER if m in loaded)
    if node == "ckpt":  # no task, no selector: no numpy.random (7 MiB)
        assert "numpy.random" not in loaded
