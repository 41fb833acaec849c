"""Running a linattn method in float64 on NumPy, whatever the caller's arrays are."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from linattn.testing._convert import to_numpy


def _to_reference_input(x: Any) -> Any:
    if isinstance(x, np.ndarray | np.generic) or _is_foreign_array(x):
        a = to_numpy(x)
        return a.astype(np.float64) if a.dtype.kind == "f" else a
    return x


def _is_foreign_array(x: Any) -> bool:
    return hasattr(x, "__dlpack__") or (hasattr(x, "detach") and hasattr(x, "cpu"))


def _to_float64(result: Any) -> Any:
    if isinstance(result, tuple | list):
        return type(result)(_to_float64(r) for r in result)
    if result is None or isinstance(result, bool | int | float):
        return result
    a = to_numpy(result)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


def reference(fn: Callable[..., Any], *arrays: Any, **kwargs: Any) -> Any:
    """Run the linattn method ``fn`` in float64 on NumPy and return its result in float64.

    Every floating array among the positional and keyword arguments (NumPy, CuPy,
    PyTorch or any DLPack array) is copied to a float64 NumPy array; boolean and integer
    arrays (masks, ``cu_seqlens``) are copied to NumPy unchanged; other arguments pass
    through. ``backend="numpy"`` is passed unless the caller gives a backend. The
    result, or each array of a tuple result, is returned as a float64 NumPy array.

    Parameters
    ----------
    fn : callable
        A linattn function, e.g. :func:`linattn.softmax_attention`.
    *arrays : array
        Its positional array arguments.
    **kwargs
        Its keyword arguments.

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.testing import reference
    >>> q = np.ones((1, 3, 1, 4), dtype=np.float16)
    >>> reference(linattn.softmax_attention, q, q, q, causal=True).dtype
    dtype('float64')
    """
    args = [_to_reference_input(a) for a in arrays]
    kw = {name: _to_reference_input(value) for name, value in kwargs.items()}
    if "backend" not in kw and "backend" in inspect.signature(fn).parameters:
        kw["backend"] = "numpy"
    return _to_float64(fn(*args, **kw))
