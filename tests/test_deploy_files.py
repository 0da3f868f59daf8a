"""Deployment files stay consistent with the manifests and pass their own tools' checks.

compose.yaml, Dockerfile, edge/ systemd units and install.sh. ``systemd-analyze`` (apt:
systemd) and ``shellcheck`` (apt: shellcheck) are skipped on a dev box without them and
required in CI (env CI set), like the mosquitto fixture.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedbus.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "edge"
UNITS = ("fedbus-trainer@.service", "fedbus-aggregator.service")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI")
        pytest.skip(f"{tool} is not installed")
    return path


# ----------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _fedbus_services(compose: dict[str, Any]) -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in compose["services"].items()
            if isinstance(svc.get("command"), list) and svc["command"][:2] == ["fedbus", "serve"]}


def test_compose_has_the_services(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert {"mosquitto", "redis", "aggregator", "checkpointer"} <= set(services)
    assert {f"trainer-{i}" for i in range(10)} <= set(services)
    # public images by default, each a variable a user (or the deployment check) overrides
    assert services["mosquitto"]["image"] == "${FEDBUS_MOSQUITTO_IMAGE:-eclipse-mosquitto:2}"
    assert services["redis"]["image"] == "${FEDBUS_REDIS_IMAGE:-redis:7}"
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] \
        == "yes"


def test_compose_services_have_healthchecks_restart_and_ordered_start(
    compose: dict[str, Any]
) -> None:
    services = compose["services"]

    for name, svc in services.items():
        assert "healthcheck" in svc, name
        assert svc.get("restart") in ("on-failure", "unless-stopped", "always"), name
    for name in _fedbus_services(compose):
        deps = services[name]["depends_on"]
        assert deps["mosquitto"]["condition"] == "service_healthy", name
        for dep in deps.values():
            assert dep["condition"] in ("service_started", "service_healthy"), name


def test_every_compose_node_exists_in_its_manifest(compose: dict[str, Any]) -> None:
    served: dict[str, set[str]] = {}
    for name, cmd in _fedbus_services(compose).items():
        manifest_path, node = cmd[2].removeprefix("/app/"), cmd[cmd.index("--node") + 1]
        env = {k: str(v) for k, v in compose["services"][name].get("environment", {}).items()
               if not str(v).startswith("${")}  # compose's own variables: unset here
        m = load_manifest(ROOT / manifest_path, env=env)
        m.node(node)  # raises ManifestError naming the known ids
        served.setdefault(manifest_path, set()).add(node)

    assert served, "no `fedbus serve` services in compose.yaml"
    for manifest_path, nodes in served.items():
        m = load_manifest(ROOT / manifest_path, env={})
        assert nodes == {n.id for n in m.nodes}, f"{manifest_path}: nodes without a service"
        assert m.broker is not None and m.broker.host in compose["services"]


def test_compose_referenced_files_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "build" in svc:
            context = svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"]
            assert (ROOT / context / "Dockerfile").is_file(), name
        for cmd_arg in svc.get("command") or []:
            if str(cmd_arg).endswith((".yaml", ".yml")):  # /app is the checkout in the image
                assert (ROOT / str(cmd_arg).removeprefix("/app/")).is_file(), f"{name}: {cmd_arg}"


def test_compose_broker_config_exists(compose: dict[str, Any]) -> None:
    mounts = [v.split(":")[0] for v in compose["services"]["mosquitto"]["volumes"]]
    binds = [m for m in mounts if m.startswith("./")]
    assert binds == ["./brokers/compose.conf"]
    if not (ROOT / "brokers" / "compose.conf").is_file():
        pytest.skip("brokers/compose.conf is not written yet")
    assert (ROOT / binds[0]).is_file()


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_pinned_cpu_trainer_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    # the base image is a build argument whose default is the public python:3.11-slim
    assert lines[0] == "ARG PYTHON_IMAGE=python:3.11-slim"
    assert lines[1] == "FROM ${PYTHON_IMAGE} AS base"
    assert re.search(r"--constraint constraints\.txt|-c constraints\.txt", text)
    assert "COPY pyproject.toml constraints.txt" in text
    assert "download.pytorch.org/whl/cpu" in text
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    # torch only in the trainer stage; the base stage (aggregator, ...) is numpy-only
    base, trainer = text.split("FROM base AS trainer")
    assert '".[trainer]"' in trainer and "[trainer]" not in base.split("RUN pip")[1]
    assert "USER fedbus" in trainer


def test_secrets_never_enter_an_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()

    assert {"examples/*/secure", "examples/*/certs", ".venv"} <= set(ignored)


# ----------------------------------------------------------------------------- systemd


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened_and_restarts(unit: str) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(EDGE / unit)
    svc = parser["Service"]

    assert svc["EnvironmentFile"] == "/etc/fedbus/fedbus.env"
    assert svc["ExecStart"].startswith("/opt/fedbus/venv/bin/fedbus serve ${FEDBUS_MANIFEST} ")
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict"
    assert "/var/lib/fedbus" in svc["ReadWritePaths"]
    assert svc.get("User") == "fedbus" or svc.get("DynamicUser") == "yes"
    assert "MemoryMax" in svc


def test_trainer_unit_serves_its_instance() -> None:
    text = (EDGE / "fedbus-trainer@.service").read_text()

    assert re.search(r"^ExecStart=.* --node %i$", text, re.MULTILINE)


@pytest.mark.parametrize(("unit", "name"), [
    ("fedbus-aggregator.service", "fedbus-aggregator.service"),
    ("fedbus-trainer@.service", "fedbus-trainer@pi-0.service"),
])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str, name: str) -> None:
    analyze = _need("systemd-analyze")
    # verify checks that ExecStart exists; point it at a binary this machine has.
    stub = shutil.which("true") or "/bin/true"
    text = (EDGE / unit).read_text().replace("/opt/fedbus/venv/bin/fedbus", stub)
    (tmp_path / unit).write_text(text)

    proc = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / name)],
                          capture_output=True, text=True, timeout=60, check=False)

    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not re.search(r"Unknown|ignoring|Failed|not executable", out), out


def test_backoff_drop_in_only_sets_restart_keys() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(EDGE / "restart-backoff.conf")

    assert parser.sections() == ["Service"]
    assert set(parser["Service"]) == {"RestartSteps", "RestartMaxDelaySec"}


def test_env_example_satisfies_the_edge_manifest() -> None:
    env = {}
    for line in (EDGE / "fedbus.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    manifest = env["FEDBUS_MANIFEST"].removeprefix("/opt/fedbus/app/")

    m = load_manifest(ROOT / manifest, env=env)

    assert m.broker is not None and m.broker.host == env["FEDBUS_BROKER_HOST"]
    assert env["FEDBUS_AGGREGATOR_NODE"] == m.aggregator.id


# ----------------------------------------------------------------------------- install.sh


def test_install_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(EDGE / "install.sh")], check=True, timeout=30)
    assert os.access(EDGE / "install.sh", os.X_OK)
    text = (EDGE / "install.sh").read_text()
    assert "set -euo pipefail" in text


def test_install_script_is_shellcheck_clean() -> None:
    shellcheck = _need("shellcheck")
    proc = subprocess.run([shellcheck, str(EDGE / "install.sh")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout


def test_install_dry_run_changes_nothing_and_uses_constraints() -> None:
    env = os.environ | {"PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(EDGE / "install.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=60, check=False, env=env)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "dry run" in out
    assert "--constraint" in out and "constraints.txt" in out
    assert "/opt/fedbus/venv" in out
    assert "fedbus-trainer@.service" in out and "daemon-reload" in out


def test_install_rejects_unknown_options() -> None:
    proc = subprocess.run(["bash", str(EDGE / "install.sh"), "--bogus"], capture_output=True,
                          text=True, timeout=30, check=False)

    assert proc.returncode == 2
    assert "--bogus" in proc.stderr


def test_install_dry_run_generates_the_nodes_own_unit() -> None:
    env = os.environ | {"PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(EDGE / "install.sh"), "--dry-run", "--node", "pi-0",
                           "--manifest", "examples/digits/edge-manifest.yaml"],
                          capture_output=True, text=True, timeout=60, check=False, env=env)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "/opt/fedbus/venv/bin/fedbus units" in out and "--node pi-0" in out
    assert "/etc/systemd/system/fedbus-pi-0.service" in out
    assert "systemctl enable fedbus-pi-0.service" in out
