"""linattn's pytest plugin: the ``linattn_validate`` fixture, for test suites of other kernels.

Installed with linattn (the ``pytest11`` entry point), so any test may ask for it::

    def test_my_gla(linattn_validate):
        linattn_validate(my_pkg.chunk_gla, "gla", adapter="fla", dtypes=["bf16"])

It is :func:`linattn.testing.assert_valid`: a failing validation raises AssertionError
with the whole report, so pytest prints the table of what failed and where.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture
def linattn_validate() -> Callable[..., object]:
    """:func:`linattn.testing.assert_valid`: validate, raising with the report on a failure."""
    from linattn.testing import assert_valid

    return assert_valid
