"""Start and stop a local mosquitto: the broker the CLI embeds and the tests run against.

``spawn_mosquitto`` writes a config sized for fedbus's chunk bursts into a temp dir, starts the
binary on a free loopback port, waits until the port accepts connections and returns a handle
whose ``stop()`` terminates (then kills) exactly the process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Final

import structlog

from fedbus._malloc import broker_env
from fedbus.errors import BrokerError

__all__ = ["QUEUED_MESSAGES", "MosquittoProcess", "find_mosquitto", "free_port", "spawn_mosquitto"]

log = structlog.get_logger(__name__)

_FALLBACK_PATHS: Final = (
    "/usr/sbin/mosquitto",
    "/usr/local/sbin/mosquitto",
    "/opt/homebrew/sbin/mosquitto",
)
_INSTALL_FIX: Final = (
    "install it: `apt-get install -y mosquitto` (Debian/Ubuntu), `brew install mosquitto`"
    " (macOS), or run the eclipse-mosquitto container and pass its host/port"
)

#: Messages mosquitto queues per client in the config written here (its default is 1000).
QUEUED_MESSAGES: Final = 100_000
#: What a packet may carry beyond one chunk (fedbus.bus.options.PACKET_HEADROOM: MQTT
#: headers, the topic, the chunk header, a signature trailer).
PACKET_HEADROOM: Final = 64 * 1024


def packet_limit(chunk_bytes: int, largest_message: int | None = None) -> int:
    """The largest MQTT packet a job's nodes send: one chunk (every payload above
    ``chunk_bytes`` is chunked), or the largest whole message when that is smaller (a model
    below one chunk), plus headroom. What the broker's ``max_packet_size`` should be."""
    body = chunk_bytes if largest_message is None else min(chunk_bytes, largest_message)
    return max(body, 0) + PACKET_HEADROOM


def packet_limit_conf(chunk_bytes: int, largest_message: int | None = None) -> str:
    """mosquitto config lines refusing any packet larger than the job ever sends: the broker
    drops it and disconnects its sender, so a forged 64 MiB publish never crosses it."""
    return ("# the largest packet this job sends: one chunk (or its largest whole message) "
            "plus headroom\n"
            f"max_packet_size {packet_limit(chunk_bytes, largest_message)}\n")

# mosquitto's defaults silently drop a client's messages beyond 1000 queued and keep only 20 in
# flight, which loses chunks of any big payload (FACTS.md). Queue by count generously and bound by
# bytes instead; persistence is off unless the caller turns it on in ``config_extra``.
_CONFIG: Final = """\
# written by fedbus.broker.spawn_mosquitto
listener {port} {host}
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages {queued}
max_queued_bytes 2147483648
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
log_type notice
{extra}
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def find_mosquitto() -> str:
    """Path of the mosquitto binary: ``$PATH`` first, then the usual sbin locations."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("the mosquitto binary is not on PATH nor in /usr/sbin", _INSTALL_FIX)


class MosquittoProcess:
    """A mosquitto started by ``spawn_mosquitto``; ``await stop()`` or ``async with`` ends it."""

    #: The broker's log, in ``workdir``.
    log_name: ClassVar[str] = "mosquitto.log"

    def __init__(
        self, proc: subprocess.Popen[bytes], host: str, port: int, workdir: Path, owns_dir: bool
    ) -> None:
        self.proc = proc
        self.host = host
        self.port = port
        self.workdir = workdir
        self._owns_dir = owns_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        path = self.workdir / self.log_name
        try:
            return path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self, grace_s: float = 5.0) -> None:
        """Terminate, wait up to ``grace_s``, then kill. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            if not await _wait_exit(self.proc, grace_s):
                self.proc.kill()
                await _wait_exit(self.proc, grace_s)
            log.debug("stop_mosquitto", pid=self.proc.pid, rc=self.proc.returncode)
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._owns_dir = False

    def kill_now(self) -> None:
        """Synchronous last resort (atexit, signal handlers): SIGKILL the process we started."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def __aenter__(self) -> MosquittoProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _wait_exit(proc: subprocess.Popen[bytes], limit_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while proc.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)  # polling a child's exit; there is no portable awaitable
    return True


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _launch(binary: str, conf: Path, logpath: Path) -> subprocess.Popen[bytes]:
    # fork/exec returns at once; readiness is awaited by polling the port.
    with open(logpath, "ab") as logfile:
        return subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C in a terminal and `timeout` signal the whole process
            # group, and a broker that dies first leaves our clean-up talking to nobody. The
            # owner stops it (stop() / kill_now()) after its nodes have said goodbye.
            start_new_session=True,
            env=broker_env(),  # model-sized buffers reused, not faulted in (fedbus._malloc)
        )


async def spawn_mosquitto(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    config_extra: str = "",
    workdir: str | os.PathLike[str] | None = None,
    startup_timeout_s: float = 10.0,
) -> MosquittoProcess:
    """Start mosquitto on ``host:port`` (a free port when None) and wait until it listens.

    ``config_extra`` is appended to the generated config (e.g. ``"persistence true\\n"`` plus a
    ``persistence_location`` inside ``workdir``). Raises ``BrokerError`` naming the fix when the
    binary is missing or the broker does not come up.
    """
    binary = find_mosquitto()
    owns_dir = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="fedbus-mosquitto-")) if workdir is None else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    # mosquitto drops root to user `mosquitto`; keep its files readable for that user.
    wd.chmod(0o755)
    chosen = port if port is not None else free_port(host)
    conf = wd / "mosquitto.conf"
    conf.write_text(_CONFIG.format(port=chosen, host=host, extra=config_extra,
                                   queued=QUEUED_MESSAGES))
    conf.chmod(0o644)
    proc = _launch(binary, conf, wd / MosquittoProcess.log_name)
    handle = MosquittoProcess(proc, host, chosen, wd, owns_dir)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout_s
    try:
        while not await _port_open(host, chosen):
            if proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {proc.returncode} at startup on {host}:{chosen}: "
                    f"{handle.log_tail()!r}",
                    "check the config lines passed in config_extra, or pick another port",
                )
            if loop.time() >= deadline:
                raise BrokerError(
                    f"mosquitto did not listen on {host}:{chosen} within {startup_timeout_s}s",
                    "check that the port is free and the host is a local address",
                )
            await asyncio.sleep(0.02)  # poll the port; bounded by the deadline above
        if proc.poll() is not None:  # the port answered, but it was someone else's listener
            raise BrokerError(
                f"mosquitto exited at startup; {host}:{chosen} is taken by another process",
                "pass port=None to pick a free port",
            )
    except BaseException:
        await handle.stop()
        raise
    log.debug("start_mosquitto", pid=proc.pid, endpoint=handle.endpoint)
    return handle
