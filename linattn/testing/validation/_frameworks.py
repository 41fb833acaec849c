"""Moving validate's float64 NumPy problems into an implementation's array library, and back.

NumPy, PyTorch, JAX and CuPy are recognised by the module their array type comes from;
none of them is imported unless an implementation asks for it, so none is a dependency.
Gradients come from PyTorch's autograd or ``jax.vjp`` when the implementation runs on
one of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from linattn.testing._convert import dtype_name as _library_dtype_name
from linattn.testing._convert import to_numpy

__all__ = ["FRAMEWORKS", "NotDifferentiableError", "canonical_dtype", "framework_of", "get_framework", "round_to"]

FRAMEWORKS = ("numpy", "torch", "jax", "cupy")

_ALIASES = {
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float": "float32", "float32": "float32",
    "fp64": "float64", "double": "float64", "float64": "float64",
}


class NotDifferentiableError(Exception):
    """The implementation gives no gradients (say why); validate marks them "not differentiable"."""


def canonical_dtype(dtype: Any) -> str:
    """"float16", "bfloat16", "float32" or "float64" for a name, an alias (fp16, bf16, ...) or a dtype object.

    Examples
    --------
    >>> from linattn.testing.validation import canonical_dtype
    >>> canonical_dtype("bf16"), canonical_dtype("fp32")
    ('bfloat16', 'float32')
    """
    name = _library_dtype_name(dtype) if not isinstance(dtype, str) else dtype.lower()
    if name not in _ALIASES:
        raise ValueError(f"dtypes must be among {sorted(set(_ALIASES))} (or the dtype objects), got {dtype!r}")
    return _ALIASES[name]


def framework_of(x: Any) -> str | None:
    """The library an array comes from, by its type's module ("torch", "jax", ...), or None."""
    root = type(x).__module__.split(".", 1)[0]
    if root == "jaxlib":
        return "jax"
    return root if root in FRAMEWORKS else None


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` (to nearest, ties to even), returned as float64.

    bfloat16 is rounded from the float32 value by its bits, so NumPy needs no bfloat16
    type; a value of the result converts to bfloat16 exactly in any library.
    """
    a = np.asarray(a, dtype=np.float64)
    if dtype == "float64":
        return a.copy()
    if dtype in ("float32", "float16"):
        return a.astype(dtype).astype(np.float64)
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def state_dtype(dtype: str) -> str:
    """States are kept in at least float32 (FLA and linattn), whatever the inputs' dtype."""
    return "float64" if dtype == "float64" else "float32"


class Framework:
    """Conversions for one array library; NumPy's is this base class."""

    name = "numpy"

    def __init__(self, device: Any = None) -> None:
        self.device = device

    def unsupported(self, dtype: str) -> str | None:
        """Why this library cannot hold ``dtype`` (None if it can)."""
        return "NumPy has no bfloat16" if dtype == "bfloat16" else None

    def asarray(self, a: np.ndarray, dtype: str | None) -> Any:
        """The NumPy array ``a`` in this library (``dtype`` None: integers and booleans kept)."""
        return np.array(a, dtype=dtype) if dtype is not None else np.array(a)

    def to_float64(self, x: Any) -> np.ndarray:
        """Any array of this library as a float64 NumPy array (bfloat16 widened first)."""
        return np.asarray(to_numpy(x), dtype=np.float64)

    def gradients(self, call: Callable[[dict[str, Any]], tuple[Any, Any]], leaves: dict[str, Any],
                  cotangents: Sequence[np.ndarray | None]) -> dict[str, np.ndarray | None]:
        """Gradients of Σ ⟨cotangent, output⟩ w.r.t. ``leaves`` by the library's autodiff."""
        raise NotDifferentiableError(f"{self.name} has no autodiff (give backward=, or .forward/.backward)")


class TorchFramework(Framework):
    name = "torch"

    def __init__(self, device: Any = None) -> None:
        self.torch = _import("torch")
        if device is None:
            device = "cuda" if self.torch.cuda.is_available() else "cpu"
        super().__init__(device)

    def unsupported(self, dtype: str) -> str | None:
        return None

    def asarray(self, a: np.ndarray, dtype: str | None) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        if dtype is not None:
            t = t.to(dtype=getattr(self.torch, dtype))
        elif t.dtype in (self.torch.int32, self.torch.int16, self.torch.uint8):
            t = t.to(self.torch.int64)  # offsets: FLA wants a LongTensor
        return t.to(self.device)

    def gradients(self, call, leaves, cotangents):
        torch = self.torch
        inputs = {name: x.detach().clone().requires_grad_(True) for name, x in leaves.items()}
        outputs = call(inputs)
        terms = []
        for out, cot in zip(outputs, cotangents, strict=True):
            if out is None or cot is None:
                continue
            if not getattr(out, "requires_grad", False):
                raise NotDifferentiableError("the output does not require grad (no autograd graph)")
            terms.append((out.to(torch.float64) * torch.as_tensor(cot, device=out.device)).sum())
        if not terms:
            raise NotDifferentiableError("no output to differentiate")
        grads = torch.autograd.grad(sum(terms), list(inputs.values()), allow_unused=True)
        return {name: None if g is None else self.to_float64(g) for name, g in zip(inputs, grads, strict=True)}


class JaxFramework(Framework):
    name = "jax"

    def __init__(self, device: Any = None) -> None:
        self.jax = _import("jax")
        self.jnp = _import("jax.numpy")
        super().__init__(device)

    def unsupported(self, dtype: str) -> str | None:
        if dtype == "float64" and not self.jax.config.jax_enable_x64:
            return "JAX computes in float32 unless jax_enable_x64 is set"
        return None

    def asarray(self, a: np.ndarray, dtype: str | None) -> Any:
        if dtype is None:
            x = self.jnp.asarray(a)
        else:
            wide = "float64" if dtype == "float64" else "float32"
            x = self.jnp.asarray(np.asarray(a, dtype=wide)).astype(getattr(self.jnp, dtype))
        return x if self.device is None else self.jax.device_put(x, self.device)

    def to_float64(self, x: Any) -> np.ndarray:
        return np.asarray(np.asarray(x), dtype=np.float64)

    def gradients(self, call, leaves, cotangents):
        names = list(leaves)

        def f(*xs: Any) -> tuple[Any, ...]:
            return tuple(call(dict(zip(names, xs, strict=True))))

        try:
            outputs, vjp = self.jax.vjp(f, *(leaves[n] for n in names))
        except Exception as err:  # a function JAX cannot trace (NumPy inside, say)
            raise NotDifferentiableError(f"jax.vjp failed: {type(err).__name__}: {_first_line(err)}") from err
        cots = tuple(None if out is None else self.jnp.asarray(
            np.zeros(out.shape) if cot is None else cot, dtype="float32").astype(out.dtype)
            for out, cot in zip(outputs, cotangents, strict=True))
        grads = vjp(cots)
        return {name: self.to_float64(g) for name, g in zip(names, grads, strict=True)}


class CupyFramework(Framework):
    name = "cupy"

    def __init__(self, device: Any = None) -> None:
        self.cupy = _import("cupy")
        super().__init__(device)

    def asarray(self, a: np.ndarray, dtype: str | None) -> Any:
        return self.cupy.asarray(a if dtype is None else a.astype(dtype))


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"validate needs {name.split('.')[0]} to run this implementation: {err}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


_CLASSES = {"numpy": Framework, "torch": TorchFramework, "jax": JaxFramework, "cupy": CupyFramework}


def get_framework(name: str, device: Any = None) -> Framework:
    """The conversions for the library ``name`` (one of :data:`FRAMEWORKS`)."""
    if name not in _CLASSES:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {name!r}")
    return _CLASSES[name](device)
