"""Running the implementation under test, and the float64 reference, on one problem."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from linattn.testing.validation._adapters import Adapter, Call, accepted_options
from linattn.testing.validation._cases import Problem
from linattn.testing.validation._frameworks import Framework, state_dtype
from linattn.testing.validation._methods import MethodSpec

__all__ = ["Runner", "check_backward_protocol", "gradient_names", "named_gradients", "reference",
           "reference_gradients"]


def _split(result: Any, final_state: bool) -> tuple[Any, Any]:
    """(o, final_state) from what an implementation returned: o, or a tuple (o, final_state, ...)."""
    if isinstance(result, tuple | list):
        o = result[0]
        final = result[1] if len(result) > 1 else None
    else:
        o, final = result, None
    if final_state and final is None:
        raise ValueError("asked for the final state (output_final_state=True), got none")
    return o, (final if final_state else None)


def gradient_names(problem: Problem) -> list[str]:
    """The differentiable arguments: every floating array, and the initial state when there is one."""
    names = [n for n in (*problem.spec.inputs, *problem.spec.keyword_arrays) if n in problem.arrays]
    return [*names, "initial_state"] if problem.initial_state is not None else names


def named_gradients(result: Any, names: list[str]) -> dict[str, Any]:
    """Gradients by argument name from a backward's result.

    Accepted: a mapping (keys ``q`` or ``dq``), an object with attributes ``dq``, ``dk``,
    ... (linattn's VJP results), or a sequence in the order of ``names``.
    """
    if isinstance(result, Mapping):
        return {n: result.get(n, result.get("d" + n)) for n in names}
    if all(hasattr(result, "d" + n) for n in names):
        return {n: getattr(result, "d" + n) for n in names}
    if isinstance(result, tuple | list):
        if len(result) < len(names):
            raise ValueError(f"backward returned {len(result)} gradients, expected {len(names)} ({', '.join(names)})")
        return dict(zip(names, result, strict=False))
    raise TypeError(f"backward must return a mapping, an object with d<name> attributes or a sequence, "
                    f"got {type(result).__name__}")


def _reference_kwargs(problem: Problem, final_state: bool) -> dict[str, Any]:
    spec = problem.spec
    kwargs = {name: problem.arrays[name] for name in spec.keyword_arrays}
    kwargs.update(spec.assumed)
    kwargs.update(problem.call_options(final_state=final_state))
    if spec.default_scale is not None and "scale" not in kwargs:
        kwargs["scale"] = spec.default_scale(problem.shape)  # explicit: linattn's linear default differs
    kwargs["backend"] = "numpy"
    return kwargs


def reference(problem: Problem, final_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Return linattn's float64 result (o, final state or None) on the problem's (rounded) values."""
    spec = problem.spec
    result = spec.forward(*(problem.arrays[n] for n in spec.inputs), **_reference_kwargs(problem, final_state))
    o, final = _split(result, final_state)
    return np.asarray(o, dtype=np.float64), None if final is None else np.asarray(final, dtype=np.float64)


def reference_gradients(problem: Problem, do: np.ndarray, dfinal: np.ndarray | None) -> dict[str, np.ndarray]:
    """Return linattn's float64 VJP: the gradient of Σ do·o (+ Σ dfinal·final) for every differentiable argument."""
    spec = problem.spec
    kwargs = _reference_kwargs(problem, False)
    if dfinal is not None:
        kwargs["dfinal_state"] = dfinal
    result = spec.vjp(*(problem.arrays[n] for n in spec.inputs), do, **accepted_options(spec.vjp, kwargs))
    names = gradient_names(problem)
    return {n: np.asarray(g, dtype=np.float64) for n, g in named_gradients(result, names).items() if g is not None}


@dataclass
class Runner:
    """The implementation under test, in one dtype: converts problems, calls it through the adapter."""

    forward: Callable[..., Any]
    backward: Callable[..., Any] | None
    adapter: Adapter
    framework: Framework
    spec: MethodSpec
    dtype: str

    def _array(self, a: np.ndarray, dtype: str | None) -> Any:
        return self.framework.asarray(a, dtype)

    def call_of(self, problem: Problem, final_state: bool, arrays: Mapping[str, Any] | None = None) -> Call:
        """The problem as the adapter receives it (``arrays`` overrides converted arrays: autograd leaves)."""
        converted = {n: self._array(a, self.dtype) for n, a in problem.arrays.items()}
        converted.update({n: a for n, a in (arrays or {}).items() if n != "initial_state"})
        numpy_options = problem.call_options(final_state=final_state)
        options = {}
        for name, value in numpy_options.items():
            if isinstance(value, np.ndarray):
                value = self._array(value, state_dtype(self.dtype) if value.dtype.kind == "f" else None)
            options[name] = value
        if arrays is not None and "initial_state" in arrays:
            options["initial_state"] = arrays["initial_state"]
        return Call(self.spec, converted, options, problem.shape, lambda a: self._array(np.asarray(a), None),
                    numpy_options)

    def run(self, problem: Problem, final_state: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """The implementation's (o, final state or None), as float64 NumPy arrays."""
        result = self.adapter.call(self.forward, self.call_of(problem, final_state))
        o, final = _split(result, final_state)
        return self.framework.to_float64(o), None if final is None else self.framework.to_float64(final)

    def gradients(self, problem: Problem, do: np.ndarray, dfinal: np.ndarray | None) -> dict[str, Any]:
        """The implementation's gradients of Σ do·o (+ Σ dfinal·final), by argument name (None: none given)."""
        names = gradient_names(problem)
        want_final = dfinal is not None
        if self.backward is not None:
            call = self.call_of(problem, False)
            kwargs = {n: call.arrays[n] for n in self.spec.keyword_arrays}
            kwargs.update(self.spec.assumed)
            kwargs.update(call.options)
            if want_final:
                kwargs["dfinal_state"] = self._array(dfinal, state_dtype(self.dtype))
            kwargs = accepted_options(self.backward, kwargs, {**self.spec.assumed})
            result = self.backward(*call.positional(), self._array(do, self.dtype), **kwargs)
            grads = named_gradients(result, names)
            return {n: None if g is None else self.framework.to_float64(g) for n, g in grads.items()}
        leaves = {n: self._array(problem.arrays[n], self.dtype) for n in names if n != "initial_state"}
        if problem.initial_state is not None:
            leaves["initial_state"] = self._array(problem.initial_state, state_dtype(self.dtype))

        def call_with(arrays: dict[str, Any]) -> tuple[Any, Any]:
            result = self.adapter.call(self.forward, self.call_of(problem, want_final, arrays))
            return _split(result, want_final)

        return self.framework.gradients(call_with, leaves, (do, dfinal))


def check_backward_protocol(adapter: Adapter, backward: Any) -> None:
    """A backward works with linattn's calling convention only (it receives the same arguments)."""
    if backward is not None and adapter.name != "linattn":
        raise ValueError(f"backward= works with adapter=None (linattn's convention), got adapter {adapter.name!r}")

