"""The embedded store of record: rounds on disk, laid out round -> client -> layer.

    <root>/rounds/00000012/record.fb                    the round's record (metadata only)
    <root>/rounds/00000012/model/L_<layer>.fb           the global model the round started from
    <root>/rounds/00000012/clients/c_<id>/sketch.fb     norm + random projection of the update
    <root>/rounds/00000012/clients/c_<id>/update/L_<layer>.fb

One layer a file, so a workload can fetch part of a model (FLStore's partial fetch). Every file
is one codec frame (no pickle) and is read back through ``decode`` with limits. Files are
written atomically (temp file, fsync, rename, fsync of the folder); a whole update is written
into a temporary folder renamed into place, so a crash never leaves half an update behind.
The relative path of a file is also its cache key (LRU and Redis).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from fedbus.codec import NO_COMPRESSION, Envelope, Limits, decode, encode
from fedbus.errors import CodecError
from fedbus.store.cache import StoreError

__all__ = ["DiskStore", "layer_file", "model_key", "record_key", "sketch_key", "update_key"]

_RECORD = "store_record"
_LAYER = "store_layer"
_SKETCH = "store_sketch"


def layer_file(name: str) -> str:
    # quote() leaves only [A-Za-z0-9_.~-] and %XX: no '/', and the 'L_' prefix makes '..' safe.
    return "L_" + quote(name, safe="") + ".fb"


def _layer_name(file: str) -> str:
    return unquote(file[2:-3])


def _round_dir(r: int) -> str:
    return f"rounds/{r:08d}"


def record_key(r: int) -> str:
    return f"{_round_dir(r)}/record.fb"


def model_key(r: int, layer: str) -> str:
    return f"{_round_dir(r)}/model/{layer_file(layer)}"


def _client_dir(r: int, client: str) -> str:
    return f"{_round_dir(r)}/clients/c_{client}"


def sketch_key(r: int, client: str) -> str:
    return f"{_client_dir(r, client)}/sketch.fb"


def update_key(r: int, client: str, layer: str) -> str:
    return f"{_client_dir(r, client)}/update/{layer_file(layer)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskStore:
    """Synchronous file access (callers run it in worker threads)."""

    def __init__(self, root: str | os.PathLike[str], job: str, limits: Limits,
                 *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.job = job
        self.limits = limits
        self.fsync = fsync
        #: With ``deferred``, layer and sketch files are not fsynced one by one: the next
        #: ``write_record`` fsyncs them all first (the record is the round's commit point, so
        #: a round whose record is on disk has all its files on disk), off the update path.
        self.deferred = False
        self._unsynced: list[Path] = []
        try:
            (self.root / "rounds").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {self.root}: {exc}; set "
                             "store.dir to a writable folder") from None
        self.bytes_written = 0

    # --- frames -------------------------------------------------------------------------
    def _write(self, path: Path, frame: bytes, *, commit: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        defer = self.fsync and self.deferred and not commit
        with open(tmp, "wb") as f:
            f.write(frame)
            if self.fsync and not defer:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if defer:
            self._unsynced += [path, path.parent]
        elif self.fsync:
            _fsync_dir(path.parent)
        self.bytes_written += len(frame)

    def flush(self) -> int:
        """fsync every file and folder written since the last flush (deferred mode); returns
        how many. A file deleted meanwhile (retention) needs nothing."""
        pending, self._unsynced = list(dict.fromkeys(self._unsynced)), []
        for path in pending:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return len(pending)

    def read_frame(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.root / key}: {exc}") from None

    def decode(self, key: str, frame: bytes) -> Envelope:
        try:
            return decode(frame, self.limits)
        except CodecError as exc:
            raise StoreError(f"{self.root / key} is not a valid store file ({exc}); it was "
                             "damaged or written by something else: delete it") from None

    # --- encode helpers (pure) --------------------------------------------------------------
    def layer_frame(self, r: int, owner: str, layer: str, arr: np.ndarray) -> bytes:
        return encode(Envelope(kind=_LAYER, job=self.job, sender=owner, round=r,
                               meta={"layer": layer}, tensors={layer: arr}), NO_COMPRESSION)

    def tensor_of(self, key: str, frame: bytes) -> np.ndarray:
        env = self.decode(key, frame)
        if env.kind != _LAYER or len(env.tensors) != 1:
            raise StoreError(f"{self.root / key} holds a {env.kind!r} frame, not one layer")
        return next(iter(env.tensors.values()))

    # --- writes ---------------------------------------------------------------------------
    def write_layers(self, r: int, owner: str | None, tensors: Mapping[str, np.ndarray],
                     ) -> dict[str, bytes]:
        """Write a model (``owner=None``) or one client's update, atomically as a whole.
        Returns {cache key: frame}."""
        if owner is None:
            final = self.root / _round_dir(r) / "model"
            keys = {name: model_key(r, name) for name in tensors}
        else:
            final = self.root / _client_dir(r, owner) / "update"
            keys = {name: update_key(r, owner, name) for name in tensors}
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir(parents=True)
        frames: dict[str, bytes] = {}
        try:
            for name, arr in tensors.items():
                frame = self.layer_frame(r, owner or "global", name, arr)
                path = tmp / layer_file(name)
                with open(path, "wb") as f:
                    f.write(frame)
                    if self.fsync and not self.deferred:
                        f.flush()
                        os.fsync(f.fileno())
                frames[keys[name]] = frame
                self.bytes_written += len(frame)
            if final.exists():
                shutil.rmtree(final)  # a re-sent update replaces the older copy
            os.replace(tmp, final)
            if self.fsync and self.deferred:
                self._unsynced += [final / layer_file(n) for n in tensors]
                self._unsynced += [final, final.parent]
            elif self.fsync:
                _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return frames

    def write_sketch(self, r: int, client: str, sketch: np.ndarray,
                     meta: Mapping[str, Any]) -> tuple[str, bytes]:
        key = sketch_key(r, client)
        frame = encode(Envelope(kind=_SKETCH, job=self.job, sender=client, round=r,
                                meta=dict(meta), tensors={"sketch": sketch}), NO_COMPRESSION)
        self._write(self.root / key, frame)
        return key, frame

    def write_record(self, r: int, record: Mapping[str, Any]) -> None:
        frame = encode(Envelope(kind=_RECORD, job=self.job, sender="store", round=r,
                                meta=dict(record)))
        if self.fsync:
            self.flush()
        self._write(self.root / record_key(r), frame, commit=True)

    # --- reads ----------------------------------------------------------------------------
    def read_record(self, r: int) -> dict[str, Any] | None:
        key = record_key(r)
        frame = self.read_frame(key)
        if frame is None:
            return None
        env = self.decode(key, frame)
        if env.kind != _RECORD or env.round != r:
            raise StoreError(f"{self.root / key} is not the record of round {r}")
        return dict(env.meta)

    def sketch_of(self, key: str, frame: bytes) -> np.ndarray:
        env = self.decode(key, frame)
        s = env.tensors.get("sketch")
        if env.kind != _SKETCH or s is None or s.ndim != 1:
            raise StoreError(f"{self.root / key} is not a sketch")
        return s

    def rounds(self) -> list[int]:
        out = []
        for p in (self.root / "rounds").iterdir():
            if p.is_dir() and p.name.isdigit():
                out.append(int(p.name))
        return sorted(out)

    def layers(self, r: int, client: str | None) -> list[str]:
        folder = (self.root / _round_dir(r) / "model" if client is None
                  else self.root / _client_dir(r, client) / "update")
        if not folder.is_dir():
            return []
        return sorted(_layer_name(p.name) for p in folder.iterdir()
                      if p.name.startswith("L_") and p.name.endswith(".fb"))

    def has_update(self, r: int, client: str) -> bool:
        return (self.root / _client_dir(r, client) / "update").is_dir()

    # --- retention ------------------------------------------------------------------------
    def delete(self, r: int, what: str) -> str:
        """Delete ``all`` of a round, its ``model`` or its client ``updates``; returns the
        cache-key prefix that went away."""
        base = self.root / _round_dir(r)
        if what == "all":
            shutil.rmtree(base, ignore_errors=True)
            return _round_dir(r) + "/"
        if what == "model":
            shutil.rmtree(base / "model", ignore_errors=True)
            return _round_dir(r) + "/model/"
        if what == "updates":
            for client in self._client_dirs(r):
                shutil.rmtree(client / "update", ignore_errors=True)
            return _round_dir(r) + "/clients/"  # sketches stay on disk; only cache entries go
        raise ValueError(what)

    def _client_dirs(self, r: int) -> Iterator[Path]:
        folder = self.root / _round_dir(r) / "clients"
        with contextlib.suppress(FileNotFoundError):
            yield from (p for p in folder.iterdir() if p.is_dir())

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.fb"))
