"""Broker security from a manifest: per-node users, passwords and topic rights for mosquitto.

Every node is a broker user named by its node id; its rights are exactly its wiring
(``fedbus.manifest.compile_wiring``), so a trainer can write only its own update, presence and
metrics and read only its parent's model and orders meant for it. Two mosquitto backends:

``dynsec`` (default): the dynamic-security plugin shipped with mosquitto 2. It checks
  SUBSCRIBE against the rights too, so a refused subscription comes back as SUBACK 0x87 and
  the client raises ``SubscribeDenied``.
``acl_file``: the classic ``password_file`` + ``acl_file``. mosquitto 2.0 grants every
  SUBSCRIBE and filters at delivery, so a forbidden subscription stays silent (it receives
  nothing); publishes are refused visibly (PUBACK 0x87) under both backends.

Both set ``use_username_as_clientid``: the client id is the authenticated user, so nobody can
take over (and kick off) another node's session by choosing its client id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fedbus import topics
from fedbus.broker import QUEUED_MESSAGES, packet_limit
from fedbus.deploy.passwords import (
    ITERATIONS,
    new_password,
    password_file_text,
    pbkdf2,
)
from fedbus.errors import DeployError
from fedbus.manifest import BrokerSpec, Manifest, compile_wiring
from fedbus.manifest.wiring import Wiring, role_wiring

__all__ = [
    "Backend",
    "SecurityFiles",
    "TlsFiles",
    "acl_text",
    "broker_conf_text",
    "dynsec_config",
    "find_dynsec_plugin",
    "node_rights",
    "write_broker_security",
]

Backend = Literal["dynsec", "acl_file"]

_DYNSEC_PATHS: Final = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",  # the eclipse-mosquitto image
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)
#: Where the eclipse-mosquitto:2 container keeps the plugin (compose files use it).
CONTAINER_DYNSEC_PLUGIN: Final = "/usr/lib/mosquitto_dynamic_security.so"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The broker's side of (m)TLS, as paths the broker process will see."""

    ca: str
    cert: str
    key: str
    #: Client certificates required; their CN (= node id) becomes the user name.
    require_client_cert: bool = True


@dataclass(frozen=True, slots=True)
class SecurityFiles:
    """What ``write_broker_security`` wrote. ``passwords`` holds secrets: never log it."""

    out_dir: Path
    backend: Backend
    conf: Path  #: mosquitto config lines to append (``spawn_mosquitto(config_extra=...)``)
    broker_conf: Path  #: a whole mosquitto.conf for a dedicated broker (compose, edge)
    passwd: Path
    acl: Path
    dynsec: Path
    password_dir: Path  #: one file per user, holding its plain password (mode 0600)
    users: tuple[str, ...]
    passwords: Mapping[str, str] = field(repr=False)

    def password_file(self, user: str) -> Path:
        return self.password_dir / user

    @property
    def conf_text(self) -> str:
        return self.conf.read_text()


def node_rights(m: Manifest, operators: Iterable[str] = (),
                aliases: Mapping[str, str] | None = None) -> dict[str, Wiring]:
    """Per broker user, what it may subscribe to and publish on: the wiring plus operators.

    ``aliases`` maps extra users to a node whose rights they share (tests: an attacker with a
    trainer's rights that does not kick the real trainer's session off the broker).
    """
    rights = dict(compile_wiring(m))
    if m.brokers:
        # Each bridge logs in to its parent broker as its own user (fedbus.deploy.bridge):
        # it publishes there what goes out and subscribes to what comes in, nothing more.
        from fedbus.deploy.bridge import bridge_rights

        rights.update(bridge_rights(m))
    for op in operators:
        topics.validate_id(op, "operator id")
        if op in rights:
            raise DeployError(f"operator {op!r} clashes with a node id of {m.source}")
        rights[op] = role_wiring(m.job, op, "operator")
    for user, node in (aliases or {}).items():
        topics.validate_id(user, "user")
        if user in rights or node not in rights:
            raise DeployError(f"alias {user!r} -> {node!r}: the alias must be new and the node "
                              f"one of {m.source}")
        rights[user] = rights[node]
    return rights


def acl_text(m: Manifest, rights: Mapping[str, Wiring]) -> str:
    """An ``acl_file``: one ``user`` block per node with exactly its topics, nothing else."""
    lines = [f"# fedbus ACL for job {m.job!r}, generated from {m.source} by `fedbus acl`.",
             "# One block per broker user (= node id); no rule for anyone else, so any other",
             "# user, and anonymous clients, may do nothing."]
    for user, w in rights.items():
        lines += ["", f"user {user}"]
        for topic in dict.fromkeys((*w.subscribe, *w.publish)):
            access = ("readwrite" if topic in w.subscribe and topic in w.publish
                      else "read" if topic in w.subscribe else "write")
            lines.append(f"topic {access} {topic}")
    return "\n".join(lines) + "\n"


def dynsec_config(m: Manifest, rights: Mapping[str, Wiring], passwords: Mapping[str, str], *,
                  iterations: int = ITERATIONS) -> dict[str, Any]:
    """The dynamic-security plugin's JSON: one client and one role per user; deny by default."""
    import base64

    clients: list[dict[str, Any]] = []
    roles: list[dict[str, Any]] = []
    for user, w in rights.items():
        salt = os.urandom(12)
        clients.append({
            "username": user,
            "textName": f"fedbus {m.job} node {user}",
            "password": base64.b64encode(pbkdf2(passwords[user], salt, iterations)).decode(),
            "salt": base64.b64encode(salt).decode(),
            "iterations": iterations,
            "roles": [{"rolename": f"fedbus.{user}"}],
        })
        acls: list[dict[str, Any]] = []
        for f in w.subscribe:
            # A pattern, not a literal: rights on ``metrics/+`` also cover ``metrics/<agg>``.
            acls += [{"acltype": "subscribePattern", "topic": f, "allow": True},
                     {"acltype": "publishClientReceive", "topic": f, "allow": True}]
        acls += [{"acltype": "publishClientSend", "topic": t, "allow": True} for t in w.publish]
        roles.append({"rolename": f"fedbus.{user}", "acls": acls})
    return {
        "clients": clients,
        "roles": roles,
        "groups": [],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
    }


def find_dynsec_plugin() -> str:
    """Path of mosquitto's dynamic-security plugin on this machine."""
    for candidate in _DYNSEC_PATHS:
        if os.path.exists(candidate):
            return candidate
    raise DeployError("mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was "
                      "not found; install mosquitto 2.x, pass its path, or use "
                      "backend='acl_file'")


def _conf_text(backend: Backend, broker_dir: str, plugin: str | None,
               tls: TlsFiles | None) -> str:
    lines = ["# fedbus broker security (generated by `fedbus acl`); append to mosquitto.conf",
             "allow_anonymous false",
             "# The client id is the authenticated user (= node id): no client can pick another",
             "# node's id and take over its session.",
             "use_username_as_clientid true"]
    if backend == "dynsec":
        lines += [f"plugin {plugin}", f"plugin_opt_config_file {broker_dir}/dynsec.json"]
    else:
        lines += [f"password_file {broker_dir}/passwd", f"acl_file {broker_dir}/acl"]
    if tls is not None:
        lines += ["# TLS on the listener above; with client certificates the CN is the user.",
                  f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}",
                  "tls_version tlsv1.2"]
        if tls.require_client_cert:
            lines += ["require_certificate true", "use_identity_as_username true"]
    return "\n".join(lines) + "\n"


def broker_conf_text(security_lines: str, *, port: int = 1883, host: str = "0.0.0.0",
                     persistence_dir: str = "/var/lib/mosquitto/",
                     log_dest: str = "stdout", queued: int = QUEUED_MESSAGES,
                     max_packet: int | None = None) -> str:
    """A whole mosquitto.conf for a broker dedicated to fedbus (compose, edge): listener,
    persistence, the queue limits chunked payloads need (brokers/README.md), the largest
    packet the job sends (``max_packet``, ``fedbus.broker.packet_limit``), security."""
    size = "" if max_packet is None else (
        "# The largest packet this job sends (one chunk plus headroom): anything bigger is\n"
        "# dropped and its sender disconnected, so a forged 64 MiB publish never crosses.\n"
        f"max_packet_size {max_packet}\n")
    return f"""# fedbus broker (generated by fedbus); see brokers/README.md for every limit below.
per_listener_settings false
listener {port} {host}
# Retained models, presence and offline sessions survive a broker restart.
persistence true
persistence_location {persistence_dir}
autosave_interval 30
# mosquitto silently drops a client's messages beyond max_queued_messages (default 1000):
# chunked models arrive as bursts, so count generously and bound by bytes instead.
max_inflight_messages 1000
# The manifest's broker.max_queued_messages says the same (nodes check it at start).
max_queued_messages {queued}
max_queued_bytes 2147483648
{size}set_tcp_nodelay true
log_dest {log_dest}
log_type error
log_type warning
log_type notice
{security_lines}"""


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)


def write_broker_security(
    m: Manifest,
    out_dir: str | os.PathLike[str],
    *,
    passwords: Mapping[str, str] | None = None,
    operators: Iterable[str] = (),
    aliases: Mapping[str, str] | None = None,
    backend: Backend = "dynsec",
    plugin: str | None = None,
    broker_dir: str | None = None,
    tls: TlsFiles | None = None,
    keep_existing: bool = True,
    world_readable: bool = False,
    persistence_dir: str = "/var/lib/mosquitto/",
    log_dest: str = "stdout",
    port: int | None = None,
    listen_host: str = "0.0.0.0",
    group: str | None = None,
) -> SecurityFiles:
    """Write the broker's password file, ACL, dynsec JSON and config lines for ``m``.

    ``passwords`` sets some users' passwords; the others keep the one already in
    ``out_dir/passwords/`` (``keep_existing``) or get a fresh random one. ``broker_dir`` is
    where the broker will see ``out_dir`` (a container mount); default ``out_dir`` itself.
    ``world_readable`` makes the hashed files 0644 for a broker that drops root to its own
    user (tests); by default they are 0640 and ``group`` (``mosquitto`` on Debian; needs
    root) is made their group, so the broker can read them and nobody else can; with ``tls``,
    the server key ``fedbus certs`` wrote (0600) is given to the group too (0640).
    """
    out = Path(out_dir)
    rights = node_rights(m, operators, aliases)
    unknown = set(passwords or {}) - set(rights)
    if unknown:
        raise DeployError(f"passwords given for {', '.join(sorted(unknown))}: not nodes or "
                          f"operators of {m.source}")
    pw_dir = out / "passwords"
    pw_dir.mkdir(parents=True, exist_ok=True)
    pw_dir.chmod(0o700)
    chosen: dict[str, str] = {}
    for user in rights:
        given = (passwords or {}).get(user)
        existing = pw_dir / user
        if given is None and keep_existing and existing.exists():
            given = existing.read_text(encoding="utf-8").strip()
        chosen[user] = given or new_password()
        _write(existing, chosen[user] + "\n", 0o600)

    mode = 0o644 if world_readable else 0o640
    files = SecurityFiles(
        out_dir=out, backend=backend, conf=out / "mosquitto.conf",
        broker_conf=out / "broker.conf", passwd=out / "passwd",
        acl=out / "acl", dynsec=out / "dynsec.json", password_dir=pw_dir,
        users=tuple(rights), passwords=chosen,
    )
    _write(files.passwd, password_file_text(chosen), mode)
    _write(files.acl, acl_text(m, rights), mode)
    # The plugin rewrites its JSON when administered at run time; it only reads it here.
    _write(files.dynsec, json.dumps(dynsec_config(m, rights, chosen), indent=1) + "\n", mode)
    if backend == "dynsec" and plugin is None:
        plugin = find_dynsec_plugin()
    where = broker_dir or str(out.resolve())
    if group is not None:
        import grp

        # The broker drops root to its own user: it reads these, and the TLS server key
        # `fedbus certs` wrote 0600, through the group (the key becomes 0640, owner kept).
        readable = [files.passwd, files.acl, files.dynsec]
        if tls is not None and Path(tls.key).is_file():
            readable.append(Path(tls.key))
        try:
            gid = grp.getgrnam(group).gr_gid
            for f in readable:
                os.chown(f, -1, gid)
                f.chmod(f.stat().st_mode & 0o7777 | 0o040)
        except (KeyError, PermissionError) as exc:
            raise DeployError(f"cannot give the broker files to group {group!r}: {exc}; run "
                              "as root, or chgrp them yourself") from None
    lines = _conf_text(backend, where, plugin, tls)
    _write(files.conf, lines, 0o644)
    if port is None:
        port = m.broker.port if m.broker else 8883 if tls else 1883
    # A manifest that states a bigger queue gets it; mosquitto's default (1000) never.
    queued = max(m.broker.max_queued_messages if m.broker else 0, QUEUED_MESSAGES)
    chunk = m.broker.chunk_bytes if m.broker else BrokerSpec().chunk_bytes
    _write(files.broker_conf, broker_conf_text(lines, port=port, host=listen_host, queued=queued,
                                               persistence_dir=persistence_dir,
                                               log_dest=log_dest,
                                               max_packet=packet_limit(chunk)), 0o644)
    return files

