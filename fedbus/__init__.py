"""fedbus: federated learning as an asyncio message bus."""

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
