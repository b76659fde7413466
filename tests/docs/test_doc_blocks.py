"""Every command block of README.md and docs/ runs, in a lab, and prints what the docs say.

A fenced `sh`/`bash` block runs (with `bash -eu -o pipefail`, in a fresh lab per file, with
TETHER_SERVER, TETHER_TOKEN and TETHER_LAB pointing at it and `tether` on PATH) unless an HTML comment
right above its fence says why not. Markers, each on its own line directly above the fence:

    <!-- doc-test: skip REASON -->     not run (installs, daemons the lab already runs, ...)
    <!-- doc-test: expect TEXT -->     the block's output must contain TEXT (repeatable)
    <!-- doc-test: file NAME -->       any block: written to NAME in the working directory first

Blocks of one file run in order in one working directory, each in its own shell.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures.lab import make_lab

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"sh", "bash", "shell"}
MARKER = re.compile(r"^<!--\s*doc-test:\s*(skip|expect|file)\b\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None
    expects: list[str] = field(default_factory=list)
    file: str | None = None

    @property
    def runs(self) -> bool:
        return self.lang in SHELL and self.skip is None

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file with the doc-test markers right above each."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(```+)\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), len(lines))
        b = Block(path, i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]) + "\n")
        k = i - 1
        while k >= 0 and (m := MARKER.match(lines[k])):
            kind, arg = m.groups()
            if kind == "skip":
                b.skip = arg
            elif kind == "expect":
                b.expects.insert(0, arg)
            else:
                b.file = arg
            k -= 1
        out.append(b)
        i = end + 1
    return out


ALL = [b for p in DOCS for b in blocks(p)]
RUNNABLE = [p for p in DOCS if any(b.runs for b in blocks(p))]


def test_every_shell_block_runs_or_says_why_not() -> None:
    assert len(ALL) > 10 and len(RUNNABLE) >= 4, [str(p) for p in RUNNABLE]
    unexplained = [b.where() for b in ALL if b.lang in SHELL and b.skip == ""]
    assert not unexplained, f"skipped without a reason: {unexplained}"
    untyped = [b.where() for b in ALL if not b.lang]
    assert not untyped, f"say the block's language (sh, yaml, json, text...): {untyped}"
    mute = [b.where() for b in ALL if b.runs and not b.expects]
    assert not mute, f"runnable blocks whose output nothing checks (add <!-- doc-test: expect ... -->): {mute}"


def test_the_marker_parser() -> None:
    doc = ROOT / "docs" / "USER_GUIDE.md"
    assert any(b.file and b.lang == "yaml" for b in blocks(doc))


@pytest.fixture
def doc_lab() -> Iterator:
    lab = make_lab()
    try:
        yield lab
    finally:
        lab.down()


@pytest.mark.lab
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_command_blocks_run_in_a_lab(path: Path, doc_lab, tmp_path) -> None:
    env = {**os.environ, "TETHER_SERVER": doc_lab.server_url, "TETHER_TOKEN": doc_lab.token,
           "TETHER_LAB": doc_lab.name, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "COLUMNS": "200", "NO_COLOR": "1"}
    for b in blocks(path):
        if b.file:
            (tmp_path / b.file).write_text(b.text)
        if not b.runs:
            continue
        r = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", b.text], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        output = r.stdout + r.stderr
        assert r.returncode == 0, f"{b.where()} exited {r.returncode}:\n{b.text}\n---\n{output[-3000:]}"
        for want in b.expects:
            assert want in output, f"{b.where()}: {want!r} not in the output:\n{b.text}\n---\n{output[-3000:]}"
