"""Adapters: how validate calls an implementation that follows another library's conventions.

An adapter turns one of validate's calls — the method's arrays and options in linattn's
layout, already in the implementation's array library — into a call of the
implementation, and its result back into linattn's layout: ``o``, or ``(o, final_state)``.
Because adapters only index and transpose (through the array-API namespace of the
inputs), PyTorch's autograd and ``jax.vjp`` see through them.

Built in: ``"linattn"`` (the default: the call of the linattn function of the same
name), ``"fla"`` and ``"fla_head_first"`` (flash-linear-attention's ops and naive
references), ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``) and
``"mamba_ssm"`` (``selective_scan_fn`` and ``mamba_chunk_scan_combined``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from linattn.testing.validation._inputs import Shape
from linattn.testing.validation._methods import MethodSpec

__all__ = ["ADAPTERS", "Adapter", "Call", "UnsupportedError", "get_adapter", "register_adapter"]


class UnsupportedError(Exception):
    """Raised by an adapter for a case the implementation cannot run; the report skips it with the reason."""


@dataclass(frozen=True)
class Call:
    """One call validate wants made, as an adapter receives it.

    Attributes
    ----------
    spec : MethodSpec
        The method (``spec.name``, ``spec.inputs`` in positional order, ``spec.keyword_arrays``).
    arrays : dict
        Every array argument by linattn's name, in the implementation's library and dtype,
        in linattn's layout ((B, T, H, D) for attention; see the method's docs).
    options : dict
        Keyword options by linattn's name: ``scale`` (only when the case sets one, so
        that the default is exercised), ``initial_state`` (N, ...) in at least float32,
        ``output_final_state``, ``cu_seqlens`` (int64), ``causal``, ``window``, ``mask``,
        ``normalize``, ``dt_softplus``, ``delta_softplus``.
    shape : Shape
        The case's sizes.
    asarray : callable
        NumPy array -> the implementation's library (for masks an adapter builds).
    numpy_options : dict
        ``options`` before conversion (NumPy arrays).
    """

    spec: MethodSpec
    arrays: dict[str, Any]
    options: dict[str, Any]
    shape: Shape
    asarray: Callable[[np.ndarray], Any]
    numpy_options: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The method's name."""
        return self.spec.name

    def positional(self) -> list[Any]:
        """The positional arrays, in linattn's order."""
        return [self.arrays[name] for name in self.spec.inputs]


@dataclass(frozen=True)
class Adapter:
    """A calling convention.

    Attributes
    ----------
    name : str
    call : callable
        ``call(impl, call: Call) -> o or (o, final_state)``, in linattn's layout; raises
        :class:`UnsupportedError` for a case the implementation cannot take.
    framework : str, optional
        The array library it feeds by default ("torch" for FLA, SDPA and mamba-ssm);
        None: NumPy unless validate is told otherwise.
    description : str
    """

    name: str
    call: Callable[[Callable[..., Any], Call], Any]
    framework: str | None = None
    description: str = ""


def accepted_options(impl: Callable[..., Any], options: Mapping[str, Any],
                     assumed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword options ``impl`` can take, by its signature.

    An option it has no parameter for is dropped when its value is the one the
    definition assumes (``assumed``), and otherwise makes the case :class:`UnsupportedError`.
    A callable whose signature cannot be read (a builtin) is taken to accept everything.
    """
    try:
        parameters = inspect.signature(impl).parameters
    except (TypeError, ValueError):
        return dict(options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    kept = {}
    for name, value in options.items():
        if name in parameters:
            kept[name] = value
        elif not (assumed and name in assumed and _same(assumed[name], value)):
            raise UnsupportedError(f"{_name(impl)} takes no {name!r} argument")
    return kept


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _name(impl: Callable[..., Any]) -> str:
    if isinstance(impl, functools.partial):
        return _name(impl.func)
    return getattr(impl, "__qualname__", None) or getattr(impl, "__name__", None) or type(impl).__name__


def _swap_time_and_heads(x: Any) -> Any:
    """(B, T, H, ...) <-> (B, H, T, ...), through the array's own namespace (autograd sees it)."""
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    axes = (0, 2, 1, *range(3, x.ndim))
    return xp.permute_dims(x, axes)


# ---- linattn's own convention ----


def _linattn_call(impl: Callable[..., Any], call: Call) -> Any:
    spec = call.spec
    options = {name: call.arrays[name] for name in spec.keyword_arrays}
    options.update(spec.assumed)
    options.update(call.options)
    return impl(*call.positional(), **accepted_options(impl, options, spec.assumed))


# ---- flash-linear-attention ----

_FLA_GQA = {"gated_delta_rule"}  # GVA: more value heads than q/k heads
_FLA_OPTIONS = ("scale", "initial_state", "output_final_state", "cu_seqlens", "normalize")
_FLA_METHODS = {"linear", "simple_gla", "retention", "gla", "rwkv6", "hgrn", "delta_rule", "gated_delta_rule"}


# linattn's name -> the names FLA's functions give the same argument (chunk_gla: g, naive_recurrent_gla: gk)
_FLA_NAMES = {"gk": ("g", "gk"), "g": ("g",), "beta": ("beta",), "w": ("w",), "u": ("u",)}


def _fla_arguments(impl: Callable[..., Any], names: tuple[str, ...],
                   arrays: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """q, k, v (r, x) by position; gates, β and u by name where the signature has it.

    FLA's functions do not agree on the order of the gate arguments
    (``chunk_gated_delta_rule(q, k, v, g, beta)`` but
    ``naive_recurrent_gated_delta_rule(q, k, v, beta, g)``): by name, both work.
    """
    try:
        parameters = set(inspect.signature(impl).parameters)
    except (TypeError, ValueError):
        parameters = set()
    positional: list[Any] = []
    by_name: dict[str, Any] = {}
    for name in names:
        fla_name = next((n for n in _FLA_NAMES.get(name, ()) if n in parameters), None)
        if fla_name is None and not by_name:
            positional.append(arrays[name])
        elif fla_name is None:
            raise UnsupportedError(f"{_name(impl)} has no parameter for {name!r} ({', '.join(_FLA_NAMES[name])})")
        else:
            by_name[fla_name] = arrays[name]
    return positional, by_name


def _fla(head_first: bool) -> Callable[[Callable[..., Any], Call], Any]:
    def call_fla(impl: Callable[..., Any], call: Call) -> Any:
        name, s = call.method, call.shape
        if name not in _FLA_METHODS:
            raise UnsupportedError(f"flash-linear-attention has no {name} op of this form: use adapter=None, "
                              "'sdpa' (softmax) or 'mamba_ssm' (selective_scan, mamba2)")
        if s.heads != s.kv_heads and name not in _FLA_GQA:
            raise UnsupportedError(f"FLA's {name} needs as many query as key/value heads (GVA: gated_delta_rule only)")
        # normalize=False is the definition validate checks; FLA's chunk ops default to True
        options = accepted_options(impl, {k: call.options[k] for k in _FLA_OPTIONS if k in call.options},
                                   {"normalize": False})
        arrays = dict(zip(call.spec.inputs, call.positional(), strict=True))
        if head_first:
            if "cu_seqlens" in options:
                raise UnsupportedError("head-first layouts take no cu_seqlens")
            arrays = {n: _swap_time_and_heads(a) if call.spec.time_axes.get(n) == 1 and a.ndim >= 3 else a
                      for n, a in arrays.items()}
        positional, by_name = _fla_arguments(impl, call.spec.inputs, arrays)
        result = impl(*positional, **by_name, **options)
        if head_first:
            if isinstance(result, tuple | list):
                return (_swap_time_and_heads(result[0]), *result[1:])
            return _swap_time_and_heads(result)
        return result

    return call_fla


# ---- PyTorch SDPA ----


def _visible(s: Shape, causal: bool, window: tuple[int | None, int | None] | None) -> np.ndarray:
    """(T, T) booleans: key j visible to query i (causal and window, T = S)."""
    i, j = np.arange(s.length)[:, None], np.arange(s.length)[None, :]
    visible = j <= i if causal else np.ones((s.length, s.length), dtype=bool)
    if window is not None:
        left, right = window
        if left is not None:
            visible &= j >= i - left
        if right is not None:
            visible &= j <= i + right
    return visible


def _sdpa_call(impl: Callable[..., Any], call: Call) -> Any:
    if call.method != "softmax":
        raise UnsupportedError(f"SDPA computes softmax attention, not {call.method}")
    if "cu_seqlens" in call.options:
        raise UnsupportedError("SDPA takes no cu_seqlens (variable-length batches)")
    q, k, v = (_swap_time_and_heads(a) for a in call.positional())
    causal, window, mask = (call.numpy_options.get(n) for n in ("causal", "window", "mask"))
    kwargs: dict[str, Any] = {}
    if window is not None or (mask is not None and causal):
        # SDPA refuses is_causal together with attn_mask: fold everything into one mask
        visible = _visible(call.shape, bool(causal), window)
        kwargs["attn_mask"] = call.asarray(visible if mask is None else mask & visible)
    elif mask is not None:
        kwargs["attn_mask"] = call.options["mask"]
    else:
        kwargs["is_causal"] = bool(causal)
    if "scale" in call.options:
        kwargs["scale"] = call.options["scale"]
    if call.shape.heads != call.shape.kv_heads:
        kwargs["enable_gqa"] = True
    return _swap_time_and_heads(impl(q, k, v, **accepted_options(impl, kwargs)))


# ---- mamba-ssm ----


def _mamba_call(impl: Callable[..., Any], call: Call) -> Any:
    o = call.options
    if "cu_seqlens" in o:
        raise UnsupportedError("mamba-ssm's scans take no cu_seqlens here (its varlen states differ)")
    if call.method == "selective_scan":
        if "initial_state" in o:
            raise UnsupportedError("mamba-ssm's selective_scan_fn takes no initial state")
        kwargs = {name: call.arrays[name] for name in ("D", "z", "delta_bias")}
        kwargs["delta_softplus"] = o.get("delta_softplus", False)
        kwargs["return_last_state"] = o.get("output_final_state", False)
        return impl(*call.positional(), **accepted_options(impl, kwargs))
    if call.method == "mamba2":
        import array_api_compat

        final = o.get("output_final_state", False)
        kwargs = {"chunk_size": 64, "D": call.arrays["D"], "dt_bias": call.arrays["dt_bias"],
                  "dt_softplus": o.get("dt_softplus", False), "return_final_states": final}
        if "initial_state" in o:  # mamba-ssm's states are (N, H, P, N_state): linattn's transposed
            xp = array_api_compat.array_namespace(o["initial_state"])
            kwargs["initial_states"] = xp.matrix_transpose(o["initial_state"])
        result = impl(*call.positional(), **accepted_options(impl, kwargs))
        if final:
            xp = array_api_compat.array_namespace(result[1])
            return result[0], xp.matrix_transpose(result[1])
        return result
    raise UnsupportedError(f"mamba-ssm has no {call.method}: use adapter=None or 'fla'")


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    """Make ``adapter`` available by its name (``validate(..., adapter=name)``, ``--adapter``)."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter must be an Adapter, got {type(adapter).__name__}")
    ADAPTERS[adapter.name] = adapter


register_adapter(Adapter("linattn", _linattn_call, None,
                         "linattn's calling convention: impl(*arrays, **options) as the linattn function"))
register_adapter(Adapter("fla", _fla(False), "torch",
                         "flash-linear-attention: chunk_*/fused_recurrent_*/naive_* ops, [B, T, H, D] torch tensors"))
register_adapter(Adapter("fla_head_first", _fla(True), "torch",
                         "FLA's head-first naive references ([B, H, T, D]: naive_recurrent_rwkv6, ...)"))
register_adapter(Adapter("sdpa", _sdpa_call, "torch",
                         "torch.nn.functional.scaled_dot_product_attention: [B, H, T, D], is_causal, attn_mask"))
register_adapter(Adapter("mamba_ssm", _mamba_call, "torch",
                         "mamba-ssm: selective_scan_fn (u (B, D, L)), mamba_chunk_scan_combined (mamba2)"))


def get_adapter(adapter: str | Adapter | Callable[..., Any] | None) -> Adapter:
    """An adapter by name, an :class:`Adapter`, or a plain ``call(impl, call)`` function (None: "linattn")."""
    if adapter is None:
        return ADAPTERS["linattn"]
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str):
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {sorted(ADAPTERS)}, an Adapter or a callable, got {adapter!r}")
        return ADAPTERS[adapter]
    if callable(adapter):
        return Adapter(_name(adapter), adapter)
    raise TypeError(f"adapter must be a name, an Adapter or a callable, got {type(adapter).__name__}")
