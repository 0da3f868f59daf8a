"""Shared fixtures. Keep this file small: one fixture a concern."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from fedbus.broker import MosquittoProcess, find_mosquitto, spawn_mosquitto
from fedbus.errors import BrokerError


@pytest.fixture
async def mosquitto() -> AsyncIterator[MosquittoProcess]:
    """A fresh mosquitto on a free loopback port, killed at teardown.

    Skipped when the binary is missing on a dev box; in CI (env CI set) a missing broker fails.
    """
    try:
        find_mosquitto()
    except BrokerError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    proc = await spawn_mosquitto()
    try:
        yield proc
    finally:
        await proc.stop()
