"""The oracle's testing core: compare any implementation with linattn's float64 reference.

- :func:`assert_close` — dtype-derived tolerances and a report of what differs and where;
- :func:`reference` — run a linattn method in float64 on NumPy;
- :func:`numerical_vjp` — central finite differences, to check a backward pass;
- :func:`validate` / :func:`assert_valid` — run another implementation (NumPy, PyTorch, JAX,
  CuPy; FLA, SDPA or mamba-ssm conventions) on the cases that break kernels and report
  which property fails (:mod:`linattn.testing.validation`);
- :mod:`linattn.testing.strategies` — hypothesis strategies that draw valid problems
  (needs the ``test`` extra).
"""

from linattn.testing._close import CloseReport, assert_close, compare, machine_epsilon, tolerance
from linattn.testing._convert import to_numpy
from linattn.testing._gradcheck import numerical_vjp
from linattn.testing._reference import reference
from linattn.testing.validation import ValidationReport, assert_valid, validate

__all__ = [
    "CloseReport",
    "ValidationReport",
    "assert_close",
    "assert_valid",
    "compare",
    "machine_epsilon",
    "numerical_vjp",
    "reference",
    "to_numpy",
    "tolerance",
    "validate",
]
