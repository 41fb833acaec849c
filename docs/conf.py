"""Sphinx configuration for the linattn documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``. The build
needs no network: there is no intersphinx, and MathJax is only loaded by the browser.
"""

from __future__ import annotations

import re
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
# _static/ is copied whole: explore.html (the explorer page, linked from explore.rst) opens from there.
html_static_path = ["_static"]
html_title = f"linattn {release}"


# Docstrings write formulas in plain text, with |x| for norms and absolute values
# (e.g. "exp(w·x' − |x'|²/2)"). reStructuredText reads |...| as a substitution reference,
# which is an error. Escape every "|" in running text; leave math (``.. math::`` blocks,
# :math:`...`), literals, code and doctest blocks, and tables alone.
_VERBATIM = re.compile(r"(``.*?``|:math:`[^`]*`|`[^`]*`)")
_BLOCK_START = re.compile(r"^\s*(\.\. (math|code-block|code|sourcecode|highlight|doctest|testcode)::|.*::\s*$)")


def _escape_bars(text: str) -> str:
    parts = _VERBATIM.split(text)
    return "".join(part if i % 2 else re.sub(r"(?<!\\)\|", r"\\|", part) for i, part in enumerate(parts))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def escape_plain_text_bars(app, what, name, obj, options, lines) -> None:
    block_indent = None  # indentation of the directive or "::" line that opened a verbatim block
    in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if in_doctest:
            in_doctest = bool(stripped)
            continue
        if block_indent is not None:
            if not stripped or _indent(line) > block_indent:
                continue
            block_indent = None
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        if stripped.startswith(("|", "+-", "+=")):  # line blocks and grid tables
            continue
        if _BLOCK_START.match(line):
            block_indent = _indent(line)
            if stripped.startswith(".."):  # the directive line itself (".. math:: formula")
                continue
        if "|" in line:
            lines[i] = _escape_bars(line)


def setup(app):
    # After numpydoc (priority 500) has turned the sections into reStructuredText.
    app.connect("autodoc-process-docstring", escape_plain_text_bars, priority=600)
