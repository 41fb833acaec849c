"""What validate knows about each method: its arguments, its reference, its VJP, its conditioning.

A :class:`MethodSpec` names a method's array arguments in the order of linattn's (and
flash-linear-attention's) function, says which of them run along time (for the causality
and state-passing probes), how to draw them, how to run the float64 reference and its
VJP, and the reduction length n and condition number κ that set the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import linattn
from linattn.testing.validation import _inputs
from linattn.testing.validation._inputs import Shape

__all__ = ["METHODS", "MethodSpec", "get_method"]

# Chunk length a kernel may sum log-decays over (FLA's and linattn's default chunk).
CHUNK = 64


@dataclass(frozen=True)
class MethodSpec:
    """One method as validate runs it.

    Attributes
    ----------
    name, description : str
    forward, vjp : callable
        linattn's function and its VJP, run in float64 as the reference.
    inputs : tuple of str
        Positional array arguments, in order.
    keyword_arrays : tuple of str
        Array arguments passed by keyword (``D``, ``dt_bias``, ...).
    time_axes : mapping
        Every array that runs along time, and its time axis.
    output_time_axis : int
    make : callable
        ``make(rng, shape, extreme) -> {name: float64 array}``.
    state : callable or None
        ``state(shape) -> shape of the initial/final state``; None: no state.
    gqa : bool
        Whether unequal head counts (GQA, or GVA for the delta rule) apply.
    default_scale : callable or None
        The scale an omitted ``scale`` means, ``default_scale(shape)``; None: no scale argument.
    defaults : mapping
        Options every call gets unless a case overrides them.
    assumed : mapping
        Options an implementation that takes no such argument is assumed to compute with
        (the method's definition); they are left out for it instead of skipping the case.
    reduction : callable
        ``reduction(shape) -> n``, the number of products summed into each output.
    log_decays : callable
        ``log_decays(arrays) -> [(g, time_axis), ...]``, the per-step log-decays (for κ).
    extreme : bool
        Whether the "extreme" case applies (gates, or large logits for softmax).
    """

    name: str
    description: str
    forward: Callable[..., Any]
    vjp: Callable[..., Any]
    inputs: tuple[str, ...]
    time_axes: Mapping[str, int]
    make: Callable[[np.random.Generator, Shape, bool], dict[str, np.ndarray]]
    keyword_arrays: tuple[str, ...] = ()
    output_time_axis: int = 1
    state: Callable[[Shape], tuple[int, ...]] | None = None
    gqa: bool = True
    default_scale: Callable[[Shape], float] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    assumed: Mapping[str, Any] = field(default_factory=dict)
    reduction: Callable[[Shape], int] = lambda s: s.length * s.key_dim
    log_decays: Callable[[Mapping[str, np.ndarray]], list[tuple[np.ndarray, int]]] = lambda a: []
    extreme: bool = True
    shape_text: Callable[[Shape], str] = lambda s: (
        f"B={s.batch} T={s.length} H={s.heads}/{s.kv_heads} K={s.key_dim} V={s.value_dim}")

    def causal(self, options: Mapping[str, Any]) -> bool:
        """Whether a call with these options is causal (only softmax has a non-causal form)."""
        return bool(options.get("causal", True))

    def condition(self, arrays: Mapping[str, np.ndarray], options: Mapping[str, Any], shape: Shape) -> float:
        """κ of the tolerance: 1 + the largest Σ|g| over CHUNK consecutive steps + the chunk count.

        A kernel that sums log-decays over a chunk rounds each exponent G_t − G_s with an
        absolute error ~ε·Σ|g|, which exp turns into the same relative error of the term.
        """
        worst = 0.0
        for g, axis in self.log_decays(arrays):
            steps = np.moveaxis(np.abs(g), axis, -1).reshape(-1, g.shape[axis])
            if steps.shape[-1] == 0:
                continue
            window = min(CHUNK, steps.shape[-1])
            cumulative = np.concatenate([np.zeros((steps.shape[0], 1)), np.cumsum(steps, axis=-1)], axis=-1)
            worst = max(worst, float(np.max(cumulative[:, window:] - cumulative[:, :-window])))
        return 1.0 + worst + (math.ceil(shape.length / CHUNK) if worst else 0.0)


def _per_head_state(s: Shape) -> tuple[int, ...]:
    return (s.n_sequences, s.kv_heads, s.key_dim, s.value_dim)


_QKV_TIME = {"q": 1, "k": 1, "v": 1}


class _SoftmaxSpec(MethodSpec):
    def condition(self, arrays, options, shape):
        """1 + the largest |logit|: a logit rounded by ε·|s| moves its weight by the same relative amount."""
        scale = options.get("scale") or shape.key_dim**-0.5
        q, k = arrays["q"], arrays["k"]
        group = q.shape[2] // k.shape[2]
        logits = np.einsum("bthd,bshd->bhts", q, np.repeat(k, group, axis=2)) * scale
        return 1.0 + float(np.max(np.abs(logits), initial=0.0))


class _DeltaSpec(MethodSpec):
    def condition(self, arrays, options, shape):
        """The gates' κ times sqrt(1 + 2·min(T, CHUNK)).

        A chunked (WY/UT) form sums up to that many corrections u_s = β_s(v_s − S̃ᵀk_s), each
        up to twice |v| + |S| (see tests/test_delta.py), whose rounding errors, of random
        signs, grow like the square root of their number.
        """
        return super().condition(arrays, options, shape) * math.sqrt(1 + 2 * min(shape.length, CHUNK))


def _linear_scale(s: Shape) -> float:
    return s.key_dim**-0.5


METHODS: dict[str, MethodSpec] = {}


def _register(spec: MethodSpec) -> None:
    METHODS[spec.name] = spec


_register(_SoftmaxSpec(
    "softmax", "exact softmax attention (linattn.softmax_attention): causal, windows, masks, GQA",
    linattn.softmax_attention, linattn.softmax_attention_vjp, ("q", "k", "v"), _QKV_TIME, _inputs.softmax,
    default_scale=_linear_scale, defaults={"causal": True}))
_register(MethodSpec(
    "linear", "FLA's chunk_linear_attn: identity features, scale Dk^-0.5, normalize=False (eps 1e-10 if True)",
    linattn.linear_attention, linattn.linear_attention_vjp, ("q", "k", "v"), _QKV_TIME, _inputs.qkv,
    state=_per_head_state, default_scale=_linear_scale, defaults={"normalize": False},
    assumed={"feature_map": "identity", "causal": True, "eps": 1e-10, "normalize": False}, extreme=False))
_register(MethodSpec(
    "simple_gla", "simple GLA (FLA's chunk_simple_gla): a scalar log-decay g per head and step",
    linattn.simple_gla, linattn.simple_gla_vjp, ("q", "k", "v", "g"), {**_QKV_TIME, "g": 1}, _inputs.simple_gla,
    state=_per_head_state, default_scale=_linear_scale, log_decays=lambda a: [(a["g"], 1)]))
_register(MethodSpec(
    "retention", "RetNet retention (FLA's chunk_retention): decays log(1 - 2^(-5-h))",
    linattn.retention, linattn.retention_vjp, ("q", "k", "v"), _QKV_TIME, _inputs.qkv,
    state=_per_head_state, default_scale=_linear_scale, extreme=False,
    log_decays=lambda a: [(np.broadcast_to(np.log1p(-2.0 ** (-5.0 - np.arange(a["k"].shape[2]))),
                                           a["k"].shape[:3]), 1)]))
_register(MethodSpec(
    "gla", "gated linear attention (FLA's chunk_gla): a log-decay per key channel",
    linattn.gla, linattn.gla_vjp, ("q", "k", "v", "gk"), {**_QKV_TIME, "gk": 1}, _inputs.gla,
    state=_per_head_state, default_scale=_linear_scale, log_decays=lambda a: [(a["gk"], 1)]))
_register(MethodSpec(
    "rwkv6", "RWKV-6 (FLA's chunk_rwkv6): exclusive readout, bonus u, log-decay w per key channel",
    linattn.rwkv6, linattn.rwkv6_vjp, ("r", "k", "v", "w", "u"), {"r": 1, "k": 1, "v": 1, "w": 1}, _inputs.rwkv6,
    state=_per_head_state, default_scale=_linear_scale, log_decays=lambda a: [(a["w"], 1)]))
_register(MethodSpec(
    "hgrn", "HGRN (FLA's fused_recurrent_hgrn): h_t = exp(g_t) * h_{t-1} + x_t per channel",
    linattn.hgrn, linattn.hgrn_vjp, ("x", "g"), {"x": 1, "g": 1}, _inputs.hgrn,
    state=lambda s: (s.n_sequences, s.channels), gqa=False, reduction=lambda s: s.length,
    log_decays=lambda a: [(a["g"], 1)], shape_text=lambda s: f"B={s.batch} T={s.length} D={s.channels}"))
_register(_DeltaSpec(
    "delta_rule", "DeltaNet (FLA's chunk_delta_rule) on unit q, k; GVA: v and beta have the larger head count",
    linattn.delta_rule, linattn.delta_rule_vjp, ("q", "k", "v", "beta"), {**_QKV_TIME, "beta": 1},
    _inputs.delta_rule, state=lambda s: (s.n_sequences, s.heads, s.key_dim, s.value_dim),
    default_scale=_linear_scale, reduction=lambda s: (s.length + 1) * (s.key_dim + s.value_dim), extreme=False,
    shape_text=lambda s: f"B={s.batch} T={s.length} H={s.kv_heads} HV={s.heads} K={s.key_dim} V={s.value_dim}"))
_register(_DeltaSpec(
    "gated_delta_rule", "Gated DeltaNet (FLA's chunk_gated_delta_rule) on unit q, k; GVA as delta_rule",
    linattn.gated_delta_rule, linattn.gated_delta_rule_vjp, ("q", "k", "v", "g", "beta"),
    {**_QKV_TIME, "g": 1, "beta": 1}, _inputs.gated_delta_rule,
    state=lambda s: (s.n_sequences, s.heads, s.key_dim, s.value_dim), default_scale=_linear_scale,
    reduction=lambda s: (s.length + 1) * (s.key_dim + s.value_dim), log_decays=lambda a: [(a["g"], 1)],
    shape_text=lambda s: f"B={s.batch} T={s.length} H={s.kv_heads} HV={s.heads} K={s.key_dim} V={s.value_dim}"))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


_register(MethodSpec(
    "mamba2", "Mamba-2 SSD scan (linattn.mamba2, mamba-ssm's mamba_chunk_scan_combined arguments)",
    linattn.mamba2, linattn.mamba2_vjp, ("x", "dt", "A", "B", "C"), {"x": 1, "dt": 1, "B": 1, "C": 1},
    _inputs.mamba2, keyword_arrays=("D", "dt_bias"), state=lambda s: (s.n_sequences, s.heads, s.key_dim, s.value_dim),
    defaults={"dt_softplus": True}, reduction=lambda s: s.length * s.key_dim + 1,
    log_decays=lambda a: [(a["A"] * _softplus(a["dt"] + a["dt_bias"]), 1)],
    shape_text=lambda s: f"B={s.batch} T={s.length} H={s.heads} G={s.kv_heads} N={s.key_dim} P={s.value_dim}"))
_register(MethodSpec(
    "selective_scan", "Mamba's S6 selective scan (mamba-ssm's selective_scan_fn arguments, (B, D, L) layout)",
    linattn.selective_scan, linattn.selective_scan_vjp, ("u", "delta", "A", "B", "C"),
    {"u": 2, "delta": 2, "B": 3, "C": 3, "z": 2}, _inputs.selective_scan, keyword_arrays=("D", "z", "delta_bias"),
    output_time_axis=2, state=lambda s: (s.n_sequences, s.channels, s.key_dim), defaults={"delta_softplus": True},
    reduction=lambda s: s.length * s.key_dim + s.key_dim,
    log_decays=lambda a: [(_softplus(a["delta"] + a["delta_bias"][:, None])[..., None] * a["A"][:, None, :], 2)],
    shape_text=lambda s: f"B={s.batch} L={s.length} D={s.channels} N={s.key_dim} G={s.kv_heads}"))


def get_method(name: str) -> MethodSpec:
    """The spec of a method validate knows, by name."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
