"""edge/install.sh and `fedbus units` on a booted Debian: the node joins, survives
`kill -9` and a reboot, and rejoins each time."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.deploy.conftest import DeployImages
from tests.deploy.dockerd import Dockerd
from tests.deploy.systemd_check import run_systemd_check

pytestmark = [pytest.mark.deploy, pytest.mark.slow]


@pytest.mark.timeout(1800)
def test_systemd_node_survives_kill_and_reboot(
    dockerd: Dockerd, images: DeployImages, workdir: Path
) -> None:
    # Execute
    res = run_systemd_check(dockerd, workdir / "systemd", images.bases["systemd"],
                            images.torch_index)
    (workdir / "systemd-result.json").write_text(json.dumps(
        {**asdict(res), "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()},
        indent=2))
    print("\n".join(res.events))
    # Assert: installed units, joined; restarted by systemd after kill -9; enabled at boot
    assert "fedbus-pi-0.service" in res.units and "fedbus-trainer@.service" in res.units
    assert res.joined_round is not None
    assert res.restarts_after_kill is not None and res.restarts_after_kill >= 1
    assert res.rejoined_after_kill is not None
    assert res.container_restarted
    assert res.enabled == "enabled" and res.active_after_reboot == "active"
    assert res.rejoined_after_reboot is not None
    # the host's aggregator saw the node go and come back, both times
    assert res.seen_leave_rejoin == [(True, True), (True, True)]
