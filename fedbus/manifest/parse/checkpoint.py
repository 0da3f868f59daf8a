"""The ``checkpoint:`` section: how the checkpointer keeps state and how long the aggregator
waits for it.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from fedbus.manifest.model import CheckpointSpec
from fedbus.manifest.parse.reader import Reader, field_names

__all__ = ["parse_checkpoint"]


def parse_checkpoint(read: Reader, value: Any) -> CheckpointSpec:
    d = CheckpointSpec()
    t = read.table({} if value is None else value, "checkpoint", field_names(CheckpointSpec))
    positive = "> 0 (seconds)"
    return CheckpointSpec(
        dir=read.string(t.get("dir", d.dir), "checkpoint.dir"),
        keep=read.integer(t.get("keep", d.keep), "checkpoint.keep", lo=1, hi=10_000),
        redis=read.opt_string(t.get("redis"), "checkpoint.redis"),
        every=read.integer(t.get("every", d.every), "checkpoint.every", lo=1),
        wait_s=read.number(t.get("wait_s", d.wait_s), "checkpoint.wait_s",
                           lambda x: x > 0, positive),
        on_unacked=cast(Literal["continue", "wait"], read.choice(
            t.get("on_unacked", d.on_unacked), "checkpoint.on_unacked",
            ("continue", "wait"))),
        restore_timeout_s=read.number(t.get("restore_timeout_s", d.restore_timeout_s),
                                      "checkpoint.restore_timeout_s", lambda x: x > 0,
                                      positive),
    )
