"""The checks validate runs on a case, each a row of the report.

- values: outputs (and final states) against the float64 reference; a failure whose
  elements all lie in the last T % 64 (or T % 16) steps is reported as "tail chunk";
- causality: inputs after position P redrawn, outputs up to P must not move;
- state passing: run(x[:P]) then run(x[P:], initial_state=its final state) against run(x);
- default scale: the output with ``scale`` left out against ``scale = Dk^-0.5`` given;
- gradients: every argument's gradient against linattn's VJP, from autograd (PyTorch,
  JAX) or the implementation's backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from linattn.testing import compare, tolerance
from linattn.testing.validation._adapters import UnsupportedError
from linattn.testing.validation._cases import Problem, build_problem, case_seed, draw_arrays
from linattn.testing.validation._frameworks import NotDifferentiableError, round_to, state_dtype
from linattn.testing.validation._report import ERROR, FAIL, PASS, SKIP, CaseResult
from linattn.testing.validation._runner import Runner, reference, reference_gradients

__all__ = ["run_case", "tolerance_of"]


def tolerance_of(problem: Problem, dtype: str, *, gradients: bool = False) -> float:
    """8·ε·sqrt(n)·κ for the problem (n doubled for gradients: a forward and a backward sum).

    float16 and bfloat16: the float32 value of the formula (kernels sum in float32) plus
    8·ε of the half dtype (the values pass through it a few times: a stored tile or
    state, the output), which does not grow with the length.
    """
    spec = problem.spec
    n = spec.reduction(problem.shape) * (2 if gradients else 1)
    kappa = spec.condition(problem.arrays, problem.options, problem.shape)
    if dtype in ("float16", "bfloat16"):
        return tolerance("float32", n, kappa) + tolerance(dtype, 1)
    return tolerance(dtype, n, kappa)


class _Comparison:
    """One array against its reference: the numbers of the report and where the errors are."""

    def __init__(self, name: str, actual: np.ndarray | None, desired: np.ndarray, tol: float,
                 magnitude: float | None = None) -> None:
        self.name, self.tol = name, tol
        self.missing = actual is None  # a gradient autograd did not give: zeros (it is, where unused)
        if actual is None:
            actual = np.zeros_like(desired)
        size = float(np.max(np.abs(desired), initial=0.0))
        atol = tol * (size if magnitude is None else max(size, magnitude))
        self.report = compare(actual, desired, rtol=tol, atol=atol)
        r = self.report
        if actual.shape == desired.shape:
            with np.errstate(invalid="ignore"):
                self.bad = ~(np.abs(actual - desired) <= r.atol + r.rtol * np.abs(desired))
        else:
            self.bad = None
        self.nan = bool(np.isnan(actual).any())

    @property
    def passed(self) -> bool:
        return self.report.passed

    @property
    def ratio(self) -> float:
        """How far outside (> 1) or inside its allowance the worst element is."""
        r = self.report
        if not np.isfinite(r.max_abs_error):
            return np.inf
        return r.max_abs_error / max(r.atol + r.rtol * abs(r.desired_at_worst), 1e-300)

    def worst(self) -> str:
        index = self.report.worst_index
        return self.name if index is None else f"{self.name}[{','.join(str(i) for i in index)}]"

    def note(self) -> str:
        if self.bad is None:
            return self.report.message
        parts = [f"{int(self.bad.sum())} of {self.bad.size} elements outside"]
        if self.missing:
            parts.append("none given (taken as zeros)")
        if self.nan:
            parts.append("NaN in the result")
        return ", ".join(parts)


def _row(problem: Problem, dtype: str, check: str, comparisons: list[_Comparison], failed_property: str,
         note: str = "") -> CaseResult:
    worst = max(comparisons, key=lambda c: c.ratio)
    passed = all(c.passed for c in comparisons)
    if not passed:
        failing = [c for c in comparisons if not c.passed]
        note = "; ".join(x for x in (note, ", ".join(f"{c.name}: {c.note()}" for c in failing)) if x)
    r = worst.report
    return CaseResult(problem.case.name, check, problem.spec.shape_text(problem.shape), dtype,
                      PASS if passed else FAIL, r.max_abs_error, r.rel_rms_error, worst.worst(), worst.tol,
                      None if passed else failed_property, note, float(worst.ratio))


def _other(problem: Problem, dtype: str, check: str, status: str, note: str) -> CaseResult:
    return CaseResult(problem.case.name, check, problem.spec.shape_text(problem.shape), dtype, status,
                      failed_property=problem.case.property if status == ERROR else None, note=note)


def _attempt(problem: Problem, dtype: str, check: str, fn: Callable[[], list[CaseResult]]) -> list[CaseResult]:
    """Run a check; an unsupported case is skipped, an exception of the implementation is an error row."""
    try:
        return fn()
    except UnsupportedError as why:
        return [_other(problem, dtype, check, SKIP, str(why))]
    except NotDifferentiableError as why:
        return [_other(problem, dtype, check, SKIP, f"not differentiable: {why}")]
    except Exception as err:  # the implementation raised: report it, go on with the other cases
        message = str(err).strip().splitlines()
        return [_other(problem, dtype, check, ERROR, f"{type(err).__name__}: {message[0] if message else ''}")]


def _tail(c: _Comparison, time_axis: int, length: int) -> str | None:
    """"tail chunk" evidence: every bad element in the last T % 64 (or T % 16) steps, with a full chunk before."""
    if c.bad is None or not c.bad.any():
        return None
    steps = np.nonzero(np.moveaxis(c.bad, time_axis, 0).reshape(length, -1).any(axis=1))[0]
    for chunk in (16, 64):  # the more specific first
        rest = length % chunk
        if length > chunk and rest and steps.min() >= length - rest:
            return f"errors only in the last T % {chunk} = {rest} steps (t >= {length - rest})"
    return None


def _values(runner: Runner, problem: Problem, dtype: str) -> list[CaseResult]:
    case, spec = problem.case, problem.spec
    o_ref, final_ref = reference(problem, case.final_state)
    o, final = runner.run(problem, case.final_state)
    tol = tolerance_of(problem, dtype)
    output = _Comparison("o", o, o_ref, tol)
    prop, note = case.property, ""
    if "cu_seqlens" not in problem.options:
        note = _tail(output, spec.output_time_axis, problem.length) or ""
        prop = "tail chunk" if note else prop
    rows = [_row(problem, dtype, "output", [output], prop, note)]
    if case.final_state:
        state = _Comparison("ht", final, final_ref, tol)
        # a final state that misses the tail's updates is the same tail chunk
        state_prop = prop if prop == "tail chunk" else ("final state" if prop == "values" else prop)
        rows.append(_row(problem, dtype, "final state", [state], state_prop))
    return rows


def _causality(runner: Runner, problem: Problem, dtype: str) -> list[CaseResult]:
    position, axis = problem.case.split, problem.spec.output_time_axis
    fresh = draw_arrays(problem.spec, problem.case, case_seed(problem.seed + 1, problem.case, dtype), dtype)
    o, _ = runner.run(problem, False)
    o_changed, _ = runner.run(problem.redrawn_after(position, fresh), False)
    prefix = [slice(None)] * o.ndim
    prefix[axis] = slice(0, position + 1)
    c = _Comparison("o", o_changed[tuple(prefix)], o[tuple(prefix)], tolerance_of(problem, dtype))
    return [_row(problem, dtype, "causality", [c], "causality",
                 f"outputs up to t = {position} moved when only later inputs changed" if not c.passed else "")]


def _state_passing(runner: Runner, problem: Problem, dtype: str) -> list[CaseResult]:
    position, axis = problem.case.split, problem.spec.output_time_axis
    o_ref, final_ref = reference(problem, True)
    o1, state = runner.run(problem.sliced(0, position), True)
    second = replace(problem.sliced(position, problem.length), initial_state=round_to(state, state_dtype(dtype)))
    o2, final = runner.run(second, True)
    tol = tolerance_of(problem, dtype)
    comparisons = [_Comparison("o", np.concatenate([o1, o2], axis=axis), o_ref, tol),
                   _Comparison("ht", final, final_ref, tol)]
    return [_row(problem, dtype, "state passing", comparisons, "state passing")]


def _default_scale(runner: Runner, problem: Problem, dtype: str) -> list[CaseResult]:
    value = problem.spec.default_scale(problem.shape)
    explicit = replace(problem, options={**problem.options, "scale": value})
    o_explicit, _ = runner.run(explicit, False)
    o_default, _ = runner.run(problem, False)
    c = _Comparison("o", o_default, o_explicit, tolerance_of(problem, dtype))
    return [_row(problem, dtype, "default scale", [c], "default scale",
                 "" if c.passed else f"scale left out differs from scale = {value:.4g} given")]


def _gradients(runner: Runner, problem: Problem, dtype: str) -> list[CaseResult]:
    rng = case_seed(problem.seed + 2, problem.case, dtype)
    o_ref, final_ref = reference(problem, problem.case.final_state)
    do = round_to(rng.standard_normal(o_ref.shape), dtype)
    dfinal = None if final_ref is None else round_to(rng.standard_normal(final_ref.shape), state_dtype(dtype))
    expected = reference_gradients(problem, do, dfinal)
    got = runner.gradients(problem, do, dfinal)
    tol = tolerance_of(problem, dtype, gradients=True)
    # A gate's gradient is a (reverse cumulative) sum of differences of products of the
    # other gradients with their inputs, which cancel: its absolute allowance is relative
    # to the largest gradient of any per-step argument, not to its own, possibly ~0, size.
    per_step = [float(np.max(np.abs(g), initial=0.0)) for n, g in expected.items() if n in problem.spec.time_axes]
    magnitude = max(per_step, default=0.0)
    comparisons = [_Comparison("d" + name, got.get(name), g, tol, magnitude) for name, g in expected.items()]
    return [_row(problem, dtype, "gradients", comparisons, "gradients")]


_CHECKS: dict[str, Callable[[Runner, Problem, str], list[CaseResult]]] = {
    "values": _values, "causality": _causality, "state passing": _state_passing, "default scale": _default_scale,
}


def run_case(runner: Runner, case: Any, seed: int, dtype: str, grads: bool) -> list[CaseResult]:
    """Every row of one case in one dtype: its check, then its gradients when asked for."""
    problem = build_problem(runner.spec, case, seed, dtype)
    rows = _attempt(problem, dtype, _check_name(case.check), lambda: _CHECKS[case.check](runner, problem, dtype))
    if grads and case.grads and not any(r.status in (SKIP, ERROR) for r in rows):  # no forward, no gradients
        rows += _attempt(problem, dtype, "gradients", lambda: _gradients(runner, problem, dtype))
    return rows


def _check_name(check: str) -> str:
    return "output" if check == "values" else check
