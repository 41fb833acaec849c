r"""The front end shared by the gated recurrences (simple GLA, RetNet, Mamba-2, GLA, RWKV-6, HGRN).

Each of them is the causal scan of :mod:`linattn.scan` with log-space gates,

.. math::

    S_t = \big(e^{g^k_t} (e^{g^v_t})^\top\big) \odot S_{t-1} + k_t v_t^\top, \qquad o_t = S_t^\top q_t ,

run on arrays in the grouped layout of :mod:`linattn._problem`: time on axis 3,
q (B, Hkv, G, T, Dk), k and v (B, Hkv, 1, T, D), gates (B, Hkv, 1, T, 1|Dk|Dv) — or
any other shapes that broadcast the same way (Mamba-2 shares q and k over a group of
value heads: v (B, G, H/G, T, P)). This module checks what every method shares (gates,
states, form, ``cu_seqlens``), walks the sequences of ``cu_seqlens`` with a state each,
and holds the helpers of the decoding states and of ``linattn compare``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._problem import compute_dtype, from_grouped, to_grouped
from linattn.backends import resolve_backend
from linattn.scan import FORMS, ScanGradients, causal_scan, causal_scan_vjp

# Longest block a decoding step runs as one chunk (as in linattn.decoding).
STEP_CHUNK = 64


def check_form(form: Any, chunk_size: Any) -> int:
    """Validate ``form`` and return ``chunk_size`` as an int >= 1."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return _checks.check_positive_int("chunk_size", chunk_size)


def check_shape(name: str, x: Any, expected: tuple[int, ...], xp: Any, against: str) -> None:
    """``x`` must be a floating array of exactly ``expected`` shape (``against`` says why)."""
    _checks.require_array(name, x)
    _checks.namespace_of(**{name: x, "the other inputs": _probe(xp)})
    _checks.require_floating(name, x, xp)
    if tuple(int(n) for n in x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} to match {against}, got {tuple(x.shape)}")


def _probe(xp: Any) -> Any:
    return xp.zeros((0,))


def check_log_decay(name: str, g: Any, expected: tuple[int, ...], xp: Any, against: str) -> None:
    """A gate in log space: ``expected`` shape, finite and <= 0 (a decay e^g in (0, 1]).

    linattn refuses a positive log-decay rather than clamping it: e^g > 1 grows the state
    without bound, and the forms would disagree on how it overflows.
    """
    check_shape(name, g, expected, xp, against)
    check_range(name, g, xp, f"finite log-decays <= 0 (each decay e^{name} in (0, 1])", upper=0.0)


def check_range(name: str, x: Any, xp: Any, what: str, *, lower: float = -math.inf, upper: float = math.inf) -> None:
    """Every value finite and in [lower, upper], by two reductions (a NaN makes both fail)."""
    if x.size == 0:
        return
    low, high = float(xp.min(x)), float(xp.max(x))
    if not (lower <= low and high <= upper and -math.inf < low and high < math.inf):
        finite = bool(xp.all(xp.isfinite(x)))
        found = f"its values span [{low!r}, {high!r}]" if finite else "it holds NaN or infinities"
        raise ValueError(f"{name} must hold {what}; {found}")


def check_state(name: str, x: Any, expected: tuple[int, ...], xp: Any, layout: str) -> None:
    """``initial_state``-like arrays: floating, exactly ``expected`` (described by ``layout``)."""
    check_shape(name, x, expected, xp, f"the inputs ({layout})")


def offsets(cu_seqlens: Any, batch: int, length: int) -> tuple[int, ...] | None:
    """Validated ``cu_seqlens`` offsets (see :func:`linattn._checks.check_cu_seqlens`) or None."""
    shapes = _checks.AttentionShapes(batch, length, length, 1, 1, 1, 1)
    return _checks.check_cu_seqlens(cu_seqlens, shapes)


def n_states(offsets: tuple[int, ...] | None, batch: int) -> int:
    """N: one state per batch element, or per sequence under ``cu_seqlens``."""
    return batch if offsets is None else len(offsets) - 1


def map_sequences(fn: Callable[..., tuple[tuple[Any, ...], tuple[Any, ...]]], offsets: tuple[int, ...] | None,
                  time_arrays: Sequence[Any], state_arrays: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Run ``fn`` on each sequence alone and join the results.

    ``fn(time_arrays, state_arrays) -> (time_outputs, state_outputs)``. Without
    ``cu_seqlens`` it sees the whole arrays; with it, each segment [lo, hi) of the time
    axis (axis −2, in a batch of one) and the n-th entry of each state array (axis 0).
    Time outputs are joined along axis −2, state outputs along axis 0 (None stays None).
    """
    if offsets is None:
        outs = fn(list(time_arrays), list(state_arrays))
        return list(outs[0]), list(outs[1])
    results = []
    for n, (lo, hi) in enumerate(itertools.pairwise(offsets)):
        seg = [None if x is None else x[..., lo:hi, :] for x in time_arrays]
        states = [None if x is None else x[n:n + 1, ...] for x in state_arrays]
        results.append(fn(seg, states))

    def join(parts: list[Any], axis: int) -> Any:
        if parts[0] is None:
            return None
        xp = array_api_compat.array_namespace(parts[0])
        return xp.concat(parts, axis=axis)

    time_out = [join([r[0][i] for r in results], -2) for i in range(len(results[0][0]))]
    state_out = [join([r[1][i] for r in results], 0) for i in range(len(results[0][1]))]
    return time_out, state_out


def scan(q: Any, k: Any, v: Any, *, gk: Any, gv: Any, initial_state: Any, offsets: tuple[int, ...] | None,
         form: str, chunk_size: int, backend: Any = None) -> tuple[Any, Any]:
    """:func:`linattn.scan.causal_scan` on each sequence with its own state: (o, final states)."""
    def run(seg: list[Any], states: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        o, final = causal_scan(seg[0], seg[1], seg[2], gk=seg[3], gv=seg[4], initial_state=states[0], form=form,
                               chunk_size=chunk_size, backend=backend)
        return (o,), (final,)

    (o,), (final,) = map_sequences(run, offsets, (q, k, v, gk, gv), (initial_state,))
    return o, final


def scan_vjp(q: Any, k: Any, v: Any, do: Any, *, gk: Any, gv: Any, initial_state: Any, dfinal_state: Any,
             offsets: tuple[int, ...] | None, form: str, chunk_size: int, backend: Any = None) -> ScanGradients:
    """:func:`linattn.scan.causal_scan_vjp` on each sequence with its own state, joined."""
    def run(seg: list[Any], states: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        g = causal_scan_vjp(seg[0], seg[1], seg[2], seg[3], gk=seg[4], gv=seg[5], initial_state=states[0],
                            dfinal_state=states[1], form=form, chunk_size=chunk_size, backend=backend)
        return (g.dq, g.dk, g.dv, g.dgk, g.dgv), (g.dinitial_state,)

    (dq, dk, dv, dgk, dgv), (ds,) = map_sequences(run, offsets, (q, k, v, do, gk, gv), (initial_state, dfinal_state))
    return ScanGradients(dq=dq, dk=dk, dv=dv, dgk=dgk, dgv=dgv, dinitial_state=ds)


@dataclass(frozen=True)
class QKVProblem:
    """Checked q, k, v in the grouped layout: q (B, Hkv, G, T, Dk) times the scale, k, v (B, Hkv, 1, T, ·).

    ``gk``/``gv`` are the method's gates (B, Hkv, 1, T, 1|Dk|Dv) once attached, ``state``
    the initial state (N, Hkv, 1, Dk, Dv) or None.
    """

    xp: Any
    shapes: _checks.AttentionShapes
    layout: str
    offsets: tuple[int, ...] | None
    q: Any
    k: Any
    v: Any
    gk: Any
    gv: Any
    state: Any
    scale: float
    form: str
    chunk_size: int
    backend: Any = None

    def gate_shape(self, width: int | None) -> tuple[int, ...]:
        """The caller's shape of a gate: (B, T, Hkv) for one per step, (B, T, Hkv, width) per channel."""
        s = self.shapes
        bt = (s.batch, s.q_len, s.kv_heads) if self.layout == "bthd" else (s.batch, s.kv_heads, s.q_len)
        return bt if width is None else (*bt, width)

    def grouped_gate(self, g: Any, per_step: bool) -> Any:
        """A gate in the caller's layout -> (B, Hkv, 1, T, 1|D) in the compute dtype."""
        xp = self.xp
        g = xp.astype(g, self.q.dtype, copy=False)
        return to_grouped(xp, xp.expand_dims(g, axis=-1) if per_step else g, self.layout, self.shapes.kv_heads)

    def output(self, x: Any, dtype: Any) -> Any:
        """Grouped (B, Hkv, G|1, T, D) -> the caller's layout and ``dtype``."""
        return self.xp.astype(from_grouped(self.xp, x, self.layout), dtype, copy=False)


def prepare_qkv(q: Any, k: Any, v: Any, *, scale: Any, initial_state: Any, cu_seqlens: Any, form: Any,
                chunk_size: Any, layout: Any, backend: Any) -> QKVProblem:
    """Check q, k, v (GQA allowed, T == S), the options and the initial state; lay them out grouped."""
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(q=q, k=k, v=v, initial_state=initial_state)
    chosen = resolve_backend(backend, xp)
    chunk_size = check_form(form, chunk_size)
    shapes = _checks.check_qkv(q, k, v, layout, xp)
    if shapes.q_len != shapes.kv_len:
        raise ValueError(f"a causal recurrence needs as many queries as keys (T == S), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)} (layout={layout!r}); to continue a sequence pass initial_state")
    seqs = offsets(cu_seqlens, shapes.batch, shapes.q_len)
    scale = _checks.check_scale(scale, shapes.key_dim)
    dtype = compute_dtype(xp, q.dtype)
    q5, k5, v5 = (to_grouped(xp, xp.astype(x, dtype, copy=False), layout, shapes.kv_heads) for x in (q, k, v))
    state = None
    if initial_state is not None:
        expected = (n_states(seqs, shapes.batch), shapes.kv_heads, shapes.key_dim, shapes.value_dim)
        check_state("initial_state", initial_state, expected, xp, "(N, Hkv, Dk, Dv)")
        state = xp.expand_dims(xp.astype(initial_state, dtype, copy=False), axis=2)
    q5 = q5 if scale == 1.0 else q5 * scale
    return QKVProblem(xp, shapes, layout, seqs, q5, k5, v5, None, None, state, scale, form, chunk_size, chosen)


def qkv_cotangents(p: QKVProblem, do: Any, dfinal_state: Any) -> tuple[Any, Any]:
    """Check ``do`` (the output's shape) and ``dfinal_state`` (the state's); return them grouped."""
    xp, s = p.xp, p.shapes
    expected = (s.batch, s.q_len, s.q_heads, s.value_dim) if p.layout == "bthd" else (
        s.batch, s.q_heads, s.q_len, s.value_dim)
    check_shape("do", do, expected, xp, f"the output (layout={p.layout!r})")
    ds = None
    if dfinal_state is not None:
        check_state("dfinal_state", dfinal_state, (n_states(p.offsets, s.batch), s.kv_heads, s.key_dim, s.value_dim),
                    xp, "(N, Hkv, Dk, Dv)")
        ds = xp.expand_dims(xp.astype(dfinal_state, p.q.dtype, copy=False), axis=2)
    return to_grouped(xp, xp.astype(do, p.q.dtype, copy=False), p.layout, s.kv_heads), ds


def sum_to(xp: Any, x: Any, shape: tuple[int, ...]) -> Any:
    """Sum the axes of x that broadcasting added or stretched, so that it has ``shape``."""
    extra = x.ndim - len(shape)
    if extra:
        x = xp.sum(x, axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    x = xp.sum(x, axis=axes, keepdims=True) if axes else x
    return xp.reshape(x, shape)


def softplus(xp: Any, x: Any) -> Any:
    """log(1 + e^x) without overflow: max(x, 0) + log1p(e^{−|x|})."""
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(xp: Any, x: Any) -> Any:
    """1 / (1 + e^{−x}) without overflow (the derivative of softplus)."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def token_dtype(xp: Any, x: Any, state: Any, method: str) -> Any:
    """The compute dtype of new tokens, which must be the decoding state's."""
    dtype = compute_dtype(xp, x.dtype)
    if dtype != state.dtype:
        raise TypeError(f"tokens of dtype {x.dtype} compute in {dtype}, but the {method} state holds {state.dtype}; "
                        f"create the state with dtype={x.dtype}")
    return dtype


def step_chunk(n: int) -> int:
    """The chunk a decoding step of n tokens runs with: one chunk up to STEP_CHUNK tokens."""
    return max(1, min(n, STEP_CHUNK))


# ---------------------------------------------------------------------------------------
# Fixed gates for `linattn compare` (which passes only q, k, v)
# ---------------------------------------------------------------------------------------


def cycling(shape: tuple[int, ...], values: Sequence[float], like: Any) -> Any:
    """values[(Σ_i (i + 1)·index_i) mod len(values)] at every index: fixed, varied, exact in float16.

    ``linattn compare`` gives a method only q, k and v; a gated method's other inputs are
    these deterministic arrays, made of dyadic fractions so that the float16, float32 and
    float64 runs and the float64 reference all see exactly the same values. The result
    has the dtype, array library and device of ``like``.
    """
    index = sum((i + 1) * np.arange(n).reshape([-1 if j == i else 1 for j in range(len(shape))])
                for i, n in enumerate(shape))
    return like_array(np.asarray(values, dtype=np.float64)[np.asarray(index) % len(values)], like)


def like_array(x: np.ndarray, like: Any) -> Any:
    """The host array ``x`` in the dtype, array library and device of ``like``."""
    xp = array_api_compat.array_namespace(like)
    return xp.asarray(x, dtype=like.dtype, device=array_api_compat.device(like))


COMPARE_LOG_DECAYS = (-1 / 16, -1 / 8, -1 / 4, -1 / 2)


def causal_only(name: str, causal: bool) -> None:
    """The gated recurrences have no non-causal form."""
    if not causal:
        raise ValueError(f"{name} is a causal recurrence; it has no non-causal form (use causal=True)")
