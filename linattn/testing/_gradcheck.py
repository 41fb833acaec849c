"""Central finite differences, to check a VJP against the function it differentiates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def numerical_vjp(
    fn: Callable[..., Any], arrays: Sequence[np.ndarray], cotangent: np.ndarray, *, step: float = 1e-6
) -> list[np.ndarray]:
    r"""The vector-Jacobian product of ``fn`` by central finite differences, element by element.

    For each input x and each of its elements x_e,

    .. math::

        \frac{\partial \langle \bar o, f \rangle}{\partial x_e} \approx
        \frac{\langle \bar o, f(x + h e) - f(x - h e) \rangle}{2h},

    whose error is O(h²)·|f'''| (truncation) plus O(ε·|f|/h) (rounding): with the
    default h = 1e-6 in float64, about 1e-12·|f'''| + 2e-10·|f|.

    Parameters
    ----------
    fn : callable
        ``fn(*arrays) -> array``; must be deterministic.
    arrays : sequence of numpy.ndarray
        float64 inputs (not modified).
    cotangent : numpy.ndarray
        ō, shaped like ``fn``'s output.
    step : float, default 1e-6
        h.

    Returns
    -------
    list of numpy.ndarray
        One gradient per input, shaped like it. Costs 2·(total input size) calls.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.testing import numerical_vjp
    >>> x = np.array([1.0, 2.0])
    >>> [g] = numerical_vjp(lambda x: x**2, [x], np.ones(2))
    >>> np.allclose(g, 2 * x)
    True
    """
    inputs = [np.array(a, dtype=np.float64, copy=True) for a in arrays]
    cotangent = np.asarray(cotangent, dtype=np.float64)
    grads = []
    for x in inputs:
        grad = np.zeros_like(x)
        flat = x.reshape(-1)  # a view: perturbing it perturbs x
        for e in range(flat.size):
            original = flat[e]
            flat[e] = original + step
            up = np.asarray(fn(*inputs), dtype=np.float64)
            flat[e] = original - step
            down = np.asarray(fn(*inputs), dtype=np.float64)
            flat[e] = original
            grad.reshape(-1)[e] = np.sum(cotangent * (up - down)) / (2 * step)
        grads.append(grad)
    return grads
