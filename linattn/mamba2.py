r"""Mamba-2 (state space duality, Dao & Gu, 2024): the SSD layer's scan, with mamba-ssm's arguments.

Per batch element and head h (of group h // (H/G)), with Δ_t = dt_t + ``dt_bias`` (then
softplus with ``dt_softplus=True``),

.. math::

    h_t = e^{\Delta_t A}\, h_{t-1} + \Delta_t\, B_t x_t^\top, \qquad
    y_t = h_t^\top C_t + D \odot x_t ,

h_t ∈ R^{N×P}. This is simple GLA (:func:`linattn.gated.simple_gla`) with

.. math::

    q = C, \quad k = B, \quad v = \Delta \cdot x, \quad g = A\,\Delta, \quad s = 1,

plus the skip D x: the mapping flash-linear-attention tests ``chunk_simple_gla`` with.
B and C are shared by the H/G heads of a group (one q and k for several values and
decays), which the scan takes as a broadcast: v (batch, G, H/G, T, P) against q and k
(batch, G, 1, T, N), never a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from linattn import _checks, _gated
from linattn._problem import compute_dtype, from_grouped, to_grouped
from linattn.backends import resolve_backend
from linattn.compare import register_method
from linattn.decoding import _allocator, _sizes, register_state

__all__ = ["Mamba2Gradients", "Mamba2State", "mamba2", "mamba2_vjp"]


class Mamba2Gradients(NamedTuple):
    """Gradients of :func:`mamba2`; None where the input was None."""

    dx: Any
    ddt: Any
    dA: Any  # noqa: N815 (the paper's letters)
    dB: Any  # noqa: N815 (the paper's letters)
    dC: Any  # noqa: N815 (the paper's letters)
    dD: Any  # noqa: N815 (the paper's letters)
    ddt_bias: Any
    dinitial_state: Any


@dataclass(frozen=True)
class _Problem:
    """Grouped arrays: x (b, G, H/G, T, P), dt and Δ (b, G, H/G, T, 1), B and C (b, G, 1, T, N)."""

    xp: Any
    layout: str
    sizes: tuple[int, int, int, int, int, int]  # batch, T, H, P, G, N
    offsets: tuple[int, ...] | None
    x: Any
    dt_raw: Any  # dt + dt_bias, before the softplus
    delta: Any
    A: Any  # (1, G, H/G, 1, 1)
    B: Any
    C: Any
    D: Any  # (1, G, H/G, 1, 1|P) or None
    state: Any  # (N, G, H/G, N, P) or None
    form: str
    chunk_size: int
    backend: Any

    def grouped_state(self, s: Any) -> Any:
        _, _, H, P, G, N = self.sizes
        return self.xp.reshape(self.xp.astype(s, self.x.dtype, copy=False), (s.shape[0], G, H // G, N, P))

    def ungrouped_state(self, s: Any) -> Any:
        _, _, H, P, _, N = self.sizes
        return self.xp.reshape(s, (s.shape[0], H, N, P))


def _per_head(xp: Any, a: Any, G: int, H: int, dtype: Any) -> Any:
    """(H,) or (H, P) -> (1, G, H/G, 1, 1|P)."""
    width = 1 if a.ndim == 1 else int(a.shape[1])
    return xp.reshape(xp.astype(a, dtype, copy=False), (1, G, H // G, 1, width))


def _prepare(x, dt, A, B, C, *, D, dt_bias, dt_softplus, initial_state, cu_seqlens, form, chunk_size, layout,
             backend) -> _Problem:
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, initial_state=initial_state)
    chosen = resolve_backend(backend, xp)
    chunk_size = _gated.check_form(form, chunk_size)
    _checks.check_bool("dt_softplus", dt_softplus)
    order = "(batch, T, H, P)" if layout == "bthd" else "(batch, H, T, P)"
    for name, a in (("x", x), ("B", B), ("C", C)):
        _checks.require_floating(name, a, xp)
        if a.ndim != 4:
            raise ValueError(f"{name} must be 4-D {order.replace('H, P', 'G, N') if name != 'x' else order} for "
                             f"layout={layout!r}, got shape {tuple(a.shape)}")
    if not (x.dtype == B.dtype == C.dtype):
        raise TypeError(f"x, B and C must share one dtype, got {x.dtype}, {B.dtype}, {C.dtype}")
    batch, T, H, P = (int(n) for n in (x.shape if layout == "bthd" else (x.shape[0], x.shape[2], x.shape[1],
                                                                       x.shape[3])))
    bdims = tuple(int(n) for n in B.shape)
    b, t, G, N = bdims if layout == "bthd" else (bdims[0], bdims[2], bdims[1], bdims[3])
    shapes = f"x {tuple(x.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} (layout={layout!r})"
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"B and C must have the same shape (batch, T, G, N), got {shapes}")
    if (b, t) != (batch, T):
        raise ValueError(f"x, B and C must have the same batch size and length, got {shapes}")
    if G < 1 or H % G != 0 or min(H, P, N) < 1:
        raise ValueError(f"the heads H of x must be a multiple of the groups G of B and C, and P, N >= 1, got {shapes}")
    against = f"x {tuple(x.shape)} (layout={layout!r})"
    _gated.check_shape("dt", dt, (batch, T, H) if layout == "bthd" else (batch, H, T), xp, against)
    _gated.check_shape("A", A, (H,), xp, against)
    if D is not None:
        _checks.require_array("D", D)
        _gated.check_shape("D", D, (H, P) if D.ndim == 2 else (H,), xp, f"{against}: (H,) or (H, P)")
    if dt_bias is not None:
        _gated.check_shape("dt_bias", dt_bias, (H,), xp, against)
    offsets = _gated.offsets(cu_seqlens, batch, T)
    dtype = compute_dtype(xp, x.dtype)
    _gated.check_range("A", A, xp, "finite values <= 0 (the decay e^{A·dt} of a step is at most 1)", upper=0.0)
    dt_raw = xp.astype(dt, dtype, copy=False)
    if dt_bias is not None:
        dt_raw = dt_raw + xp.reshape(xp.astype(dt_bias, dtype, copy=False), (H,) if layout == "bthd" else (H, 1))
    delta = _gated.softplus(xp, dt_raw) if dt_softplus else dt_raw
    _gated.check_range("dt (plus dt_bias, through softplus when dt_softplus=True)", delta, xp,
                       "finite step sizes Δ >= 0", lower=0.0)

    def grouped(a: Any, heads: int) -> Any:
        return to_grouped(xp, xp.astype(a, dtype, copy=False), layout, heads)

    state = None
    if initial_state is not None:
        _gated.check_state("initial_state", initial_state, (_gated.n_states(offsets, batch), H, N, P), xp,
                           "(N, H, N_state, P)")
    p = _Problem(xp, layout, (batch, T, H, P, G, N), offsets, grouped(x, G),
                 grouped(xp.expand_dims(dt_raw, axis=-1), G), grouped(xp.expand_dims(delta, axis=-1), G),
                 _per_head(xp, A, G, H, dtype), grouped(B, G), grouped(C, G),
                 None if D is None else _per_head(xp, D, G, H, dtype), state, form, chunk_size, chosen)
    return p if initial_state is None else replace(p, state=p.grouped_state(initial_state))


def mamba2(x: Any, dt: Any, A: Any, B: Any, C: Any, *, D: Any = None, dt_bias: Any = None, dt_softplus: bool = False,
           initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None, form: str = "chunked",
           chunk_size: int = 64, layout: str = "bthd", backend: str | None = None) -> Any:
    r"""The Mamba-2 SSD scan (mamba-ssm's ``mamba_chunk_scan_combined``), through simple GLA.

    .. math::

        \Delta_t = f(dt_t + \text{dt\_bias}), \qquad
        h_t = e^{\Delta_t A} h_{t-1} + \Delta_t B_t x_t^\top, \qquad
        y_t = h_t^\top C_t + D \odot x_t ,

    f = softplus when ``dt_softplus`` else the identity; per batch element and head h,
    whose B and C are those of group h // (H/G). Computed as the scan of
    :func:`linattn.gated.simple_gla` with q = C, k = B, v = Δ x, g = A Δ and scale 1.

    Parameters
    ----------
    x : array, shape (batch, T, H, P)
        The inputs per head (``(batch, H, T, P)`` with ``layout="bhtd"``).
    dt : array, shape (batch, T, H)
        Step sizes before ``dt_bias`` and the softplus (``(batch, H, T)`` for "bhtd").
    A : array, shape (H,)
        The decay rates, finite and <= 0 (Mamba-2 stores −exp(A_log)).
    B, C : array, shape (batch, T, G, N)
        Input and output projections of the state, G groups (H a multiple of G).
    D : array, shape (H,) or (H, P), optional
        The skip connection.
    dt_bias : array, shape (H,), optional
        Added to dt before the softplus.
    dt_softplus : bool, default False
        Δ = softplus(dt + dt_bias); otherwise Δ = dt + dt_bias. Δ must be finite and >= 0.
    initial_state : array, shape (N_seq, H, N, P), optional
        h_{−1} per sequence (N_seq = batch, or the sequences of ``cu_seqlens``).
    output_final_state : bool, default False
        Also return h after the last step, (N_seq, H, N, P).
    cu_seqlens, form, chunk_size, layout, backend
        As in :func:`linattn.gated.simple_gla`.

    Returns
    -------
    y : array, shape (batch, T, H, P)
        In x's layout and dtype.
    final_state : array, shape (N_seq, H, N, P)
        Only with ``output_final_state=True``, in the compute dtype.

    Raises
    ------
    TypeError, ValueError
        Bad shapes (naming the argument and x's shape) or dtypes, A > 0, Δ < 0 or not
        finite, H not a multiple of G, bad ``cu_seqlens``, form or state.

    Notes
    -----
    - The state is h as the scan keeps it, (N_seq, H, N, P) = (…, Dk, Dv) like
      :func:`linattn.gated.simple_gla`'s and flash-linear-attention's; mamba-ssm's
      ``initial_states`` and final states are (batch, H, P, N), the transpose: pass
      ``swapaxes(h, -1, -2)`` between the two (a square N = P state is not caught by the
      shape check).
    - Not here (outside the scan, as in FLA's mapping): the z gate (``y · silu(z)``, and
      the gated RMSNorm of the layer), ``dt_limit`` (mamba-ssm clamps Δ after the
      softplus; its default (0, inf) does nothing), ``seq_idx`` (use ``cu_seqlens``).
    - Scale 1: the SSD has no 1/sqrt(N) (FLA's mapping passes ``scale=1.0``).
    - Three forms that agree to rounding in float64 (mamba-ssm: one chunked kernel,
      fp32 inside); any ``chunk_size`` (mamba-ssm: ``chunk_size`` is the kernel's block).

    References
    ----------
    T. Dao, A. Gu. "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality." ICML 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.mamba2 import mamba2
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 8, 4, 3))  # H = 4 heads of P = 3
    >>> B, C = rng.standard_normal((2, 1, 8, 2, 5))  # G = 2 groups, N = 5
    >>> dt, A = rng.random((1, 8, 4)), -rng.random(4)
    >>> y, h = mamba2(x, dt, A, B, C, D=np.ones(4), output_final_state=True, chunk_size=3)
    >>> y.shape, h.shape
    ((1, 8, 4, 3), (1, 4, 5, 3))
    >>> bool(np.allclose(y, mamba2(x, dt, A, B, C, D=np.ones(4), form="recurrent")))
    True
    """
    p = _prepare(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
                 cu_seqlens=cu_seqlens, form=form, chunk_size=chunk_size, layout=layout, backend=backend)
    _checks.check_bool("output_final_state", output_final_state)
    y, final = _gated.scan(p.C, p.B, p.x * p.delta, gk=p.A * p.delta, gv=None, initial_state=p.state,
                           offsets=p.offsets, form=p.form, chunk_size=p.chunk_size, backend=p.backend)
    if p.D is not None:
        y = y + p.D * p.x
    y = p.xp.astype(from_grouped(p.xp, y, layout), x.dtype, copy=False)
    return (y, p.ungrouped_state(final)) if output_final_state else y


def mamba2_vjp(x: Any, dt: Any, A: Any, B: Any, C: Any, do: Any, *, D: Any = None, dt_bias: Any = None,
               dt_softplus: bool = False, initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None,
               form: str = "chunked", chunk_size: int = 64, layout: str = "bthd",
               backend: str | None = None) -> Mamba2Gradients:
    r"""Gradients of :func:`mamba2` for every input, by the scan's VJP and the chain rule.

    With the scan's cotangents dq, dk, dv, dg (per step) and dh_{−1}:

    .. math::

        dC = dq, \quad dB = dk, \quad dx = \Delta\, dv + D \odot dy, \quad
        d\Delta_t = \textstyle\sum_p dv_{t,p}\, x_{t,p} + A\, dg_t, \quad
        dA = \textstyle\sum_t \Delta_t\, dg_t,

        d(dt)_t = d\Delta_t\, f'(dt_t + \text{dt\_bias}), \quad
        d\,\text{dt\_bias} = \textstyle\sum_t d(dt)_t, \quad
        dD = \textstyle\sum_t dy_t \odot x_t ,

    f' = sigmoid for the softplus, 1 otherwise; dB and dC sum over the heads of a group,
    dA, dD and d dt_bias over batch and time.

    Parameters
    ----------
    x, dt, A, B, C, D, dt_bias, dt_softplus, initial_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`mamba2`.
    do : array, shape (batch, T, H, P)
        Cotangent of y.
    dfinal_state : array, shape (N_seq, H, N, P), optional
        Cotangent of the final state.

    Returns
    -------
    Mamba2Gradients
        (dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial_state), shaped like the inputs;
        None for an input that was None.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.mamba2 import mamba2, mamba2_vjp
    >>> rng = np.random.default_rng(1)
    >>> x, do = rng.standard_normal((2, 1, 6, 2, 2))
    >>> B, C = rng.standard_normal((2, 1, 6, 1, 3))
    >>> dt, A = rng.random((1, 6, 2)), -rng.random(2)
    >>> grads = mamba2_vjp(x, dt, A, B, C, do)
    >>> e = np.array([1e-6, 0.0])
    >>> fd = ((mamba2(x, dt, A + e, B, C) - mamba2(x, dt, A - e, B, C)) * do).sum() / 2e-6
    >>> bool(np.isclose(grads.dA[0], fd))
    True
    """
    p = _prepare(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
                 cu_seqlens=cu_seqlens, form=form, chunk_size=chunk_size, layout=layout, backend=backend)
    xp = p.xp
    batch, _, H, P, G, N = p.sizes
    _gated.check_shape("do", do, tuple(x.shape), xp, f"the output y (layout={layout!r})")
    ds = None
    if dfinal_state is not None:
        _gated.check_state("dfinal_state", dfinal_state, (_gated.n_states(p.offsets, batch), H, N, P), xp,
                           "(N_seq, H, N, P)")
        ds = p.grouped_state(dfinal_state)
    do5 = to_grouped(xp, xp.astype(do, p.x.dtype, copy=False), layout, G)
    g = _gated.scan_vjp(p.C, p.B, p.x * p.delta, do5, gk=p.A * p.delta, gv=None, initial_state=p.state,
                        dfinal_state=ds, offsets=p.offsets, form=p.form, chunk_size=p.chunk_size,
                        backend=p.backend)
    dx = g.dv * p.delta + (0.0 if p.D is None else p.D * do5)
    ddelta = xp.sum(g.dv * p.x, axis=-1, keepdims=True) + g.dgk * p.A
    ddt = ddelta * _gated.sigmoid(xp, p.dt_raw) if dt_softplus else ddelta
    per_head = (0, 3, 4)

    def out(a: Any, like: Any) -> Any:
        return xp.astype(from_grouped(xp, a, layout), like.dtype, copy=False)

    def head_vector(a: Any, like: Any) -> Any:
        return xp.astype(xp.reshape(a, tuple(like.shape)), like.dtype, copy=False)

    dD = None
    if D is not None:
        dD = xp.sum(do5 * p.x, axis=(0, 3) if D.ndim == 2 else per_head)
        dD = head_vector(dD, D)
    return Mamba2Gradients(
        dx=out(dx, x),
        ddt=out(ddt, dt)[..., 0],
        dA=head_vector(xp.sum(g.dgk * p.delta, axis=per_head), A),
        dB=out(g.dk, B),
        dC=out(g.dq, C),
        dD=dD,
        ddt_bias=None if dt_bias is None else head_vector(xp.sum(ddt, axis=per_head), dt_bias),
        dinitial_state=None if initial_state is None else xp.astype(p.ungrouped_state(g.dinitial_state),
                                                                    initial_state.dtype, copy=False),
    )


@dataclass(frozen=True, eq=False)
class Mamba2State:
    r"""Decoding state of :func:`mamba2`: h (batch, H, N, P) and the layer's A, D, dt_bias, dt_softplus.

    ``step(state, C, B, x, dt=dt)`` — the positional q, k, v of :func:`linattn.decoding.step`
    are C, B, x, the roles the scan gives them — with C and B of shape (batch, n, G, N),
    x (batch, n, H, P) and dt (batch, n, H) (``layout="bhtd"``: heads before time).

    Attributes
    ----------
    h : array, shape (batch, H, N, P)
    A, D, dt_bias : array
        As in :func:`mamba2` (D and dt_bias may be None).
    dt_softplus : bool

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import init_state, step
    >>> from linattn.mamba2 import mamba2
    >>> rng = np.random.default_rng(0)
    >>> x, (B, C), dt, A = (rng.standard_normal((1, 4, 2, 3)), rng.standard_normal((2, 1, 4, 1, 2)),
    ...                     rng.random((1, 4, 2)), -rng.random(2))
    >>> state = init_state("mamba2", batch=1, heads=2, head_dim=3, state_dim=2, A=A, dt_softplus=True)
    >>> y, state = step(state, C, B, x, dt=dt)  # a prefill of all four tokens
    >>> bool(np.allclose(y, mamba2(x, dt, A, B, C, dt_softplus=True)))
    True
    """

    h: Any
    A: Any
    D: Any = None
    dt_bias: Any = None
    dt_softplus: bool = False

    @classmethod
    def initial(cls, *, batch: int, heads: int, head_dim: int, state_dim: int, A: Any, D: Any = None,
                dt_bias: Any = None, dt_softplus: bool = False, dtype: Any = None, xp: Any = None,
                device: Any = None) -> Mamba2State:
        """The state before any token: h = 0.

        Parameters
        ----------
        batch, heads, head_dim, state_dim : int
            batch, H, P, N.
        A, D, dt_bias, dt_softplus
            The layer's parameters, as in :func:`mamba2`.
        dtype : dtype, optional
            The tokens' dtype (default float64); the state is float32 for half precision.
        xp : module, optional
        device : optional

        Returns
        -------
        Mamba2State
        """
        sizes = _sizes(batch=batch, heads=heads, head_dim=head_dim, state_dim=state_dim)
        ns, dtype, device = _allocator(xp, dtype, device)
        h = ns.zeros((sizes["batch"], sizes["heads"], sizes["state_dim"], sizes["head_dim"]), dtype=dtype,
                     device=device)
        return cls.from_final_state(h, A=A, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus)

    @classmethod
    def from_final_state(cls, final_state: Any, *, A: Any, D: Any = None, dt_bias: Any = None,
                         dt_softplus: bool = False) -> Mamba2State:
        """Continue from the ``final_state`` (batch, H, N, P) of :func:`mamba2`.

        Parameters
        ----------
        final_state : array, shape (batch, H, N, P)
        A, D, dt_bias, dt_softplus
            The options of the forward that produced it.

        Returns
        -------
        Mamba2State
        """
        xp = _checks.namespace_of(final_state=final_state, A=A, D=D, dt_bias=dt_bias)
        _checks.require_floating("final_state", final_state, xp)
        if final_state.ndim != 4 or compute_dtype(xp, final_state.dtype) != final_state.dtype:
            raise ValueError(f"final_state must be a float32 or float64 array (batch, H, N, P), got shape "
                             f"{tuple(final_state.shape)} and dtype {final_state.dtype}")
        _checks.check_bool("dt_softplus", dt_softplus)
        return cls(final_state, A, D, dt_bias, dt_softplus)

    @property
    def final_state(self) -> Any:
        """The state h (batch, H, N, P), in the form of ``mamba2``'s states."""
        return self.h

    def _step(self, C: Any, B: Any, x: Any, layout: str, dt: Any = None) -> tuple[Any, Mamba2State]:
        if dt is None:
            raise TypeError("a mamba2 step needs dt=..., the step sizes of the new tokens (batch, n, H)")
        xp = _checks.namespace_of(x=x, state=self.h)
        _checks.require_floating("x", x, xp)
        _gated.token_dtype(xp, x, self.h, "mamba2")
        n = int(x.shape[1] if layout == "bthd" else x.shape[2]) if x.ndim == 4 else 1
        y, h = mamba2(x, dt, self.A, B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=self.dt_softplus,
                      initial_state=self.h, output_final_state=True, chunk_size=_gated.step_chunk(n), layout=layout)
        return y, replace(self, h=h)


register_state("mamba2", Mamba2State)


def _compare_run(q: Any, k: Any, v: Any, causal: bool, form: str = "chunked") -> Any:
    _gated.causal_only("mamba2", causal)
    batch, T, H, _ = q.shape
    dt = _gated.cycling((batch, T, H), (1 / 8, 1 / 4, 1 / 2, 1.0), q)
    A = _gated.cycling((H,), (-1 / 2, -1.0, -1 / 4), q)
    return mamba2(v, dt, A, k, q, form=form)


register_method("mamba2", _compare_run,
                description="Mamba-2 SSD: C=q, B=k, x=v, G=H groups, fixed dt and A, chunked scan",
                reference=lambda q, k, v, causal: _compare_run(q, k, v, causal, form="recurrent"),
                supports_noncausal=False)
