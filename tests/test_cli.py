"""The command line without traps: argument mistakes, deep validation, help, version, watch.

Each test is a regression test for a trap a new user hit (issue #13).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedbus import __version__
from fedbus.broker import MosquittoProcess

ROOT = Path(__file__).resolve().parents[1]
FEDBUS = [sys.executable, "-m", "fedbus.cli"]


def fedbus(*args: str, cwd: Path = ROOT, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    # the example tasks import from the repository root, wherever the command runs
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*FEDBUS, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


def toy(tmp_path: Path, **over: Any) -> Path:
    data = yaml.safe_load((ROOT / "examples/toy/manifest.yaml").read_text())
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("rounds", ["0", "-1", "two"])
def test_bad_rounds_is_an_argument_error(rounds: str) -> None:
    # Execute
    r = fedbus("run", "examples/toy/manifest.yaml", "--rounds", rounds, timeout=120)
    # Assert: argparse's usage error (exit 2), not a hang and not "invalid manifest"
    assert r.returncode == 2
    assert "argument --rounds" in r.stderr and ">= 1" in r.stderr
    assert "invalid manifest" not in r.stderr


def test_unknown_log_level_rejected() -> None:
    r = fedbus("validate", "examples/toy/manifest.yaml", "--log-level", "foo")
    assert r.returncode == 2
    assert "argument --log-level" in r.stderr and "invalid choice" in r.stderr


def test_version() -> None:
    r = fedbus("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fedbus {__version__}"


def test_help_has_examples_and_no_markup() -> None:
    top = fedbus("--help")
    assert top.returncode == 0
    assert "``" not in top.stdout
    assert "examples:" in top.stdout
    commands = ["run", "serve", "validate", "watch", "ls", "show", "plot", "new", "dashboard"]
    for cmd in commands:
        assert cmd in top.stdout
        sub = fedbus(cmd, "--help")
        assert sub.returncode == 0, cmd
        assert "examples:\n  fedbus " + cmd in sub.stdout, cmd


def test_validate_rejects_misspelt_task_param(tmp_path: Path) -> None:
    # Prepare: `lrr` instead of `lr`
    path = toy(tmp_path, task={"params": {"size": 10, "lrr": 0.05}})
    # Execute
    r = fedbus("validate", str(path))
    # Assert: the field, the typo and the allowed names
    assert r.returncode == 2
    assert "task.params" in r.stderr and "lrr" in r.stderr
    assert "allowed: size, lr, delay_s, speeds" in r.stderr


def test_validate_rejects_misspelt_task_factory(tmp_path: Path) -> None:
    path = toy(tmp_path, task={"ref": "examples.toy.task:make_tsak"})
    r = fedbus("validate", str(path))
    assert r.returncode == 2
    assert "task.ref" in r.stderr and "make_tsak" in r.stderr and "make_task" in r.stderr


def test_factory_with_kwargs_accepts_any_param(tmp_path: Path) -> None:
    # Prepare: a task module whose factory takes **kwargs
    pkg = tmp_path / "kwtask.py"
    pkg.write_text("from examples.toy.task import make_task as _m\n"
                   "def make_task(*, partition, num_partitions, seed=0, **kw):\n"
                   "    return _m(partition=partition, num_partitions=num_partitions, seed=seed)\n")
    path = toy(tmp_path, task={"ref": "kwtask:make_task", "params": {"anything": 1}})
    # Execute
    r = fedbus("validate", str(path))
    # Assert
    assert r.returncode == 0, r.stderr
    assert "manifest" in r.stdout and "valid" in r.stdout


def test_validate_rejects_wrong_typed_task_param(tmp_path: Path) -> None:
    path = toy(tmp_path, task={"params": {"size": "big"}})
    r = fedbus("validate", str(path))
    assert r.returncode == 2
    assert "size must be an integer, got 'big' (str)" in r.stderr


def test_wrong_typed_strategy_param_is_a_manifest_error(tmp_path: Path) -> None:
    path = toy(tmp_path, strategy={"name": "fedadam", "params": {"eta": "abc"}})
    r = fedbus("validate", str(path))
    assert r.returncode == 2
    assert "strategy" in r.stderr and "eta must be a number, got 'abc' (str)" in r.stderr
    assert "ufunc" not in r.stderr and "Traceback" not in r.stderr


def test_missing_tls_file_fails_validate(tmp_path: Path) -> None:
    path = toy(tmp_path, broker={"host": "127.0.0.1", "port": 8883,
                                 "tls_ca": str(tmp_path / "missing-ca.crt")})
    r = fedbus("validate", str(path))
    assert r.returncode == 2
    assert "broker.tls_ca" in r.stderr and "does not exist" in r.stderr


def test_tls_file_next_to_the_manifest_passes(tmp_path: Path) -> None:
    # Prepare: a CA file beside the manifest, named relatively (the credentials' rule)
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    path = toy(tmp_path, broker={"host": "127.0.0.1", "port": 8883, "tls_ca": "ca.crt"})
    # Execute
    r = fedbus("validate", str(path), cwd=tmp_path.parent)
    # Assert
    assert r.returncode == 0, r.stderr


def test_validate_accepts_the_examples() -> None:
    for path in ("examples/toy/manifest.yaml", "examples/digits/manifest.yaml"):
        r = fedbus("validate", path)
        assert r.returncode == 0, r.stderr
        assert "imported  the task" in r.stdout


def test_validate_says_how_updates_and_the_model_are_compressed(tmp_path: Path) -> None:
    # Prepare
    path = toy(tmp_path, codec={"level": 0, "update": {"mode": "topk", "fraction": 0.2},
                                "model": "int8"})
    # Execute
    r = fedbus("validate", str(path))
    # Assert
    assert r.returncode == 0, r.stderr
    assert ("codec     zstd level 0; updates topk 0.2; model int8 (block 256, nearest "
            "rounding)") in r.stdout


@pytest.mark.broker
async def test_watch_after_the_job_ended_says_so(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    # Prepare: a job that ran to completion on this broker (its aggregator left "offline")
    path = toy(tmp_path, rounds=2)
    broker = f"{mosquitto.host}:{mosquitto.port}"
    done = fedbus("run", str(path), "--broker", broker, "--no-record")
    assert done.returncode == 0, done.stderr[-2000:]
    # Execute
    r = fedbus("watch", str(path), "--broker", broker, "--timeout", "2", timeout=120)
    # Assert: a clear message and a non-zero exit instead of a silent hang
    assert r.returncode == 1
    assert "aggregator aggregator is offline" in r.stderr
    assert "no round report from job 'toy'" in r.stderr and "--timeout" in r.stderr


@pytest.mark.parametrize("command", ["watch", "dashboard"])
def test_observer_on_a_secured_broker_without_user_names_the_flag(command: str) -> None:
    # Execute: the README's secured example, without --user (nothing listens on port 9)
    r = fedbus(command, "examples/toy/secure-manifest.yaml", "--broker", "127.0.0.1:9",
               timeout=120)
    # Assert: one line naming --user, before any connection or password file is tried
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert "--user OPERATOR" in r.stderr and "broker.password_file" in r.stderr
    assert "cannot read the password" not in r.stderr


def test_run_dashboard_on_a_secured_broker_points_to_fedbus_dashboard() -> None:
    r = fedbus("run", "examples/toy/secure-manifest.yaml", "--dashboard", "0", "--no-record",
               timeout=120)
    assert r.returncode == 1
    assert "fedbus dashboard examples/toy/secure-manifest.yaml --user OPERATOR" in r.stderr


@pytest.mark.broker
async def test_a_second_run_of_a_running_job_is_refused(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    import asyncio
    import signal

    # Prepare: the job running on a shared broker, slow enough to still be running
    path = toy(tmp_path, rounds=200, task={"params": {"size": 100, "delay_s": 0.2}})
    broker = f"{mosquitto.host}:{mosquitto.port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = await asyncio.create_subprocess_exec(
        *FEDBUS, "run", str(path), "--broker", broker, "--no-record", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert first.stdout is not None
        async with asyncio.timeout(180):  # generous: only cuts a hang short
            while not (await first.stdout.readline()).startswith(b"round "):
                pass
        # Execute: the same job again on the same broker
        second = await asyncio.to_thread(fedbus, "run", str(path), "--broker", broker,
                                         "--no-record", timeout=180)
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(first.communicate(), 60)
    # Assert: refused in one line naming the running instance; the first one unharmed
    assert second.returncode == 1, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1, second.stderr
    assert f"job 'toy' is already running on {broker}" in second.stderr
    assert "aggregator 'aggregator' is online" in second.stderr
    assert first.returncode == 128 + signal.SIGTERM


@pytest.mark.broker
def test_run_dashboard_on_a_busy_port_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    import socket

    # Prepare: the port is taken
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Execute
        r = fedbus("run", str(toy(tmp_path)), "--dashboard", str(port), "--runs-dir",
                   str(tmp_path / "runs"))
    # Assert: one line naming the port; no traceback, no run folder, no broker started
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert not (tmp_path / "runs").exists()
