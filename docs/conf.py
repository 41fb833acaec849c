"""Sphinx configuration for the linattn documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``. The build
needs no network: there is no intersphinx, and MathJax is only loaded by the browser.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Document the checkout next to this file, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import linattn

project = "linattn"
release = linattn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

# Stubs for the :toctree: of api.rst are written to api/generated/ (git-ignored).
# _templates/autosummary/class.rst documents a class's methods on its own page.
autosummary_generate = True
templates_path = ["_templates"]
autodoc_typehints = "none"  # the numpydoc Parameters sections carry the types and shapes

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False

nitpicky = False
exclude_patterns = ["_build"]

html_theme = "pydata_sphinx_theme"
html_title = f"linattn {release}"
