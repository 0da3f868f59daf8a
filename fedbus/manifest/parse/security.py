"""The ``security:`` section: whether messages are signed, and where the keys are."""

from __future__ import annotations

from typing import Any

from fedbus.manifest.model import SecuritySpec
from fedbus.manifest.parse.reader import Reader, field_names

__all__ = ["SIGN_MODES", "parse_security"]

SIGN_MODES = ("off", "optional", "required")


def parse_security(read: Reader, value: Any) -> SecuritySpec:
    d = SecuritySpec()
    t = read.table({} if value is None else value, "security", field_names(SecuritySpec))
    return SecuritySpec(
        sign=read.choice(t.get("sign", d.sign), "security.sign", SIGN_MODES),
        keys=read.string(t.get("keys", d.keys), "security.keys"),
    )
