"""The ``task:`` section: a ``module:factory`` reference, never imported here (the aggregator
may not have the task's libraries).
"""

from __future__ import annotations

import re
from typing import Any

from fedbus.manifest.model import TaskSpec
from fedbus.manifest.parse.reader import Reader

__all__ = ["parse_task"]


_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_task(read: Reader, value: Any) -> TaskSpec:
    if isinstance(value, str):
        value = {"ref": value}
    t = read.table(value, "task", ("ref", "params"), required=("ref",))
    ref = read.string(t["ref"], "task.ref")
    if not _REF.match(ref):
        read.fail("task.ref", f"{ref!r} must be 'package.module:factory' "
                              "(e.g. examples.digits.task:make_task)")
    return TaskSpec(ref=ref, params=read.params(t.get("params"), "task.params"))
