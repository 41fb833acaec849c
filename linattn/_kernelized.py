r"""The shared front end of kernelized attention (Linear Transformer, Performer, cosFormer).

A kernelized method replaces exp(q·k) by a feature inner product φ(q)·φ(k), so that

.. math::

    o_t = \frac{s \sum_{j \in V(t)} (\phi(q_t)\cdot\phi(k_j))\, v_j}
               {s \sum_{j \in V(t)} \phi(q_t)\cdot\phi(k_j) + \varepsilon}
    \quad\text{(normalised)}, \qquad
    o_t = s \sum_{j \in V(t)} (\phi(q_t)\cdot\phi(k_j))\, v_j \quad\text{(not)},

with V(t) = {j ≤ t} (causal) or all keys. Every method differs only in φ; this module
checks the arguments once, lays the heads out for GQA, walks ``cu_seqlens`` segments,
and runs :func:`linattn.scan.causal_scan` (or its non-causal form). The normaliser is the
same scan with a column of ones appended to v: its last output column is
s·φ(q_t)·z_t with z_t = Σ_j φ(k_j), and its state's last column is z.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from linattn import _checks
from linattn._problem import compute_dtype, from_grouped, to_grouped
from linattn.backends import resolve_backend
from linattn.scan import FORMS, causal_scan, causal_scan_vjp


@dataclass(frozen=True)
class Featurizer:
    """How a method maps queries and keys to features, and back for gradients.

    Each callable takes grouped arrays (..., T, D) and the positions (T,) of their rows
    within their sequence (cosFormer uses them; the others ignore them).
    """

    query: Callable[[Any, Any], Any]
    key: Callable[[Any, Any], Any]
    query_vjp: Callable[[Any, Any, Any], Any]
    key_vjp: Callable[[Any, Any, Any], Any]


@dataclass(frozen=True)
class ScanOptions:
    """The options every kernelized method shares."""

    causal: bool
    normalize: bool
    eps: float
    scale: float
    form: str
    chunk_size: int


def check_options(*, causal: Any, normalize: Any, eps: Any, scale: Any, form: Any, chunk_size: Any,
                  default_scale: float) -> ScanOptions:
    """Validate the shared options and fill in the scale default."""
    _checks.check_bool("causal", causal)
    _checks.check_bool("normalize", normalize)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    scale = default_scale if scale is None else _checks.check_scale(scale, 1)
    return ScanOptions(causal, normalize, float(eps), scale, form, chunk_size)


@dataclass(frozen=True)
class KernelizedProblem:
    """Checked inputs in the grouped layout q (B, Hkv, G, T, Dk), k and v (B, Hkv, 1, S, D)."""

    xp: Any
    shapes: _checks.AttentionShapes
    layout: str
    input_dtype: Any
    q: Any
    k: Any
    v: Any
    cu_seqlens: tuple[int, ...] | None
    options: ScanOptions
    backend: Any = None

    def segments(self) -> list[tuple[slice, slice]]:
        """(query rows, key rows) of each sequence: the ``cu_seqlens`` segments, or all of them.

        Without ``cu_seqlens`` the queries are all T rows and the keys all S rows (S may
        differ from T in non-causal attention).
        """
        if self.cu_seqlens is None:
            return [(slice(0, self.shapes.q_len), slice(0, self.shapes.kv_len))]
        return [(slice(lo, hi), slice(lo, hi)) for lo, hi in itertools.pairwise(self.cu_seqlens)]

    @property
    def n_states(self) -> int:
        """N: one state per batch element, or per sequence under ``cu_seqlens``."""
        return self.shapes.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1

    def positions(self, rows: slice) -> Any:
        """Positions 0, 1, ... of a segment's rows within their sequence."""
        return self.xp.arange(rows.stop - rows.start, device=array_api_compat.device(self.q))

    def output(self, x: Any) -> Any:
        """Grouped (B, Hkv, G, T, D) -> the caller's layout and dtype."""
        return self.xp.astype(from_grouped(self.xp, x, self.layout), self.input_dtype, copy=False)

    def kv_output(self, x: Any) -> Any:
        """Grouped (B, Hkv, G|1, S, D) gradient of k or v -> the caller's layout (summing G)."""
        if x.shape[2] != 1:
            x = self.xp.sum(x, axis=2, keepdims=True)
        return self.output(x)


def prepare(q: Any, k: Any, v: Any, *, layout: str, cu_seqlens: Any, backend: str | None,
            options: ScanOptions) -> KernelizedProblem:
    """Check q, k, v, layout, cu_seqlens and the backend; lay the heads out for GQA."""
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(q=q, k=k, v=v)
    chosen = resolve_backend(backend, xp)
    shapes = _checks.check_qkv(q, k, v, layout, xp)
    if options.causal and shapes.q_len != shapes.kv_len:
        raise ValueError(
            f"causal linear attention needs as many queries as keys (T == S), got T={shapes.q_len}, "
            f"S={shapes.kv_len}; to continue a sequence pass initial_state instead"
        )
    offsets = _checks.check_cu_seqlens(cu_seqlens, shapes)
    dtype = compute_dtype(xp, q.dtype)
    q5, k5, v5 = (to_grouped(xp, xp.astype(x, dtype, copy=False), layout, shapes.kv_heads) for x in (q, k, v))
    return KernelizedProblem(xp, shapes, layout, q.dtype, q5, k5, v5, offsets, options, chosen)


def check_state(problem: KernelizedProblem, initial_state: Any, feature_dim: int, name: str = "initial_state") -> Any:
    """Validate ``initial_state`` and return it grouped as (N, Hkv, 1, m, Dv [+1]) or None.

    Unnormalised: an array (N, Hkv, m, Dv). Normalised: a pair (S (N, Hkv, m, Dv),
    z (N, Hkv, m)); it is stored as S with z appended as an extra value column.
    """
    if initial_state is None:
        return None
    xp, s = problem.xp, problem.shapes
    if not problem.options.causal:
        raise ValueError(f"{name} needs causal=True: non-causal attention has no state")
    expected = (problem.n_states, s.kv_heads, feature_dim, s.value_dim)
    if problem.options.normalize:
        if not isinstance(initial_state, tuple | list) or len(initial_state) != 2:
            raise ValueError(f"{name} must be a pair (S, z) when normalize=True, "
                             f"S of shape {expected} and z of shape {expected[:3]}")
        S, z = initial_state
        _check_state_array(problem, f"{name}[0] (S)", S, expected)
        _check_state_array(problem, f"{name}[1] (z)", z, expected[:3])
        S = xp.concat([xp.astype(S, problem.q.dtype), xp.expand_dims(xp.astype(z, problem.q.dtype), axis=-1)],
                      axis=-1)
    else:
        _check_state_array(problem, name, initial_state, expected)
        S = xp.astype(initial_state, problem.q.dtype)
    return xp.expand_dims(S, axis=2)


def _check_state_array(problem: KernelizedProblem, name: str, x: Any, expected: tuple[int, ...]) -> None:
    _checks.namespace_of(q=problem.q, **{name: x})
    _checks.require_floating(name, x, problem.xp)
    if tuple(x.shape) != expected:
        layout = "(N, Hkv, m, Dv)" if len(expected) == 4 else "(N, Hkv, m)"
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(x.shape)}")


def final_state_output(problem: KernelizedProblem, state: Any) -> Any:
    """Grouped (N, Hkv, 1, m, Dv [+1]) -> S (N, Hkv, m, Dv), or the pair (S, z) when normalised."""
    state = state[:, :, 0]
    if not problem.options.normalize:
        return state
    return state[..., :-1], state[..., -1]


def _scaled(x: Any, scale: float) -> Any:
    return x if scale == 1.0 else x * scale


def _with_ones(xp: Any, v: Any) -> Any:
    ones = xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=array_api_compat.device(v))
    return xp.concat([v, ones], axis=-1)


def _scan(problem: KernelizedProblem, fq: Any, fk: Any, v: Any, state: Any) -> tuple[Any, Any]:
    """Scan of the features (normaliser column included); returns the raw (augmented) outputs."""
    xp, opt = problem.xp, problem.options
    if opt.normalize:
        v = _with_ones(xp, v)
    if opt.causal:
        return causal_scan(fq, fk, v, initial_state=state, form=opt.form, chunk_size=opt.chunk_size,
                           backend=problem.backend)
    kt = xp.matrix_transpose(fk)
    o = xp.matmul(xp.matmul(fq, kt), v) if opt.form == "parallel" else xp.matmul(fq, xp.matmul(kt, v))
    return o, None


def _normalised(problem: KernelizedProblem, raw: Any) -> Any:
    if not problem.options.normalize:
        return raw
    return raw[..., :-1] / (raw[..., -1:] + problem.options.eps)


def forward(problem: KernelizedProblem, featurizer: Featurizer, initial_state: Any,
            output_final_state: bool) -> Any:
    """Run a kernelized method: feature maps, then the scan, per sequence."""
    xp, opt = problem.xp, problem.options
    outputs, finals = [], []
    for n, (rows, cols) in enumerate(problem.segments()):
        q, k, v = problem.q[..., rows, :], problem.k[..., cols, :], problem.v[..., cols, :]
        fq = _scaled(featurizer.query(q, problem.positions(rows)), opt.scale)
        fk = featurizer.key(k, problem.positions(cols))
        state = None if initial_state is None else (
            initial_state if problem.cu_seqlens is None else initial_state[n:n + 1])
        raw, final = _scan(problem, fq, fk, v, state)
        outputs.append(_normalised(problem, raw))
        finals.append(final)
    o = problem.output(xp.concat(outputs, axis=3))
    if not output_final_state:
        return o
    if not opt.causal:
        raise ValueError("output_final_state needs causal=True: non-causal attention has no final state")
    return o, final_state_output(problem, xp.concat(finals, axis=0))


def vjp(problem: KernelizedProblem, featurizer: Featurizer, do: Any, initial_state: Any,
        dfinal_state: Any) -> tuple[Any, ...]:
    """Gradients of :func:`forward` w.r.t. q, k, v (and the initial state, when given)."""
    xp, opt, s = problem.xp, problem.options, problem.shapes
    expected = (s.batch, s.q_len, s.q_heads, s.value_dim) if problem.layout == "bthd" else (
        s.batch, s.q_heads, s.q_len, s.value_dim)
    _checks.namespace_of(q=problem.q, do=do)
    _checks.require_floating("do", do, xp)
    if tuple(do.shape) != expected:
        raise ValueError(f"do must have the output's shape {expected} (layout={problem.layout!r}), got "
                         f"{tuple(do.shape)}")
    do5 = to_grouped(xp, xp.astype(do, problem.q.dtype), problem.layout, s.kv_heads)
    dq, dk, dv, dstates = [], [], [], []
    for n, (rows, cols) in enumerate(problem.segments()):
        q, k, v, do_seg = problem.q[..., rows, :], problem.k[..., cols, :], problem.v[..., cols, :], do5[..., rows, :]
        q_pos, k_pos = problem.positions(rows), problem.positions(cols)
        fq = _scaled(featurizer.query(q, q_pos), opt.scale)
        fk = featurizer.key(k, k_pos)
        state, dstate = (None if x is None else (x if problem.cu_seqlens is None else x[n:n + 1])
                         for x in (initial_state, dfinal_state))
        v_in = _with_ones(xp, v) if opt.normalize else v
        do_in = do_seg
        if opt.normalize:  # o = num / (den + eps): push do through the division
            raw, _ = _scan(problem, fq, fk, v, state)
            inv = 1.0 / (raw[..., -1:] + opt.eps)
            d_den = -xp.sum(do_seg * raw[..., :-1], axis=-1, keepdims=True) * inv * inv
            do_in = xp.concat([do_seg * inv, d_den], axis=-1)
        if opt.causal:
            g = causal_scan_vjp(fq, fk, v_in, do_in, initial_state=state, dfinal_state=dstate, form=opt.form,
                                chunk_size=opt.chunk_size, backend=problem.backend)
            dfq, dfk, dv_in, dstate0 = g.dq, g.dk, g.dv, g.dinitial_state
        else:  # o = Q (Kᵀ V): dQ = dO (Vᵀ K), dK = V (dOᵀ Q), dV = K (Qᵀ dO)
            dfq = xp.matmul(do_in, xp.matmul(xp.matrix_transpose(v_in), fk))
            dfk = xp.sum(xp.matmul(v_in, xp.matmul(xp.matrix_transpose(do_in), fq)), axis=2, keepdims=True)
            dv_in = xp.sum(xp.matmul(fk, xp.matmul(xp.matrix_transpose(fq), do_in)), axis=2, keepdims=True)
            dstate0 = None
        dq.append(featurizer.query_vjp(q, q_pos, _scaled(dfq, opt.scale)))
        dk.append(featurizer.key_vjp(k, k_pos, dfk))
        dv.append(dv_in[..., :-1] if opt.normalize else dv_in)
        dstates.append(dstate0)
    grads = (problem.output(xp.concat(dq, axis=3)), problem.kv_output(xp.concat(dk, axis=3)),
             problem.kv_output(xp.concat(dv, axis=3)))
    if initial_state is None:
        return grads
    return (*grads, final_state_output(problem, xp.concat(dstates, axis=0)))


