"""What the test modules share: the import path and the fixtures.

Plain helpers live in plain modules next to this one (``checkpoints.py``: reading a
run's checkpoint; ``mesh_cases.py``: the tiny network trained on a device mesh), so that
no test module imports another.

``tests/multidevice/`` holds tests that need 8 CPU devices in their own pytest process;
the main run leaves it out (``collect_ignore`` below) and it runs on its own:
``python -m pytest -q tests/multidevice``.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# The examples' and benchmarks' scripts (``import train``, ``import long_run``) and this
# folder's helpers (``import reference_fira``) import as top-level modules.
for path in (ROOT / "examples", ROOT / "benchmarks", TESTS):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

# Run by its own pytest process, which starts JAX with 8 CPU devices (see its conftest.py).
collect_ignore = ["multidevice"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """A small corpus of real text (stdlib modules) with one unique marker per file."""
  import data as data_lib  # examples/data.py

  root = tmp_path_factory.mktemp("corpus")
  sources = sorted(data_lib.stdlib_root().glob("*.py"))[:30]
  for i, source in enumerate(sources):
    (root / f"doc{i:02d}.txt").write_text(f"MARKER{i:02d}MARKER\n" + source.read_text()[:20000])
  return root
