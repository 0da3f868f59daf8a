"""A node's broker identity from the manifest: user name, password, TLS files.

With any credential configured (``password_env``, ``password_file`` or a client certificate)
the user name defaults to the node id, which is what ``fedbus acl`` / ``fedbus certs`` make
the broker expect. The password is read here, kept out of reprs and never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedbus.errors import FedbusError, ManifestError
from fedbus.manifest import Manifest

__all__ = ["Credentials", "credentials_key", "node_credentials", "observer_id"]


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def secured(self) -> bool:
        return self.username is not None or self.tls_cert is not None


def _path(m: Manifest, template: str, node_id: str) -> str:
    path = Path(template.replace("{node}", node_id))
    if not path.is_absolute() and m.source and not m.source.startswith("<"):
        path = Path(m.source).resolve().parent / path
    return str(path)


def node_credentials(m: Manifest, node_id: str, *,
                     env: dict[str, str] | None = None) -> Credentials:
    """The identity ``node_id`` connects with; ``ManifestError`` if a password file cannot be
    read. An unset or empty ``password_env`` means no password (an anonymous broker); a
    secured broker then refuses the connection, and ``ConnectError`` says so."""
    b = m.broker
    if b is None:
        return Credentials()
    environ = os.environ if env is None else env
    password: str | None = None
    if b.password_env and environ.get(b.password_env):
        password = environ[b.password_env]
    elif b.password_file:
        path = _path(m, b.password_file, node_id)
        try:
            password = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ManifestError(m.source, "broker.password_file",
                                f"cannot read the password of {node_id!r} from {path}: "
                                f"{exc.strerror or exc}; run `fedbus acl` or fix the path"
                                ) from None
    secured = password is not None or b.tls_cert is not None
    username = b.username or (node_id if secured else None)
    return Credentials(
        username=username,
        password=password,
        tls_ca=_path(m, b.tls_ca, node_id) if b.tls_ca else None,
        tls_cert=_path(m, b.tls_cert, node_id) if b.tls_cert else None,
        tls_key=_path(m, b.tls_key, node_id) if b.tls_key else None,
    )


def credentials_key(m: Manifest, env: dict[str, str] | None = None) -> str | None:
    """The manifest key that makes its broker ask for credentials, or None (anonymous)."""
    b = m.broker
    if b is None:
        return None
    environ = os.environ if env is None else env
    if b.password_file:
        return "broker.password_file"
    if b.password_env and environ.get(b.password_env):
        return "broker.password_env"
    if b.tls_cert:
        return "broker.tls_cert"
    return None


def observer_id(m: Manifest, user: str | None, command: str, *,
                env: dict[str, str] | None = None) -> str:
    """The identity a read-only observer (``fedbus watch``, ``fedbus dashboard``) connects as:
    ``user`` (an operator from ``fedbus acl --operator``), else a throwaway id, which only an
    anonymous broker accepts; on a secured one that is said at once, naming ``--user``."""
    if user:
        return user
    key = credentials_key(m, env)
    if key is not None:
        raise FedbusError(f"`fedbus {command}`: job {m.job!r}'s broker asks for credentials "
                          f"({key} in {m.source}): pass --user OPERATOR, an operator made by "
                          "`fedbus acl --operator` (e.g. --user ops)")
    return f"{command}-{os.getpid()}"
