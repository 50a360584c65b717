"""Every ```python block of README.md runs as printed, each on its own in a fresh namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def slug(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def python_blocks(text: str) -> list[tuple[str, int, str]]:
  """``(id, first line, source)`` of each ```python block.

  The id names the block's section, its leading comment if it has one, and its first line:
  e.g. ``quick-start-flax-nnx-line79``.
  """
  # Headings outside code blocks only: a "# comment" in a block is not a heading.
  prose = re.sub(r"^```.*?^```$", lambda m: " " * len(m.group()), text, flags=re.M | re.S)
  blocks = []
  for match in FENCE.finditer(text):
    line = text.count("\n", 0, match.start(1)) + 1
    headings = re.findall(r"^#+ (.+)$", prose[: match.start()], re.MULTILINE)
    name = slug(headings[-1]) if headings else "top"
    comment = re.match(r"# (.+)", match.group(1))
    if comment:
      name += "-" + slug(comment.group(1))
    blocks.append((f"{name}-line{line}", line, match.group(1)))
  return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_the_python_snippets_this_test_runs():
  # The three quick starts, the layouts, the pieces and the shardings.
  assert len(BLOCKS) >= 6


@pytest.mark.parametrize(("line", "source"), [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_every_python_snippet_in_the_readme_runs(line, source):
  # Padded with blank lines so that a traceback names the README's own line numbers.
  code = compile("\n" * (line - 1) + source, str(README), "exec")
  exec(code, {"__name__": f"readme_line_{line}"})
