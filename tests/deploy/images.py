"""Base images for the deployment checks, built here because no image registry is reachable.

Debian 12 comes from ``debootstrap`` (cached as a tarball under ``.deploy/cache``) and is
imported into the private daemon; stand-ins for ``python:3.11-slim``, ``eclipse-mosquitto:2``
and ``redis:7`` (and a booted Debian with systemd) are built from it with the Dockerfiles in
``images/``. The built bases are saved to ``.deploy/cache/bases-<arch>-<key>.tar`` so a rerun
only loads them; nothing else survives a check. Users build on the public images instead
(the Dockerfile's and compose file's defaults).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Final

from tests.deploy.dockerd import DeployUnavailable, Dockerd, ensure_packages

__all__ = ["CACHE", "ROOT", "STANDINS", "WheelIndex", "base_images", "debian_image",
           "import_debian", "local_ca_dir", "rootfs_tar"]

ROOT: Final = Path(__file__).resolve().parents[2]
CACHE: Final = ROOT / ".deploy" / "cache"
IMAGES_DIR: Final = Path(__file__).resolve().parent / "images"
SUITE: Final = "bookworm"
#: In the rootfs already: what every image here needs (Raspberry Pi OS ships python3 too).
INCLUDE: Final = "python3,python3-venv,ca-certificates,procps"
STANDINS: Final = {
    "python": "fedbus-deploy/python:3.11",
    "mosquitto": "fedbus-deploy/mosquitto:2",
    "redis": "fedbus-deploy/redis:7",
    "systemd": "fedbus-deploy/systemd:bookworm",
}
MIRROR: Final = "http://deb.debian.org/debian"


def debian_image(arch: str) -> str:
    return f"fedbus-deploy/debian:{SUITE}-{arch}"


def local_ca_dir() -> Path:
    """The host's locally added CAs (``update-ca-certificates`` input); may be empty."""
    return Path("/usr/local/share/ca-certificates")


def rootfs_tar(arch: str, log: Path) -> Path:
    """``debootstrap --variant=minbase`` of Debian 12 for ``arch``, as a cached tarball."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tar = CACHE / f"{SUITE}-{arch}.tar"
    if tar.exists():
        return tar
    needs = {"debootstrap": "debootstrap"}
    if arch != "amd64":
        needs |= {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support"}
    ensure_packages(needs)
    if arch == "arm64":
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True,
                       check=False)
        if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
            raise DeployUnavailable("binfmt_misc has no qemu-aarch64 entry: "
                                    "apt-get install qemu-user-static binfmt-support")
    rootfs = CACHE / f"rootfs-{arch}.tmp"
    done = rootfs / "etc" / "os-release"
    if not (done.exists() and (rootfs / "usr" / "bin" / "python3").exists()):
        shutil.rmtree(rootfs, ignore_errors=True)
        started = time.monotonic()
        with open(log, "ab") as out:
            r = subprocess.run(["debootstrap", f"--arch={arch}", "--variant=minbase",
                                f"--include={INCLUDE}", SUITE, str(rootfs), MIRROR],
                               stdout=out, stderr=subprocess.STDOUT, check=False)
        if r.returncode != 0:
            raise DeployUnavailable(f"debootstrap {arch} failed (exit {r.returncode}); see {log}")
        with open(log, "a") as out:
            out.write(f"debootstrap {arch}: {time.monotonic() - started:.0f} s\n")
    part = tar.with_suffix(".part")
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(part), "."],
                   check=True)
    part.rename(tar)
    shutil.rmtree(rootfs, ignore_errors=True)
    return tar


def import_debian(d: Dockerd, arch: str) -> str:
    """The debootstrapped Debian 12 of ``arch`` as an image in ``d``; returns its tag."""
    tar = rootfs_tar(arch, d.workdir / f"bases-{arch}.log")
    with open(tar, "rb") as f:
        subprocess.run(["docker", "import", "--platform", f"linux/{arch}", "-",
                        debian_image(arch)], stdin=f, env=d.env, check=True,
                       capture_output=True, timeout=900)
    return debian_image(arch)


def _key(names: list[str], arch: str) -> str:
    h = hashlib.sha256(arch.encode())
    for name in names:
        h.update((IMAGES_DIR / f"{name}.Dockerfile").read_bytes())
    ca = local_ca_dir()
    for crt in sorted(ca.glob("*.crt")) if ca.is_dir() else []:
        h.update(crt.read_bytes())
    return h.hexdigest()[:12]


def base_images(d: Dockerd, arch: str = "amd64",
                names: tuple[str, ...] = tuple(STANDINS)) -> dict[str, str]:
    """Load (or build and cache) the stand-in images; returns {name: image tag}."""
    tags = {n: STANDINS[n] + ("" if arch == "amd64" else f"-{arch}") for n in names}
    cached = CACHE / f"bases-{arch}-{_key(sorted(names), arch)}.tar"
    if cached.exists():
        d.docker("load", "-q", "-i", str(cached), capture=True, timeout=600)
        return tags
    log = d.workdir / f"bases-{arch}.log"
    import_debian(d, arch)
    platform = f"linux/{arch}"
    for name in names:
        with tempfile.TemporaryDirectory(prefix="fedbus-base-") as ctx:
            shutil.copy(IMAGES_DIR / f"{name}.Dockerfile", Path(ctx) / "Dockerfile")
            ca = Path(ctx) / "ca"
            ca.mkdir()
            if local_ca_dir().is_dir():
                for crt in local_ca_dir().glob("*.crt"):
                    shutil.copy(crt, ca / crt.name)
            with open(log, "ab") as out:
                r = subprocess.run(
                    ["docker", "build", "--network", "host", "--platform", platform,
                     "--build-arg", f"DEBIAN_IMAGE={debian_image(arch)}", "-t", tags[name], ctx],
                    env=d.env, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=1800)
            if r.returncode != 0:
                raise DeployUnavailable(f"building the {name} base image failed; see {log}")
    for old in CACHE.glob(f"bases-{arch}-*.tar"):
        old.unlink()
    part = cached.with_suffix(".part")
    d.docker("save", "-o", str(part), *tags.values(), timeout=600)
    os.replace(part, cached)
    return tags


class WheelIndex:
    """A PEP 503 index on 127.0.0.1 with CPU torch and its dependencies, for ``TORCH_INDEX``.

    PyPI's x86_64 torch is the multi-GB CUDA build and download.pytorch.org is not reachable
    here; ``pip download torch==<pin>`` finds the CPU wheel this machine was set up with (and
    its dependencies). A user's build takes them from the PyTorch CPU index instead (the
    Dockerfile's default).
    """

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "wheelhouse"
        self._server: http.server.ThreadingHTTPServer | None = None
        self.url = ""

    def __enter__(self) -> WheelIndex:
        files = self.dir / "files"
        files.mkdir(parents=True, exist_ok=True)
        pin = next(line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.startswith("torch=="))
        if not list(files.glob("torch-*.whl")):
            r = subprocess.run([sys.executable, "-m", "pip", "download", "-q",
                                "--only-binary=:all:", "-d", str(files), pin],
                               capture_output=True, text=True, check=False, timeout=1800)
            if r.returncode != 0:
                raise DeployUnavailable(f"pip download {pin} failed: {r.stderr[-400:]}")
        wheels = sorted(files.glob("*.whl"))
        if not any(w.name.startswith("torch-") and "+cpu" in w.name for w in wheels):
            raise DeployUnavailable(f"pip download {pin} gave no CPU build: the trainer image "
                                    "would pull GBs of CUDA")
        projects: dict[str, list[str]] = {}
        for w in wheels:
            name = re.sub(r"[-_.]+", "-", w.name.split("-", 1)[0]).lower()
            projects.setdefault(name, []).append(w.name)
        for name, names in projects.items():
            page = self.dir / "simple" / name
            page.mkdir(parents=True, exist_ok=True)
            links = "".join(f'<a href="../../files/{n}">{n}</a>\n' for n in names)
            (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}"
                                             "</body></html>\n")
        handler = functools.partial(_QuietHandler, directory=str(self.dir))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, name="wheel-index", daemon=True).start()
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
        return self

    def __exit__(self, *exc: object) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
