"""The README's "Securing a federation" command blocks, run as written against a real mosquitto
that drops root to its own user, as Debian's does.

The blocks are read from README.md (tests/docs.py) and run in a scratch copy of the project,
so the relative paths work as they do for a user. What the test adds, to share the machine:
`fedbus acl` gets `--listen 127.0.0.1:PORT --persistence-dir DIR/` (a free loopback port and
a private persistence folder instead of 0.0.0.0:1883 and /var/lib/mosquitto/), and
`fedbus dashboard` a free `--port`. Needs root (the broker's files go to group mosquitto, as
the README says); CI runs as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedbus.broker import find_mosquitto, free_port
from tests.docs import ROOT, block_with

pytestmark = [pytest.mark.broker, pytest.mark.slow]
README = ROOT / "README.md"
# Generous bounds: they only cut a hang short, and hold on a busy machine.
_STEP_S = 180.0


@pytest.fixture
def project() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the README's broker set-up gives files to group mosquitto: needs root")
    # Under /tmp and 0755: the broker runs as user mosquitto and must reach its files.
    d = Path(tempfile.mkdtemp(prefix="fedbus-readme-"))
    d.chmod(0o755)
    try:
        (d / "examples").mkdir(mode=0o755)
        shutil.copy(ROOT / "examples" / "__init__.py", d / "examples")
        shutil.copytree(ROOT / "examples" / "toy", d / "examples" / "toy",
                        ignore=shutil.ignore_patterns("secure", "certs", "__pycache__"))
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Recipe:
    """A README block being run in ``cwd``: its finished commands and background processes."""

    cwd: Path
    port: int
    env: dict[str, str]
    done: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    background: list[asyncio.subprocess.Process] = field(default_factory=list)

    def argv(self, line: str) -> list[str]:
        words = shlex.split(line)
        if words[0] == "fedbus":
            words = [sys.executable, "-m", "fedbus.cli", *words[1:]]
            if words[3] == "acl":
                data = self.cwd / "broker-data"
                data.mkdir(exist_ok=True)
                shutil.chown(data, "mosquitto", "mosquitto")
                words += ["--listen", f"127.0.0.1:{self.port}", "--persistence-dir", f"{data}/"]
        elif words[0] == "mosquitto":
            words[0] = find_mosquitto()
        return words

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.argv(line), cwd=self.cwd, env=self.env, capture_output=True,
                           text=True, timeout=_STEP_S, check=False)
        self.done[line] = r
        return r

    async def start(self, line: str, *extra: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(line), *extra, cwd=self.cwd, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.background.append(proc)
        return proc

    async def broker(self, line: str) -> None:
        proc = await self.start(line)
        async with asyncio.timeout(_STEP_S):
            while not await _listening(self.port):
                if proc.returncode is not None:
                    assert proc.stdout is not None
                    pytest.fail(f"{line} exited {proc.returncode}: "
                                f"{(await proc.stdout.read()).decode()[-2000:]}")
                await asyncio.sleep(0.05)  # polling another process's port

    async def stop(self) -> None:
        for p in reversed(self.background):
            if p.returncode is None:
                p.kill()
            await p.wait()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def _stderr_until(proc: asyncio.subprocess.Process, needle: bytes) -> bytes:
    assert proc.stderr is not None
    async with asyncio.timeout(_STEP_S):
        while True:
            line = await proc.stderr.readline()
            if needle in line or not line:
                return line


def _recipe(project: Path) -> Recipe:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDBUS_BROKER_PORT": str(port),
           "FEDBUS_ROUNDS": "3"}
    return Recipe(cwd=project, port=port, env=env)


def _secrets(folder: Path) -> list[str]:
    return [p.read_text().strip() for p in (folder / "passwords").iterdir()]


async def test_readme_securing_commands_run_a_federation(project: Path) -> None:
    # Prepare: the README's block, in order: acl, mosquitto, run, and watch beside the run
    acl, broker, run, watch = block_with(README, "--operator ops")
    assert acl.startswith("fedbus acl ") and broker.startswith("mosquitto -c ")
    assert run.startswith("fedbus run ") and watch.startswith("fedbus watch ")
    dashboard = f"fedbus dashboard {run.split()[2]} --user ops"
    assert f"`{dashboard}`" in README.read_text()  # the README's dashboard line, as written
    r = _recipe(project)
    try:
        # Execute
        assert r.run(acl).returncode == 0, r.done[acl].stderr
        await r.broker(broker)
        watcher = await r.start(watch)
        assert b"watch_started" in await _stderr_until(watcher, b"watch_started")
        ran = await asyncio.to_thread(r.run, run)
        watched, _ = await asyncio.wait_for(watcher.communicate(), _STEP_S)
        # ... then the dashboard, as the same operator, beside a second run of the job
        port = free_port()
        page = await r.start(dashboard, "--port", str(port))
        assert b"dashboard on" in await _stderr_until(page, b"dashboard on")
        again = await asyncio.to_thread(r.run, run)
        state = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/state"))
    finally:
        await r.stop()
    # Assert: the job finished twice; the operator saw the rounds; no secret reached any output
    for done in (ran, again):
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1].startswith("final ")
    assert "round   3/3" in watched.decode()
    assert state["round"] == 3 and {n["id"] for n in state["nodes"]} == {
        "aggregator", "t0", "t1", "t2"}
    everything = "".join(c.stdout + c.stderr for c in r.done.values()) + watched.decode()
    assert not any(pw in everything for pw in _secrets(project / "examples/toy/secure"))


async def test_readme_mutual_tls_commands_run_a_federation(project: Path) -> None:
    # Prepare: the README's mTLS block: certs, acl --certs --group, mosquitto, run
    lines = block_with(README, "fedbus certs ")
    certs, acl, broker, run = lines
    r = _recipe(project)
    try:
        # Execute
        assert r.run(certs).returncode == 0, r.done[certs].stderr
        assert r.run(acl).returncode == 0, r.done[acl].stderr
        await r.broker(broker)
        ran = await asyncio.to_thread(r.run, run)
    finally:
        await r.stop()
    # Assert: the broker, running as user mosquitto, read its 0640 key; the job finished
    key = project / "examples/toy/certs/broker.key"
    assert key.stat().st_mode & 0o777 == 0o640 and key.group() == "mosquitto"
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().splitlines()[-1].startswith("final ")
    assert "tls_cert" in (project / "examples/toy/mtls-manifest.yaml").read_text()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_STEP_S) as resp:
        body: bytes = resp.read()
        return body
