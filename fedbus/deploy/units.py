"""systemd for one node of a manifest: a hardened unit and its environment file.

``fedbus-<node>.service`` runs ``fedbus serve MANIFEST --node <node>``: restarts on failure
with a growing delay (systemd >= 254) and a start limit, logs to journald under its own
identifier, and has memory and CPU limits sized for a Raspberry Pi (by role). The env file
holds the variables the manifest reads (``${VAR}``) and, for a secured broker, the node's own
password; it is written 0640, for ``root:fedbus``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedbus.errors import DeployError
from fedbus.manifest import Manifest

__all__ = ["UnitFiles", "check_startable", "manifest_variables", "unit_text", "write_unit"]

#: (MemoryHigh, MemoryMax, CPUWeight, Nice) by role. A 4 GB Pi: torch plus a small model fits
#: well under 1.5 GB; numpy-only roles need a fraction. Raise them for bigger models.
_LIMITS: Final = {
    "trainer": ("1200M", "1536M", 80, 5),
    "aggregator": ("768M", "1024M", 100, 0),
    "relay": ("768M", "1024M", 100, 0),
}
_DEFAULT_LIMITS: Final = ("384M", "512M", 60, 5)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


@dataclass(frozen=True, slots=True)
class UnitFiles:
    unit: Path
    env: Path
    name: str


def manifest_variables(m: Manifest) -> list[str]:
    """Names of the environment variables the manifest file refers to, in order."""
    if not m.source or m.source.startswith("<"):
        return []
    try:
        text = Path(m.source).read_text(encoding="utf-8")
    except OSError:
        return []
    names = [v for v in dict.fromkeys(_VAR.findall(text))]
    if m.broker is not None and m.broker.password_env:
        names.append(m.broker.password_env)
    return list(dict.fromkeys(names))


def check_startable(m: Manifest, node_id: str, *, broker: str | None = None,
                    password: str | None = None,
                    values: Mapping[str, str] | None = None) -> list[str]:
    """Why ``fedbus serve`` of ``node_id`` could not start on this device as generated.

    A unit for such a node would exit at once and restart-loop, so the certain failures
    raise ``DeployError`` naming the fix; the doubtful ones (a user name with no password
    yet, to be filled into the env file) come back as warnings. ``broker`` is a
    ``--broker HOST:PORT`` given to the unit; ``values`` the environment it is made from.
    """
    node = m.node(node_id)
    env = os.environ if values is None else values
    where = f"fedbus-{node.id}.service would exit at once and restart-loop"
    if broker is None:
        if m.brokers:
            known = node.broker is not None and node.broker in m.brokers
            spec = m.brokers[node.broker].spec if known and node.broker else None
            if spec is None:
                raise DeployError(
                    f"{m.source}: {node.id} connects to broker {node.broker!r}, which has no "
                    f"host and port (`fedbus run` starts it itself); {where}. Give "
                    f"brokers.{node.broker} host and port, or pass --broker HOST:PORT")
        elif m.broker is None:
            raise DeployError(
                f"{m.source} names no broker (`fedbus run` starts its own; a device cannot): "
                f"{where}. Pass --broker HOST:PORT (written into ExecStart), or add "
                "broker: {host: ${FEDBUS_BROKER_HOST}, port: 1883} to the manifest")
    b = m.broker
    if b is None:
        return []
    warnings: list[str] = []
    for field_name in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        template = getattr(b, field_name)
        if not template:
            continue
        if field_name == "password_file" and password is not None:
            continue  # --secure: the password goes into the env file instead
        path = Path(template.replace("{node}", node.id))
        if not path.is_absolute() and m.source and not m.source.startswith("<"):
            path = Path(m.source).resolve().parent / path
        if not path.is_file():
            fix = ("run `fedbus acl` and copy the node's password there, or pass --secure DIR"
                   if field_name == "password_file" else
                   "copy the node's certificate files from `fedbus certs` there")
            raise DeployError(f"{m.source}: broker.{field_name} of {node.id} is {path}, which "
                              f"does not exist here; {where}. Fix: {fix}")
    if password is not None and not b.password_env:
        raise DeployError(f"{m.source}: --secure gives {node.id} a password, but the manifest "
                          "has no broker.password_env to hand it to the node: add "
                          "password_env: FEDBUS_BROKER_PASSWORD under broker:")
    has_password = (password is not None or bool(b.password_env and env.get(b.password_env))
                    or bool(b.password_file))
    if b.username and not has_password and not b.tls_cert:
        var = b.password_env or "a password_env variable"
        warnings.append(f"broker user {b.username!r} has no password: {node.id} will be "
                        f"refused by a secured broker. Pass --secure DIR (a `fedbus acl` "
                        f"folder), or set {var} in /etc/fedbus/{node.id}.env before starting")
    return warnings


def unit_text(m: Manifest, node_id: str, *, manifest_path: str, prefix: str = "/opt/fedbus",
              env_file: str, systemd_version: int = 252, broker: str | None = None) -> str:
    """The unit for ``node_id``; ``manifest_path`` is where the manifest is on the device;
    ``broker`` (HOST:PORT) overrides the manifest's broker on the command line."""
    node = m.node(node_id)
    override = f" --broker {broker}" if broker else ""
    high, cap, weight, nice = _LIMITS.get(node.role, _DEFAULT_LIMITS)
    name = f"fedbus-{node.id}"
    backoff = ("# Restart delays grow from 10 s to 5 minutes over 6 restarts (systemd >= 254).\n"
               "RestartSteps=6\nRestartMaxDelaySec=5min\n") if systemd_version >= 254 else ""
    threads = "3" if node.role == "trainer" else "1"
    return f"""# Generated by `fedbus units {m.source} --node {node.id}`; regenerate, do not edit.
# fedbus {node.role} {node.id} of job {m.job}.
#   systemctl enable --now {name}    journalctl -fu {name}
[Unit]
Description=fedbus {node.role} {node.id} (job {m.job})
Wants=network-online.target
After=network-online.target mosquitto.service
# Give up after 10 crashes in 10 minutes instead of looping forever (then: systemctl reset-failed).
StartLimitIntervalSec=600
StartLimitBurst=10

[Service]
Type=exec
User=fedbus
Group=fedbus
EnvironmentFile={env_file}
ExecStart={prefix}/venv/bin/fedbus serve {manifest_path} --node {node.id}{override}
# A finished job exits 0 and stays stopped; a crash restarts. The broker connection has its
# own jittered backoff, so this only covers the process dying.
Restart=on-failure
RestartSec=10s
{backoff}TimeoutStopSec=30s
StandardOutput=journal
StandardError=journal
SyslogIdentifier={name}
Environment=PYTHONUNBUFFERED=1 HOME=/var/lib/fedbus XDG_CACHE_HOME=/var/cache/fedbus
Environment=OMP_NUM_THREADS={threads} PYTHONPATH={prefix}/app

StateDirectory=fedbus
CacheDirectory=fedbus
WorkingDirectory=/var/lib/fedbus

# Pi-sized limits for a {node.role}: throttled above MemoryHigh, killed above MemoryMax.
MemoryHigh={high}
MemoryMax={cap}
CPUWeight={weight}
Nice={nice}
TasksMax=256

# Hardening: the node only needs the network and its own directories.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=/var/lib/fedbus /var/cache/fedbus
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
UMask=0027

[Install]
WantedBy=multi-user.target
"""


def env_text(m: Manifest, node_id: str, *, values: Mapping[str, str],
             password: str | None = None) -> str:
    """KEY=value lines (systemd EnvironmentFile) for the variables the manifest reads."""
    lines = [f"# Environment of fedbus-{node_id}.service (generated by `fedbus units`).",
             "# EnvironmentFile syntax: KEY=value, no `export`, no shell expansion."]
    pw_env = m.broker.password_env if m.broker else None
    for name in manifest_variables(m):
        if name == pw_env:
            continue
        value = values.get(name)
        if value is None:
            lines.append(f"# {name}=   (unset: the manifest's default applies, if it has one)")
            continue
        if any(c in value for c in "\n\"'\\"):
            raise DeployError(f"{name}={value!r} cannot be written to an EnvironmentFile")
        lines.append(f"{name}={value}")
    if pw_env:
        lines.append(f"# The broker password of {node_id} (this file is 0640 root:fedbus).")
        lines.append(f"{pw_env}={password or ''}")
    return "\n".join(lines) + "\n"


def write_unit(m: Manifest, node_id: str, out_dir: str | os.PathLike[str], *,
               manifest_path: str | None = None, prefix: str = "/opt/fedbus",
               env_dir: str = "/etc/fedbus", values: Mapping[str, str] | None = None,
               password: str | None = None, systemd_version: int = 252,
               broker: str | None = None) -> UnitFiles:
    """Write ``fedbus-<node>.service`` and ``<node>.env`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"fedbus-{m.node(node_id).id}.service"
    env_path = f"{env_dir}/{node_id}.env"
    unit = out / name
    unit.write_text(unit_text(m, node_id, manifest_path=manifest_path or
                              str(Path(m.source).resolve()), prefix=prefix, env_file=env_path,
                              systemd_version=systemd_version, broker=broker))
    unit.chmod(0o644)
    env = out / f"{node_id}.env"
    env.write_text(env_text(m, node_id, values=os.environ if values is None else values,
                            password=password))
    env.chmod(0o640)
    return UnitFiles(unit=unit, env=env, name=name)
