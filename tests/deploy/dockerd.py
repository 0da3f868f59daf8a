"""A private Docker daemon for the deployment checks: its own data root, exec root and socket.

It never touches the host's Docker: ``--bridge=none --iptables=false --ip6tables=false``, so
containers run with host networking and talk over 127.0.0.1 only. ``stop()`` removes every
container, image and mount it made, then the daemon's whole state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["DeployUnavailable", "Dockerd", "ensure_packages", "wait_until"]


class DeployUnavailable(RuntimeError):
    """This machine cannot run a deployment check; the message says why and what to do."""


def ensure_packages(commands: dict[str, str]) -> None:
    """apt-get install the Debian package of every missing command ({command: package})."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise DeployUnavailable(f"missing {', '.join(missing)}: run as root, or "
                                f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise DeployUnavailable(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-400:]}")
    # Debian's docker.io enables its own daemon where systemd runs; ours is private.
    with contextlib.suppress(OSError):
        subprocess.run(["systemctl", "disable", "--now", "docker.service", "docker.socket"],
                       capture_output=True, check=False)


def wait_until(what: str, predicate: Callable[[], Any], timeout_s: float, poll_s: float) -> Any:
    """``predicate()``'s first true value, asked every ``poll_s`` (containers and the daemon
    give nothing to await); ``AssertionError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)  # polling an external daemon: there is nothing to await
    raise DeployUnavailable(f"timed out after {timeout_s:.0f}s waiting for {what}")


class Dockerd:
    """``with Dockerd(workdir) as d: d.docker("ps")`` - started in ``__enter__``."""

    def __init__(self, workdir: Path, *, keep_images: bool = False) -> None:
        """``keep_images`` keeps the data root (images, build cache) for the next daemon on
        the same ``workdir``: for working on the checks, never what a check does."""
        self.keep_images = keep_images
        self.workdir = workdir.resolve()
        # Unix socket paths are limited to 108 bytes: exec root and socket live in /tmp.
        self.exec_root = Path(tempfile.mkdtemp(prefix="fbd-", dir="/tmp"))
        self.socket = self.exec_root / "docker.sock"
        self.data_root = self.workdir / "docker-data"
        self.log_path = self.workdir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for docker / docker-compose talking to this daemon only."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(DOCKER_HOST=self.host, DOCKER_BUILDKIT="0", COMPOSE_DOCKER_CLI_BUILD="0",
                   DOCKER_CONFIG=str(self.workdir / "docker-config"))
        return env

    def __enter__(self) -> Dockerd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ensure_packages({"dockerd": "docker.io"})
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "docker-config").mkdir(exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
             "--pidfile", str(self.exec_root / "dockerd.pid"), "-H", self.host,
             "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
             "--userland-proxy=false"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise DeployUnavailable(f"dockerd exited {self.proc.returncode}: {tail}")
            if not self.socket.exists():
                return False
            try:
                return self.docker("info", check=False, capture=True, timeout=20).returncode == 0
            except subprocess.TimeoutExpired:
                return False

        try:
            _wait(up, 60, "dockerd to answer")
        except BaseException:
            self.stop()
            raise

    def docker(self, *args: str, check: bool = True, capture: bool = False,
               timeout: float | None = None, input: bytes | None = None
               ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["docker", *args], env=self.env, check=False, text=True,
                           capture_output=capture, timeout=timeout,
                           input=input.decode() if input is not None else None)
        if check and r.returncode != 0:
            said = (r.stderr or "").strip()[-1500:] if capture else "(see the output above)"
            raise AssertionError(f"`docker {' '.join(args)}` exited {r.returncode}: {said}")
        return r

    def out(self, *args: str, timeout: float | None = 120) -> str:
        return self.docker(*args, capture=True, timeout=timeout).stdout.strip()

    def compose(self, project_dir: Path, compose_file: Path, project: str,
                *args: str, check: bool = True, timeout: float | None = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "--ansi", "never", "-p", project, "-f", str(compose_file),
             "--project-directory", str(project_dir), *args],
            env={**self.env, **(env or {})}, check=check, text=True, capture_output=True,
            timeout=timeout)

    def stop(self) -> None:
        """Remove containers and volumes, stop the daemon, unmount, delete its state."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.out("ps", "-aq", timeout=60).split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False, capture=True, timeout=120)
            with contextlib.suppress(Exception):
                self.docker("volume", "prune", "-f", check=False, capture=True, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None
        # dockerd normally stops its containerd; anything left started under our exec root
        # (by pid file) is ours and is killed by pid.
        for pidfile in self.exec_root.rglob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().strip())
                if _cmdline_mentions(pid, str(self.exec_root)):
                    os.kill(pid, signal.SIGKILL)
        unmount_under([self.data_root, self.exec_root])
        shutil.rmtree(self.exec_root, ignore_errors=True)
        if not self.keep_images:
            shutil.rmtree(self.data_root, ignore_errors=True)


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False


def mounts_under(roots: Sequence[Path]) -> list[str]:
    prefixes = [str(r.resolve()) for r in roots]
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any(target == p or target.startswith(p + "/") for p in prefixes):
            found.append(target)
    return found


def unmount_under(roots: Sequence[Path]) -> None:
    """Lazily unmount whatever is still mounted below ``roots``, deepest first."""
    for target in sorted(mounts_under(roots), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)
