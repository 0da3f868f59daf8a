"""fedbus._malloc: node processes reuse model-sized buffers instead of faulting them in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the tuning is glibc's mallopt")

# Allocate, write and free a 4 MB buffer 50 times, as a trainer does every round, and count the
# page faults that costs; optionally after tune_for_rounds().
_CHILD = """
import json, resource, sys
import numpy as np
from fedbus._malloc import tune_for_rounds
applied = tune_for_rounds() if sys.argv[1] == "tune" else None
np.ones(1_000_000, dtype=np.float32)  # warm up: the first block is faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    a = np.ones(1_000_000, dtype=np.float32)
    b = a + 1.0
    del a, b
mid = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# an 11M-parameter update (44 MB, above glibc's own 32 MiB ceiling) joined from its chunks
parts = [bytes(1_000_000)] * 44
for _ in range(5):
    joined = b"".join(parts)
    del joined
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults": mid - before, "big_faults": after - mid}))
"""


def _child(mode: str, **env: str) -> dict[str, int | bool | None]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                         check=True, timeout=60,
                         env={k: v for k, v in os.environ.items()
                              if not k.startswith(("MALLOC_", "FEDBUS_MALLOC"))} | env)
    result: dict[str, int | bool | None] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_tuned_process_reuses_buffers_instead_of_faulting_them_in() -> None:
    # Prepare / Execute
    plain = _child("plain")
    tuned = _child("tune")
    # Assert: 50 rounds of two 4 MB buffers fault ~100k pages untuned; tuned, they are reused
    assert tuned["applied"] is True
    assert isinstance(plain["faults"], int) and isinstance(tuned["faults"], int)
    assert plain["faults"] > 20_000
    assert tuned["faults"] < plain["faults"] / 10
    # five 44 MB buffers fault ~54k pages untuned (a fresh mmap each); tuned, one's worth
    assert isinstance(plain["big_faults"], int) and isinstance(tuned["big_faults"], int)
    assert plain["big_faults"] > 40_000
    assert tuned["big_faults"] < 15_000


def test_a_spawned_broker_gets_the_same_tuning_unless_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedbus._malloc import broker_env

    for key in ("FEDBUS_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    assert broker_env()["MALLOC_MMAP_THRESHOLD_"] == str(1 << 30)
    monkeypatch.setenv("FEDBUS_MALLOC", "default")
    assert "MALLOC_MMAP_THRESHOLD_" not in broker_env()
    monkeypatch.delenv("FEDBUS_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert broker_env()["MALLOC_TRIM_THRESHOLD_"] == "0"
    assert "MALLOC_MMAP_THRESHOLD_" not in broker_env()


def test_operator_choices_win() -> None:
    # Execute / Assert: FEDBUS_MALLOC=default, or glibc's own tunables, leave malloc alone
    assert _child("tune", FEDBUS_MALLOC="default")["applied"] is False
    assert _child("tune", MALLOC_MMAP_THRESHOLD_="1048576")["applied"] is False
