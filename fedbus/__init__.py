"""fedbus: federated learning as an asyncio message bus."""

import sys as _sys

if "structlog" not in _sys.modules and "rich" not in _sys.modules:
    # structlog imports rich (and pygments) whenever it is installed, for pretty tracebacks:
    # ~4 MiB and 66 modules in every node. fedbus renders its own console lines; the
    # progress display imports rich itself when it draws. Hidden only while structlog loads.
    _sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        if _sys.modules.get("rich", 0) is None:
            del _sys.modules["rich"]

from fedbus.codec import Compression, Envelope, Limits, decode, encode
from fedbus.errors import (
    BusError,
    CodecError,
    ConnectError,
    FedbusError,
    ManifestError,
    TaskError,
    UpdateRejected,
)

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "CodecError",
    "Compression",
    "ConnectError",
    "Envelope",
    "FedbusError",
    "Limits",
    "ManifestError",
    "TaskError",
    "UpdateRejected",
    "__version__",
    "decode",
    "encode",
]
