"""Local mosquittos for a manifest: tests, trials and ``fedbus run``.

``spawn_secure_mosquitto`` writes the users, passwords and rights (and with ``tls`` the
certificates) for a manifest into a folder the broker can read, starts mosquitto on a free
loopback port and returns the broker plus the same manifest pointed at it, so ``make_bus``
connects every node with its own identity.

``spawn_bridged`` starts every broker a multi-broker manifest (``brokers:``) leaves to
``fedbus run``, each on a free loopback port with its generated bridge to its parent, and
waits until every bridge is connected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import structlog

from fedbus.broker import (
    QUEUED_MESSAGES,
    MosquittoProcess,
    free_port,
    packet_limit_conf,
    spawn_mosquitto,
)
from fedbus.deploy.certs import CertFiles, write_certs
from fedbus.deploy.security import Backend, SecurityFiles, TlsFiles, write_broker_security
from fedbus.errors import BrokerError, ManifestError
from fedbus.manifest import BrokerSpec, Manifest

__all__ = ["BridgedBrokers", "SecureMosquitto", "spawn_bridged", "spawn_secure_mosquitto"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class SecureMosquitto:
    proc: MosquittoProcess
    files: SecurityFiles
    certs: CertFiles | None
    #: The manifest pointed at this broker, every node with its own credentials.
    manifest: Manifest
    workdir: Path

    @property
    def host(self) -> str:
        return self.proc.host

    @property
    def port(self) -> int:
        return self.proc.port

    def password(self, user: str) -> str:
        return self.files.passwords[user]

    async def stop(self) -> None:
        try:
            await self.proc.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _prepare(m: Manifest, backend: Backend, tls: bool, ops: tuple[str, ...],
             passwords: Mapping[str, str] | None, aliases: Mapping[str, str] | None,
             ) -> tuple[Path, SecurityFiles, CertFiles | None]:
    # Under /tmp and 0755: mosquitto drops root to its own user, which must reach the files.
    work = Path(tempfile.mkdtemp(prefix="fedbus-secure-"))
    work.chmod(0o755)
    try:
        certs = None
        tls_files = None
        if tls:
            certs = write_certs(m, work / "certs", operators=(*ops, *(aliases or {})),
                                world_readable_keys=True)
            tls_files = TlsFiles(ca=str(certs.ca), cert=str(certs.broker_cert),
                                 key=str(certs.broker_key))
        files = write_broker_security(m, work / "security", passwords=passwords, operators=ops,
                                      aliases=aliases, backend=backend, tls=tls_files,
                                      world_readable=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, files, certs


async def spawn_secure_mosquitto(
    m: Manifest,
    *,
    backend: Backend = "dynsec",
    tls: bool = False,
    operators: Iterable[str] = (),
    passwords: Mapping[str, str] | None = None,
    aliases: Mapping[str, str] | None = None,
    config_extra: str = "",
) -> SecureMosquitto:
    """Start mosquitto with ``m``'s generated users and rights (``tls``: mTLS, CN = node id).

    ``aliases={"mallory": "t0"}`` adds a user with exactly t0's rights: an attacker holding a
    trainer's credentials, without taking over the real t0's session.
    """
    work, files, certs = _prepare(m, backend, tls, tuple(operators), passwords, aliases)
    try:
        proc = await spawn_mosquitto(config_extra=files.conf_text + config_extra,
                                     workdir=work / "broker")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    spec = BrokerSpec(
        host=proc.host,
        port=proc.port,
        password_file=str(files.password_dir / "{node}"),
        tls_ca=str(certs.ca) if certs else None,
        tls_cert=str(certs.out_dir / "nodes" / "{node}.crt") if certs else None,
        tls_key=str(certs.out_dir / "nodes" / "{node}.key") if certs else None,
        chunk_bytes=m.broker.chunk_bytes if m.broker else BrokerSpec().chunk_bytes,
        keepalive_s=m.broker.keepalive_s if m.broker else BrokerSpec().keepalive_s,
        max_queued_messages=QUEUED_MESSAGES,  # what spawn_mosquitto configures
    )
    return SecureMosquitto(proc=proc, files=files, certs=certs,
                           manifest=dataclasses.replace(m, broker=spec), workdir=work)


@dataclass(slots=True)
class BridgedBrokers:
    """The brokers ``spawn_bridged`` started, by name, and the manifest pointed at them."""

    procs: dict[str, MosquittoProcess]
    manifest: Manifest

    async def stop(self) -> None:
        """Children first, so no bridge spends its last seconds reconnecting to a dead parent."""
        for name in reversed(list(self.procs)):
            try:
                await self.procs[name].stop()
            finally:
                self.procs[name].kill_now()

    def kill_now(self) -> None:
        for proc in self.procs.values():
            proc.kill_now()
            shutil.rmtree(proc.workdir, ignore_errors=True)


async def _bridge_up(proc: MosquittoProcess, connection: str, timeout_s: float) -> None:
    # mosquitto keeps `$SYS/broker/connection/<name>/state` retained on the bridging broker:
    # "1" once the bridge is connected to its parent (and has subscribed there).
    import aiomqtt

    topic = f"$SYS/broker/connection/{connection}/state"
    try:
        async with asyncio.timeout(timeout_s):
            async with aiomqtt.Client(proc.host, proc.port, identifier=f"{connection}.probe",
                                      protocol=aiomqtt.ProtocolVersion.V5) as client:
                await client.subscribe(topic)
                async for message in client.messages:
                    if bytes(message.payload or b"") == b"1":  # type: ignore[arg-type]
                        return
    except TimeoutError:
        raise BrokerError(f"the bridge {connection} on {proc.endpoint} did not connect within "
                          f"{timeout_s:g}s: {proc.log_tail()!r}",
                          "check the parent broker is up and reachable") from None


async def spawn_bridged(m: Manifest, *, config_extra: str = "",
                        bridge_timeout_s: float = 15.0) -> BridgedBrokers:
    """Start each of ``m.brokers`` without host/port, parents first, each bridged to its
    parent; return them once every bridge is connected, with ``m`` pointed at them
    (``fedbus.manifest.with_node_broker`` then gives each node its broker)."""
    from fedbus.deploy.bridge import bridge_config, bridge_name, topological

    order = topological(m)
    addresses: dict[str, tuple[str, int]] = {
        b.name: (b.spec.host, b.spec.port) for b in order if b.spec is not None}
    for b in order:
        if b.spec is None:
            addresses[b.name] = ("127.0.0.1", free_port())
        elif b.parent is not None and m.brokers[b.parent].spec is None:
            raise ManifestError(m.source, f"brokers.{b.name}",
                                f"{b.name!r} runs elsewhere but bridges to {b.parent!r}, which "
                                "`fedbus run` starts on a loopback port it cannot be told; "
                                f"give {b.parent!r} a host and port too")
    started = BridgedBrokers({}, m)
    try:
        for b in order:
            if b.spec is not None:
                continue
            host, port = addresses[b.name]
            bridge = bridge_config(m, b.name, addresses) if b.parent is not None else ""
            # (the limit before the bridge section: it is a global option)
            limit = packet_limit_conf(BrokerSpec().chunk_bytes)
            proc = await spawn_mosquitto(port, host=host,
                                         config_extra=limit + bridge + config_extra)
            started.procs[b.name] = proc
            log.info("broker_started", broker=b.name, endpoint=proc.endpoint, pid=proc.pid,
                     parent=b.parent)
        for name, proc in started.procs.items():
            if m.brokers[name].parent is not None:
                await _bridge_up(proc, bridge_name(m, name), bridge_timeout_s)
    except BaseException:
        await started.stop()
        raise
    specs = {name: dataclasses.replace(
        b, spec=b.spec or BrokerSpec(host=addresses[name][0], port=addresses[name][1],
                                     max_queued_messages=QUEUED_MESSAGES))
        for name, b in m.brokers.items()}
    root = next(b for b in specs.values() if b.parent is None)
    started.manifest = dataclasses.replace(m, brokers=MappingProxyType(specs), broker=root.spec)
    return started
