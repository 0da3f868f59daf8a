"""compose.yaml without Docker: every fedbus service's command, run as a local process
against a local mosquitto with the service's environment, must complete the job."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from processes import assert_job_finished, exit_codes, reaped

from fedbus.broker import MosquittoProcess
from fedbus.deploy.compose import STATE_DIR

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def fedbus_services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return {name: svc for name, svc in compose["services"].items()
            if isinstance(svc.get("command"), list) and svc["command"][0] == "fedbus"}


def local_command(svc: dict[str, Any]) -> list[str]:
    """The service's arguments with the image's /app as this checkout."""
    return [str(ROOT / a.removeprefix("/app/")) if str(a).startswith("/app/") else str(a)
            for a in svc["command"][1:]]


def local_env(svc: dict[str, Any]) -> dict[str, str]:
    """The service's own settings; what compose would pass through from its shell
    (``${VAR:-}``) and redis (a compose service) are left out."""
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    return {k: v for k, v in env.items() if not v.startswith("${") and k != "FEDBUS_REDIS_URL"}


async def test_compose_services_run_as_local_processes(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    # Prepare: the compose environment, pointed at the local broker, with a short job
    services = fedbus_services()
    assert "aggregator" in services and len(services) >= 3
    async with reaped() as procs:
        for name, svc in services.items():
            # a stateful node works in its volume (working_dir): here, a folder of its own
            cwd = tmp_path / name if svc.get("working_dir") else ROOT
            cwd.mkdir(exist_ok=True)
            own = {k: v.replace(STATE_DIR, str(cwd)) for k, v in local_env(svc).items()}
            env = {**os.environ, **own, "PYTHONPATH": str(ROOT),
                   "FEDBUS_BROKER_HOST": mosquitto.host,
                   "FEDBUS_BROKER_PORT": str(mosquitto.port), "FEDBUS_ROUNDS": "3"}
            procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.cli", *local_command(svc), cwd=cwd, env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: ASYNC230 - a log sink
            )
        # Execute
        out, _ = await asyncio.wait_for(procs["aggregator"].communicate(), 240)
        # An anonymous broker cannot vouch for `done` (anyone could send one), so trainers
        # keep serving after the job; what compose sends on `down` stops them cleanly.
        trainers = {n: p for n, p in procs.items() if n != "aggregator"}
        assert all(p.returncode is None for p in trainers.values())
        for p in trainers.values():
            p.terminate()
        codes = await exit_codes(procs)
    # Assert: every node exited cleanly and the aggregator printed its rounds and result
    assert_job_finished(codes, out, 3, "final accuracy=")
