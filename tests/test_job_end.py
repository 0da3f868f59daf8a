"""What `fedbus serve` trainers do when their job is done (README, Docker Compose): on a secured
broker they exit 0 (the `done` is the aggregator's: the ACL says so); on an anonymous broker
anyone could have sent it, so they keep serving until they are stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from fedbus.broker import MosquittoProcess
from fedbus.manifest import load_manifest
from tests.conftest import SecureBrokerFactory
from tests.test_cli import FEDBUS, ROOT, toy

pytestmark = [pytest.mark.broker, pytest.mark.slow]
# Bounds that only cut a hang short; generous so they hold on a busy machine.
_BOUND_S = 240.0


async def _serve(path: Path, node: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *FEDBUS, "serve", str(path), "--node", node, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def _job(path: Path) -> tuple[asyncio.subprocess.Process, int]:
    """Trainers and then the aggregator served; the aggregator's exit code once it is done."""
    trainers = await _serve(path, "t*")
    aggregator = await _serve(path, "aggregator")
    try:
        async with asyncio.timeout(_BOUND_S):
            _, err = await aggregator.communicate()
    except BaseException:
        for p in (trainers, aggregator):
            if p.returncode is None:
                p.kill()
                await p.wait()
        raise
    assert aggregator.returncode == 0, err.decode()[-2000:]
    return trainers, aggregator.returncode


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_trainers_exit_once_the_job_is_done_on_a_secured_broker(
    secure_mosquitto: SecureBrokerFactory, tmp_path: Path
) -> None:
    # Prepare: the toy behind a broker with per-node users and rights
    sb = await secure_mosquitto(load_manifest(toy(tmp_path)))
    path = toy(tmp_path, rounds=2, broker={
        "host": sb.host, "port": sb.port, "max_queued_messages": 100000,
        "password_file": str(sb.files.password_dir / "{node}")})
    # Execute
    trainers, _ = await _job(path)
    try:
        async with asyncio.timeout(_BOUND_S):
            _, err = await trainers.communicate()
    finally:
        await _stop(trainers)
    # Assert: the trainers' process ended by itself, cleanly
    assert trainers.returncode == 0, err.decode()[-2000:]
    assert err.decode().count("job_done") == 3


async def test_trainers_keep_serving_after_the_job_on_an_anonymous_broker(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    # Prepare
    path = toy(tmp_path, rounds=2, broker={"host": mosquitto.host, "port": mosquitto.port,
                                           "max_queued_messages": 100000})
    # Execute: the job, then wait until every trainer has heard `done`
    trainers, _ = await _job(path)
    heard: list[str] = []
    try:
        assert trainers.stderr is not None
        async with asyncio.timeout(_BOUND_S):
            while len(heard) < 3:
                line = (await trainers.stderr.readline()).decode()
                assert line, "the trainers' process ended"
                if "job_done_untrusted" in line:
                    heard.append(line)
        still_serving = trainers.returncode is None
        trainers.send_signal(signal.SIGTERM)
        async with asyncio.timeout(_BOUND_S):
            await trainers.wait()
    finally:
        await _stop(trainers)
    # Assert: still up after `done`, and a signal stops them cleanly
    assert still_serving
    assert trainers.returncode == 0
