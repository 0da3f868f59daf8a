"""The README's "Securing a federation" commands, run as written against a real mosquitto.

`fedbus acl` -> `mosquitto -c .../broker.conf` -> `fedbus run` with `fedbus watch --user ops`
alongside. Needs root (the broker's files go to group mosquitto, as the README says); CI runs
as root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.broker import find_mosquitto, free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "examples" / "toy" / "secure-manifest.yaml"


@pytest.fixture
def project() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the README's broker set-up gives files to group mosquitto: needs root")
    # Under /tmp and 0755: the broker runs as user mosquitto and must reach its files.
    d = Path(tempfile.mkdtemp(prefix="fedbus-readme-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fedbus(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT, check=False)


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_readme_securing_commands_run_a_federation(project: Path) -> None:
    # Prepare: the example manifest where the README's relative paths work
    manifest = project / "secure-manifest.yaml"
    shutil.copy(MANIFEST, manifest)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDBUS_BROKER_PORT": str(port),
           "FEDBUS_ROUNDS": "3"}
    data = project / "data"
    data.mkdir()
    shutil.chown(data, "mosquitto", "mosquitto")
    # Execute: fedbus acl (loopback listener and a private persistence dir for the test)
    acl = _fedbus("acl", str(manifest), "--out", str(project / "secure"), "--operator", "ops",
                  "--group", "mosquitto", "--listen", f"127.0.0.1:{port}",
                  "--persistence-dir", f"{data}/", env=env)
    assert acl.returncode == 0, acl.stderr
    secrets = {p.name: p.read_text().strip() for p in (project / "secure/passwords").iterdir()}
    broker = await asyncio.create_subprocess_exec(
        find_mosquitto(), "-c", str(project / "secure/broker.conf"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    watch = None
    try:
        for _ in range(200):  # polling another process's port, at most 10 s
            if await _listening(port):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"mosquitto did not listen on {port}")
        watch = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fedbus.cli", "watch", str(manifest), "--user", "ops",
            env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert watch.stderr is not None
        async with asyncio.timeout(30):
            while b"watch_started" not in await watch.stderr.readline():
                pass
        run = await asyncio.to_thread(_fedbus, "run", str(manifest), env=env)
        watched, _ = await asyncio.wait_for(watch.communicate(), 60)
    finally:
        for p in (watch, broker):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()
    # Assert: the job finished; the operator saw the rounds; no secret reached any output
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1].startswith("final ")
    assert watched.decode().count("round ") == 3 or "round   3/3" in watched.decode()
    everything = acl.stdout + acl.stderr + run.stdout + run.stderr + watched.decode()
    assert not any(pw in everything for pw in secrets.values())
