"""The host's half of an edge federation: a mosquitto and `fedbus serve` nodes on 127.0.0.1.

The systemd and arm64 checks install one node inside a container with edge/install.sh; it
joins this broker (host networking) and this aggregator. Every process here is started with
its own pid and killed by it in ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Final

from fedbus.broker import find_mosquitto, free_port
from tests.deploy.images import ROOT

__all__ = ["HostFederation", "repo_files"]

_ROUND: Final = re.compile(r"^round\s+(\d+)/(\d+)\s+participants\s+(\d+)/(\d+)", re.M)


def repo_files(dest: Path) -> Path:
    """A tarball of the checkout as a user has it (tracked and new files, nothing ignored):
    what edge/install.sh is run from on the device."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout
    existing = b"\0".join(n for n in names.split(b"\0") if n and (ROOT / n.decode()).exists())
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "fedbus-src.tar"
    subprocess.run(["tar", "-C", str(ROOT), "--null", "-T", "-", "-cf", str(tar)],
                   input=existing, check=True)
    return tar


class HostFederation:
    """``with HostFederation(workdir, manifest, nodes, env) as fed:`` broker + nodes."""

    def __init__(self, workdir: Path, manifest: str, nodes: list[str],
                 env: dict[str, str]) -> None:
        self.workdir = workdir
        self.manifest = manifest
        self.nodes = nodes
        self.port = free_port()
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                    "FEDBUS_BROKER_HOST": "127.0.0.1", "FEDBUS_BROKER_PORT": str(self.port),
                    **env}
        self.broker: subprocess.Popen[bytes] | None = None
        self.serve: subprocess.Popen[bytes] | None = None
        self.out_path = workdir / "host-nodes.out"
        self._files: list[IO[bytes]] = []

    def __enter__(self) -> HostFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "max_queued_messages 100000\npersistence false\n"
                        f"log_dest file {self.workdir / 'mosquitto.log'}\n")
        try:
            self.broker = self._spawn([find_mosquitto(), "-c", str(conf)], "mosquitto.out")
            self._wait_port()
            args = [sys.executable, "-m", "fedbus.cli", "serve", str(ROOT / self.manifest)]
            for node in self.nodes:
                args += ["--node", node]
            self.serve = self._spawn(args, self.out_path.name, cwd=self.workdir)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, args: list[str], out: str, cwd: Path | None = None
               ) -> subprocess.Popen[bytes]:
        f = open(self.workdir / out, "wb")
        self._files.append(f)
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                cwd=cwd or self.workdir, start_new_session=True)

    def _wait_port(self) -> None:
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)  # waiting for another process to listen
        raise AssertionError(f"mosquitto did not listen on {self.port}")

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def rounds(self) -> list[tuple[int, int, int]]:
        """(round, participants, selected) of every round the host's aggregator printed."""
        return [(int(m[0]), int(m[2]), int(m[3])) for m in _ROUND.findall(self.output())]

    def wait_round(self, what: str, predicate: object, after: int, timeout_s: float) -> int:
        """The first round numbered above ``after`` for which ``predicate(participants,
        selected)`` holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for number, got, selected in self.rounds():
                if number > after and predicate(got, selected):  # type: ignore[operator]
                    return number
            if self.serve is not None and self.serve.poll() is not None:
                raise AssertionError(f"host nodes exited {self.serve.returncode}:\n"
                                     f"{self.output()[-2000:]}")
            time.sleep(0.5)  # polling another process's output
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last "
                             f"rounds {self.rounds()[-5:]}")

    def count(self, pattern: str) -> int:
        """How many lines of the host nodes' output match ``pattern`` (a regex)."""
        return len(re.findall(pattern, self.output(), re.M))

    def last_round(self) -> int:
        r = self.rounds()
        return r[-1][0] if r else 0

    def stop(self) -> None:
        for proc in (self.serve, self.broker):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for f in self._files:
            f.close()
        self._files.clear()
        shutil.rmtree(self.workdir / "checkpoints", ignore_errors=True)
