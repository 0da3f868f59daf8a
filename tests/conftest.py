"""Shared fixtures. Keep this file small: one fixture a concern."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fedbus.broker import MosquittoProcess, find_mosquitto, spawn_mosquitto
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
