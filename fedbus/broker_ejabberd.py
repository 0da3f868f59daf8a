"""A second, independent MQTT 5 broker for tests: ejabberd's ``mod_mqtt`` (Erlang).

fedbus must not depend on mosquitto's quirks (docs/broker.md, "Which MQTT features fedbus
relies on"). Debian ships ejabberd (23.01 in bookworm), whose ``mod_mqtt`` speaks MQTT 5;
``spawn_ejabberd`` starts one on a free loopback port with a throw-away config and spool, no
Erlang distribution (so no epmd daemon is left behind), and ``stop()`` ends exactly the
process it started. Anonymous logins, like the private mosquitto of ``fedbus run``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from pathlib import Path
from typing import ClassVar, Final

import structlog

from fedbus.broker import MosquittoProcess, _port_open, free_port
from fedbus.errors import BrokerError

__all__ = ["ERL", "EjabberdProcess", "ejabberd_installed", "spawn_ejabberd"]

log = structlog.get_logger(__name__)

ERL: Final = "/usr/bin/erl"
_FIX: Final = "install it: `apt-get install -y --no-install-recommends ejabberd` (Debian)"

# mod_mqtt's defaults would bite fedbus like mosquitto's do: max_queue 5000 messages per
# offline session (chunks of a big model), session_expiry 5 min, and at most 1000 retained
# messages matched by one subscription. Raised here; persistent sessions kept in RAM.
_CONFIG: Final = """\
# written by fedbus.broker_ejabberd.spawn_ejabberd
hosts: [localhost]
loglevel: warning
auth_method: [anonymous]
anonymous_protocol: login_anon
listen:
  - port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 1024
    max_payload_size: 268435455
modules:
  mod_mqtt:
    max_queue: unlimited
    session_expiry: 3600
    match_retained_limit: unlimited
    max_topic_depth: 16
"""


def _libs() -> Path | None:
    # Debian puts ejabberd's Erlang applications under /usr/lib/<multiarch triplet>/.
    found = sorted(Path("/usr/lib").glob("*/ejabberd-*/ebin/mod_mqtt.beam"))
    return found[-1].parents[2] if found else None


def ejabberd_installed() -> bool:
    """Is Debian's ejabberd (with its Erlang runtime) on this machine?"""
    return os.access(ERL, os.X_OK) and _libs() is not None


class EjabberdProcess(MosquittoProcess):
    """The same handle as a spawned mosquitto (host, port, ``stop()``, ``kill_now()``)."""

    log_name: ClassVar[str] = "ejabberd.log"

    async def stop(self, grace_s: float = 0.0) -> None:
        """SIGKILL: a throw-away broker (its spool is deleted) needs no clean shutdown, and
        the Erlang VM takes seconds over SIGTERM."""
        await super().stop(grace_s)


def _launch(cmd: list[str], work: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    # fork/exec returns at once; readiness is awaited by polling the port.
    with open(work / "stdout.log", "ab") as out:
        return subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


async def spawn_ejabberd(*, startup_timeout_s: float = 30.0) -> EjabberdProcess:
    """Start ejabberd's MQTT broker on a free loopback port; ``BrokerError`` if it cannot."""
    libs = _libs()
    if libs is None or not os.access(ERL, os.X_OK):
        raise BrokerError("ejabberd (with mod_mqtt) is not installed", _FIX)
    work = Path(tempfile.mkdtemp(prefix="fedbus-ejabberd-"))
    port = free_port()
    (work / "ejabberd.yml").write_text(_CONFIG.format(port=port))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work),
        "EJABBERD_CONFIG_PATH": str(work / "ejabberd.yml"),
        "EJABBERD_LOG_PATH": str(work / EjabberdProcess.log_name),
        "ERL_LIBS": str(libs),
        "ERL_CRASH_DUMP": str(work / "erl_crash.dump"),
        "ERL_CRASH_DUMP_BYTES": "0",
    }
    # No -sname/-name: no distribution, so erl starts no epmd that would outlive the test.
    cmd = [ERL, "-noinput", "+K", "true", "-mnesia", "dir", f'"{work / "spool"}"',
           "-s", "ejabberd"]
    proc = _launch(cmd, work, env)
    handle = EjabberdProcess(proc, "127.0.0.1", port, work, owns_dir=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout_s
    try:
        while not await _port_open("127.0.0.1", port):
            if proc.poll() is not None or loop.time() >= deadline:
                tail = (work / "stdout.log").read_text(errors="replace")[-1500:]
                raise BrokerError(f"ejabberd did not listen on 127.0.0.1:{port} within "
                                  f"{startup_timeout_s:g}s (exit {proc.poll()}): {tail!r}",
                                  "run the erl command by hand to see why")
            await asyncio.sleep(0.05)  # poll the port; bounded by the deadline above
    except BaseException:
        await handle.stop()
        raise
    log.debug("start_ejabberd", pid=proc.pid, endpoint=handle.endpoint)
    return handle
