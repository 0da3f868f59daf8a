"""Fixtures of the deployment checks: a private Docker daemon and the images, once a session.

They run in `make test` where a daemon can start (root, Debian's docker.io, which the harness
installs when missing) and skip with the reason elsewhere; ``FEDBUS_DEPLOY=0`` skips them on
purpose. `make deploy-check` runs the full-size digits job (``FEDBUS_DEPLOY_FULL=1``) and
`make deploy-check-arm64` the arm64 check (``FEDBUS_DEPLOY_ARM64=1``). docs/deploy.md says
what each shows and what it cost.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.dockerd import DeployUnavailable, Dockerd
from tests.deploy.images import ROOT, WheelIndex, base_images

#: Where the checks work: git-ignored; ``cache/`` (debootstrap tarballs, base images) stays.
WORK = ROOT / ".deploy"


@dataclass(frozen=True)
class DeployImages:
    bases: dict[str, str]
    torch_index: str
    build_s: float


def _skip_or_fail(reason: str) -> None:
    # CI runs as root on Debian, where the daemon starts: a failure to start is a failure.
    if os.environ.get("CI") and os.environ.get("FEDBUS_DEPLOY") != "0":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="package")
def workdir() -> Iterator[Path]:
    """``.deploy/run-<pid>``: logs and results stay for a look; older runs' folders go."""
    for old in WORK.glob("run-*"):
        pid = old.name.removeprefix("run-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    path = WORK / f"run-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shutil.rmtree(path / "wheelhouse", ignore_errors=True)


@pytest.fixture(scope="package")
def dockerd(workdir: Path) -> Iterator[Dockerd]:
    if os.environ.get("FEDBUS_DEPLOY") == "0":
        pytest.skip("FEDBUS_DEPLOY=0: deployment checks switched off")
    if os.geteuid() != 0:
        pytest.skip("the deployment checks start their own dockerd: run them as root")
    # pytest-timeout's signal, or a CI's TERM, must still reach the cleanup below.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    d = Dockerd(workdir)
    try:
        d.start()
    except DeployUnavailable as exc:
        signal.signal(signal.SIGTERM, previous)
        _skip_or_fail(f"no Docker daemon here: {exc}")
    try:
        yield d
    finally:
        d.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="package")
def images(dockerd: Dockerd, workdir: Path) -> Iterator[DeployImages]:
    """The stand-in base images and a local index with CPU torch (the project's own images
    are built by the checks, through the files they test)."""
    started = time.monotonic()
    try:
        bases = base_images(dockerd)
    except DeployUnavailable as exc:
        _skip_or_fail(f"base images could not be made: {exc}")
    with WheelIndex(workdir) as index:
        yield DeployImages(bases, index.url, time.monotonic() - started)
