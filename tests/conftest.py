"""Shared fixtures. Keep this file small: one fixture a concern."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker import MosquittoProcess, find_mosquitto, free_port, spawn_mosquitto
from fedbus.deploy.local import SecureMosquitto, spawn_secure_mosquitto
from fedbus.errors import BrokerError
from fedbus.manifest import Manifest
from fedbus.runs import ENV_VAR as RUNS_ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
# Tool caches and environments a test session may touch; anything else that appears in or
# vanishes from the checkout during a session is a test writing outside its temp folders.
# (.deploy/ is the deployment checks' documented work folder and image cache: tests/deploy)
_NOT_CHECKED = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                "fedbus.egg-info", "node_modules", ".deploy"}


_runs_key = pytest.StashKey[tuple[str, str | None]]()
_paths_key = pytest.StashKey[set[str]]()


def _checkout_paths() -> set[str]:
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _NOT_CHECKED]
        rel = os.path.relpath(dirpath, ROOT)
        found.update(os.path.normpath(os.path.join(rel, n)) for n in (*dirnames, *filenames))
    return found


def _outputs(paths: list[str]) -> list[str]:
    """The paths git ignores: what programs write (runs/, checkpoints/, secrets), not the
    source files a developer adds while the tests run. All of them without git."""
    if not paths:
        return []
    try:
        found = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT,
                               input="\n".join(paths), capture_output=True, text=True,
                               timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return paths
    if found.returncode not in (0, 1):  # 1: none ignored; 128: not a git checkout
        return paths
    ignored = set(found.stdout.splitlines())
    return [p for p in paths if p in ignored]


def pytest_configure(config: pytest.Config) -> None:
    # Run folders of every `fedbus run` a test starts (in this process or a child, which
    # inherits the variable) go to a session temp root, never to the user's ./runs.
    root = tempfile.mkdtemp(prefix="fedbus-test-runs-")
    config.stash[_runs_key] = (root, os.environ.get(RUNS_ENV_VAR))
    os.environ[RUNS_ENV_VAR] = root
    config.stash[_paths_key] = _checkout_paths()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _runs_key not in config.stash:
        return
    root, before = config.stash[_runs_key]
    shutil.rmtree(root, ignore_errors=True)
    if before is None:
        os.environ.pop(RUNS_ENV_VAR, None)
    else:
        os.environ[RUNS_ENV_VAR] = before


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when tests created or removed output files in the checkout (runs/,
    checkpoints/, generated secrets: what git ignores)."""
    before = session.config.stash.get(_paths_key, None)
    if before is None:
        return
    after = _checkout_paths()
    created, removed = _outputs(sorted(after - before)), _outputs(sorted(before - after))
    if not created and not removed:
        return
    lines = [f"  + {p}" for p in created[:20]] + [f"  - {p}" for p in removed[:20]]
    more = len(created) + len(removed) - len(lines)
    print(f"\nthe test session wrote outside its temporary folders ({ROOT}):\n"
          + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else ""))
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



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
