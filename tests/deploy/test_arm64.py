"""edge/install.sh in an arm64 userland under qemu (`make deploy-check-arm64`, about 20 minutes
on the 2-core box): a numpy-only node and a torch digits trainer join the host's federation.
Not in `make test`: emulation makes it too slow; its last result is in docs/deploy.md."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.deploy.arm64_check import run_arm64_check
from tests.deploy.dockerd import DeployUnavailable, Dockerd
from tests.deploy.images import import_debian

pytestmark = [
    pytest.mark.deploy, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FEDBUS_DEPLOY_ARM64") != "1",
                       reason="the arm64 check runs by `make deploy-check-arm64` "
                              "(FEDBUS_DEPLOY_ARM64=1)"),
]

ROUNDS = 5


@pytest.mark.timeout(3 * 3600)
def test_arm64_nodes_install_and_join(dockerd: Dockerd, workdir: Path) -> None:
    try:
        image = import_debian(dockerd, "arm64")
    except DeployUnavailable as exc:
        pytest.skip(f"no arm64 userland: {exc}")
    # Execute
    res = run_arm64_check(dockerd, workdir / "arm64", image, rounds=ROUNDS)
    (workdir / "arm64-result.json").write_text(json.dumps(
        {**asdict(res), "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()},
        indent=2))
    print("\n".join(res.events))
    # Assert: an aarch64 userland; both nodes took part in every round
    assert res.uname == "aarch64"
    for kind in ("numpy", "torch"):
        assert res.nodes[kind].rounds_done == ROUNDS, (kind, res.nodes[kind])
