"""A federation's certificates: one CA, the broker's server certificate, one client per node.

Each node's certificate has CN = node id, so mosquitto's ``use_identity_as_username`` makes the
certificate the identity its ACL checks (``fedbus.deploy.security``). Keys are ECDSA P-256:
small, and cheap for a Raspberry Pi to handshake with. Needs the ``security`` extra
(``cryptography``). An existing CA in the output folder is kept, so adding a node does not
invalidate the certificates already handed out.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus import topics
from fedbus.errors import DeployError
from fedbus.manifest import Manifest

__all__ = ["CertFiles", "write_certs"]


@dataclass(frozen=True, slots=True)
class CertFiles:
    out_dir: Path
    ca: Path
    broker_cert: Path
    broker_key: Path
    users: tuple[str, ...]

    def cert(self, user: str) -> Path:
        return self.out_dir / "nodes" / f"{user}.crt"

    def key(self, user: str) -> Path:
        return self.out_dir / "nodes" / f"{user}.key"


def _crypto() -> Any:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise DeployError("`fedbus certs` needs the cryptography package: "
                          "pip install 'fedbus[security]'") from None
    return x509, hashes, serialization, ec, NameOID, ExtendedKeyUsageOID


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def write_certs(
    m: Manifest,
    out_dir: str | os.PathLike[str],
    *,
    broker_hosts: Sequence[str] = (),
    operators: Iterable[str] = (),
    days: int = 825,
    world_readable_keys: bool = False,
) -> CertFiles:
    """Write ``ca.crt``/``ca.key``, ``broker.crt``/``broker.key`` and ``nodes/<id>.crt|key``.

    ``broker_hosts`` are the names and addresses clients dial (the manifest's broker host,
    ``localhost`` and ``127.0.0.1`` are always added); TLS checks the dialled name against them.
    Private keys are 0600 unless ``world_readable_keys`` (tests: the broker drops root).
    """
    x509, hashes, serialization, ec, NameOID, EKU = _crypto()
    out = Path(out_dir)
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    key_mode = 0o644 if world_readable_keys else 0o600
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    def pem_key(key: Any) -> bytes:
        return bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"fedbus {m.job}"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    if ca_crt.exists() and ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    else:
        ca_private = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder().subject_name(name(f"fedbus {m.job} CA"))
            .issuer_name(name(f"fedbus {m.job} CA")).public_key(ca_private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(ca_private, hashes.SHA256())
        )
        _write(ca_key, pem_key(ca_private), 0o600)
        _write(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def issue(cn: str, usage: Any, sans: Sequence[Any]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_private, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    hosts = list(dict.fromkeys([*broker_hosts, *([m.broker.host] if m.broker else []),
                                "localhost", "127.0.0.1"]))
    sans: list[Any] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    crt, key = issue("broker", EKU.SERVER_AUTH, sans)
    _write(out / "broker.crt", crt, 0o644)
    _write(out / "broker.key", key, key_mode)

    users = [n.id for n in m.nodes]
    for op in operators:
        users.append(topics.validate_id(op, "operator id"))
    for user in users:
        crt, key = issue(user, EKU.CLIENT_AUTH, ())
        _write(out / "nodes" / f"{user}.crt", crt, 0o644)
        _write(out / "nodes" / f"{user}.key", key, key_mode)
    return CertFiles(out_dir=out, ca=ca_crt, broker_cert=out / "broker.crt",
                     broker_key=out / "broker.key", users=tuple(users))
