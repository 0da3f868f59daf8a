"""Per-client state on disk: what a strategy keeps on clients between rounds (SCAFFOLD's c_i,
FedDyn's gradient), one small file per client that has any, in the project's codec (no pickle).

Workers hold one model each; a client's state is loaded before it trains and saved after, so
memory never grows with the population. Writes are atomic (temporary file + rename), so a
worker killed mid-write leaves the previous state, and workers in other processes sharing the
folder read whole files only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedbus import topics
from fedbus.codec import Envelope, Limits, decode, encode
from fedbus.errors import CodecError, FedbusError

__all__ = ["ClientStateStore"]

_KIND = "client_state"


class ClientStateStore:
    """Named arrays per client id under ``root`` (created when missing)."""

    def __init__(self, root: str | os.PathLike[str], *, limits: Limits | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.writes = 0

    def _path(self, client: str) -> Path:
        return self.root / f"{topics.validate_id(client, 'client id')}.fbs"

    def get(self, client: str) -> dict[str, np.ndarray]:
        """The client's saved arrays (writable copies); empty when it has none yet."""
        path = self._path(client)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            env = decode(data, self.limits)
        except CodecError as exc:
            raise FedbusError(f"client state {path} is unreadable ({exc}); delete it to start "
                              "that client afresh") from None
        return {k: np.array(v, copy=True) for k, v in env.tensors.items()}

    def put(self, client: str, state: Mapping[str, np.ndarray]) -> None:
        path = self._path(client)
        if not state:
            path.unlink(missing_ok=True)
            return
        env = Envelope(kind=_KIND, job="sim", sender=client, round=0, tensors=dict(state))
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode(env))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.writes += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.fbs"))
