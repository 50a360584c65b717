"""Fails unless docs/api.rst has exactly one entry for each name of ``fira_jax.__all__``.

  python docs/check_api_coverage.py

Exit status 1 lists the public names without an entry (add an ``.. autofunction::`` or
``.. autoclass::`` line for each to docs/api.rst) and the entries that name something
``fira_jax`` no longer exports (a renamed or removed name: update or delete the entry).
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.rst"
ENTRY = re.compile(
  r"^\.\.\s+(?:py:)?auto(?:function|class|data|exception|attribute|module)::\s+"
  r"(?:fira_jax\.)?([A-Za-z_][A-Za-z0-9_]*)\s*$",
  re.MULTILINE,
)


def documented_names(text: str) -> list[str]:
  """The names of the autodoc entries of an .rst page, in order."""
  return ENTRY.findall(text)


def main() -> int:
  sys.path.insert(0, str(ROOT))
  import fira_jax

  public = set(fira_jax.__all__)
  entries = documented_names(API.read_text(encoding="utf-8"))
  counts = collections.Counter(entries)
  missing = sorted(public - counts.keys())
  stale = sorted(counts.keys() - public)
  repeated = sorted(name for name, n in counts.items() if n > 1)
  for title, names in (
    ("names of fira_jax.__all__ without an entry in docs/api.rst", missing),
    ("entries in docs/api.rst that fira_jax.__all__ does not export", stale),
    ("names with more than one entry in docs/api.rst", repeated),
  ):
    if names:
      print(f"{title}:")
      for name in names:
        print(f"  {name}")
  if missing or stale or repeated:
    return 1
  print(f"docs/api.rst documents all {len(public)} names of fira_jax.__all__.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
