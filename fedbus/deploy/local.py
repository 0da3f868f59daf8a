"""A local mosquitto locked down by a manifest's generated security: tests and trials.

``spawn_secure_mosquitto`` writes the users, passwords and rights (and with ``tls`` the
certificates) for a manifest into a folder the broker can read, starts mosquitto on a free
loopback port and returns the broker plus the same manifest pointed at it, so ``make_bus``
connects every node with its own identity.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedbus.broker import QUEUED_MESSAGES, MosquittoProcess, spawn_mosquitto
from fedbus.deploy.certs import CertFiles, write_certs
from fedbus.deploy.security import Backend, SecurityFiles, TlsFiles, write_broker_security
from fedbus.manifest import BrokerSpec, Manifest

__all__ = ["SecureMosquitto", "spawn_secure_mosquitto"]


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
