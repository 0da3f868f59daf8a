"""The ``codec:`` section: zstd level and message bound, and how updates and the broadcast model
are compressed (fedbus.compress).
"""

from __future__ import annotations

from typing import Any

from fedbus.compress import MODEL_MODES, UpdateCodec
from fedbus.compress import MODES as UPDATE_MODES
from fedbus.manifest.model import CodecSpec
from fedbus.manifest.parse.reader import Reader, field_names

__all__ = ["parse_codec"]


def parse_codec(read: Reader, value: Any) -> CodecSpec:
    d = CodecSpec()
    t = read.table({} if value is None else value, "codec", field_names(CodecSpec))
    return CodecSpec(
        level=read.integer(t.get("level", d.level), "codec.level", lo=0, hi=22),
        shuffle=read.boolean(t.get("shuffle", d.shuffle), "codec.shuffle"),
        max_message_mb=read.integer(t.get("max_message_mb", d.max_message_mb),
                                    "codec.max_message_mb", lo=1),
        update=_tensor_codec(read, t.get("update"), "codec.update", UPDATE_MODES,
                             UpdateCodec()),
        model=_tensor_codec(read, t.get("model"), "codec.model", MODEL_MODES,
                            CodecSpec().model),
    )


def _tensor_codec(read: Reader, value: Any, field: str, modes: tuple[str, ...],
                  d: UpdateCodec) -> UpdateCodec:
    if value is None:
        return d
    if isinstance(value, str):
        value = {"mode": value}
    t = read.table(value, field, field_names(UpdateCodec), required=("mode",))
    mode = read.string(t["mode"], f"{field}.mode")
    if mode not in modes:
        read.fail(f"{field}.mode", f"{mode!r} is not one of {', '.join(modes)}")
    return UpdateCodec(
        mode=mode,
        block=read.integer(t.get("block", d.block), f"{field}.block", lo=1, hi=1 << 20),
        stochastic=read.boolean(t.get("stochastic", d.stochastic), f"{field}.stochastic"),
        fraction=read.number(t.get("fraction", d.fraction), f"{field}.fraction",
                             lambda x: 0 < x <= 0.5, "in (0, 0.5]"),
    )
