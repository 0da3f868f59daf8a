"""``fedbus new NAME``: write a runnable project (task module, manifest, README) from the
templates in ``fedbus/templates/project``; ``{{name}}`` and ``{{job}}`` are filled in.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from fedbus.errors import FedbusError

__all__ = ["new_project"]

# template file -> file written in the project
_FILES = {"task.py.tmpl": "task.py", "manifest.yaml": "manifest.yaml", "README.md": "README.md",
          "gitignore": ".gitignore"}


def new_project(folder: Path) -> Path:
    """Create ``folder`` with a project named after it; refuses to touch a non-empty folder."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FedbusError(f"{folder} already exists and is not empty; pick a new name")
    name = folder.resolve().name
    job = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:64] or "project"
    folder.mkdir(parents=True, exist_ok=True)
    templates = resources.files("fedbus") / "templates" / "project"
    for source, target in _FILES.items():
        text = (templates / source).read_text(encoding="utf-8")
        text = text.replace("{{name}}", name).replace("{{job}}", job)
        (folder / target).write_text(text, encoding="utf-8")
    return folder
