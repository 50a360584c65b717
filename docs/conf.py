"""Sphinx configuration of the fira_jax API reference.

Build (warnings are errors):

  pip install -e ".[docs]"
  python -m sphinx -W --keep-going -b html docs docs/_build/html

Run the examples of the docstrings and of these pages:

  python -m sphinx -b doctest docs docs/_build/doctest

Check that every name of ``fira_jax.__all__`` has an entry in api.rst:

  python docs/check_api_coverage.py

The build needs no network: no intersphinx, and the theme (furo) ships its assets.
"""

from __future__ import annotations

import pathlib
import sys

# Document the working tree's package even where it is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fira_jax

project = "fira_jax"
author = "fira_jax contributors"
copyright = "fira_jax contributors"
version = release = fira_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.doctest",
]

# Google-style docstrings ("Args:", "Returns:", "Example:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# No type hints on this site: the docstrings say what each argument takes, and the hints
# (jax.typing.ArrayLike and other unions, the package's own aliases) would be shown expanded
# or unresolved. nitpicky stays off: jax and optax names are not part of this site, and
# intersphinx, which could link them, would need the network at build time.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
nitpicky = False

# Docstrings write code in ``double backticks``; a single-backtick span is code too.
default_role = "code"

# The examples of the docstrings run under the doctest builder as under pytest.
doctest_global_setup = "import jax, jax.numpy as jnp, optax, fira_jax"

exclude_patterns = ["_build", "README.md", "check_api_coverage.py"]
templates_path: list[str] = []

html_theme = "furo"
html_title = f"fira_jax {release}"
html_static_path: list[str] = []


def _no_builtin_docstring(app, what, name, obj, options, lines):
  """Option values are plain tuples: show the page's text, not tuple's own docstring."""
  if what == "data" and isinstance(obj, tuple):
    lines.clear()


def setup(app):
  app.connect("autodoc-process-docstring", _no_builtin_docstring)
