"""Shared fixtures. Keep this file small: one fixture a concern."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker import MosquittoProcess, find_mosquitto, free_port, spawn_mosquitto
from fedbus.deploy.local import SecureMosquitto, spawn_secure_mosquitto
from fedbus.errors import BrokerError
from fedbus.manifest import Manifest


def _need_mosquitto() -> None:
    try:
        find_mosquitto()
    except BrokerError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
async def mosquitto() -> AsyncIterator[MosquittoProcess]:
    """A fresh mosquitto on a free loopback port, killed at teardown.

    Skipped when the binary is missing on a dev box; in CI (env CI set) a missing broker fails.
    """
    _need_mosquitto()
    proc = await spawn_mosquitto()
    try:
        yield proc
    finally:
        await proc.stop()


@pytest.fixture
async def ejabberd() -> AsyncIterator[MosquittoProcess]:
    """ejabberd's MQTT 5 broker (mod_mqtt), a second broker implementation, on a free
    loopback port; killed at teardown. Skipped with the reason when it is not installed on a
    dev box; in CI, where `make system` installs it, its absence fails."""
    from fedbus.broker_ejabberd import ejabberd_installed, spawn_ejabberd

    if not ejabberd_installed():
        why = "ejabberd is not installed: apt-get install -y --no-install-recommends ejabberd"
        if os.environ.get("CI"):
            pytest.fail(why + " (`make system` does)")
        pytest.skip(why + " (or `make system`)")
    proc = await spawn_ejabberd()
    try:
        yield proc
    finally:
        await proc.stop()


SecureBrokerFactory = Callable[..., Awaitable[SecureMosquitto]]


@pytest.fixture
async def secure_mosquitto() -> AsyncIterator[SecureBrokerFactory]:
    """Factory: ``sb = await secure_mosquitto(manifest, tls=False, backend="dynsec")``.

    Starts a mosquitto locked down by the manifest's generated users and rights (mTLS with
    ``tls``); ``sb.manifest`` points every node at it with its own credentials and
    ``sb.password(node)`` gives a node's password (e.g. to play an attacker holding it).
    Every broker started is stopped at teardown.
    """
    _need_mosquitto()
    started: list[SecureMosquitto] = []

    async def start(m: Manifest, **kwargs: Any) -> SecureMosquitto:
        sb = await spawn_secure_mosquitto(m, **kwargs)
        started.append(sb)
        return sb

    try:
        yield start
    finally:
        for sb in started:
            await sb.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port, killed at teardown."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:  # wait until it answers, bounded
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(timeout=10)
