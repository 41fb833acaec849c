"""Comparison of an implementation's output with the reference, with dtype-derived tolerances."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from linattn.testing._convert import dtype_name, to_numpy

__all__ = ["CloseReport", "assert_close", "machine_epsilon", "tolerance"]

# Machine epsilon (spacing of floats at 1.0) by dtype name; bfloat16 and float16 are
# listed by name because NumPy has no bfloat16 and other libraries name them alike.
_EPSILON = {
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
}

# Safety factor on top of eps·sqrt(n): covers the handful of roundings per element
# (exp, the division by the row sum, the final cast) that do not grow with n.
_ROUNDINGS_PER_ELEMENT = 8.0


def machine_epsilon(dtype: Any) -> float:
    """Machine epsilon of a floating dtype (NumPy, CuPy, PyTorch or array-API), by its name.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.testing import machine_epsilon
    >>> machine_epsilon(np.float32)
    1.1920928955078125e-07
    """
    name = dtype_name(dtype)
    if name not in _EPSILON:
        raise TypeError(f"dtype must be a floating dtype ({', '.join(_EPSILON)}), got {dtype!r}")
    return _EPSILON[name]


def tolerance(dtype: Any, reduction_length: int = 1, condition: float = 1.0) -> float:
    r"""The relative tolerance linattn allows an implementation computing in ``dtype``.

    .. math::

        \text{tol} = 8\,\varepsilon_{\text{dtype}}\,\sqrt{\max(n, 1)}\;\kappa

    where n is the length of the reductions that produced each element (the number of
    keys a query sums over, the length of a scan) and κ (``condition``) the problem's
    condition number where it is known to be large, e.g. the logit magnitude when logits
    are rounded. Rounding errors of a sum of n terms grow like sqrt(n)·ε for random
    signs (and at worst like n·ε); 8 covers the fixed number of roundings per element.

    Parameters
    ----------
    dtype : dtype
        The dtype the implementation under test computes or stores its result in.
    reduction_length : int, default 1
        n above.
    condition : float, default 1.0
        κ above, >= 1.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.testing import tolerance
    >>> tolerance(np.float64, reduction_length=64) == 8 * 2.0**-52 * 8
    True
    """
    if reduction_length < 0:
        raise ValueError(f"reduction_length must be >= 0, got {reduction_length}")
    if not condition >= 1.0:
        raise ValueError(f"condition must be >= 1, got {condition}")
    return _ROUNDINGS_PER_ELEMENT * machine_epsilon(dtype) * math.sqrt(max(reduction_length, 1)) * condition


@dataclass(frozen=True)
class CloseReport:
    """The outcome of one comparison.

    Attributes
    ----------
    passed : bool
        Whether every element satisfied |a − d| <= atol + rtol·|d|.
    max_abs_error : float
        max |a − d| over elements (inf if a NaN or an infinity differs).
    rel_rms_error : float
        ||a − d||₂ / ||d||₂ over finite elements (0 when both are zero).
    worst_index : tuple of int or None
        Index of the element with the largest error relative to its allowance.
    actual_at_worst, desired_at_worst : float
        The two values there.
    rtol, atol : float
        The tolerances applied.
    shape : tuple of int
    message : str
        Empty when passed; else why it failed.
    """

    passed: bool
    max_abs_error: float
    rel_rms_error: float
    worst_index: tuple[int, ...] | None
    actual_at_worst: float
    desired_at_worst: float
    rtol: float
    atol: float
    shape: tuple[int, ...]
    message: str = ""

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        text = (
            f"{verdict}: shape {self.shape}, max abs error {self.max_abs_error:.3e}, "
            f"relative RMS error {self.rel_rms_error:.3e}, rtol {self.rtol:.3e}, atol {self.atol:.3e}"
        )
        if self.worst_index is not None:
            text += (
                f"; worst element at index {self.worst_index}: "
                f"actual {self.actual_at_worst!r}, desired {self.desired_at_worst!r}"
            )
        return text + (f"; {self.message}" if self.message else "")


def compare(
    actual: Any,
    desired: Any,
    *,
    dtype: Any = None,
    reduction_length: int = 1,
    condition: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
) -> CloseReport:
    """Compare like :func:`assert_close` and return the :class:`CloseReport` without raising."""
    a = to_numpy(actual)
    d = to_numpy(desired)
    if dtype is None:
        dtype = _lowest_precision(actual, desired)
    if a.shape != d.shape:
        return CloseReport(False, math.inf, math.inf, None, math.nan, math.nan, math.nan, math.nan, a.shape,
                           f"shapes differ: actual {a.shape}, desired {d.shape}")
    if a.dtype.kind == "b" or d.dtype.kind in "biu":
        equal = a == d
        worst = None if equal.all() else tuple(int(i) for i in np.argwhere(~equal)[0])
        return CloseReport(bool(equal.all()), float(np.max(np.abs(a.astype(float) - d), initial=0.0)), 0.0,
                           worst, float(a[worst]) if worst else 0.0, float(d[worst]) if worst else 0.0, 0.0, 0.0,
                           a.shape, "" if worst is None else "values differ")
    a = a.astype(np.float64)
    d = d.astype(np.float64)
    tol = tolerance(dtype, reduction_length, condition)
    rtol = tol if rtol is None else float(rtol)
    finite_d = d[np.isfinite(d)]
    scale = float(np.max(np.abs(finite_d))) if finite_d.size else 0.0
    # The absolute part scales with the largest |desired|: elements that are small by
    # cancellation carry the rounding error of the large terms that cancelled.
    atol = tol * scale if atol is None else float(atol)

    same_special = (a == d) & ~np.isfinite(d)  # equal infinities (lse = -inf) agree exactly
    with np.errstate(invalid="ignore"):  # inf - inf; handled by same_special and the NaN rule
        err = np.where(same_special, 0.0, np.abs(a - d))
    err = np.where(np.isnan(err), np.inf, err)
    allowance = atol + rtol * np.abs(np.where(np.isfinite(d), d, 0.0))
    ratio = np.where(err == 0, 0.0, err / np.where(allowance > 0, allowance, np.finfo(float).tiny))
    passed = bool(np.all(err <= allowance))
    both_finite = np.isfinite(a) & np.isfinite(d)
    diff_norm = float(np.linalg.norm(a[both_finite] - d[both_finite]))
    ref_norm = float(np.linalg.norm(d[both_finite]))
    rel_rms = diff_norm / ref_norm if ref_norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    if a.size == 0:
        return CloseReport(True, 0.0, 0.0, None, 0.0, 0.0, rtol, atol, a.shape)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(ratio)), a.shape))
    message = ""
    if not passed:
        n_bad = int(np.count_nonzero(err > allowance))
        message = f"{n_bad} of {a.size} elements outside tolerance"
        if np.isnan(a).any():
            message += f" ({int(np.isnan(a).sum())} NaN in actual)"
    return CloseReport(passed, float(err.max()), rel_rms, worst, float(a[worst]), float(d[worst]), rtol, atol,
                       a.shape, message)


def assert_close(
    actual: Any,
    desired: Any,
    *,
    dtype: Any = None,
    reduction_length: int = 1,
    condition: float = 1.0,
    rtol: float | None = None,
    atol: float | None = None,
    err_msg: str = "",
) -> CloseReport:
    r"""Assert that ``actual`` equals ``desired`` within a tolerance derived from the dtype.

    Every element must satisfy

    .. math::

        |a - d| \le \text{atol} + \text{rtol}\,|d|, \qquad
        \text{rtol} = \text{tol}, \quad \text{atol} = \text{tol}\cdot\max|d|,

    with tol = :func:`tolerance` (dtype, reduction_length, condition) =
    8·ε·sqrt(n)·κ. The absolute part is relative to the largest ``|desired|`` so that
    elements that are small by cancellation are judged by the size of what cancelled.
    Equal infinities agree (an lse of −inf); a NaN anywhere fails. Shapes must match
    exactly: nothing is broadcast.

    Parameters
    ----------
    actual : array
        The implementation's result (NumPy, CuPy, PyTorch, or any DLPack array).
    desired : array
        The reference result, usually float64 from :func:`linattn.testing.reference`.
    dtype : dtype, optional
        The dtype whose ε sets the tolerance; default the lower precision of the two.
    reduction_length : int, default 1
        Length of the sums behind each element (keys per query, scan length).
    condition : float, default 1.0
        Known condition number of the problem (e.g. logit magnitude), >= 1.
    rtol, atol : float, optional
        Override the derived tolerances.
    err_msg : str, optional
        Prepended to the failure message.

    Returns
    -------
    CloseReport
        The comparison's numbers (also on success).

    Raises
    ------
    AssertionError
        With the max-abs error, relative RMS error, the worst element's index and values,
        and the tolerances.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.testing import assert_close
    >>> d = np.array([1.0, 2.0, 3.0])
    >>> assert_close(d.astype(np.float32), d).passed
    True
    >>> assert_close(d + [0, 0, 1e-3], d)
    Traceback (most recent call last):
    ...
    AssertionError: FAILED: shape (3,), max abs error 1.000e-03, ...
    """
    report = compare(actual, desired, dtype=dtype, reduction_length=reduction_length, condition=condition,
                     rtol=rtol, atol=atol)
    if not report.passed:
        raise AssertionError((err_msg + ": " if err_msg else "") + str(report))
    return report


def _lowest_precision(*arrays: Any) -> Any:
    names = [dtype_name(x.dtype) for x in arrays]
    floating = [n for n in names if n in _EPSILON]
    if not floating:
        return "float64"
    return max(floating, key=lambda n: _EPSILON[n])
