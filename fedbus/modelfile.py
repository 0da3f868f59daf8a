"""Models on disk in the safetensors format: no code runs on load, and torch users read it in one
line (``safetensors.torch.load_file``). Written here directly, so the core needs no new package.

The format: 8-byte little-endian header length, a JSON header mapping each tensor name to its
dtype, shape and byte range, then the raw little-endian buffers back to back.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import numpy as np

from fedbus.errors import FedbusError

__all__ = ["read_header", "read_safetensors", "write_safetensors"]

_DTYPES: Final = {
    "float64": "F64", "float32": "F32", "float16": "F16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_NUMPY: Final = {v: k for k, v in _DTYPES.items()}
# A header larger than this is not a model file we wrote (the format's own readers cap it too).
_MAX_HEADER: Final = 100 << 20


def write_safetensors(path: str | os.PathLike[str], weights: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write ``weights`` to ``path`` atomically (temp file + rename); returns the file size."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name])
        code = _DTYPES.get(a.dtype.name)
        if code is None:
            raise FedbusError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot "
                              f"hold; cast it to one of {', '.join(_DTYPES)}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the buffers start 8-byte aligned
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)
    os.replace(tmp, target)
    return 8 + len(raw) + offset


def read_header(path: str | os.PathLike[str]) -> dict[str, object]:
    """The JSON header of a safetensors file (names, dtypes, shapes, ``__metadata__``)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FedbusError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise FedbusError(f"{path}: safetensors header claims {n} bytes; refusing")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise FedbusError(f"{path}: safetensors header is not a JSON object")
    return header


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load every tensor of a safetensors file as numpy arrays."""
    header = read_header(path)
    data = Path(path).read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        b, e = info["data_offsets"]
        dtype = np.dtype(_NUMPY[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data[start + b:start + e], dtype=dtype).reshape(info["shape"])
    return out
