"""Per-node broker passwords: generated or read, hashed in mosquitto's own ``$7$`` format.

``mosquitto_passwd`` writes ``user:$7$<iterations>$<salt b64>$<PBKDF2-SHA512 b64>``; hashing
here means generating a federation's password file needs no mosquitto tools on the machine.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from fedbus.errors import DeployError

__all__ = [
    "hash_password",
    "new_password",
    "password_file_text",
    "pbkdf2",
    "read_secrets_file",
    "verify_password",
]

# mosquitto_passwd's own default. It protects weak, human-chosen passwords only a little; the
# generated ones carry ~190 random bits, where iterations add nothing.
ITERATIONS: Final = 101
_SALT_BYTES: Final = 12


def new_password() -> str:
    """A random password, URL-safe (no quoting trouble in env files, YAML or shell)."""
    return secrets.token_urlsafe(24)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)


def hash_password(password: str, *, iterations: int = ITERATIONS,
                  salt: bytes | None = None) -> str:
    """The ``$7$`` hash mosquitto's ``password_file`` reads (what ``mosquitto_passwd`` writes)."""
    s = salt if salt is not None else os.urandom(_SALT_BYTES)
    return f"$7${iterations}${_b64(s)}${_b64(pbkdf2(password, s, iterations))}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash (used by tests and by ``fedbus acl``)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    expected = base64.b64decode(parts[4])
    return secrets.compare_digest(pbkdf2(password, salt, int(parts[2])), expected)


def read_secrets_file(path: str | os.PathLike[str], known: Iterable[str]) -> dict[str, str]:
    """``NODE=password`` lines (env-file style; ``#`` comments, blank lines) for known nodes.

    Raises ``DeployError`` naming the line for a malformed line or an unknown node id, so a
    typo never silently leaves a node with a random password.
    """
    names = set(known)
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DeployError(f"cannot read secrets file {path}: {exc.strerror or exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not value:
            raise DeployError(f"{path}:{number}: expected NODE=password")
        if name not in names:
            raise DeployError(f"{path}:{number}: {name!r} is not a node or operator of this "
                              f"manifest; known: {', '.join(sorted(names))}")
        out[name] = value.strip().strip("'\"")
    return out


def password_file_text(passwords: Mapping[str, str], *, iterations: int = ITERATIONS) -> str:
    """The whole ``password_file``: one ``user:hash`` line per user, sorted for stable diffs."""
    return "".join(f"{user}:{hash_password(pw, iterations=iterations)}\n"
                   for user, pw in sorted(passwords.items()))
