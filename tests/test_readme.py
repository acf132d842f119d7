"""Every Python example in README.md runs as written, each in a fresh interpreter.

The blocks are found by parsing README.md, so a new ```python block is tested without touching
this file. Each runs in its own subprocess from the repository root (as a reader would paste it),
so blocks stay independent; the subprocesses run a few at a time in threads, since most of their
time is JAX compiling, one core each.
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Headings of blocks that need more than ~30 s on a 2-core CPU; they run with `pytest -m slow`.
SLOW = frozenset()

#: Extra checks appended to a block (by heading), for what its comments promise.
CHECKS = {
    "A first solve": 'assert "converged after 6 iterations" in hvp.status_message(info)\n',
    "Hypergradients": ("assert bool(info.finite)\n"
                       "assert result.history[-1]['outer_loss'] < "
                       "result.history[0]['outer_loss']\n"),
}

TIMEOUT_S = 600


class Block(NamedTuple):
    heading: str  # the nearest Markdown heading above the fence
    line: int  # 1-based line of the opening fence
    lang: str  # the fence's info string ("" for a bare ```)
    code: str

    def describe(self) -> str:
        first = next((s for s in self.code.splitlines() if s.strip()), "")
        return f"README.md block under {self.heading!r} (line {self.line}, starting {first!r})"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the heading it sits under."""
    blocks, heading, opened, lines = [], "(top of file)", None, []
    for number, line in enumerate(text.splitlines(), start=1):
        if opened is None and line.startswith("```"):
            opened, lines = (number, line[3:].strip()), []
        elif opened is not None and line.strip() == "```":
            blocks.append(Block(heading, opened[0], opened[1], "\n".join(lines) + "\n"))
            opened = None
        elif opened is not None:
            lines.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    if opened is not None:
        raise ValueError(f"README.md: the fence opened at line {opened[0]} is never closed")
    return blocks


BLOCKS = parse_blocks(README.read_text())
PYTHON = [block for block in BLOCKS if block.lang == "python"]


def _ids(blocks: list[Block]) -> list[str]:
    """Test ids from headings (stable when lines move), numbered where a heading repeats."""
    slugs = [re.sub(r"[^a-z0-9]+", "-", block.heading.lower()).strip("-") for block in blocks]
    return [slug if slugs.count(slug) == 1 else f"{slug}-{slugs[:i].count(slug) + 1}"
            for i, slug in enumerate(slugs)]


def _run(block: Block) -> subprocess.CompletedProcess:
    code = block.code + CHECKS.get(block.heading, "")
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=ROOT, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        return subprocess.CompletedProcess(error.cmd, -1, error.stdout or "",
                                           f"timed out after {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def runs(request):
    """Starts every selected block at once (a few at a time) and maps its line to a future."""
    wanted = [item.callspec.params["block"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")
              and "block" in item.callspec.params]
    with ThreadPoolExecutor(max_workers=max(1, min(len(wanted), os.cpu_count() or 1))) as pool:
        yield {block.line: pool.submit(_run, block) for block in wanted}


def test_readme_has_python_blocks():
    assert len(PYTHON) >= 1, "no ```python block found in README.md; is the parser broken?"
    unknown = set(CHECKS) - {block.heading for block in PYTHON}
    assert not unknown, f"CHECKS names headings with no python block: {sorted(unknown)}"


def test_no_unlabelled_python_block():
    hidden = [block.describe() for block in BLOCKS if block.lang == ""
              and block.code.lstrip().startswith(("import ", "from "))]
    assert not hidden, ("bare ``` fences that hold Python; label them ```python so that this "
                        "test runs them:\n" + "\n".join(hidden))


@pytest.mark.parametrize("block", [
    pytest.param(block, id=name, marks=[pytest.mark.slow] if block.heading in SLOW else [])
    for block, name in zip(PYTHON, _ids(PYTHON), strict=True)])
def test_readme_block_runs(block, runs):
    result = runs[block.line].result()
    if result.returncode != 0:
        pytest.fail(f"{block.describe()} failed with exit code {result.returncode} (line n of "
                    f"<string> below is README.md line {block.line} + n):\n"
                    f"{result.stderr[-4000:]}", pytrace=False)
