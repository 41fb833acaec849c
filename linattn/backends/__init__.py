"""Backends: how the reference's primitives run on a device.

A :class:`Backend` names an array library it accepts and may supply fast kernels for
named primitives; a method asks its backend for a kernel and falls back to the
reference code (which is written against the array API and so runs on any backend)
when the backend has none. Methods never re-implement math per backend.

``backend=None`` follows the input arrays: NumPy arrays run on the ``"numpy"`` backend,
CuPy arrays on the ``"cupy"`` backend (CUDA kernels for the causal scans), and arrays of
any other array-API library that no registered backend claims run on the
``"reference"`` backend, which is the same reference code with no kernels.
``backend="reference"`` forces the reference code on any arrays, CuPy's included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from linattn.backends.cupy_backend import CUPY_BACKEND
from linattn.backends.numpy_backend import NUMPY_BACKEND

__all__ = ["Backend", "available_backends", "get_backend", "register_backend", "resolve_backend"]


@dataclass(frozen=True)
class Backend:
    """A device backend.

    Parameters
    ----------
    name : str
        The name users pass as ``backend=``.
    accepts : callable
        ``accepts(xp) -> bool``: whether arrays of namespace ``xp`` run on this backend.
    kernels : mapping of str to callable, optional
        Fast implementations of primitives, by primitive name. Each takes the chunked
        form's arrays and returns its results, or None for a call it does not cover:

        - ``"causal_scan"``: ``(q, k, v, gk, gv, state0) -> (o, final_state)``, the chunked
          form of :func:`linattn.scan.causal_scan`; called with ``wide=True`` it may return
          o unrounded in its accumulation dtype (float32 for 16-bit data), as
          :func:`linattn.scan.causal_scan_vjp` asks for the gradients that its gate
          gradients sum;
        - ``"causal_scan_reversed"``: the same scan run from the last step to the first,
          S_t = diag(e^{gk_t}) S_{t+1} diag(e^{gv_t}) + k_t v_tᵀ from S_T = state0,
          o_t = S_tᵀ q_t, returning (o, S_0) (the gradients' backward scans), ``wide`` as
          for ``"causal_scan"``;
        - ``"delta_scan"``: ``(q, k, v, beta, g, state0) -> (o, final_state)``, the chunked
          form of :func:`linattn.delta_scan.delta_scan`;
        - ``"delta_scan_vjp"``: ``(q, k, v, beta, g, state0, do, dfinal_state) ->
          (dq, dk, dv, dbeta, dg, dstate0)`` over the inputs' broadcast leading axes, the
          gradients of :func:`linattn.delta_grad.delta_scan_vjp`;
        - ``"gate_gradient"``: ``(a, b, c, d, end, summed) -> dG`` with
          dG_t = end + Σ_{t' ≥ t} (a ⊙ b − c ⊙ d)_{t'}, summed over the last axis when
          ``summed``, for operands of one shape (..., T, D): the gradient of a scan's
          log-gates in :func:`linattn.scan.causal_scan_vjp`; called with ``round_b=True``
          (``round_d=True``) it returns (dG, b rounded, d rounded): b (d) rounded to the
          dtype a and c are read in, None for a copy not asked for — the VJP's unrounded
          gradients rounded as the kernel reads them.
    """

    name: str
    accepts: Callable[[Any], bool]
    kernels: Mapping[str, Callable[..., Any]] = field(default_factory=dict)

    def kernel(self, primitive: str) -> Callable[..., Any] | None:
        """Return this backend's kernel for ``primitive``, or None to use the reference.

        Parameters
        ----------
        primitive : str
            The primitive's name.

        Returns
        -------
        callable or None
        """
        return self.kernels.get(primitive)


REFERENCE_BACKEND = Backend(name="reference", accepts=lambda xp: True)

_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Register ``backend`` under its name, replacing any backend of that name.

    Parameters
    ----------
    backend : Backend
        The backend to register.

    Raises
    ------
    TypeError
        If ``backend`` is not a :class:`Backend`.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a linattn.backends.Backend, got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend


def available_backends() -> Mapping[str, Backend]:
    """Return the registered backends by name.

    Returns
    -------
    Mapping of str to Backend
        A read-only view of the registry.
    """
    return MappingProxyType(_REGISTRY)


def get_backend(name: str) -> Backend:
    """Return the backend registered as ``name``.

    Parameters
    ----------
    name : str
        A registered backend name, e.g. ``"numpy"``.

    Returns
    -------
    Backend

    Raises
    ------
    ValueError
        If no backend of that name is registered.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)} or None, got {name!r}") from None


def resolve_backend(backend: str | Backend | None, xp: Any) -> Backend:
    """Return the backend that runs arrays of namespace ``xp``.

    Parameters
    ----------
    backend : str, Backend or None
        A registered name (or a backend already resolved), or None to follow the arrays.
    xp : module
        The inputs' array namespace.

    Returns
    -------
    Backend

    Raises
    ------
    ValueError
        If ``backend`` is unknown or does not accept arrays of ``xp``.
    """
    if backend is None:
        for candidate in _REGISTRY.values():
            if candidate is not REFERENCE_BACKEND and candidate.accepts(xp):
                return candidate
        return REFERENCE_BACKEND
    if isinstance(backend, Backend):
        backend = backend.name
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    chosen = get_backend(backend)
    if not chosen.accepts(xp):
        raise ValueError(
            f"backend={backend!r} does not run arrays of {getattr(xp, '__name__', xp)!s}; "
            "move the inputs to that library first, or pass backend=None to follow the inputs"
        )
    return chosen


register_backend(REFERENCE_BACKEND)
register_backend(Backend(**NUMPY_BACKEND))
register_backend(Backend(**CUPY_BACKEND))
