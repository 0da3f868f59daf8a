"""Signed messages: who sent a payload, proven by its sender's Ed25519 key.

A signed payload is the payload followed by a trailer::

    payload | signature (64) | signer id (utf-8) | len(signer id) (1) | b"FBS2"

The signature covers BLAKE3(payload | signer id): one pass over the bytes, then a 32-byte
Ed25519 signature, so signing an 11M-parameter update costs one hash of its 44 MB and a few
microseconds. BLAKE3 (SIMD on x86, NEON on ARM) hashed 44 MB 2.4x faster than SHA-256 here,
where OpenSSL's SHA-256 uses SHA-NI; a Raspberry Pi 4's Cortex-A72 has no ARMv8 crypto
extensions, so SHA-256 runs without help there (docs/security.md, "What it costs"). What
the envelope says (job,
kind, sender, round, message id, the run's epoch in its meta) is inside the signed bytes, so
none of it can be changed, and a replay is caught where it always was: message ids seen
before, rounds and epochs a service does not expect. ``cryptography`` and ``blake3`` (the
``security`` extra) are needed only by nodes of a job that signs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from fedbus import topics
from fedbus.errors import FedbusError

__all__ = ["KEY_CHECK_S", "MAGIC", "SignatureError", "Signer", "Verifier", "generate_key",
           "read_key", "read_public_keys", "split_signed", "write_key_pair"]

log = structlog.get_logger(__name__)

MAGIC: Final = b"FBS2"
#: How often a signer looks at its key file, and a verifier at the public keys' folder.
KEY_CHECK_S: float = 5.0
_SIG: Final = 64
_MAX_ID: Final = 64  # topic-level ids are at most 64 characters (fedbus.topics)
#: Signatures found good lately, kept so that checking one again is a lookup: a replayed
#: message (a real one, captured and published again, a thousand times a second) costs a
#: BLAKE3 of its payload instead of an Ed25519 verification (~60 us). Oldest forgotten first.
_REMEMBERED: Final = 4096


class SignatureError(FedbusError):
    """A payload whose signature is missing, malformed, unknown or wrong (``reason``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - the security extra is part of every install here
        raise FedbusError("signed messages need the 'security' extra: "
                          "pip install 'fedbus[security]'") from None
    return ed25519


def payload_hasher() -> Any:
    """A new BLAKE3 hasher: what a signature's digest starts from. The bus hashes a chunked
    payload with one as its chunks arrive (fedbus.bus._chunking), and hands it over."""
    try:
        from blake3 import blake3
    except ImportError:  # pragma: no cover - the security extra is part of every install here
        raise FedbusError("signed messages need the 'security' extra: "
                          "pip install 'fedbus[security]'") from None
    return blake3(max_threads=1)


def _digest(payload: bytes | memoryview, signer: str, hashed: Any = None) -> bytes:
    """BLAKE3(payload | signer); ``hashed``: a hasher that has read the payload already."""
    if hashed is not None:  # a copy: one delivery may be checked by several subscriptions
        h = hashed.copy()
    else:
        h = payload_hasher()
        h.update(payload)
    h.update(signer.encode())
    digest: bytes = h.digest()
    return digest


def generate_key() -> tuple[bytes, bytes]:
    """A new (private, public) raw Ed25519 key pair, 32 bytes each."""
    ed = _ed25519()
    from cryptography.hazmat.primitives import serialization as ser

    key = ed.Ed25519PrivateKey.generate()
    raw = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return raw, pub


class Signer:
    """Signs what one node publishes. ``from_file``: the key is read again when its file
    changes (checked at most every ``KEY_CHECK_S``), so a node takes a rotated key without
    a restart."""

    def __init__(self, node_id: str, private_key: bytes, *, path: Path | None = None) -> None:
        topics.validate_id(node_id, "signer id")
        self.node_id = node_id
        self._key = _ed25519().Ed25519PrivateKey.from_private_bytes(private_key)
        self._tail = node_id.encode() + bytes([len(node_id.encode())]) + MAGIC
        self._path = path
        self._stamp = _stamp(path) if path is not None else None
        self._checked = time.monotonic()

    @classmethod
    def from_file(cls, node_id: str, path: Path) -> Signer:
        return cls(node_id, read_key(path), path=path)

    def sign(self, payload: bytes) -> bytes:
        """``payload`` with its trailer appended (a copy: for small payloads)."""
        return b"".join((payload, self.trailer(payload)))

    def trailer(self, payload: bytes | memoryview) -> bytes:
        """What follows ``payload`` to sign it: the bus frames the two without joining them
        (``Bus.publish(tail=)``)."""
        self._follow_file()
        signature: bytes = self._key.sign(_digest(payload, self.node_id))
        return signature + self._tail

    def _follow_file(self) -> None:
        if self._path is None or time.monotonic() - self._checked < KEY_CHECK_S:
            return
        self._checked = time.monotonic()
        stamp = _stamp(self._path)
        if stamp != self._stamp and stamp is not None:
            try:
                key = _ed25519().Ed25519PrivateKey.from_private_bytes(read_key(self._path))
            except FedbusError as exc:  # half-written: keep signing with the old key
                log.warning("signing_key_unreadable", node=self.node_id, error=str(exc))
                return
            self._key, self._stamp = key, stamp
            log.info("signing_key_changed", node=self.node_id, path=str(self._path))


def split_signed(data: bytes) -> tuple[memoryview, bytes, str] | None:
    """(payload, signature, signer) of a signed payload; None when it carries no trailer."""
    if len(data) < len(MAGIC) + 1 + _SIG or data[-len(MAGIC):] != MAGIC:
        return None
    n = data[-len(MAGIC) - 1]
    end = len(data) - len(MAGIC) - 1
    if not 1 <= n <= _MAX_ID or end - n - _SIG < 0:
        raise SignatureError("bad_signature", "malformed signature trailer")
    try:
        signer = bytes(data[end - n:end]).decode()
    except UnicodeDecodeError:
        raise SignatureError("bad_signature", "signer id is not text") from None
    view = memoryview(data)
    return view[:end - n - _SIG], bytes(view[end - n - _SIG:end - n]), signer


class Verifier:
    """Checks payloads against the job's public keys (node id -> raw key, or keys: a node
    being rotated has two). ``from_folder``: the folder's ``<node>.pub`` and
    ``<node>.pub.next`` files, read again when they change (checked at most every
    ``KEY_CHECK_S``), so keys rotate without a restart (docs/security.md)."""

    def __init__(self, public_keys: Mapping[str, bytes | Sequence[bytes]], *, required: bool,
                 folder: Path | None = None) -> None:
        self.required = required
        self._keys = _public(public_keys)
        self._folder = folder
        self._stamp = _folder_stamp(folder) if folder is not None else None
        self._checked = time.monotonic()
        self._good: dict[tuple[str, bytes, bytes], None] = {}

    @classmethod
    def from_folder(cls, folder: Path, *, required: bool) -> Verifier:
        return cls(read_public_keys(folder), required=required, folder=folder)

    @property
    def signers(self) -> frozenset[str]:
        return frozenset(self._keys)

    def verify(self, data: bytes) -> tuple[bytes, str | None]:
        """(the payload without its trailer, the signer); the signer is None for an unsigned
        payload where signatures are optional. Raises ``SignatureError``."""
        parts = split_signed(data)
        if parts is None:
            if self.required:
                raise SignatureError("unsigned", "this job requires signed messages")
            return data, None
        payload, signature, signer = parts
        self._check(payload, signature, signer)
        return bytes(payload), signer

    def verify_tail(self, payload: bytes, tail: bytes, hashed: Any = None) -> str:
        """The signer of ``payload``, whose trailer came apart from it (``Message.tail``):
        nothing is copied; ``hashed``: a hasher (``payload_hasher``) that has read exactly
        ``payload`` already, so it is not read again. Raises ``SignatureError``."""
        parts = split_signed(tail)
        if parts is None or len(parts[0]):
            raise SignatureError("bad_signature", "malformed signature trailer")
        _, signature, signer = parts
        self._check(payload, signature, signer, hashed)
        return signer

    def _check(self, payload: bytes | memoryview, signature: bytes, signer: str,
               hashed: Any = None) -> None:
        self._follow_folder()
        keys = self._keys.get(signer)
        if not keys:
            raise SignatureError("unknown_signer", f"no public key for {signer!r}")
        digest = _digest(payload, signer, hashed)
        seen = (signer, signature, digest)
        if seen in self._good:
            return
        for key in keys:
            try:
                key.verify(signature, digest)
            except Exception:  # cryptography's InvalidSignature: the next key, if any
                continue
            if len(self._good) >= _REMEMBERED:
                del self._good[next(iter(self._good))]
            self._good[seen] = None
            return
        raise SignatureError("bad_signature", f"signature of {signer!r} does not match")

    def _follow_folder(self) -> None:
        if self._folder is None or time.monotonic() - self._checked < KEY_CHECK_S:
            return
        self._checked = time.monotonic()
        stamp = _folder_stamp(self._folder)
        if stamp == self._stamp:
            return
        try:
            keys = _public(read_public_keys(self._folder))
        except FedbusError as exc:  # a file half-copied: keep the keys we have, look again
            log.warning("public_keys_unreadable", folder=str(self._folder), error=str(exc))
            return
        self._keys, self._stamp = keys, stamp
        self._good.clear()  # a key withdrawn: what it signed is checked again
        log.info("public_keys_changed", folder=str(self._folder), signers=len(keys))


def _public(keys: Mapping[str, bytes | Sequence[bytes]]) -> dict[str, tuple[Any, ...]]:
    ed = _ed25519()
    return {node: tuple(ed.Ed25519PublicKey.from_public_bytes(raw)
                        for raw in ([raws] if isinstance(raws, bytes) else raws))
            for node, raws in keys.items()}


def read_public_keys(folder: Path) -> dict[str, list[bytes]]:
    """Node id -> its public keys in ``folder``: ``<node>.pub``, and ``<node>.pub.next``
    while a key is being rotated."""
    keys: dict[str, list[bytes]] = {}
    for path in sorted(folder.glob("*.pub")) + sorted(folder.glob("*.pub.next")):
        node = path.name.removesuffix(".next").removesuffix(".pub")
        keys.setdefault(node, []).append(read_key(path))
    return keys


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _folder_stamp(folder: Path) -> tuple[Any, ...]:
    names = sorted(p.name for p in folder.glob("*.pub*"))
    return tuple((name, _stamp(folder / name)) for name in names)


def write_key_pair(folder: str | os.PathLike[str], node_id: str, *, suffix: str = "") -> None:
    """``<node>.key`` (private, mode 0600) and ``<node>.pub`` in ``folder``, hex-encoded
    (``suffix=".next"``: the pair a rotation moves to)."""
    raw, pub = generate_key()
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    key_path = root / f"{topics.validate_id(node_id, 'node id')}.key{suffix}"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(raw.hex() + "\n")
    (root / f"{node_id}.pub{suffix}").write_text(pub.hex() + "\n")


def read_key(path: str | os.PathLike[str]) -> bytes:
    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as exc:
        raise FedbusError(f"cannot read key {path}: {exc}; make keys with `fedbus keys`"
                          ) from None
    if len(raw) != 32:
        raise FedbusError(f"key {path} is not a 32-byte Ed25519 key; make it with `fedbus keys`")
    return raw
