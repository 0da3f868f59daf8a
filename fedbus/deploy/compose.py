"""A docker compose file for any manifest: the broker, redis when a role needs it, every node.

Every node is ``fedbus serve MANIFEST --node ID`` in the fedbus image, healthy only while it is
connected to the broker (``--health-file``, checked by ``python -m fedbus.deploy.health``),
restarted on failure, never after finishing its job. With ``secure_dir`` the broker gets the
manifest's generated users and rights, and each node container gets only its own password
(and, with ``certs_dir``, its own certificate), mounted where the manifest says to read it.
The compose file is meant to sit at the project root (``build: .``, ``./brokers/...``).

A manifest with several ``brokers:`` gets one broker service each, every one but the root
bridged to its parent (``fedbus.deploy.bridge``). ``network="host"`` puts every container on
the host's network, each broker on 127.0.0.1 and its manifest port: no bridge network, no
published ports (what the deployment check runs, docs/deploy.md). Nodes that keep state
(aggregator, checkpointer, store) work in a volume, ``/var/lib/fedbus``, which outlives
``docker compose down``. Images are variables with the public images as defaults.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

import yaml

from fedbus.broker import packet_limit_conf
from fedbus.deploy.bridge import bridge_config, topological
from fedbus.deploy.security import CONTAINER_DYNSEC_PLUGIN, TlsFiles, write_broker_security
from fedbus.deploy.units import manifest_variables
from fedbus.errors import DeployError
from fedbus.manifest import BrokerSpec, Manifest

__all__ = ["IMAGE_VARS", "NETWORKS", "STATE_DIR", "compose_config", "compose_yaml"]

APP: Final = PurePosixPath("/app")  # WORKDIR of the Dockerfile
HEALTH_FILE: Final = "/tmp/fedbus.health"
#: Home of the image's fedbus user; a node that keeps state works (and keeps it) there.
STATE_DIR: Final = "/var/lib/fedbus"
_BROKER_CONFIG_DIR: Final = "/mosquitto/config"
#: Roles that may keep data in redis (checkpoint.redis / store.redis_url).
REDIS_ROLES: Final = frozenset({"checkpointer", "store"})
#: Roles whose data must outlive their container: a volume, and their working directory.
STATE_ROLES: Final = frozenset({"aggregator", "checkpointer", "store"})
_LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
#: Roles that load the task (the aggregator for its first model and server-side evaluation):
#: they get the trainer image when the task's module imports torch.
_TASK_ROLES: Final = frozenset({"trainer", "aggregator", "relay", "store"})
_IMPORTS_TORCH: Final = re.compile(r"^\s*(import torch|from torch)\b", re.M)
#: The images, as compose variables: override them (e.g. with a local mirror) in the
#: environment or an .env file beside the compose file.
IMAGE_VARS: Final = {
    "mosquitto": ("FEDBUS_MOSQUITTO_IMAGE", "eclipse-mosquitto:2"),
    "redis": ("FEDBUS_REDIS_IMAGE", "redis:7"),
    "python": ("FEDBUS_PYTHON_IMAGE", "python:3.11-slim"),
    "torch_index": ("FEDBUS_TORCH_INDEX", "https://download.pytorch.org/whl/cpu"),
}
Network = Literal["bridge", "host"]
NETWORKS: Final = ("bridge", "host")

#: brokers/compose.conf without the listener: a generated broker config starts with these.
_BROKER_SETTINGS: Final = """\
allow_anonymous true

# Persistence keeps retained models and offline sessions across a broker restart.
persistence true
persistence_location /mosquitto/data/
autosave_interval 30

max_inflight_messages 1000
max_queued_messages 100000
max_queued_bytes 2147483648
set_tcp_nodelay true

log_dest stdout
log_type error
log_type warning
log_type notice
"""


_ONE_VAR: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def _var(name: str) -> str:
    var, default = IMAGE_VARS[name]
    return f"${{{var}:-{default}}}"


def task_needs_torch(m: Manifest, root: str | Path = ".") -> bool:
    """Does the task's module import torch? Read, not imported (the machine that generates
    a compose file need not have torch); a module not found here counts as torch."""
    module = m.task.ref.partition(":")[0]
    base = Path(root).joinpath(*module.split("."))
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    if not any(c.is_file() for c in candidates):
        import importlib.util

        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            return True
        candidates = [Path(spec.origin)]
    return any(c.is_file() and _IMPORTS_TORCH.search(c.read_text(encoding="utf-8"))
               for c in candidates)


def _is_name(host: str) -> bool:
    """A DNS name (a compose service can answer to it), not an address or localhost."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host not in _LOCAL_HOSTS
    return False


def _broker_service_name(m: Manifest) -> tuple[str, bool]:
    """(service name, whether nodes must be told it with --broker)."""
    host = m.broker.host if m.broker else "127.0.0.1"
    return (host, False) if _is_name(host) else ("mosquitto", True)


def _in_container(manifest_path: str, template: str, node: str) -> str:
    path = PurePosixPath(template.replace("{node}", node))
    if path.is_absolute():
        return str(path)
    return str(APP / PurePosixPath(manifest_path).parent / path)


def _healthcheck(test: list[str], interval: str = "10s") -> dict[str, Any]:
    return {"test": test, "interval": interval, "timeout": "5s", "retries": 5,
            "start_period": "20s"}


def _broker_healthcheck(port: int) -> dict[str, Any]:
    return _healthcheck(["CMD", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port),
                         "-t", "$$SYS/#", "-C", "1", "-W", "3"])


def _address_values(m: Manifest) -> dict[str, str]:
    """{VAR: value} for broker host/port fields written as just ``${VAR}`` or
    ``${VAR:-default}``: the values this compose file was generated with."""
    try:
        raw = yaml.safe_load(Path(m.source).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(raw, dict):
        return {}
    pairs: list[tuple[Any, BrokerSpec | None]] = [(raw.get("broker"), m.broker)]
    if isinstance(raw.get("brokers"), dict):
        pairs += [(spec, m.brokers[name].spec if name in m.brokers else None)
                  for name, spec in raw["brokers"].items()]
    out: dict[str, str] = {}
    for spec, resolved in pairs:
        if not isinstance(spec, dict) or resolved is None:
            continue
        for key in ("host", "port"):
            match = _ONE_VAR.fullmatch(str(spec.get(key, "")).strip())
            if match:
                out[match[1]] = str(getattr(resolved, key))
    return out


def node_healthcheck(max_age_s: int = 30) -> list[str]:
    """What ``python -m fedbus.deploy.health`` checks, in the shell: the health file is at
    most ``max_age_s`` old. No Python start (numpy and all) every 15 s in every container:
    on a loaded 2-core box that missed the 5 s timeout."""
    return ["CMD-SHELL", f"test $$(( $$(date +%s) - $$(stat -c %Y {HEALTH_FILE}) )) "
                         f"-le {max_age_s}"]


def broker_conf(listen: str, port: int, bridge: str = "",
                chunk_bytes: int = BrokerSpec().chunk_bytes) -> str:
    """A broker config as brokers/compose.conf, on ``listen:port``, refusing packets larger
    than the job sends (``chunk_bytes``: one chunk plus headroom), plus a bridge section."""
    head = ("# Generated by `fedbus compose` (settings of brokers/compose.conf); regenerate "
            "instead of editing.\n")
    text = (f"{head}\nlistener {port} {listen}\n{_BROKER_SETTINGS}\n"
            f"{packet_limit_conf(chunk_bytes)}")
    return text + (f"\n{bridge}" if bridge else "")


def _multi_broker_plan(m: Manifest, network: Network) -> dict[str, tuple[str, BrokerSpec]]:
    """{broker name: (service name, spec)} for a manifest with ``brokers:``, checked."""
    plan: dict[str, tuple[str, BrokerSpec]] = {}
    ports: dict[int, str] = {}
    for b in topological(m):
        field = f"brokers.{b.name}"
        if b.spec is None:
            raise DeployError(
                f"{m.source}: {field} has no host and port; a compose file runs every broker "
                f"itself, so give each one where its nodes reach it, e.g. "
                f"{b.name}: {{host: ${{FEDBUS_{b.name.upper()}_HOST:-broker-{b.name}}}, "
                f"port: 1883}} (or `--network host` with 127.0.0.1 and a port each)")
        host = b.spec.host
        if network == "host":
            if _is_name(host):
                raise DeployError(
                    f"{m.source}: {field}.host is {host!r}, but with --network host every "
                    "broker listens on 127.0.0.1: set it to 127.0.0.1 (and a port of its own)")
            if b.spec.port in ports:
                raise DeployError(
                    f"{m.source}: {field}.port {b.spec.port} is also {ports[b.spec.port]!r}'s;"
                    " on the host's network each broker needs a port of its own")
            ports[b.spec.port] = b.name
            plan[b.name] = (f"broker-{b.name}", b.spec)
        else:
            if not _is_name(host):
                raise DeployError(
                    f"{m.source}: {field}.host is {host!r}; on a compose network nodes reach "
                    f"a broker by its service name: set it to a name (e.g. broker-{b.name}, "
                    "the service is named after it) or use --network host")
            if any(svc == host for svc, _ in plan.values()):
                raise DeployError(f"{m.source}: two brokers are both reached as {host!r}")
            plan[b.name] = (host, b.spec)
    return plan


def compose_config(
    m: Manifest,
    manifest_path: str,
    *,
    redis: bool | None = None,
    image: str = "fedbus:dev",
    secure_dir: str | None = None,
    certs_dir: str | None = None,
    root: str | Path = ".",
    network: Network = "bridge",
    redis_port: int = 6379,
    config_dir: str = "brokers/generated",
) -> dict[str, Any]:
    """The compose document for ``m`` (``manifest_path`` relative to the project root).

    ``secure_dir`` (relative to ``root``) receives the broker's users and rights from
    ``write_broker_security``; ``certs_dir`` is a ``fedbus certs`` folder (mTLS).
    ``redis=None`` adds redis only when a node's role keeps data there. ``network="host"``
    runs every container on the host's network (brokers and redis on 127.0.0.1).
    Broker configs that brokers/compose.conf cannot serve (host network, several brokers,
    bridges) are written to ``config_dir`` (relative to ``root``).
    """
    if network not in NETWORKS:
        raise DeployError(f"network {network!r}: use one of {', '.join(NETWORKS)}")
    host_net = network == "host"
    b = m.broker
    if m.brokers and (secure_dir or certs_dir):
        raise DeployError(f"{m.source} declares several brokers: --secure/--certs generate one "
                          "broker's users; secure each broker with `fedbus acl` (bridge users "
                          "included) and its config by hand, or use one broker")
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
    volumes: dict[str, Any] = {}
    conf_dir = Path(root) / config_dir

    def write_conf(service: str, text: str) -> str:
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / f"{service}.conf").write_text(text, encoding="utf-8")
        where = PurePosixPath(config_dir) / f"{service}.conf"
        source = str(where) if where.is_absolute() else f"./{where}"
        return f"{source}:{_BROKER_CONFIG_DIR}/mosquitto.conf:ro"

    def broker_service(service: str, port: int, conf_mount: str,
                       publish: bool = True) -> dict[str, Any]:
        volumes[f"{service}-data"] = None
        svc: dict[str, Any] = {"image": _var("mosquitto"), "restart": "unless-stopped"}
        if host_net:
            svc["network_mode"] = "host"
        elif publish:
            svc["ports"] = [f"{port}:{port}"]
        svc["volumes"] = [conf_mount, f"{service}-data:/mosquitto/data"]
        svc["healthcheck"] = _broker_healthcheck(port)
        return svc

    # Which broker service each node uses, and whether it must be told where it is.
    node_broker: dict[str, tuple[str, str | None]] = {}  # node -> (service, --broker value)
    if m.brokers:
        plan = _multi_broker_plan(m, network)
        for bn in topological(m):
            service, spec = plan[bn.name]
            bridge = ""
            if bn.parent is not None:
                parent_service, parent_spec = plan[bn.parent]
                parent_at = ("127.0.0.1" if host_net else parent_service, parent_spec.port)
                bridge = bridge_config(m, bn.name, {bn.parent: parent_at})
            listen = "127.0.0.1" if host_net else "0.0.0.0"
            # Only the root broker's port is published (operators watch there); the others
            # are reached by their service names inside the compose network.
            services[service] = broker_service(
                service, spec.port, write_conf(service, broker_conf(listen, spec.port, bridge,
                                                               spec.chunk_bytes)),
                publish=bn.parent is None)
            if bn.parent is not None:
                services[service]["depends_on"] = {
                    plan[bn.parent][0]: {"condition": "service_healthy"}}
        for n in m.nodes:
            node_broker[n.id] = (plan[n.broker or next(iter(plan))][0], None)
    else:
        broker_name, tell_broker = _broker_service_name(m)
        port = b.port if b else 1883
        if host_net:
            # No compose DNS on the host's network: every node is pointed at 127.0.0.1.
            broker_name, tell_broker = "mosquitto", True
        if host_net and not secure_dir:
            mount = write_conf(broker_name, broker_conf(
                "127.0.0.1", port, chunk_bytes=b.chunk_bytes if b else BrokerSpec().chunk_bytes))
        else:
            mount = "./brokers/compose.conf:/mosquitto/config/mosquitto.conf:ro"
        broker = broker_service(broker_name, port, mount)
        if secure_dir:
            tls = None
            if certs_dir:
                c = f"{_BROKER_CONFIG_DIR}/certs"
                tls = TlsFiles(ca=f"{c}/ca.crt", cert=f"{c}/broker.crt", key=f"{c}/broker.key")
            write_broker_security(m, Path(root) / secure_dir,
                                  broker_dir=f"{_BROKER_CONFIG_DIR}/fedbus",
                                  plugin=CONTAINER_DYNSEC_PLUGIN, tls=tls,
                                  persistence_dir="/mosquitto/data/", port=port,
                                  listen_host="127.0.0.1" if host_net else "0.0.0.0")
            broker["volumes"] = [f"./{secure_dir}:{_BROKER_CONFIG_DIR}/fedbus:ro",
                                 f"{broker_name}-data:/mosquitto/data"]
            if certs_dir:
                broker["volumes"] += [
                    f"./{certs_dir}/{name}:{_BROKER_CONFIG_DIR}/certs/{name}:ro"
                    for name in ("ca.crt", "broker.crt", "broker.key")]
            broker["command"] = ["mosquitto", "-c", f"{_BROKER_CONFIG_DIR}/fedbus/broker.conf"]
            # Anonymous clients are refused now: health = the listener is up (LISTEN in
            # /proc/net/tcp), which needs no credentials inside the broker container.
            broker["healthcheck"] = _healthcheck(
                ["CMD-SHELL", f"grep -q ':{port:04X} 00000000:0000 0A' /proc/net/tcp"
                 if not host_net else f"grep -q '0100007F:{port:04X} 00000000:0000 0A' "
                 "/proc/net/tcp"])
        services[broker_name] = broker
        address = f"{'127.0.0.1' if host_net else broker_name}:{port}"
        for n in m.nodes:
            node_broker[n.id] = (broker_name, address if tell_broker else None)

    use_redis = redis if redis is not None else any(n.role in REDIS_ROLES for n in m.nodes)
    redis_host = "127.0.0.1" if host_net else "redis"
    if use_redis:
        cmd = ["redis-server", "--appendonly", "yes", "--appendfsync", "everysec"]
        ping = ["CMD", "redis-cli", "ping"]
        if host_net:
            cmd += ["--port", str(redis_port), "--bind", "127.0.0.1"]
            ping = ["CMD", "redis-cli", "-p", str(redis_port), "ping"]
        services["redis"] = {
            "image": _var("redis"),
            "restart": "unless-stopped",
            # AOF everysec: at most about a second of checkpoints lost (FACTS.md).
            "command": cmd,
            "volumes": ["redis-data:/data"],
            "healthcheck": _healthcheck(ping),
        }
        if host_net:
            services["redis"]["network_mode"] = "host"
        volumes["redis-data"] = None

    root_id = m.aggregator.id
    torch_task = task_needs_torch(m, root)
    checkpointers = [n.id for n in m.nodes if n.role == "checkpointer"]
    secret = m.broker.password_env if m.broker else None
    # Not passed through: the secret, what compose sets itself, and the broker addresses
    # (the compose file decides where the brokers are; a shell's 127.0.0.1 must not win).
    addresses = _address_values(m)
    skip = {secret, "FEDBUS_REDIS_URL", "FEDBUS_RUNS_DIR", *addresses}
    passthrough = [v for v in manifest_variables(m) if v not in skip]
    for n in m.nodes:
        service, tell = node_broker[n.id]
        stateful = n.role in STATE_ROLES
        # A stateful node works in its volume: relative data paths (checkpoint.dir, store.dir,
        # runs) land there; so the manifest is named by its path in the image.
        path = str(APP / manifest_path) if stateful else manifest_path
        cmd = ["fedbus", "serve", path, "--node", n.id, "--health-file", HEALTH_FILE]
        if tell is not None:
            cmd += ["--broker", tell]
        deps: dict[str, Any] = {service: {"condition": "service_healthy"}}
        if use_redis and (n.role == "aggregator" or n.role in REDIS_ROLES):
            deps["redis"] = {"condition": "service_healthy"}
        if n.role == "checkpointer":
            pass  # the aggregator waits for it instead (below)
        elif n.id != root_id:
            # Nodes may join before the aggregator publishes a model; it waits for them.
            deps[root_id] = {"condition": "service_started"}
        elif checkpointers:
            # A restarted aggregator asks the checkpointer for its state once, at start: the
            # checkpointer must be connected by then, or the job starts over from round 1.
            for ck in checkpointers:
                deps[ck] = {"condition": "service_healthy"}
        # torch only where a torch task is loaded: the checkpointer (and every node of a
        # numpy task) runs the numpy-only stage.
        stage = "trainer" if n.role in _TASK_ROLES and torch_task else "base"
        build: dict[str, Any] = {"context": ".", "target": stage,
                                 "args": {"PYTHON_IMAGE": _var("python")}}
        if stage == "trainer":
            build["args"]["TORCH_INDEX"] = _var("torch_index")
        if host_net:
            build["network"] = "host"
        tag = image if stage == "base" else image.replace("fedbus", "fedbus-trainer", 1)
        svc: dict[str, Any] = {
            "build": build,
            "image": tag,
            "command": cmd,
            # A node that finishes its job exits 0 and stays down; a crash restarts it.
            "restart": "on-failure",
            "depends_on": deps,
            "healthcheck": _healthcheck(node_healthcheck(), interval="15s"),
        }
        if host_net:
            svc["network_mode"] = "host"
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
        env: dict[str, str] = {}
        for var in passthrough:
            # what the manifest reads (${VAR}) comes from where compose runs: `FEDBUS_ROUNDS=5
            # docker compose up` works; unset stays unset (the manifest's default applies)
            env[var] = f"${{{var}:-}}"
        if tell is None:
            # Where the brokers are is this file's decision (its services, its ports): the
            # nodes get the values it was generated with, whatever the shell says later.
            env.update(addresses)
        if stage == "trainer":
            # Every node of a compose project shares one machine: one torch thread each, as
            # `fedbus run` gives trainers that share a process (and the same floating-point
            # sums: with 2 threads the model differed from `fedbus run`'s in the 9th digit).
            env["OMP_NUM_THREADS"] = "${OMP_NUM_THREADS:-1}"
        if stateful:
            volumes[f"state-{n.id}"] = None
            mounts.append(f"state-{n.id}:{STATE_DIR}")
            svc["working_dir"] = STATE_DIR
        if n.role == "aggregator":
            # the run folder (metrics, final and best model) survives the container
            env["FEDBUS_RUNS_DIR"] = f"{STATE_DIR}/runs"
        if n.role in REDIS_ROLES and use_redis:
            env["FEDBUS_REDIS_URL"] = f"redis://{redis_host}:{redis_port}/0"
        if env:
            svc["environment"] = env
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
