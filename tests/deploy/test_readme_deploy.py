"""The README's "Deploy" commands are the ones the deployment checks run (no daemon needed)."""

from __future__ import annotations

import re
from pathlib import Path

from fedbus.deploy.compose import compose_config
from fedbus.manifest import load_manifest
from tests.deploy import compose_check, systemd_check

ROOT = Path(__file__).resolve().parents[2]


def _deploy_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines += [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]
    return lines


def test_readme_compose_commands_are_the_checks() -> None:
    commands = _deploy_commands()
    # the check adds --network host and its own ports/paths: the rest is the README's line
    assert f"fedbus compose {compose_check.MANIFEST} --redis --out compose.yaml" in commands
    m = load_manifest(ROOT / compose_check.MANIFEST, env={})
    doc = compose_config(m, compose_check.MANIFEST, redis=True)
    first: dict[str, str] = {}
    for name, svc in doc["services"].items():
        if "build" in svc:
            first.setdefault(svc["image"], name)
    assert f"docker-compose build {' '.join(first.values())}" in commands
    assert "docker-compose up -d" in commands


def test_readme_edge_commands_are_the_checks() -> None:
    commands = _deploy_commands()
    install = next(c for c in commands if "edge/install.sh" in c)
    assert install.endswith(f"edge/install.sh --no-torch --node {systemd_check.NODE} "
                            f"--manifest {systemd_check.MANIFEST}")
    assert f"sudo systemctl enable --now fedbus-{systemd_check.NODE}" in commands
