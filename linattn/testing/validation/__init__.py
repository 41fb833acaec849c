"""Validate another implementation of an attention method against linattn's float64 reference.

:func:`validate` runs an implementation (NumPy, PyTorch, JAX or CuPy; through an
adapter when it follows flash-linear-attention's, PyTorch SDPA's or mamba-ssm's
conventions) on generated problems that cover what breaks kernels, and reports, case by
case, how far its outputs, final states and gradients are from linattn's float64
reference and which property failed. :func:`assert_valid` raises with that report, for
test suites; the pytest fixture ``linattn_validate`` does the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from linattn.testing.validation._adapters import (
    ADAPTERS,
    Adapter,
    Call,
    UnsupportedError,
    get_adapter,
    register_adapter,
)
from linattn.testing.validation._cases import CASES, Case, select_cases
from linattn.testing.validation._frameworks import FRAMEWORKS, NotDifferentiableError, canonical_dtype, get_framework
from linattn.testing.validation._inputs import Shape
from linattn.testing.validation._methods import METHODS, MethodSpec, get_method
from linattn.testing.validation._properties import run_case
from linattn.testing.validation._report import SKIP, TOLERANCE_RULE, CaseResult, ValidationReport
from linattn.testing.validation._runner import Runner, check_backward_protocol

__all__ = [
    "ADAPTERS",
    "CASES",
    "FRAMEWORKS",
    "METHODS",
    "TOLERANCE_RULE",
    "Adapter",
    "Call",
    "Case",
    "CaseResult",
    "MethodSpec",
    "NotDifferentiableError",
    "Shape",
    "UnsupportedError",
    "ValidationReport",
    "assert_valid",
    "canonical_dtype",
    "register_adapter",
    "validate",
]


def _impl_name(impl: Any) -> str:
    if isinstance(impl, functools.partial):
        return f"partial({_impl_name(impl.func)})"
    module = getattr(impl, "__module__", None) or type(impl).__module__
    name = getattr(impl, "__qualname__", None) or getattr(impl, "__name__", None) or type(impl).__qualname__
    return f"{module}.{name}" if module and module != "builtins" else str(name)


def _forward_backward(impl: Any, backward: Callable[..., Any] | None) -> tuple[Callable[..., Any], Any]:
    """An object with ``.forward`` and ``.backward`` is both; otherwise impl is the forward."""
    forward = impl
    if not callable(impl) or (hasattr(impl, "forward") and hasattr(impl, "backward") and not isinstance(impl, type)):
        forward = getattr(impl, "forward", None)
        backward = backward if backward is not None else getattr(impl, "backward", None)
    if not callable(forward):
        raise TypeError(f"impl must be callable or have a callable .forward, got {type(impl).__name__}")
    if backward is not None and not callable(backward):
        raise TypeError(f"backward must be callable, got {type(backward).__name__}")
    return forward, backward


def validate(
    impl: Any,
    method: str,
    *,
    cases: Iterable[str] | str | None = None,
    dtypes: Iterable[Any] | str = ("float32",),
    grads: bool = True,
    seed: int = 0,
    adapter: str | Adapter | Callable[..., Any] | None = None,
    framework: str | None = None,
    device: Any = None,
    backward: Callable[..., Any] | None = None,
) -> ValidationReport:
    r"""Run ``impl`` on generated problems and compare it with linattn's float64 reference.

    Each case (:data:`CASES`) probes one thing that breaks kernels: T = 1, T not a
    multiple of 16 or 64 (a tail chunk), head dims that are not powers of two, GQA (GVA
    for the delta rule), an explicit and the default scale, a nonzero initial state and
    the final state, state passing across a split, causality (inputs after P redrawn),
    ``cu_seqlens`` with empty and length-1 sequences, extreme gates or logits, a long
    sequence, and per method windows and masks (softmax) or zero keys under a normaliser
    (linear). For every case and dtype the inputs are drawn in float64, rounded to the
    dtype, handed to ``impl`` in its array library, and its results compared element by
    element with linattn run in float64 on the same rounded values:

    .. math::

        |a - r| \le \text{tol}\,(\max|r| + |r|), \qquad
        \text{tol} = 8\,\varepsilon\,\sqrt{n}\,\kappa ,

    ε of the dtype (float16 and bfloat16: the float32 value of the formula plus 8ε of
    the half dtype, as kernels sum in float32), n the products summed into each output
    (T·Dk for a scan, doubled for gradients) and κ the condition: 1 + the largest sum of
    absolute log-decays over 64 steps + the number of chunks for the gated methods (a chunked
    kernel rounds those sums in its exponents), 1 + the largest absolute logit for softmax, times
    sqrt(1 + 2·min(T, 64)) for the delta rule (the corrections a chunk sums at once).

    Gradients (``grads=True``) are those of Σ do·o (+ Σ dS·S_final where the final state
    is compared) for random cotangents, against linattn's VJP: from PyTorch's autograd or
    ``jax.vjp`` when ``impl`` runs there, or from a backward the implementation supplies;
    a NumPy implementation without one is reported "not differentiable" (skipped, not
    passed).

    Parameters
    ----------
    impl : callable or object
        The implementation. With ``adapter=None`` it is called like the linattn function
        of the same method (``linattn.gla(q, k, v, gk, scale=..., initial_state=...,
        output_final_state=..., cu_seqlens=...)``), returning ``o`` or
        ``(o, final_state)``; keyword options it has no parameter for make their case
        skipped (with the reason), except those the method's definition fixes (e.g.
        ``feature_map="identity"`` for "linear"). An object with ``.forward`` and
        ``.backward`` supplies its gradients (see ``backward``).
    method : str
        One of :data:`METHODS`: "softmax", "linear", "simple_gla", "retention", "gla",
        "rwkv6", "hgrn", "delta_rule", "gated_delta_rule", "mamba2", "selective_scan".
    cases : iterable of str, optional
        Case names to run (default: every case that applies to the method).
    dtypes : iterable of str, default ("float32",)
        "float32", "float64", "float16"/"fp16", "bfloat16"/"bf16" (bfloat16 needs PyTorch
        or JAX: NumPy has none, so its rows are skipped with that reason).
    grads : bool, default True
        Compare gradients on the cases that have them.
    seed : int, default 0
        The same seed draws the same problems.
    adapter : str, Adapter or callable, optional
        The calling convention: None or "linattn", "fla" (flash-linear-attention's ops
        and naive references, [B, T, H, D]), "fla_head_first", "sdpa", "mamba_ssm", an
        :class:`Adapter`, or a function ``call(impl, call: Call) -> o or (o, final_state)``.
    framework : {"numpy", "torch", "jax", "cupy"}, optional
        The array library ``impl`` takes (default: the adapter's; NumPy for linattn's).
    device : optional
        Where PyTorch/JAX arrays go (PyTorch default: "cuda" when available, else "cpu").
    backward : callable, optional
        ``backward(*arrays, do, **options, dfinal_state=...)`` with the arguments of the
        linattn VJP of the method (``linattn.gla_vjp``); returns the gradients as a
        mapping by argument name, an object with ``dq``, ``dk``, ... attributes, or a
        sequence in the order of the positional arrays, the keyword arrays, then the
        initial state. Only with linattn's convention.

    Returns
    -------
    ValidationReport
        ``report.passed``, ``report.failed_properties``, ``report.rows`` (one
        :class:`CaseResult` per check), ``print(report)`` for the table.

    Raises
    ------
    ValueError, TypeError
        An unknown method, case, dtype, adapter or framework, or a non-callable impl.

    Examples
    --------
    >>> import linattn
    >>> from linattn.testing import validate
    >>> report = validate(linattn.gla, "gla", cases=["basic", "tail"], backward=linattn.gla_vjp)
    >>> report.passed
    True
    >>> [(r.case, r.check, r.status) for r in report.rows]  # doctest: +NORMALIZE_WHITESPACE
    [('basic', 'output', 'pass'), ('basic', 'gradients', 'pass'),
     ('tail', 'output', 'pass'), ('tail', 'gradients', 'pass')]
    """
    spec = get_method(method)
    chosen = select_cases(spec, cases)
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    names = tuple(canonical_dtype(d) for d in dtypes)
    if not names:
        raise ValueError("dtypes must name at least one dtype")
    if not isinstance(grads, bool):
        raise TypeError(f"grads must be a bool, got {type(grads).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    conventions = get_adapter(adapter)
    forward, backward = _forward_backward(impl, backward)
    check_backward_protocol(conventions, backward)
    library = get_framework(framework or conventions.framework or "numpy", device)
    rows: list[CaseResult] = []
    for dtype in names:
        runner = Runner(forward, backward, conventions, library, spec, dtype)
        reason = library.unsupported(dtype)
        for case in chosen:
            if reason is not None:
                rows.append(CaseResult(case.name, "output", spec.shape_text(case.shape), dtype, SKIP, note=reason))
                continue
            rows.extend(run_case(runner, case, seed, dtype, grads))
    return ValidationReport(spec.name, _impl_name(impl), conventions.name, library.name, names, seed, tuple(rows))


def assert_valid(impl: Any, method: str, **kwargs: Any) -> ValidationReport:
    """:func:`validate`, raising AssertionError with the report when a check fails.

    Parameters
    ----------
    impl, method, **kwargs
        As :func:`validate`.

    Returns
    -------
    ValidationReport
        When every check passed (or was skipped).

    Raises
    ------
    AssertionError
        With the whole report (its table, summary and tolerance rule) as the message.

    Examples
    --------
    >>> import linattn
    >>> from linattn.testing import assert_valid
    >>> assert_valid(linattn.hgrn, "hgrn", cases=["t1", "varlen"]).passed
    True
    """
    report = validate(impl, method, **kwargs)
    if not report.passed:
        raise AssertionError("\n" + str(report))
    return report
