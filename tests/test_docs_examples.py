"""The reports shown in docs/validate.rst are what validate says today (docs/scripts/validate_tutorial.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from linattn.testing.validation import CASES

ROOT = Path(__file__).resolve().parents[1]


def tutorial():
    path = ROOT / "docs" / "scripts" / "validate_tutorial.py"
    spec = importlib.util.spec_from_file_location("validate_tutorial", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def verdicts(text: str) -> list[tuple[str, ...]]:
    """(case, check, result, property) of every row of a printed report; the numbers may differ by BLAS."""
    names = {case.name for case in CASES}
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in names:
            result = next(f for f in fields if f in ("pass", "FAIL", "skip", "error"))
            after = line.split(f" {result} ", 1)[1].strip() if f" {result} " in line else ""
            rows.append((fields[0], line[14:28].strip(), result, after.split(":")[0] if after else ""))
    return rows


def test_the_tutorial_reports_in_the_docs_are_current() -> None:
    buggy, fixed = tutorial().reports()
    static = ROOT / "docs" / "_static"
    for report, name in ((buggy, "validate_buggy.txt"), (fixed, "validate_fixed.txt")):
        shown = (static / name).read_text(encoding="utf-8")
        assert verdicts(shown) == verdicts(str(report)), f"rerun python docs/scripts/validate_tutorial.py ({name})"
        assert report.summary() in shown
    assert ("tail", "output", "FAIL", "tail chunk") in verdicts(str(buggy))  # the parser reads the columns
    assert not buggy.passed and fixed.passed
    assert "tail chunk" in buggy.failed_properties
