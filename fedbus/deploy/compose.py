"""A docker compose file for any manifest: the broker, redis when a role needs it, every node.

Every node is ``fedbus serve MANIFEST --node ID`` in the fedbus image, healthy only while it is
connected to the broker (``--health-file``, checked by ``python -m fedbus.deploy.health``),
restarted on failure, never after finishing its job. With ``secure_dir`` the broker gets the
manifest's generated users and rights, and each node container gets only its own password
(and, with ``certs_dir``, its own certificate), mounted where the manifest says to read it.
The compose file is meant to sit at the project root (``build: .``, ``./brokers/...``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

from fedbus.deploy.security import CONTAINER_DYNSEC_PLUGIN, TlsFiles, write_broker_security
from fedbus.errors import DeployError
from fedbus.manifest import Manifest

__all__ = ["compose_config", "compose_yaml"]

APP: Final = PurePosixPath("/app")  # WORKDIR of the Dockerfile
HEALTH_FILE: Final = "/tmp/fedbus.health"
_BROKER_CONFIG_DIR: Final = "/mosquitto/config"
#: Roles that keep data in redis (and a volume); none of them exists yet in this version.
REDIS_ROLES: Final = frozenset({"checkpointer", "store"})
_LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_TORCH_ROLES: Final = frozenset({"trainer"})


def _broker_service_name(m: Manifest) -> tuple[str, bool]:
    """(service name, whether nodes must be told it with --broker)."""
    host = m.broker.host if m.broker else "127.0.0.1"
    try:
        ipaddress.ip_address(host)
        is_name = False
    except ValueError:
        is_name = host not in _LOCAL_HOSTS
    return (host, False) if is_name else ("mosquitto", True)


def _in_container(manifest_path: str, template: str, node: str) -> str:
    path = PurePosixPath(template.replace("{node}", node))
    if path.is_absolute():
        return str(path)
    return str(APP / PurePosixPath(manifest_path).parent / path)


def _healthcheck(test: list[str], interval: str = "10s") -> dict[str, Any]:
    return {"test": test, "interval": interval, "timeout": "5s", "retries": 5,
            "start_period": "20s"}


def compose_config(
    m: Manifest,
    manifest_path: str,
    *,
    redis: bool | None = None,
    image: str = "fedbus:dev",
    secure_dir: str | None = None,
    certs_dir: str | None = None,
    root: str | Path = ".",
) -> dict[str, Any]:
    """The compose document for ``m`` (``manifest_path`` relative to the project root).

    ``secure_dir`` (relative to ``root``) receives the broker's users and rights from
    ``write_broker_security``; ``certs_dir`` is a ``fedbus certs`` folder (mTLS).
    ``redis=None`` adds redis only when a node's role keeps data there.
    """
    if m.brokers:
        raise DeployError(f"{m.source} declares several brokers (brokers:); a compose file "
                          "here runs one. Deploy each broker with `fedbus bridge MANIFEST "
                          "--broker NAME` appended to its config, or use `fedbus run`")
    broker_name, tell_broker = _broker_service_name(m)
    port = m.broker.port if m.broker else 1883
    b = m.broker
    if certs_dir and not secure_dir:
        raise DeployError("certificates need the broker's users and rights too: "
                          "pass --secure DIR with --certs")
    if secure_dir and (b is None or not (b.password_file or b.tls_cert)):
        raise DeployError(f"{m.source}: a secured compose needs the manifest to say where each "
                          "node reads its secret: broker.password_file (e.g. "
                          "secure/passwords/{node}) and, with --certs, broker.tls_ca/tls_cert/"
                          "tls_key (e.g. certs/nodes/{node}.crt)")
    if certs_dir and (b is None or not (b.tls_ca and b.tls_cert and b.tls_key)):
        raise DeployError(f"{m.source}: with --certs set broker.tls_ca, tls_cert and tls_key "
                          "(e.g. certs/ca.crt, certs/nodes/{node}.crt, certs/nodes/{node}.key)")

    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {"mosquitto-data": None}
    broker: dict[str, Any] = {
        "image": "eclipse-mosquitto:2",
        "restart": "unless-stopped",
        "ports": [f"{port}:{port}"],
        "volumes": ["./brokers/compose.conf:/mosquitto/config/mosquitto.conf:ro",
                    "mosquitto-data:/mosquitto/data"],
        "healthcheck": _healthcheck(["CMD", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port),
                                     "-t", "$$SYS/#", "-C", "1", "-W", "3"]),
    }
    if secure_dir:
        tls = None
        if certs_dir:
            c = f"{_BROKER_CONFIG_DIR}/certs"
            tls = TlsFiles(ca=f"{c}/ca.crt", cert=f"{c}/broker.crt", key=f"{c}/broker.key")
        write_broker_security(m, Path(root) / secure_dir, broker_dir=f"{_BROKER_CONFIG_DIR}/fedbus",
                              plugin=CONTAINER_DYNSEC_PLUGIN, tls=tls,
                              persistence_dir="/mosquitto/data/", port=port)
        broker["volumes"] = [f"./{secure_dir}:{_BROKER_CONFIG_DIR}/fedbus:ro",
                             "mosquitto-data:/mosquitto/data"]
        if certs_dir:
            broker["volumes"] += [
                f"./{certs_dir}/{name}:{_BROKER_CONFIG_DIR}/certs/{name}:ro"
                for name in ("ca.crt", "broker.crt", "broker.key")]
        broker["command"] = ["mosquitto", "-c", f"{_BROKER_CONFIG_DIR}/fedbus/broker.conf"]
        # Anonymous clients are refused now: health = the listener is up (LISTEN in
        # /proc/net/tcp), which needs no credentials inside the broker container.
        broker["healthcheck"] = _healthcheck(
            ["CMD-SHELL", f"grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp"])
    services[broker_name] = broker

    use_redis = redis if redis is not None else any(n.role in REDIS_ROLES for n in m.nodes)
    if use_redis:
        services["redis"] = {
            "image": "redis:7",
            "restart": "unless-stopped",
            # AOF everysec: at most about a second of checkpoints lost (FACTS.md).
            "command": ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec"],
            "volumes": ["redis-data:/data"],
            "healthcheck": _healthcheck(["CMD", "redis-cli", "ping"]),
        }
        volumes["redis-data"] = None

    root_id = m.aggregator.id
    for n in m.nodes:
        cmd = ["fedbus", "serve", manifest_path, "--node", n.id, "--health-file", HEALTH_FILE]
        if tell_broker:
            cmd += ["--broker", f"{broker_name}:{port}"]
        deps: dict[str, Any] = {broker_name: {"condition": "service_healthy"}}
        if n.role == "aggregator" and use_redis:
            deps["redis"] = {"condition": "service_healthy"}
        if n.id != root_id:
            # Nodes may join before the aggregator publishes a model; it waits for them.
            deps[root_id] = {"condition": "service_started"}
        # torch only where training happens: the other roles run the numpy-only stage.
        stage = "trainer" if n.role in _TORCH_ROLES else "base"
        svc: dict[str, Any] = {
            "build": {"context": ".", "target": stage},
            "image": image if stage == "base" else image.replace("fedbus", "fedbus-trainer", 1),
            "command": cmd,
            # A node that finishes its job exits 0 and stays down; a crash restarts it.
            "restart": "on-failure",
            "depends_on": deps,
            "healthcheck": _healthcheck(["CMD", "python", "-m", "fedbus.deploy.health",
                                         HEALTH_FILE, "--max-age", "30"], interval="15s"),
        }
        mounts: list[str] = []
        if secure_dir and b is not None and b.password_file:
            mounts.append(f"./{secure_dir}/passwords/{n.id}:"
                          f"{_in_container(manifest_path, b.password_file, n.id)}:ro")
        if certs_dir and b is not None and b.tls_ca and b.tls_cert and b.tls_key:
            mounts += [
                f"./{certs_dir}/ca.crt:{_in_container(manifest_path, b.tls_ca, n.id)}:ro",
                f"./{certs_dir}/nodes/{n.id}.crt:"
                f"{_in_container(manifest_path, b.tls_cert, n.id)}:ro",
                f"./{certs_dir}/nodes/{n.id}.key:"
                f"{_in_container(manifest_path, b.tls_key, n.id)}:ro",
            ]
        if n.role in REDIS_ROLES:
            volumes[f"state-{n.id}"] = None
            mounts.append(f"state-{n.id}:/var/lib/fedbus")
            svc["environment"] = {"FEDBUS_REDIS_URL": "redis://redis:6379/0"}
        if mounts:
            svc["volumes"] = mounts
        services[n.id] = svc
    # No top-level `name:`: Debian's docker-compose 1.29 rejects it; the project is named
    # after the folder (or `docker compose -p NAME`).
    return {"services": services, "volumes": volumes}


def compose_yaml(m: Manifest, manifest_path: str, **kwargs: Any) -> str:
    doc = compose_config(m, manifest_path, **kwargs)
    head = (f"# Generated by `fedbus compose {manifest_path}` from the manifest; regenerate "
            "instead of editing.\n# `docker compose up --build` at the project root. Nodes "
            "are healthy only while connected\n# to the broker; a node that finishes its job "
            "exits 0 and stays down.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
