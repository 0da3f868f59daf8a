"""The command blocks of README.md and docs/*.md, read the way a user copies them.

A command block is a fenced block tagged ``bash``/``sh``/``shell``/``console``. Its commands are
its lines without comments; in a ``console`` block only the ``$ `` lines are commands (the rest
is output). Tests run these lines as written (tests/test_docs_commands.py lists which test
runs each one), so a changed document is a changed test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
_FENCE = re.compile(r"^```(\w*)\s*$")
_SHELLS = {"bash", "sh", "shell", "console"}


@dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository root
    line: int  # 1-based line in the document
    text: str  # the command, its trailing comment removed

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _strip_comment(line: str) -> str:
    # A comment starts at a '#' after whitespace (never inside a word such as a URL's '#x').
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def commands(path: Path) -> list[list[Command]]:
    """Every shell block of ``path``: a list of its commands, in order."""
    blocks: list[list[Command]] = []
    lang: str | None = None
    block: list[Command] = []
    rel = str(path.relative_to(ROOT))
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = _FENCE.match(line)
        if fence and lang is None:
            lang = fence.group(1) or "text"
            block = []
            continue
        if fence:
            if lang in _SHELLS and block:
                blocks.append(block)
            lang = None
            continue
        if lang not in _SHELLS:
            continue
        if lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:]
        text = _strip_comment(line)
        if text:
            block.append(Command(rel, number, text))
    return blocks


def all_commands() -> list[Command]:
    return [c for doc in DOCS for block in commands(doc) for c in block]


def block_with(path: Path, needle: str) -> list[str]:
    """The commands of the one block of ``path`` that has a command containing ``needle``."""
    found = [b for b in commands(path) if any(needle in c.text for c in b)]
    assert len(found) == 1, f"{len(found)} blocks of {path} contain {needle!r}"
    return [c.text for c in found[0]]
