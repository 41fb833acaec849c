r"""The front end of the delta rules: argument checks, the GVA head layout, sequences, the L2 norm.

:func:`prepare` checks q, k, v, β, g and the options once and lays the heads out as
q, k (B, H, 1, T, Dk) and v, β, g (B, H, G, T, ·) with G = HV / H, so that the value heads
of a group share their query/key head by broadcasting; :func:`forward` and :func:`vjp`
walk the ``cu_seqlens`` segments, each with its own state, through
:func:`linattn.delta_scan.delta_scan` and :func:`linattn.delta_grad.delta_scan_vjp`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

from linattn import _checks
from linattn._problem import compute_dtype, from_grouped, to_grouped
from linattn.backends import resolve_backend
from linattn.delta_grad import delta_scan_vjp
from linattn.delta_scan import FORMS, delta_scan

__all__ = ["DeltaGradients", "forward", "l2norm", "prepare", "vjp"]

L2NORM_EPS = 1e-6  # FLA's l2norm: x / sqrt(Σx² + 1e-6)


def l2norm(x: Any) -> Any:
    r"""L2-normalise the last axis, x / sqrt(Σ_d x_d² + 1e-6): FLA's ``use_qk_l2norm_in_kernel``.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.delta import l2norm
    >>> l2norm(np.array([3.0, 4.0])).round(6).tolist()
    [0.6, 0.8]
    """
    xp = _checks.namespace_of(x=x)
    return x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def _l2norm_vjp(xp: Any, x: Any, dy: Any) -> Any:
    """The VJP of l2norm: dx = r (dy − y (y·dy)) with y = r x, r = (Σx² + eps)^{−1/2}."""
    r = 1.0 / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)
    y = r * x
    return r * (dy - y * xp.sum(y * dy, axis=-1, keepdims=True))


@dataclass(frozen=True)
class _Sizes:
    batch: int
    length: int
    heads: int  # H: query/key heads
    value_heads: int  # HV
    key_dim: int
    value_dim: int


@dataclass(frozen=True)
class _Problem:
    """Checked inputs, grouped: q, k (B, H, 1, T, Dk); v (B, H, G, T, Dv); beta (B, H, G, T, 1|Dv); g (..., 1)."""

    xp: Any
    sizes: _Sizes
    layout: str
    dtypes: dict[str, Any]
    beta_per_channel: bool
    q_raw: Any
    k_raw: Any
    q: Any  # after the L2 norm and the scale
    k: Any
    v: Any
    beta: Any
    g: Any
    state: Any  # (N, H, G, Dk, Dv) or None
    offsets: tuple[int, ...] | None
    scale: float
    use_qk_l2norm: bool
    form: str
    chunk_size: int
    backend: Any = None

    def segments(self) -> list[tuple[int, slice]]:
        """(index of the state, rows) of each sequence: the cu_seqlens segments, or all T rows."""
        if self.offsets is None:
            return [(-1, slice(0, self.sizes.length))]
        return [(n, slice(lo, hi)) for n, (lo, hi) in enumerate(itertools.pairwise(self.offsets))]

    @property
    def n_states(self) -> int:
        return self.sizes.batch if self.offsets is None else len(self.offsets) - 1

    def grouped_state(self, name: str, x: Any) -> Any:
        """(N, HV, Dk, Dv) -> (N, H, G, Dk, Dv), checked."""
        if x is None:
            return None
        s, xp = self.sizes, self.xp
        _checks.namespace_of(q=self.q, **{name: x})
        _checks.require_floating(name, x, xp)
        expected = (self.n_states, s.value_heads, s.key_dim, s.value_dim)
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} must have shape (N, HV, Dk, Dv) = {expected}, got {tuple(x.shape)}")
        grouped = (expected[0], s.heads, s.value_heads // s.heads, *expected[2:])
        return xp.reshape(xp.astype(x, self.q.dtype, copy=False), grouped)

    def output(self, x: Any, name: str) -> Any:
        """Grouped (B, H, G, T, D) -> the caller's layout and the dtype of input ``name``."""
        return self.xp.astype(from_grouped(self.xp, x, self.layout), self.dtypes[name], copy=False)


def _order(layout: str) -> str:
    return "(B, T, H, D)" if layout == "bthd" else "(B, H, T, D)"


def _bthd(x: Any, layout: str) -> tuple[int, ...]:
    """Sizes in (B, T, H, ...) order whatever the layout."""
    shape = tuple(int(n) for n in x.shape)
    return shape if layout == "bthd" else (shape[0], shape[2], shape[1], *shape[3:])


def _check_arrays(xp: Any, q: Any, k: Any, v: Any, beta: Any, g: Any, layout: str) -> _Sizes:
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g)):
        if x is not None:
            _checks.require_floating(name, x, xp)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (layout={layout!r})"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D {_order(layout)} for layout={layout!r}, got shape {tuple(x.shape)}")
    if tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"q and k must have the same shape (B, T, H, Dk), got {shapes}")
    B, T, H, Dk = _bthd(q, layout)
    Bv, Tv, HV, Dv = _bthd(v, layout)
    if (Bv, Tv) != (B, T):
        raise ValueError(f"v must have q's batch size and length, got {shapes}")
    if H == 0 or HV == 0 or HV % H != 0:
        raise ValueError(f"the value heads HV must be a positive multiple of the query/key heads H (GVA), got {shapes}")
    if Dk == 0 or Dv == 0:
        raise ValueError(f"head dims must be positive, got {shapes}")
    head_shape = (B, T, HV) if layout == "bthd" else (B, HV, T)
    for name, x, shapes_ok in (("beta", beta, (head_shape, (*head_shape, Dv))), ("g", g, (head_shape,))):
        if x is not None and tuple(x.shape) not in shapes_ok:
            allowed = " or ".join(str(s) for s in shapes_ok)
            raise ValueError(f"{name} must have shape {allowed} for {shapes} (one per value head"
                             f"{', or per value channel' if name == 'beta' else ''}), got {tuple(x.shape)}")
    if not bool(xp.all((beta >= 0) & (beta <= 2))):
        raise ValueError(f"beta must lie in [0, 2] (beta > 1 makes the transition's eigenvalue along k negative; "
                         f"FLA allows (0, 2) with allow_neg_eigval), got values from {float(xp.min(beta))} to "
                         f"{float(xp.max(beta))} in beta of shape {tuple(beta.shape)} (NaN counts as outside)")
    if g is not None and not bool(xp.all((g <= 0) & (g > -math.inf))):
        raise ValueError(f"g must be a finite log-decay <= 0 (decay e^g in (0, 1]), got values from "
                         f"{float(xp.min(g))} to {float(xp.max(g))} in g of shape {tuple(g.shape)} "
                         f"(NaN counts as outside)")
    return _Sizes(B, T, H, HV, Dk, Dv)


def prepare(q: Any, k: Any, v: Any, beta: Any, g: Any, *, scale: Any, initial_state: Any, cu_seqlens: Any,
            form: Any, chunk_size: Any, use_qk_l2norm: Any, layout: Any, backend: Any) -> _Problem:
    """Check every argument of a delta rule (g None: the plain rule) and lay the heads out."""
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state)
    chosen = resolve_backend(backend, xp)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    _checks.check_bool("use_qk_l2norm", use_qk_l2norm)
    sizes = _check_arrays(xp, q, k, v, beta, g, layout)
    scale = _checks.check_scale(scale, sizes.key_dim)
    offsets = _checks.check_cu_seqlens(cu_seqlens, _checks.AttentionShapes(
        sizes.batch, sizes.length, sizes.length, sizes.value_heads, sizes.heads, sizes.key_dim, sizes.value_dim))
    dtype = compute_dtype(xp, q.dtype)

    def grouped(x: Any) -> Any:
        if x is None:
            return None
        if x.ndim == 3:  # beta or g, one per value head
            x = xp.expand_dims(x, axis=-1)
        x = to_grouped(xp, xp.astype(x, dtype, copy=False), layout, sizes.heads)
        return xp.reshape(x, tuple(x.shape), copy=True)  # one copy, in the grouped order (time rows contiguous)

    q_raw, k_raw = grouped(q), grouped(k)
    qn, kn = (l2norm(q_raw), l2norm(k_raw)) if use_qk_l2norm else (q_raw, k_raw)
    dtypes = {"q": q.dtype, "k": k.dtype, "v": v.dtype, "beta": beta.dtype, "g": None if g is None else g.dtype,
              "initial_state": None if initial_state is None else initial_state.dtype}
    problem = _Problem(xp, sizes, layout, dtypes, beta.ndim == 4, q_raw, k_raw, qn * scale, kn, grouped(v),
                       grouped(beta), grouped(g), None, offsets, scale, use_qk_l2norm, form, chunk_size, chosen)
    return replace(problem, state=problem.grouped_state("initial_state", initial_state))


def _segment_state(state: Any, n: int) -> Any:
    return None if state is None else (state if n < 0 else state[n:n + 1])


def forward(p: _Problem, output_final_state: Any) -> Any:
    """Run the scan on each sequence; o in the caller's layout and dtype (and the final states)."""
    _checks.check_bool("output_final_state", output_final_state)
    xp, outputs, finals = p.xp, [], []
    for n, rows in p.segments():
        o, S = delta_scan(p.q[..., rows, :], p.k[..., rows, :], p.v[..., rows, :], p.beta[..., rows, :],
                          g=None if p.g is None else p.g[..., rows, :], initial_state=_segment_state(p.state, n),
                          form=p.form, chunk_size=p.chunk_size, backend=p.backend)
        outputs.append(o)
        finals.append(S)
    o = p.output(xp.concat(outputs, axis=3), "q")
    if not output_final_state:
        return o
    S = xp.concat(finals, axis=0)
    return o, xp.reshape(S, (S.shape[0], p.sizes.value_heads, p.sizes.key_dim, p.sizes.value_dim))


@dataclass(frozen=True)
class DeltaGradients:
    """Cotangents of the inputs of :func:`linattn.delta.delta_rule` / :func:`linattn.delta.gated_delta_rule`.

    Each is shaped like its input and in its dtype; ``dg`` is None for the plain delta
    rule, ``dinitial_state`` None when no initial state was given.
    """

    dq: Any
    dk: Any
    dv: Any
    dbeta: Any
    dg: Any
    dinitial_state: Any


def vjp(p: _Problem, do: Any, dfinal_state: Any) -> DeltaGradients:
    """The reverse-mode loop on each sequence, then the scale, the L2 norm and the GVA group sums."""
    xp, s = p.xp, p.sizes
    _checks.namespace_of(q=p.q, do=do)
    _checks.require_floating("do", do, xp)
    expected = (s.batch, s.length, s.value_heads, s.value_dim)
    expected = expected if p.layout == "bthd" else (expected[0], expected[2], expected[1], expected[3])
    if tuple(do.shape) != expected:
        raise ValueError(f"do must have the output's shape {expected} (layout={p.layout!r}), got {tuple(do.shape)}")
    do5 = to_grouped(xp, xp.astype(do, p.q.dtype, copy=False), p.layout, s.heads)
    dstate = p.grouped_state("dfinal_state", dfinal_state)
    parts: dict[str, list[Any]] = {name: [] for name in ("dq", "dk", "dv", "dbeta", "dg", "dinitial_state")}
    for n, rows in p.segments():
        grads = delta_scan_vjp(p.q[..., rows, :], p.k[..., rows, :], p.v[..., rows, :], p.beta[..., rows, :],
                               do5[..., rows, :], g=None if p.g is None else p.g[..., rows, :],
                               initial_state=_segment_state(p.state, n), dfinal_state=_segment_state(dstate, n),
                               chunk_size=p.chunk_size)
        for name in parts:
            parts[name].append(getattr(grads, name))
    dq, dk, dv, dbeta = (xp.concat(parts[name], axis=3) for name in ("dq", "dk", "dv", "dbeta"))
    dq = dq * p.scale  # q_eff = s · l2norm(q)
    if p.use_qk_l2norm:
        dq, dk = _l2norm_vjp(xp, p.q_raw, dq), _l2norm_vjp(xp, p.k_raw, dk)
    dbeta, dg = p.output(dbeta, "beta"), None
    if not p.beta_per_channel:
        dbeta = dbeta[..., 0]
    if p.g is not None:
        dg = p.output(xp.concat(parts["dg"], axis=3), "g")[..., 0]
    dinitial = None
    if p.state is not None:
        S = xp.concat(parts["dinitial_state"], axis=0)
        dinitial = xp.astype(xp.reshape(S, (S.shape[0], s.value_heads, s.key_dim, s.value_dim)),
                             p.dtypes["initial_state"], copy=False)
    return DeltaGradients(p.output(dq, "q"), p.output(dk, "k"), p.output(dv, "v"), dbeta, dg, dinitial)
