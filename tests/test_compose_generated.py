"""`fedbus compose` for any manifest: valid compose files whose services finish a federation.

Without Docker: ``docker-compose config`` (Debian's docker-compose works without a daemon)
validates each generated file, and every node service's command runs as a local process
against a local mosquitto (a locked-down one for the secured variant) with the same arguments.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker import MosquittoProcess
from fedbus.deploy.compose import HEALTH_FILE, compose_config, compose_yaml
from fedbus.manifest import Manifest, load_manifest
from tests.conftest import SecureBrokerFactory

ROOT = Path(__file__).resolve().parents[1]

_SECURE_MANIFEST = """\
version: 1
job: toysec
rounds: 4
broker:
  host: mosquitto
  port: 1883
  chunk_bytes: 1024
  password_file: secure/passwords/{node}
  tls_ca: certs/ca.crt
  tls_cert: certs/nodes/{node}.crt
  tls_key: certs/nodes/{node}.key
round: {deadline_s: 20, quorum: 1.0, min_clients: 3, start_timeout_s: 30}
task: {ref: "examples.toy.task:make_task", params: {size: 2000, lr: 0.5, delay_s: 0.2}}
nodes: [{id: aggregator, role: aggregator}]
trainers: {count: 3, prefix: t}
"""


def _secure_project(tmp_path: Path, *, tls: bool) -> tuple[Path, Manifest]:
    proj = tmp_path / "proj"
    proj.mkdir()
    lines = _SECURE_MANIFEST.splitlines(keepends=True)
    if not tls:
        lines = [ln for ln in lines if not ln.lstrip().startswith("tls_")]
    (proj / "m.yaml").write_text("".join(lines))
    return proj, load_manifest(proj / "m.yaml")


def _docker_compose() -> str:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (apt-get install docker-compose)")
        pytest.skip("docker-compose is not installed")
    return tool


def test_compose_yaml_is_what_fedbus_compose_generates() -> None:
    m = load_manifest(ROOT / "examples/digits/compose-manifest.yaml", env={})
    # Execute
    expected = compose_yaml(m, "examples/digits/compose-manifest.yaml", redis=True)
    # Assert: regenerate with `fedbus compose examples/digits/compose-manifest.yaml --redis
    # --out compose.yaml` when this fails
    assert (ROOT / "compose.yaml").read_text() == expected


def test_secured_compose_mounts_only_each_nodes_own_secrets(tmp_path: Path) -> None:
    proj, m = _secure_project(tmp_path, tls=True)
    (proj / "certs" / "nodes").mkdir(parents=True)
    # Execute
    doc = compose_config(m, "m.yaml", secure_dir="secure", certs_dir="certs", root=proj)
    # Assert
    t1 = doc["services"]["t1"]["volumes"]
    assert "./secure/passwords/t1:/app/secure/passwords/t1:ro" in t1
    assert "./certs/nodes/t1.key:/app/certs/nodes/t1.key:ro" in t1
    assert not any("/t0" in v or "/aggregator" in v for v in t1)
    broker = doc["services"]["mosquitto"]
    assert broker["command"][-1] == "/mosquitto/config/fedbus/broker.conf"
    conf = (proj / "secure" / "broker.conf").read_text()
    assert "use_identity_as_username true" in conf and "allow_anonymous false" in conf


@pytest.mark.parametrize("variant", ["digits", "toy", "secure-mtls"])
def test_generated_compose_passes_docker_compose_config(tmp_path: Path, variant: str) -> None:
    tool = _docker_compose()
    if variant == "digits":
        proj, path = ROOT, "examples/digits/compose-manifest.yaml"
        text = compose_yaml(load_manifest(ROOT / path, env={}), path, redis=True)
    elif variant == "toy":
        proj, path = ROOT, "examples/toy/manifest.yaml"
        text = compose_yaml(load_manifest(ROOT / path), path)
    else:
        proj, m = _secure_project(tmp_path, tls=True)
        (proj / "certs" / "nodes").mkdir(parents=True)
        path = "m.yaml"
        text = compose_yaml(m, path, secure_dir="secure", certs_dir="certs", root=proj)
    out = tmp_path / "compose.yaml"
    out.write_text(text)
    # Execute: --project-directory keeps relative paths where the file will live
    proc = subprocess.run([tool, "-f", str(out), "--project-directory", str(proj), "config",
                           "-q"], capture_output=True, text=True, timeout=120, check=False)
    # Assert
    assert proc.returncode == 0, proc.stderr


async def _run_services(doc: dict[str, Any], cwd: Path, host: str, port: int,
                        logs: Path, *, secured: bool) -> tuple[dict[str, int], str, bool]:
    """Every `fedbus serve` service as a local process; (exit codes, aggregator stdout, health
    file seen while running)."""
    procs: dict[str, asyncio.subprocess.Process] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for name, svc in doc["services"].items():
            cmd = list(svc.get("command") or [])
            if cmd[:2] != ["fedbus", "serve"]:
                continue
            cmd[cmd.index(HEALTH_FILE)] = str(logs / f"{name}.health")
            if "--broker" in cmd:
                cmd[cmd.index("--broker") + 1] = f"{host}:{port}"
            else:
                cmd += ["--broker", f"{host}:{port}"]
            procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.cli", *cmd[1:], cwd=cwd, env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=open(logs / f"{name}.log", "wb"),  # noqa: ASYNC230 - a log sink
            )
        # Each node's health file must be seen while the job runs. Not all at one instant:
        # the toy job's rounds take milliseconds, so the last trainer to connect and the
        # aggregator's exit can be closer together than any polling period.
        seen: set[str] = set()
        async with asyncio.timeout(60):
            while seen != set(procs) and procs["aggregator"].returncode is None:
                seen |= {n for n in procs if (logs / f"{n}.health").exists()}
                await asyncio.sleep(0.01)  # polling files other processes write
        healthy = seen == set(procs)
        out, _ = await asyncio.wait_for(procs["aggregator"].communicate(), 120)
        if not secured:
            # An anonymous broker cannot vouch for `done` (anyone could send one): trainers
            # keep serving until stopped, as `docker compose down` does. Authenticated ones
            # trust their aggregator's `done` and exit by themselves.
            for p in procs.values():
                if p.returncode is None:
                    p.terminate()
        codes = {n: await asyncio.wait_for(p.wait(), 60) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
    return codes, out.decode(), healthy


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True], ids=["open", "secured"])
async def test_generated_compose_services_finish_the_federation(
    tmp_path: Path, mosquitto: MosquittoProcess, secure_mosquitto: SecureBrokerFactory,
    secure: bool,
) -> None:
    # Prepare: the compose document and a local broker standing in for its broker service
    logs = tmp_path / "logs"
    logs.mkdir()
    if secure:
        proj, m = _secure_project(tmp_path, tls=False)
        doc = compose_config(m, "m.yaml", secure_dir="secure", root=proj)
        given = {u: (proj / "secure" / "passwords" / u).read_text().strip()
                 for u in (n.id for n in m.nodes)}
        sb = await secure_mosquitto(m, passwords=given)
    else:
        proj, m = ROOT, load_manifest(ROOT / "examples/toy/manifest.yaml")
        doc = compose_config(m, "examples/toy/manifest.yaml")
        sb = None
    broker = sb.proc if sb else mosquitto
    # Execute
    codes, out, healthy = await _run_services(doc, proj, broker.host, broker.port, logs,
                                              secured=secure)
    # Assert: all nodes healthy (= connected) while running, then done and exited cleanly
    assert healthy
    assert set(codes.values()) == {0}, codes
    lines = out.strip().splitlines()
    assert sum(line.startswith("round ") for line in lines) == m.rounds
    assert lines[-1].startswith("final ")
    assert not list(logs.glob("*.health")), "health files must go when the node stops"

