"""edge/install.sh in an arm64 Debian 12 userland (Raspberry Pi OS / Jetson class) under qemu.

The container is the debootstrapped arm64 rootfs (python3 and venv in it, as Pi OS ships
them), run through binfmt's qemu-aarch64 on the host's network. install.sh installs from a
copy of the checkout, first numpy-only with a toy node, then the trainer extra (torch from
PyPI's aarch64 wheel) with a digits node; each node is started the way its unit would start
it (its ExecStart, its env file, user fedbus; there is no systemd in this container, that
part is the amd64 systemd check) and must complete rounds with the host's aggregator.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tests.deploy.dockerd import Dockerd
from tests.deploy.federation import HostFederation
from tests.deploy.images import local_ca_dir
from tests.deploy.systemd_check import PIP_CERT, install_in, sh

__all__ = ["Arm64Result", "run_arm64_check"]

NAME: Final = "fedbus-edge-arm64"


@dataclass
class NodeRun:
    manifest: str
    flags: list[str]
    install_s: float = 0.0
    rounds_done: int = 0
    rss_kib: int | None = None
    joined_round: int | None = None
    venv_mb: int | None = None


@dataclass
class Arm64Result:
    uname: str = ""
    python: str = ""
    events: list[str] = field(default_factory=list)
    nodes: dict[str, NodeRun] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")


def _start_node(d: Dockerd, node: str) -> None:
    """What fedbus-NODE.service runs: its ExecStart as user fedbus with its env file."""
    unit = sh(d, NAME, f"cat /etc/systemd/system/fedbus-{node}.service")
    execstart = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    envs = [x.removeprefix("Environment=") for x in unit.splitlines()
            if x.startswith("Environment=")]
    cmd = execstart.removeprefix("ExecStart=")
    script = (f"install -d -o fedbus -g fedbus /var/lib/fedbus /var/cache/fedbus && cd "
              f"/var/lib/fedbus && exec runuser -u fedbus -- env {' '.join(envs)} bash -c "
              f"{shlex.quote(f'set -a; . /etc/fedbus/{node}.env; set +a; exec {cmd}')} "
              f"> /root/{node}.out 2>&1")
    d.docker("exec", "-d", NAME, "bash", "-c", script, capture=True)


def _rss(d: Dockerd, node: str) -> int | None:
    out = sh(d, NAME, f"pgrep -u fedbus -f 'fedbus serve.*--node {node}' | head -1", check=False)
    if not out.isdigit():
        return None
    rss = sh(d, NAME, f"ps -o rss= -p {out}", check=False)
    return int(rss) if rss.strip().isdigit() else None


def _stop_node(d: Dockerd, node: str) -> None:
    sh(d, NAME, f"pkill -TERM -u fedbus -f -- '--node {node}' || true", check=False)


#: MIDR_EL1 of a Raspberry Pi 4's Cortex-A72 (r0p3).
PI4_MIDR: Final = "0x00000000410fd083"


def fake_cpu_sysfs(dest: Path) -> Path:
    """A copy of the host's /sys/devices/system/cpu (cpu lists, topology) plus the arm64
    identification registers every aarch64 kernel exposes and qemu-user cannot: torch's
    oneDNN (xbyak_aarch64) reads MIDR_EL1 at import and, without it, `import torch`
    segfaults under emulation. A Pi's or a Jetson's kernel has the real file."""
    src = Path("/sys/devices/system/cpu")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("online", "possible", "present", "kernel_max", "offline"):
        if (src / name).is_file():
            (dest / name).write_text((src / name).read_text())
    for cpu in sorted(src.glob("cpu[0-9]*")):
        ident = dest / cpu.name / "regs" / "identification"
        ident.mkdir(parents=True, exist_ok=True)
        (ident / "midr_el1").write_text(PI4_MIDR + "\n")
        (ident / "revidr_el1").write_text("0x0000000000000000\n")
        topo = dest / cpu.name / "topology"
        topo.mkdir(exist_ok=True)
        for f in (cpu / "topology").glob("*"):
            try:
                (topo / f.name).write_text(f.read_text())
            except OSError:
                continue
    return dest


def run_arm64_check(d: Dockerd, workdir: Path, image: str, rounds: int = 5) -> Arm64Result:
    res = Arm64Result()
    cpus = fake_cpu_sysfs(workdir / "sys-cpu")
    # no --platform: this daemon would look for the image in a registry; the image is arm64
    d.docker("run", "-d", "--name", NAME, "--network", "host",
             "-v", f"{cpus}:/sys/devices/system/cpu:ro", image, "sleep", "infinity",
             capture=True)
    try:
        res.uname = sh(d, NAME, "uname -m")
        res.python = sh(d, NAME, "python3 --version")
        res.note(f"arm64 container: uname -m = {res.uname}, {res.python}")
        for crt in sorted(local_ca_dir().glob("*.crt")) if local_ca_dir().is_dir() else []:
            d.docker("cp", str(crt), f"{NAME}:/usr/local/share/ca-certificates/{crt.name}",
                     capture=True)
        sh(d, NAME, "update-ca-certificates >/dev/null")
        # (kind, manifest, install.sh flags, the arm64 node); the host runs aggregator + pi-1
        plan = [("numpy", "examples/toy/edge-manifest.yaml", ["--no-torch"], "pi-0"),
                ("torch", "examples/digits/edge-manifest.yaml", [], "pi-2")]
        for kind, manifest, flags, node in plan:
            run = NodeRun(manifest, flags)
            res.nodes[kind] = run
            fed = HostFederation(workdir / f"host-{kind}", manifest, ["aggregator", "pi-1"],
                                 {"FEDBUS_ROUNDS": str(rounds)})
            # install first (minutes under emulation), then start the host's half
            # PyTorch's CPU index (install.sh's default) is not reachable from this machine:
            # torch comes from PyPI, whose aarch64 build is the CUDA one (docs/deploy.md)
            env = {"PIP_CERT": PIP_CERT, "FEDBUS_BROKER_HOST": "127.0.0.1",
                   "FEDBUS_BROKER_PORT": str(fed.port),
                   "FEDBUS_TORCH_INDEX": "https://pypi.org/simple"}
            run.install_s = install_in(d, NAME, workdir, [*flags, "--node", node,
                                                          "--manifest", manifest], env,
                                       timeout=5400)
            run.venv_mb = int(sh(d, NAME, "du -sm /opt/fedbus/venv | cut -f1"))
            res.note(f"install.sh {' '.join(flags)} --node {node} ({kind}): "
                     f"{run.install_s:.0f} s, venv {run.venv_mb} MB")
            with fed:
                _start_node(d, node)
                try:
                    run.joined_round = fed.wait_round(f"arm64 {node} in a round",
                                                      lambda g, s: g == s == 2, 0, 1800)
                    run.rss_kib = _rss(d, node)
                    fed.wait_round(f"round {rounds}", lambda g, s: True, rounds - 1, 3600)
                    run.rounds_done = sum(1 for _, g, s in fed.rounds() if g == s == 2)
                    res.note(f"{kind} node {node}: {run.rounds_done}/{rounds} rounds with 2/2,"
                             f" RSS {run.rss_kib} KiB")
                finally:
                    out = sh(d, NAME, f"tail -50 /root/{node}.out || true", check=False)
                    (workdir / f"arm64-{kind}-{node}.out").write_text(out)
                    _stop_node(d, node)
    finally:
        d.docker("rm", "-f", NAME, check=False, capture=True, timeout=120)
    return res
