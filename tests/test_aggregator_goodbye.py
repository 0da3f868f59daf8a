"""An aggregator stopped by a service manager (SIGTERM: `docker compose down`, `systemctl
stop`) says it is offline: the next instance starts at once instead of waiting as a standby
behind a retained `online` that no will would ever clear (a clean disconnect sends none)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
from pathlib import Path

import pytest

from fedbus.broker import MosquittoProcess
from fedbus.failover import await_leadership, stand_down
from fedbus.manifest import BrokerSpec, load_manifest, with_broker

pytestmark = [pytest.mark.broker]
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples/toy/checkpoint-manifest.yaml"


async def test_a_stopped_aggregator_leaves_no_active_instance_behind(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    # Prepare: an aggregator serving (waiting for its trainers), its presence retained online
    m = load_manifest(MANIFEST)
    m = with_broker(m, dataclasses.replace(m.broker or BrokerSpec(), host=mosquitto.host,
                                           port=mosquitto.port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedbus.cli", "serve", str(MANIFEST), "--node", "aggregator",
        "--broker", f"{mosquitto.host}:{mosquitto.port}", cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(120):  # until it is up: then a second instance would wait
            while True:
                try:
                    await asyncio.wait_for(await_leadership(m, "aggregator"), 5)
                except TimeoutError:
                    break
                await stand_down()  # a probe: it will not run the node
                assert proc.returncode is None
        # Execute: what `docker stop` / `systemctl stop` send
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 60)
        # Assert: it exited as a stopped service does, and a new instance need not wait
        waited = await asyncio.wait_for(await_leadership(m, "aggregator"), 30)
        await stand_down()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0
    assert waited < 5
