"""A node installed by edge/install.sh on a booted Debian (systemd as PID 1 in a container).

The federation's broker and aggregator run on the host; the container shares its network.
The check runs install.sh from a copy of the checkout, starts the node with
``systemctl enable --now``, sees it join, kills its main process with SIGKILL (systemd
restarts it), restarts the whole container (a reboot: the enabled unit starts at boot) and
sees it rejoin after each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tests.deploy.dockerd import Dockerd, wait_until
from tests.deploy.federation import HostFederation, repo_files

__all__ = ["SYSTEMD_RUN", "EdgeResult", "install_in", "run_systemd_check", "start_systemd"]

#: What runs systemd as PID 1 here without --privileged (FACTS.md, "Deployment targets").
SYSTEMD_RUN: Final = ("--network", "host", "--cap-add", "SYS_ADMIN", "--cgroupns=host",
                      "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run",
                      "--tmpfs", "/run/lock", "--security-opt", "seccomp=unconfined")
MANIFEST: Final = "examples/toy/edge-manifest.yaml"
NODE: Final = "pi-0"
PIP_CERT: Final = "/etc/ssl/certs/ca-certificates.crt"


@dataclass
class EdgeResult:
    install_s: float = 0.0
    events: list[str] = field(default_factory=list)
    joined_round: int | None = None
    restarts_after_kill: int | None = None
    rejoined_after_kill: int | None = None
    enabled: str = ""
    active_after_reboot: str = ""
    rejoined_after_reboot: int | None = None
    rss_kib: int | None = None
    units: list[str] = field(default_factory=list)
    #: (left, joined again) as the host's aggregator saw it: after the kill, after the reboot
    seen_leave_rejoin: list[tuple[bool, bool]] = field(default_factory=list)
    container_restarted: bool = False

    def note(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def _wait(what: str, predicate: Callable[[], Any], timeout_s: float, poll_s: float = 1.0) -> Any:
    return wait_until(what, predicate, timeout_s, poll_s)


def sh(d: Dockerd, name: str, script: str, *, check: bool = True, timeout: float = 120,
       env: dict[str, str] | None = None) -> str:
    args = ["exec"]
    for k, v in (env or {}).items():
        args += ["-e", f"{k}={v}"]
    r = d.docker(*args, name, "bash", "-c", script, check=False, capture=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"in {name}: {script!r} exited {r.returncode}:\n"
                             f"{(r.stdout + r.stderr)[-3000:]}")
    return r.stdout.strip()


def start_systemd(d: Dockerd, name: str, image: str) -> None:
    d.docker("run", "-d", "--name", name, *SYSTEMD_RUN, image, capture=True)
    wait_booted(d, name)


def wait_booted(d: Dockerd, name: str) -> str:
    def state() -> str:
        s = sh(d, name, "systemctl is-system-running || true", check=False, timeout=30)
        return s if s in ("running", "degraded") else ""

    got = _wait(f"systemd in {name} to finish booting", state, 180, poll_s=1)
    return str(got)


def install_in(d: Dockerd, name: str, workdir: Path, flags: list[str], env: dict[str, str],
               timeout: float = 1800) -> float:
    """Copy the checkout to /root/fedbus in the container and run edge/install.sh there."""
    tar = repo_files(workdir)
    d.docker("cp", str(tar), f"{name}:/root/fedbus-src.tar", capture=True)
    sh(d, name, "mkdir -p /root/fedbus && tar -C /root/fedbus -xf /root/fedbus-src.tar")
    started = time.monotonic()
    out = sh(d, name, f"/root/fedbus/edge/install.sh {' '.join(flags)} > /root/install.log 2>&1"
             " || { tail -50 /root/install.log; exit 1; }", timeout=timeout, env=env)
    del out
    return time.monotonic() - started


def node_rss_kib(d: Dockerd, name: str, unit: str) -> int | None:
    pid = sh(d, name, f"systemctl show -p MainPID --value {unit}", check=False)
    if not pid or pid == "0":
        return None
    rss = sh(d, name, f"ps -o rss= -p {pid}", check=False)
    return int(rss) if rss.isdigit() else None


def run_systemd_check(d: Dockerd, workdir: Path, image: str, torch_index: str) -> EdgeResult:
    res = EdgeResult()
    name = "fedbus-edge-amd64"
    unit = f"fedbus-{NODE}"
    with HostFederation(workdir / "host", MANIFEST, ["aggregator", "pi-1"],
                        {"FEDBUS_ROUNDS": "100000"}) as fed:
        try:
            start_systemd(d, name, image)
            res.note("container booted (systemd is PID 1)")
            env = {"PIP_CERT": PIP_CERT, "FEDBUS_BROKER_HOST": "127.0.0.1",
                   "FEDBUS_BROKER_PORT": str(fed.port), "FEDBUS_TORCH_INDEX": torch_index}
            res.install_s = install_in(d, name, workdir, ["--no-torch", "--node", NODE,
                                                          "--manifest", MANIFEST], env)
            res.note(f"edge/install.sh --no-torch --node {NODE}: {res.install_s:.0f} s")
            res.units = sh(d, name, "ls /etc/systemd/system | grep fedbus || true").split()
            sh(d, name, f"systemctl enable --now {unit}")
            res.note(f"systemctl enable --now {unit}")
            after = fed.last_round()
            res.joined_round = fed.wait_round(f"{NODE} to join", lambda g, s: g == s == 2,
                                              after, 300)
            res.note(f"{NODE} joined: round {res.joined_round} had 2/2 participants")
            res.rss_kib = node_rss_kib(d, name, unit)

            lost, joined = rf"node_lost\s.*peer={NODE}\b", rf"node_joined\s.*peer={NODE}\b"

            def leave_rejoin(before: tuple[int, int]) -> tuple[bool, bool] | None:
                seen = (fed.count(lost) > before[0], fed.count(joined) > before[1])
                return seen if all(seen) else None

            def rejoined(after_what: str, before: tuple[int, int]) -> int:
                """The round in which the node took part again (the aggregator having seen
                it leave and rejoin since ``before``), noted."""
                after = fed.last_round()
                r: int = fed.wait_round(f"{NODE} to rejoin after {after_what}",
                                        lambda g, s: g == s == 2, after, 300)
                res.seen_leave_rejoin.append(_wait("the aggregator to see it leave and rejoin",
                                                   lambda: leave_rejoin(before), 60))
                res.note(f"rejoined: round {r} had 2/2 participants")
                return r

            # kill -9 of the unit's main process: Restart=on-failure after RestartSec=10s
            mark = (fed.count(lost), fed.count(joined))
            pid = sh(d, name, f"systemctl show -p MainPID --value {unit}")
            sh(d, name, f"kill -9 {pid}")
            res.note(f"kill -9 {pid} (MainPID of {unit})")

            def restarted() -> int | None:
                n = sh(d, name, f"systemctl show -p NRestarts --value {unit}", check=False)
                active = sh(d, name, f"systemctl is-active {unit} || true", check=False)
                new_pid = sh(d, name, f"systemctl show -p MainPID --value {unit}", check=False)
                ok = n.isdigit() and int(n) >= 1 and active == "active" and new_pid != pid
                return int(n) if ok else None

            res.restarts_after_kill = _wait(f"systemd to restart {unit}", restarted, 120)
            res.note(f"systemd restarted it (NRestarts={res.restarts_after_kill})")
            res.rejoined_after_kill = rejoined("kill -9", mark)

            # a reboot: stop the container (systemd shuts down) and start it again
            mark = (fed.count(lost), fed.count(joined))
            started_at = d.out("inspect", "-f", "{{.State.StartedAt}}", name)
            d.docker("restart", "-t", "30", name, capture=True, timeout=120)
            res.container_restarted = \
                d.out("inspect", "-f", "{{.State.StartedAt}}", name) != started_at
            res.note("docker restart (reboot)")
            wait_booted(d, name)
            res.enabled = sh(d, name, f"systemctl is-enabled {unit} || true", check=False)
            res.active_after_reboot = _wait(
                f"{unit} to start at boot",
                lambda: sh(d, name, f"systemctl is-active {unit} || true", check=False)
                == "active" and "active", 120)
            res.note(f"after boot: {unit} is-enabled={res.enabled}, "
                     f"is-active={res.active_after_reboot}")
            res.rejoined_after_reboot = rejoined("the reboot", mark)
        finally:
            try:
                log = sh(d, name, f"journalctl -u {unit} --no-pager | tail -200", check=False)
                (workdir / f"{unit}.journal").write_text(log)
            except Exception as exc:
                res.note(f"no journal: {exc}")
            d.docker("rm", "-f", name, check=False, capture=True, timeout=120)
    return res
