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
from processes import assert_job_finished, exit_codes, reaped

from fedbus.broker import MosquittoProcess
from fedbus.deploy.compose import HEALTH_FILE, STATE_DIR, compose_config, compose_yaml
from fedbus.errors import DeployError
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


@pytest.mark.parametrize("variant", ["digits", "digits-host", "bridged", "toy", "secure-mtls"])
def test_generated_compose_passes_docker_compose_config(tmp_path: Path, variant: str) -> None:
    tool = _docker_compose()
    if variant == "digits":
        proj, path = ROOT, "examples/digits/compose-manifest.yaml"
        text = compose_yaml(load_manifest(ROOT / path, env={}), path, redis=True)
    elif variant in ("digits-host", "bridged"):
        proj = tmp_path
        path = ("examples/digits/compose-manifest.yaml" if variant == "digits-host"
                else "examples/compose/three-level-bridged.yaml")
        text = compose_yaml(load_manifest(ROOT / path, env={}), path, redis=True, root=proj,
                            network="host" if variant == "digits-host" else "bridge",
                            config_dir="brokers")
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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    async with reaped() as procs:
        for name, svc in doc["services"].items():
            cmd = list(svc.get("command") or [])
            if cmd[:2] != ["fedbus", "serve"]:
                continue
            cmd[cmd.index(HEALTH_FILE)] = str(logs / f"{name}.health")
            if "--broker" in cmd:
                cmd[cmd.index("--broker") + 1] = f"{host}:{port}"
            else:
                cmd += ["--broker", f"{host}:{port}"]
            # the image's /app is the project here; a stateful node's volume a folder of its own
            cmd = [str(cwd / c.removeprefix("/app/")) if c.startswith("/app/") else c
                   for c in cmd]
            state = logs / f"{name}-state"
            state.mkdir(exist_ok=True)
            own = {k: str(v).replace(STATE_DIR, str(state))
                   for k, v in svc.get("environment", {}).items() if not str(v).startswith("${")}
            procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fedbus.cli", *cmd[1:],
                cwd=state if svc.get("working_dir") else cwd, env={**env, **own},
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
        codes = await exit_codes(procs)
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
    assert_job_finished(codes, out, m.rounds)
    assert not list(logs.glob("*.health")), "health files must go when the node stops"



def test_compose_runs_one_broker_per_brokers_entry_with_the_bridges(tmp_path: Path) -> None:
    path = "examples/compose/three-level-bridged.yaml"
    m = load_manifest(ROOT / path, env={})
    # Execute
    doc = compose_config(m, path, root=tmp_path, config_dir="brokers")
    # Assert: root and site each a broker service; site bridged to root by service name
    services = doc["services"]
    assert {"broker-root", "broker-site"} <= set(services)
    assert services["broker-root"]["ports"] == ["1883:1883"]
    assert "ports" not in services["broker-site"], "only the root broker is published"
    assert services["broker-site"]["depends_on"] == {
        "broker-root": {"condition": "service_healthy"}}
    site = (tmp_path / "brokers" / "broker-site.conf").read_text()
    assert "listener 1884 0.0.0.0" in site and "address broker-root:1883" in site
    assert "connection fedbus.topo-bridged.bridge.site" in site
    assert "connection" not in (tmp_path / "brokers" / "broker-root.conf").read_text()
    # nodes reach their own broker through the manifest (no --broker), trainers the site's
    assert services["trainer-0"]["depends_on"]["broker-site"] == {"condition": "service_healthy"}
    assert services["aggregator"]["depends_on"]["broker-root"] == {
        "condition": "service_healthy"}
    assert all("--broker" not in s.get("command", []) for s in services.values())
    assert services["trainer-0"]["environment"]["FEDBUS_SITE_HOST"] == "broker-site"


def test_multi_broker_compose_names_what_is_missing(tmp_path: Path) -> None:
    m = load_manifest(ROOT / "examples/topologies/three-level-bridged.yaml")
    with pytest.raises(DeployError, match=r"brokers\.root has no host and port"):
        compose_config(m, "examples/topologies/three-level-bridged.yaml", root=tmp_path)
    host_names = load_manifest(ROOT / "examples/compose/three-level-bridged.yaml", env={})
    with pytest.raises(DeployError, match=r"with --network host every broker listens on "
                                          r"127\.0\.0\.1"):
        compose_config(host_names, "m.yaml", root=tmp_path, network="host")


def test_host_network_compose_uses_loopback_and_the_chosen_ports(tmp_path: Path) -> None:
    path = "examples/digits/compose-manifest.yaml"
    m = load_manifest(ROOT / path, env={"FEDBUS_BROKER_PORT": "18831"})
    # Execute
    doc = compose_config(m, path, redis=True, root=tmp_path, network="host", redis_port=16390,
                         config_dir="brokers")
    # Assert: no bridge network, no published ports; everyone on 127.0.0.1
    services = doc["services"]
    assert all(s["network_mode"] == "host" for s in services.values())
    assert not any("ports" in s for s in services.values())
    conf = (tmp_path / "brokers" / "mosquitto.conf").read_text()
    assert "listener 18831 127.0.0.1" in conf
    assert services["mosquitto"]["volumes"][0].startswith("./brokers/mosquitto.conf:")
    assert "--port" in services["redis"]["command"] and "16390" in services["redis"]["command"]
    agg = services["aggregator"]
    assert agg["command"][agg["command"].index("--broker") + 1] == "127.0.0.1:18831"
    assert agg["build"]["network"] == "host"
    assert services["checkpointer"]["environment"]["FEDBUS_REDIS_URL"] == \
        "redis://127.0.0.1:16390/0"


def test_compose_keeps_state_in_volumes_and_images_overridable() -> None:
    path = "examples/digits/compose-manifest.yaml"
    doc = compose_config(load_manifest(ROOT / path, env={}), path, redis=True)
    services = doc["services"]
    # Assert: stateful nodes work in their volume; the run folder is kept there too
    for name in ("aggregator", "checkpointer"):
        assert services[name]["working_dir"] == "/var/lib/fedbus"
        assert f"state-{name}:/var/lib/fedbus" in services[name]["volumes"]
        assert services[name]["command"][2] == f"/app/{path}"
    assert services["aggregator"]["environment"]["FEDBUS_RUNS_DIR"] == "/var/lib/fedbus/runs"
    assert "volumes" not in services["trainer-0"]
    # the aggregator waits for the checkpointer it restores from
    assert services["aggregator"]["depends_on"]["checkpointer"] == {
        "condition": "service_healthy"}
    # a torch task: whoever loads it gets the trainer image; the checkpointer needs numpy only
    assert services["aggregator"]["image"] == "fedbus-trainer:dev"
    assert services["checkpointer"]["image"] == "fedbus:dev"
    assert services["mosquitto"]["image"] == "${FEDBUS_MOSQUITTO_IMAGE:-eclipse-mosquitto:2}"
    assert services["trainer-0"]["build"]["args"]["PYTHON_IMAGE"] == \
        "${FEDBUS_PYTHON_IMAGE:-python:3.11-slim}"
    # what the manifest reads passes through from compose's environment; the broker's
    # address is the file's own (its service), not whatever the shell says at `up`
    env = services["trainer-0"]["environment"]
    assert env["FEDBUS_ROUNDS"] == "${FEDBUS_ROUNDS:-}"
    assert env["FEDBUS_BROKER_HOST"] == "mosquitto" and env["FEDBUS_BROKER_PORT"] == "1883"


def test_numpy_task_nodes_get_the_numpy_image() -> None:
    path = "examples/toy/manifest.yaml"
    doc = compose_config(load_manifest(ROOT / path), path)
    images = {s["image"] for n, s in doc["services"].items() if n != "mosquitto"}
    assert images == {"fedbus:dev"}
