"""`fedbus units`: each generated unit passes `systemd-analyze verify`, and its ExecStart line,
run as a local process with its environment file, serves its node of a federation that
finishes behind a locked-down local broker."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from processes import assert_job_finished, exit_codes, reaped

from fedbus.deploy.security import write_broker_security
from fedbus.deploy.units import write_unit
from fedbus.manifest import Manifest, load_manifest
from tests.conftest import SecureBrokerFactory

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/opt/fedbus"

_MANIFEST = """\
version: 1
job: edgetoy
rounds: 3
broker:
  host: ${FEDBUS_BROKER_HOST}
  port: ${FEDBUS_BROKER_PORT:-1883}
  password_env: FEDBUS_BROKER_PASSWORD
round: {deadline_s: 20, quorum: 1.0, min_clients: 2, start_timeout_s: 30}
task: {ref: "examples.toy.task:make_task", params: {size: 500}}
nodes: [{id: aggregator, role: aggregator}]
trainers: {count: 2, prefix: pi-}
"""


def _project(tmp_path: Path, host: str = "10.0.0.5", port: int = 1883) -> Manifest:
    (tmp_path / "m.yaml").write_text(_MANIFEST)
    return load_manifest(tmp_path / "m.yaml",
                         env={"FEDBUS_BROKER_HOST": host, "FEDBUS_BROKER_PORT": str(port)})


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


@pytest.mark.parametrize("systemd_version", [252, 254])
def test_generated_units_pass_systemd_analyze_verify(tmp_path: Path, systemd_version: int) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is required in CI")
        pytest.skip("systemd-analyze is not installed")
    m = _project(tmp_path)
    for node in m.nodes:
        files = write_unit(m, node.id, tmp_path / "units", systemd_version=systemd_version,
                           values={"FEDBUS_BROKER_HOST": "10.0.0.5"})
        # verify checks that ExecStart exists; point it at a binary this machine has.
        text = files.unit.read_text().replace(f"{PREFIX}/venv/bin/fedbus", "/bin/true")
        if systemd_version >= 254:  # this machine's systemd may predate the backoff keys
            text = "\n".join(x for x in text.splitlines() if not x.startswith("RestartS")
                             and not x.startswith("RestartMax"))
        probe = tmp_path / files.name
        probe.write_text(text)
        # Execute
        proc = subprocess.run([analyze, "verify", "--man=no", str(probe)], capture_output=True,
                              text=True, timeout=60, check=False)
        # Assert
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Unknown" not in out and "ignoring" not in out, out
        assert f"SyslogIdentifier=fedbus-{node.id}\n" in files.unit.read_text()
        assert files.env.stat().st_mode & 0o007 == 0


@pytest.mark.broker
async def test_each_units_execstart_serves_its_node(
    tmp_path: Path, secure_mosquitto: SecureBrokerFactory
) -> None:
    # Prepare: users and passwords from `fedbus acl`, a broker holding them, one unit per node
    m = _project(tmp_path)
    sec = write_broker_security(m, tmp_path / "secure", plugin="/unused.so")
    sb = await secure_mosquitto(m, passwords=sec.passwords)
    async with reaped() as procs:
        for node in m.nodes:
            files = write_unit(m, node.id, tmp_path / "units", password=sec.passwords[node.id],
                               values={"FEDBUS_BROKER_HOST": sb.host,
                                       "FEDBUS_BROKER_PORT": str(sb.port)})
            line = next(x for x in files.unit.read_text().splitlines()
                        if x.startswith("ExecStart="))
            argv = shlex.split(line.removeprefix("ExecStart="))
            assert argv[0] == f"{PREFIX}/venv/bin/fedbus"
            env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
                   **_env_file(files.env)}
            # Execute: the unit's command line, with this venv's fedbus and its env file only
            procs[node.id] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.cli", *argv[1:], cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(procs["aggregator"].communicate(), 120)
        codes = await exit_codes(procs)
    # Assert: every node authenticated with its own password and the job finished
    assert_job_finished(codes, out, 3)


def _units(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedbus.cli", "units", *args], cwd=ROOT,
                          env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
                               **(env or {})}, capture_output=True, text=True, timeout=120,
                          check=False)


def test_units_refuse_a_node_whose_manifest_names_no_broker(tmp_path: Path) -> None:
    # Execute: the topology examples let `fedbus run` start the broker; a device cannot
    proc = _units("examples/topologies/star.yaml", "--node", "trainer-0", "--out",
                  str(tmp_path))
    # Assert: refused, nothing written, the fix named
    assert proc.returncode != 0
    assert "names no broker" in proc.stderr and "--broker HOST:PORT" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_units_broker_option_goes_into_execstart(tmp_path: Path) -> None:
    proc = _units("examples/topologies/star.yaml", "--node", "trainer-0", "--out",
                  str(tmp_path), "--broker", "10.0.0.5:1884")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in (tmp_path / "fedbus-trainer-0.service").read_text().splitlines()
                if x.startswith("ExecStart="))
    assert line.endswith("--node trainer-0 --broker 10.0.0.5:1884")


def test_units_refuse_missing_credentials_and_warn_on_a_missing_password(
    tmp_path: Path
) -> None:
    text = _MANIFEST.replace("  password_env: FEDBUS_BROKER_PASSWORD\n",
                             "  password_file: secure/passwords/{node}\n")
    (tmp_path / "m.yaml").write_text(text)
    env = {"FEDBUS_BROKER_HOST": "10.0.0.5"}
    # Execute: the node's password file is not on this device
    proc = _units(str(tmp_path / "m.yaml"), "--node", "pi-0", "--out", str(tmp_path / "u"),
                  env=env)
    # Assert
    assert proc.returncode != 0
    assert "broker.password_file of pi-0" in proc.stderr and "fedbus acl" in proc.stderr
    # a user name with no password yet: written, with a warning that says where it goes
    (tmp_path / "m2.yaml").write_text(_MANIFEST.replace(
        "  password_env: FEDBUS_BROKER_PASSWORD\n",
        "  username: pi\n  password_env: FEDBUS_BROKER_PASSWORD\n"))
    proc = _units(str(tmp_path / "m2.yaml"), "--node", "pi-0", "--out", str(tmp_path / "u2"),
                  env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "FEDBUS_BROKER_PASSWORD" in proc.stderr
    assert "/etc/fedbus/pi-0.env" in proc.stderr


def test_units_refuse_a_broker_of_brokers_without_an_address(tmp_path: Path) -> None:
    proc = _units("examples/topologies/three-level-bridged.yaml", "--node", "trainer-0",
                  "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "broker 'site', which has no host and port" in proc.stderr
