r"""Mamba (S6): the selective scan of Gu & Dao (2023), as a front end to the causal scan.

For every batch element b and channel d (D channels), with a state h_t ∈ R^N,

.. math::

    \Delta_t = \mathrm{softplus}(\delta_t + \delta_\text{bias}) \quad(\text{or } \delta_t + \delta_\text{bias}),
    \qquad
    h_t = e^{\Delta_t A_d} \odot h_{t-1} + \Delta_t\, u_t\, B_t, \qquad
    y_t = C_t^\top h_t + D_d\, u_t, \qquad y_t \leftarrow y_t \cdot \mathrm{silu}(z_t),

A discretised by zero-order hold (Ā = exp(ΔA)) and B by Euler (B̄ = ΔB), as mamba-ssm's
``selective_scan_fn`` computes them. The recurrence is the causal linear scan of
:mod:`linattn.scan` with leading dims (b, d), Dk = N and Dv = 1:

.. math::

    q_t = C_t, \quad k_t = B_t, \quad v_t = \Delta_t u_t, \quad g^k_t = \Delta_t A_d \ (\le 0), \qquad
    S_t = h_t \in \mathbb{R}^{N \times 1}, \quad o_t = S_t^\top q_t = C_t^\top h_t .

``form="recurrent"`` is the loop over t above (the definition); ``"chunked"`` and
``"parallel"`` hand the mapped arrays to :func:`linattn.scan.causal_scan`, whose forms
never compute e^{+G}. Gradients are the chain rule through :func:`linattn.scan.causal_scan_vjp`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._problem import compute_dtype
from linattn.backends import resolve_backend
from linattn.compare import register_method
from linattn.decoding import _allocator, register_state
from linattn.scan import FORMS, causal_scan, causal_scan_vjp

__all__ = ["FORMS", "MambaState", "SelectiveScanGradients", "compare_problem", "selective_scan", "selective_scan_vjp"]


# ---------------------------------------------------------------------------------------
# Elementwise pieces
# ---------------------------------------------------------------------------------------


def _softplus(xp: Any, x: Any) -> Any:
    """log(1 + e^x), as max(x, 0) + log1p(e^{−|x|}) so that no exponent is positive."""
    return xp.where(x > 0, x, xp.zeros_like(x)) + xp.log1p(xp.exp(-xp.abs(x)))


def _sigmoid(xp: Any, x: Any) -> Any:
    """1 / (1 + e^{−x}), from e^{−|x|} ≤ 1 on both sides."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ---------------------------------------------------------------------------------------
# Checks and the mapping onto the scan
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """Checked inputs in the compute dtype, and how the channels fall into groups.

    The scan runs on leading dims (batch, G, H) with channel d = g·H + h: G is the least
    common multiple of B's and C's group counts, so each group of the scan reads one
    group of B and one of C (mamba-ssm: channel d reads group d // (D / G_B)).
    """

    xp: Any
    out_dtype: Any
    u: Any  # (Bt, D, L)
    pre: Any  # δ + δ_bias, (Bt, D, L)
    dt: Any  # Δ: softplus(pre) with delta_softplus, else pre
    A: Any  # (D, N)
    B: Any
    C: Any
    D: Any
    z: Any
    delta_bias: Any
    delta_softplus: bool
    initial_state: Any  # (Bt or N_seq, D, N)
    offsets: tuple[int, ...] | None
    groups: int

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """(Bt, D, L, N)."""
        return (*(int(n) for n in self.u.shape), int(self.A.shape[1]))

    def segments(self) -> list[slice]:
        """The time steps of each sequence (all of them without cu_seqlens)."""
        if self.offsets is None:
            return [slice(0, self.sizes[2])]
        return [slice(lo, hi) for lo, hi in itertools.pairwise(self.offsets)]

    def per_group(self, x: Any, width: int) -> Any:
        """(Bt, D, L) or (D, width) -> (Bt, G, H, L, 1) or (G, H, 1, width)."""
        batch, D, L, _ = self.sizes
        G = self.groups
        if x.ndim == 2:
            return self.xp.reshape(x, (G, D // G, 1, width))
        return self.xp.reshape(x, (batch, G, D // G, L, 1))

    def key_or_query(self, x: Any) -> Any:
        """B or C -> (b, G, 1, L, N), b = Bt (or 1 for a time-invariant B, C)."""
        xp, (_, D, L, N), G = self.xp, self.sizes, self.groups
        if x.ndim == 2:  # (D, N): constant over time, one per channel
            x = xp.broadcast_to(xp.reshape(x, (1, D, 1, N)), (1, D, L, N))
        else:  # (Bt, N, L) or (Bt, G_x, N, L)
            x = xp.matrix_transpose(x if x.ndim == 4 else xp.expand_dims(x, axis=1))
        own = int(x.shape[1])
        if own not in (1, G):  # expand group g_x to the scan's groups g_x·r .. g_x·r + r − 1
            x = xp.broadcast_to(xp.expand_dims(x, axis=2), (int(x.shape[0]), own, G // own, L, N))
        return xp.reshape(x, (int(x.shape[0]), own if own == 1 else G, 1, L, N))

    def key_or_query_gradient(self, d5: Any, like: Any) -> Any:
        """The inverse of :meth:`key_or_query` for a gradient: sum back to B's or C's shape."""
        xp, (_, D, L, N), G = self.xp, self.sizes, self.groups
        d = d5[:, :, 0, :, :]  # (b, G or 1, L, N)
        own = D if like.ndim == 2 else (1 if like.ndim == 3 else int(like.shape[1]))
        if int(d.shape[1]) != own:
            d = xp.sum(xp.reshape(d, (int(d.shape[0]), own, G // own, L, N)), axis=2)
        if like.ndim == 2:
            return xp.sum(d, axis=(0, 2))
        return xp.matrix_transpose(d[:, 0, :, :] if like.ndim == 3 else d)

    def state_per_group(self, state: Any) -> Any:
        """(n, D, N) -> (n, G, H, N, 1), the scan's state for Dv = 1."""
        n, D, N = (int(s) for s in state.shape)
        return self.xp.reshape(state, (n, self.groups, D // self.groups, N, 1))

    def state_per_channel(self, state: Any) -> Any:
        """(n, G, H, N, 1) -> (n, D, N)."""
        return self.xp.reshape(state, (int(state.shape[0]), self.sizes[1], self.sizes[3]))


def _check_bc(name: str, x: Any, batch: int, channels: int, length: int, state_size: int) -> int:
    """Validate B or C and return its group count (D for a time-invariant (D, N))."""
    shapes = {2: (channels, state_size), 3: (batch, state_size, length)}
    expected = f"(D, N) = {shapes[2]}, (B, N, L) = {shapes[3]} or (B, G, N, L) with G dividing D = {channels}"
    if x.ndim in shapes and tuple(x.shape) == shapes[x.ndim]:
        return channels if x.ndim == 2 else 1
    if x.ndim == 4:
        b, g, n, length_x = (int(s) for s in x.shape)
        if (b, n, length_x) == (batch, state_size, length) and g >= 1 and channels % g == 0:
            return g
    raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def _prepare(u, delta, A, B, C, *, D, z, delta_bias, delta_softplus, initial_state, cu_seqlens, backend,
             form, chunk_size, extra=None) -> _Problem:
    """Check every argument of selective_scan (and ``extra`` arrays: cotangents) and cast them."""
    arrays = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
              "initial_state": initial_state, **(extra or {})}
    xp = _checks.namespace_of(**arrays)
    for name, x in arrays.items():
        if x is not None:
            _checks.require_floating(name, x, xp)
    resolve_backend(backend, xp)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    _checks.check_positive_int("chunk_size", chunk_size)
    _checks.check_bool("delta_softplus", delta_softplus)
    if u.ndim != 3:
        raise ValueError(f"u must be 3-D (B, D, L), channels first as in mamba-ssm, got shape {tuple(u.shape)}")
    batch, channels, length = (int(s) for s in u.shape)
    if A.ndim != 2 or int(A.shape[0]) != channels or int(A.shape[1]) < 1:
        raise ValueError(f"A must have shape (D, N) with D = {channels} channels (u {tuple(u.shape)}), "
                         f"got {tuple(A.shape)}")
    N = int(A.shape[1])
    for name, x, shape in (("delta", delta, tuple(u.shape)), ("z", z, tuple(u.shape)), ("D", D, (channels,)),
                           ("delta_bias", delta_bias, (channels,))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match u {tuple(u.shape)}, got {tuple(x.shape)}")
    groups = math.lcm(_check_bc("B", B, batch, channels, length, N), _check_bc("C", C, batch, channels, length, N))
    shapes = _checks.AttentionShapes(batch, length, length, channels, channels, N, 1)
    offsets = _checks.check_cu_seqlens(cu_seqlens, shapes)
    n_states = batch if offsets is None else len(offsets) - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_states, channels, N):
        what = "(B, D, N)" if offsets is None else "(number of sequences, D, N)"
        raise ValueError(f"initial_state must have shape {what} = {(n_states, channels, N)}, "
                         f"got {tuple(initial_state.shape)}")
    if bool(xp.any(A > 0)):
        raise ValueError("A must be <= 0 everywhere (mamba-ssm's A = -exp(A_log) < 0): a positive entry makes "
                         f"the state grow as exp(Δ·A) and the scan's log-decays positive; got max(A) = "
                         f"{float(xp.max(A))}")
    # The inputs set the compute dtype; states and cotangents are cast to it.
    states = {"initial_state", *(extra or {})}
    inputs = [x for name, x in arrays.items() if x is not None and name not in states]
    dtype = compute_dtype(xp, xp.result_type(*inputs))
    cast = lambda x: None if x is None else xp.astype(x, dtype)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias, initial_state = (cast(x) for x in (u, delta, A, B, C, D, z, delta_bias,
                                                                           initial_state))
    pre = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = _softplus(xp, pre) if delta_softplus else pre
    if bool(xp.any(dt < 0)):
        raise ValueError("the time step Δ = delta + delta_bias (softplus'd when delta_softplus=True) must be >= 0: "
                         "with A <= 0 the log-decay Δ·A is then <= 0; pass delta_softplus=True for raw projections")
    return _Problem(xp, arrays["u"].dtype, u, pre, dt, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                    offsets, groups)


# ---------------------------------------------------------------------------------------
# The scan, by the definition or through linattn.scan
# ---------------------------------------------------------------------------------------


def _recurrent(xp: Any, q: Any, k: Any, v: Any, dt: Any, A: Any, h: Any) -> tuple[Any, Any]:
    """The definition, step by step: h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t, y_t = C_t · h_t.

    q = C and k = B (b, G, 1, L, N); v = Δu and dt = Δ (Bt, G, H, L, 1); A (G, H, 1, N);
    h (Bt, G, H, N) the state before the first step. Returns y (Bt, G, H, L) and h_{L−1}.
    """
    ys = []
    for t in range(int(dt.shape[-2])):
        h = xp.exp(dt[..., t, :] * A[..., 0, :]) * h + v[..., t, :] * k[..., t, :]
        ys.append(xp.sum(q[..., t, :] * h, axis=-1))
    if not ys:
        return xp.zeros((*h.shape[:-1], 0), dtype=h.dtype, device=array_api_compat.device(h)), h
    return xp.stack(ys, axis=-1), h


def _mapped(p: _Problem) -> tuple[Any, Any, Any, Any, Any]:
    """The scan's arrays: q = C, k = B (b, G, 1, L, N); v = Δu and Δ (Bt, G, H, L, 1); A (G, H, 1, N)."""
    return (p.key_or_query(p.C), p.key_or_query(p.B), p.per_group(p.dt * p.u, 1), p.per_group(p.dt, 1),
            p.per_group(p.A, p.sizes[3]))


def _steps(x: Any, steps: slice) -> Any:
    """The time steps ``steps`` of an array laid out (..., L, width)."""
    return x[..., steps, :]


def _of_sequence(p: _Problem, state: Any, n: int) -> Any:
    """Sequence n's slice of a state (B, D, N) or (N_seq, D, N); the whole state without cu_seqlens."""
    return state if state is None or p.offsets is None else state[n:n + 1]


def _scan(p: _Problem, form: str, chunk_size: int) -> tuple[Any, Any]:
    """C_tᵀ h_t for every step (Bt, D, L) and the final states (Bt or N_seq, D, N), sequence by sequence."""
    xp, (batch, D, L, N) = p.xp, p.sizes
    q, k, v, dt5, A = _mapped(p)
    outputs, finals = [], []
    for n, steps in enumerate(p.segments()):
        h0 = _of_sequence(p, p.initial_state, n)
        q_n, k_n, v_n, dt_n = (_steps(x, steps) for x in (q, k, v, dt5))
        if form == "recurrent":
            h = xp.zeros((int(v.shape[0]), p.groups, D // p.groups, N), dtype=v.dtype,
                         device=array_api_compat.device(v))
            if h0 is not None:
                h = h + p.state_per_group(h0)[..., 0]
            y, h = _recurrent(xp, q_n, k_n, v_n, dt_n, A, h)
            outputs.append(y)
            finals.append(xp.expand_dims(h, axis=-1))
        else:
            state = None if h0 is None else p.state_per_group(h0)
            o, h = causal_scan(q_n, k_n, v_n, gk=dt_n * A, initial_state=state, form=form, chunk_size=chunk_size)
            outputs.append(o[..., 0])
            finals.append(h)
    y = outputs[0] if len(outputs) == 1 else xp.concat(outputs, axis=-1)
    final = finals[0] if len(finals) == 1 else xp.concat(finals, axis=0)
    return xp.reshape(y, (batch, D, L)), p.state_per_channel(final)


def _scan_vjp(p: _Problem, dy: Any, dfinal: Any, form: str, chunk_size: int) -> tuple[Any, ...]:
    """causal_scan_vjp on the mapped arrays, sequence by sequence.

    Returns dq, dk (b, G, 1, L, N), d(Δu) (Bt, D, L), dgk (Bt, G, H, L, N) and the
    initial states' cotangents (Bt or N_seq, D, N), or None without an initial state.
    """
    xp, (batch, D, L, _) = p.xp, p.sizes
    q, k, v, dt5, A = _mapped(p)
    do = p.per_group(dy, 1)
    parts = []
    for n, steps in enumerate(p.segments()):
        h0, dh = _of_sequence(p, p.initial_state, n), _of_sequence(p, dfinal, n)
        q_n, k_n, v_n, do_n, dt_n = (_steps(x, steps) for x in (q, k, v, do, dt5))
        g = causal_scan_vjp(q_n, k_n, v_n, do_n, gk=dt_n * A,
                            initial_state=None if h0 is None else p.state_per_group(h0),
                            dfinal_state=None if dh is None else p.state_per_group(dh), form=form,
                            chunk_size=chunk_size)
        parts.append((g.dq, g.dk, g.dv, g.dgk, g.dinitial_state))
    dq, dk, dv, dgk = (xp.concat([part[i] for part in parts], axis=-2) for i in range(4))
    dh0 = None if p.initial_state is None else p.state_per_channel(xp.concat([part[4] for part in parts], axis=0))
    return dq, dk, xp.reshape(dv, (batch, D, L)), dgk, dh0


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def selective_scan(
    u: Any,
    delta: Any,
    A: Any,
    B: Any,
    C: Any,
    *,
    D: Any = None,
    z: Any = None,
    delta_bias: Any = None,
    delta_softplus: bool = False,
    initial_state: Any = None,
    output_final_state: bool = False,
    form: str = "recurrent",
    chunk_size: int = 64,
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> Any:
    r"""Mamba's selective scan (S6), with mamba-ssm's ``selective_scan_fn`` arguments.

    .. math::

        \Delta_t = \mathrm{softplus}(\delta_t + \delta_\text{bias}), \quad
        h_t = e^{\Delta_t A} \odot h_{t-1} + \Delta_t u_t B_t, \quad
        y_t = \big(C_t^\top h_t + D\, u_t\big) \cdot \mathrm{silu}(z_t),

    per batch element and channel (the softplus only with ``delta_softplus=True``; the
    bias, D and the gate only when given).

    Parameters
    ----------
    u : array, shape (B, D, L)
        The input, channels first (mamba-ssm's layout).
    delta : array, shape (B, D, L)
        The time step δ before ``delta_bias`` and the softplus.
    A : array, shape (D, N)
        The state matrix (diagonal per channel), real and <= 0: mamba-ssm's ``-exp(A_log)``.
    B, C : array, shape (B, N, L), (B, G, N, L) or (D, N)
        Input and output projections: shared by every channel, per group of D / G
        consecutive channels (channel d reads group d // (D / G)), or constant over time
        and per channel. B and C may take different forms.
    D : array, shape (D,), optional
        The skip connection D·u.
    z : array, shape (B, D, L), optional
        The gate: y ← y · silu(z).
    delta_bias : array, shape (D,), optional
        Added to δ before the softplus.
    delta_softplus : bool, default False
        Apply softplus to δ + δ_bias.
    initial_state : array, shape (B, D, N), optional
        h before the first step (zeros when None); (number of sequences, D, N) with
        ``cu_seqlens``.
    output_final_state : bool, default False
        Also return the state after the last step.
    form : {"recurrent", "chunked", "parallel"}, default "recurrent"
        ``recurrent``: the loop over t (the definition, and the fastest form on a CPU,
        hence the default: with one value column per channel the chunked form does C
        times the recurrence's exponentials); ``chunked``/``parallel``:
        :func:`linattn.scan.causal_scan` on the mapped arrays.
    chunk_size : int, default 64
        Steps per chunk of the chunked form.
    cu_seqlens : array or sequence of int, optional
        N+1 offsets of sequences packed along L in a batch of one (B = 1), as in
        FlashAttention: each sequence starts from its own initial state.
    backend : str, optional
        A registered backend (None follows the arrays).

    Returns
    -------
    y : array, shape (B, D, L)
        In u's dtype.
    final_state : array, shape (B, D, N)
        With ``output_final_state=True``; (number of sequences, D, N) with ``cu_seqlens``;
        in the compute dtype (float32 for half-precision inputs).

    Raises
    ------
    ValueError
        Shapes that do not fit together (naming the argument), A with a positive entry,
        a negative time step, an unknown form, a chunk size < 1, bad ``cu_seqlens``.
    TypeError
        Non-floating arrays, arrays of different libraries.

    Notes
    -----
    The arithmetic is mamba-ssm's ``selective_scan_ref``: Ā = exp(ΔA), B̄u = ΔBu, the
    bias before the softplus, y = Cᵀh + Du, then the silu gate. Differences: the
    computation is in float64 for float64 inputs (mamba-ssm: always float32); the
    softplus is exact (torch's switches to the identity above 20, a difference below
    2.1e-9); A must be real and <= 0 (no complex A); ``output_final_state`` is
    ``return_last_state``; the initial state, its gradient and the final state's are
    not in released mamba-ssm; ``cu_seqlens`` returns one final state per sequence.

    References
    ----------
    A. Gu and T. Dao. "Mamba: Linear-Time Sequence Modeling with Selective State Spaces." 2023.

    Examples
    --------
    One channel, N = 1, Δ = δ, A = −1, B = (2, 3), C = (1, −1), D = 0.5: h_0 = 0.5·1·2 = 1,
    y_0 = 1 + 0.5, h_1 = e^{−1} + 1·2·3, y_1 = −h_1 + 0.5·2.

    >>> import numpy as np
    >>> from linattn.mamba import selective_scan
    >>> u, delta = np.array([[[1.0, 2.0]]]), np.array([[[0.5, 1.0]]])
    >>> A, B, C = np.array([[-1.0]]), np.array([[[2.0, 3.0]]]), np.array([[[1.0, -1.0]]])
    >>> y = selective_scan(u, delta, A, B, C, D=np.array([0.5]), form="recurrent")
    >>> np.allclose(y, [[[1.5, -(np.exp(-1) + 6) + 1]]])
    True
    >>> bool(np.allclose(selective_scan(u, delta, A, B, C, D=np.array([0.5]), chunk_size=1), y))
    True
    """
    p = _prepare(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                 initial_state=initial_state, cu_seqlens=cu_seqlens, backend=backend, form=form,
                 chunk_size=chunk_size)
    _checks.check_bool("output_final_state", output_final_state)
    xp = p.xp
    y, final = _scan(p, form, chunk_size)
    if p.D is not None:
        y = y + p.D[:, None] * p.u
    if p.z is not None:
        y = y * (p.z * _sigmoid(xp, p.z))
    y = xp.astype(y, p.out_dtype)
    return (y, final) if output_final_state else y


@dataclass(frozen=True)
class SelectiveScanGradients:
    """Cotangents of the inputs of :func:`selective_scan`, each shaped and typed like its input.

    ``dD``, ``dz``, ``ddelta_bias`` and ``dinitial_state`` are None where the input was.
    """

    du: Any
    ddelta: Any
    dA: Any  # noqa: N815 (the math letters of the inputs, as mamba-ssm names its gradients)
    dB: Any  # noqa: N815
    dC: Any  # noqa: N815
    dD: Any  # noqa: N815
    dz: Any
    ddelta_bias: Any
    dinitial_state: Any


def selective_scan_vjp(
    u: Any,
    delta: Any,
    A: Any,
    B: Any,
    C: Any,
    dy: Any,
    *,
    D: Any = None,
    z: Any = None,
    delta_bias: Any = None,
    delta_softplus: bool = False,
    initial_state: Any = None,
    dfinal_state: Any = None,
    form: str = "recurrent",
    chunk_size: int = 64,
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> SelectiveScanGradients:
    r"""Gradients of :func:`selective_scan` for every input, by the chain rule on the scan's VJP.

    With y_s = Cᵀh + Du the output before the gate and dq, dk, dv, dg^k the scan's
    cotangents (:func:`linattn.scan.causal_scan_vjp` with do = dy·silu(z)),

    .. math::

        dz = dy\, y_s\, \sigma(z)\big(1 + z(1 - \sigma(z))\big), \quad
        dC = dq, \quad dB = dk, \quad dA_{dn} = \sum_{b,t} dg^k_{tn} \Delta_t, \quad
        dD_d = \sum_{b,t} do_t u_t,

    .. math::

        du_t = dv_t \Delta_t + D\, do_t, \quad
        d\Delta_t = dv_t u_t + \sum_n dg^k_{tn} A_n, \quad
        d\delta_t = d\Delta_t\, \sigma(\delta_t + \delta_\text{bias}) \ (\text{softplus; else } d\Delta_t),
        \quad d\delta_\text{bias} = \sum_{b,t} d\delta_t .

    Parameters
    ----------
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, form, chunk_size, cu_seqlens, backend
        As in :func:`selective_scan`.
    dy : array, shape (B, D, L)
        Cotangent of the output.
    dfinal_state : array, shape (B, D, N), optional
        Cotangent of the final state ((number of sequences, D, N) with ``cu_seqlens``);
        None is zero. (mamba-ssm ignores it.)

    Returns
    -------
    SelectiveScanGradients

    Raises
    ------
    ValueError, TypeError
        As :func:`selective_scan`, and for a cotangent of the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.mamba import selective_scan, selective_scan_vjp
    >>> rng = np.random.default_rng(0)
    >>> u, delta, z, dy = rng.standard_normal((4, 1, 2, 5))
    >>> A, B, C = -np.exp(rng.standard_normal((2, 3))), rng.standard_normal((1, 3, 5)), rng.standard_normal((1, 3, 5))
    >>> g = selective_scan_vjp(u, delta, A, B, C, dy, z=z, delta_softplus=True)
    >>> f = lambda A: np.sum(dy * selective_scan(u, delta, A, B, C, z=z, delta_softplus=True))
    >>> e = np.zeros_like(A); e[1, 2] = 1e-6
    >>> bool(np.isclose((f(A + e) - f(A - e)) / 2e-6, g.dA[1, 2]))
    True
    """
    p = _prepare(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                 initial_state=initial_state, cu_seqlens=cu_seqlens, backend=backend, form=form,
                 chunk_size=chunk_size, extra={"dy": dy, "dfinal_state": dfinal_state})
    xp, (_, channels, _, N) = p.xp, p.sizes
    if tuple(dy.shape) != tuple(u.shape):
        raise ValueError(f"dy must have the shape of u {tuple(u.shape)}, got {tuple(dy.shape)}")
    n_states = p.sizes[0] if p.offsets is None else len(p.offsets) - 1
    if dfinal_state is not None and tuple(dfinal_state.shape) != (n_states, channels, N):
        raise ValueError(f"dfinal_state must have the final state's shape {(n_states, channels, N)}, "
                         f"got {tuple(dfinal_state.shape)}")
    dtype = p.u.dtype
    dy = xp.astype(dy, dtype)
    dfinal = None if dfinal_state is None else xp.astype(dfinal_state, dtype)
    dz = None
    if p.z is not None:  # the gate: out = y_s · z σ(z)
        y, _ = _scan(p, form, chunk_size)
        if p.D is not None:
            y = y + p.D[:, None] * p.u
        s = _sigmoid(xp, p.z)
        dz = dy * y * s * (1.0 + p.z * (1.0 - s))
        dy = dy * (p.z * s)
    dq, dk, dv, dgk, dh0 = _scan_vjp(p, dy, dfinal, form, chunk_size)
    du = dv * p.dt
    dD = None
    if p.D is not None:
        du = du + p.D[:, None] * dy
        dD = xp.sum(dy * p.u, axis=(0, 2))
    ddt = dv * p.u + xp.reshape(xp.sum(dgk * p.per_group(p.A, N), axis=-1), tuple(p.u.shape))  # gk = Δ·A
    dA = xp.reshape(xp.sum(dgk * p.per_group(p.dt, 1), axis=(0, 3)), (channels, N))
    ddelta = ddt * _sigmoid(xp, p.pre) if p.delta_softplus else ddt
    ddelta_bias = None if p.delta_bias is None else xp.sum(ddelta, axis=(0, 2))

    def like(x: Any, original: Any) -> Any:
        return None if x is None else xp.astype(x, original.dtype)

    return SelectiveScanGradients(
        du=like(du, u), ddelta=like(ddelta, delta), dA=like(dA, A),
        dB=like(p.key_or_query_gradient(dk, B), B), dC=like(p.key_or_query_gradient(dq, C), C),
        dD=like(dD, D), dz=like(dz, z), ddelta_bias=like(ddelta_bias, delta_bias),
        dinitial_state=like(dh0, initial_state),
    )


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MambaState:
    r"""Decoding state of :func:`selective_scan`: h (B, D, N) and the layer's fixed parameters.

    Each new token updates

    .. math::

        h_t = e^{\Delta_t A} \odot h_{t-1} + \Delta_t u_t B_t, \qquad
        y_t = \big(C_t^\top h_t + D\, u_t\big) \cdot \mathrm{silu}(z_t),

    so the state is N numbers per channel whatever the length. The tokens are Mamba's
    per-token inputs, not (q, k, v): call :meth:`step` (``state.step(u, delta, B, C)``) or
    the generic ``linattn.decoding.step(state, None, None, None, u=..., delta=..., B=..., C=...)``.

    Attributes
    ----------
    h : array, shape (B, D, N)
        The state after ``position`` tokens, in the compute dtype.
    A, D, delta_bias : array
        The layer's parameters, as in :func:`selective_scan` (in the compute dtype).
    delta_softplus : bool
    position : int
        Tokens so far.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.mamba import MambaState, selective_scan
    >>> rng = np.random.default_rng(0)
    >>> u, delta = rng.standard_normal((2, 1, 3, 7))
    >>> A, B, C = -np.exp(rng.standard_normal((3, 4))), rng.standard_normal((1, 4, 7)), rng.standard_normal((1, 4, 7))
    >>> state = MambaState.initial(batch=1, A=A, delta_softplus=True)
    >>> ys = []
    >>> for t in range(7):
    ...     y, state = state.step(u[..., t:t + 1], delta[..., t:t + 1], B[..., t:t + 1], C[..., t:t + 1])
    ...     ys.append(y)
    >>> full = selective_scan(u, delta, A, B, C, delta_softplus=True)
    >>> bool(np.allclose(np.concatenate(ys, axis=-1), full)), state.h.shape, state.position
    (True, (1, 3, 4), 7)
    """

    h: Any
    A: Any
    D: Any
    delta_bias: Any
    delta_softplus: bool
    position: int

    @classmethod
    def initial(cls, *, batch: int, A: Any, D: Any = None, delta_bias: Any = None, delta_softplus: bool = False,
                initial_state: Any = None, dtype: Any = None) -> MambaState:
        """The state before the first token: zeros, or ``initial_state`` (e.g. a prefill's final state).

        Parameters
        ----------
        batch : int
            B.
        A, D, delta_bias, delta_softplus
            The layer's parameters, as in :func:`selective_scan`.
        initial_state : array, shape (B, D, N), optional
            Start from this state (a final state of :func:`selective_scan`).
        dtype : dtype, optional
            The dtype of the tokens to come (default A's); the state is kept in its
            compute dtype, with the parameters.

        Returns
        -------
        MambaState
        """
        batch = _checks.check_positive_int("batch", batch)
        xp = _checks.namespace_of(A=A, D=D, delta_bias=delta_bias, initial_state=initial_state)
        _checks.require_floating("A", A, xp)
        dtype = A.dtype if dtype is None else dtype
        _allocator(xp, dtype, array_api_compat.device(A))  # a TypeError unless a real floating dtype
        if A.ndim != 2:
            raise ValueError(f"A must have shape (D, N), got {tuple(A.shape)}")
        channels, N = (int(s) for s in A.shape)
        device = array_api_compat.device(A)
        u = xp.zeros((batch, channels, 0), dtype=dtype, device=device)  # no token: checks the parameters alone
        bc = xp.zeros((batch, N, 0), dtype=dtype, device=device)
        p = _prepare(u, u, A, bc, bc, D=D, z=None, delta_bias=delta_bias, delta_softplus=delta_softplus,
                     initial_state=initial_state, cu_seqlens=None, backend=None, form="recurrent", chunk_size=1)
        h = p.initial_state if p.initial_state is not None else xp.zeros((batch, channels, N), dtype=p.A.dtype,
                                                                          device=device)
        return cls(h, p.A, p.D, p.delta_bias, delta_softplus, 0)

    def step(self, u: Any, delta: Any, B: Any, C: Any, z: Any = None) -> tuple[Any, MambaState]:
        """Feed n new tokens: their outputs and the state after them (this state is not modified).

        Parameters
        ----------
        u, delta, z : array, shape (B, D, n)
            The new tokens' inputs, time steps and gates (n >= 0), channels first.
        B, C : array, shape (B, N, n), (B, G, N, n) or (D, N)
            As in :func:`selective_scan`.

        Returns
        -------
        y : array, shape (B, D, n)
            Equal to rounding to the last n outputs of :func:`selective_scan` on the whole sequence.
        new_state : MambaState

        Raises
        ------
        TypeError
            Tokens whose compute dtype is not the state's.
        ValueError
            Tokens whose batch, channels or N do not match the state; the errors of :func:`selective_scan`.
        """
        xp = _checks.namespace_of(u=u, delta=delta, B=B, C=C, z=z, state=self.h)
        batch = int(self.h.shape[0])
        if u.ndim != 3 or int(u.shape[0]) != batch:
            raise ValueError(f"u must have shape (B, D, n) with the state's batch B = {batch}, got {tuple(u.shape)}")
        tokens = {"u": u, "delta": delta, "B": B, "C": C, "z": z}
        for name, x in tokens.items():
            if x is not None:
                _checks.require_floating(name, x, xp)
        arrays = [x for x in (*tokens.values(), self.A, self.D, self.delta_bias) if x is not None]
        dtype = compute_dtype(xp, xp.result_type(*arrays))  # what selective_scan will compute in
        if dtype != self.h.dtype:
            raise TypeError(f"tokens of dtype {u.dtype} compute in {dtype}, but the state holds {self.h.dtype}; "
                            f"create the state with dtype={u.dtype}")
        y, h = selective_scan(u, delta, self.A, B, C, D=self.D, z=z, delta_bias=self.delta_bias,
                              delta_softplus=self.delta_softplus, initial_state=self.h, output_final_state=True,
                              form="recurrent")
        return y, replace(self, h=h, position=self.position + int(u.shape[-1]))

    def _step(self, q: Any, k: Any, v: Any, layout: str, **inputs: Any) -> tuple[Any, MambaState]:
        """The :func:`linattn.decoding.step` entry: q, k, v are None and the tokens come by name."""
        if q is not None or k is not None or v is not None or layout != "bthd":
            raise TypeError("a MambaState takes Mamba's per-token inputs by name, channels first: "
                            "step(state, None, None, None, u=..., delta=..., B=..., C=..., z=...)")
        unknown = sorted(set(inputs) - {"u", "delta", "B", "C", "z"})
        missing = sorted({"u", "delta", "B", "C"} - set(inputs))
        if unknown or missing:
            raise TypeError(f"a MambaState step takes u, delta, B, C (and optionally z); got unknown {unknown}, "
                            f"missing {missing}")
        return self.step(**inputs)


register_state("mamba", MambaState)


# ---------------------------------------------------------------------------------------
# linattn compare
# ---------------------------------------------------------------------------------------


def compare_problem(q: Any, k: Any, v: Any, *, seed: int = 0) -> dict[str, Any]:
    """The selective-scan problem ``linattn compare`` runs for attention inputs q, k, v.

    From (B, T, H, Dh) arrays, with H·Dh channels and N = Dh: u is v with its heads and
    dims as channels (channel h·Dh + e is v[:, :, h, e]); B and C are k and q, one group
    per head (B of shape (B, H, Dh, T)); A = −(1, 2, …, N) for every channel (mamba-ssm's
    S4D-real initialisation); D = 1; Δ = softplus(w_d u + b_d) with w_d ~ N(0, 1/4) and
    b_d = softplus⁻¹(dt_d), dt_d log-uniform in [0.001, 0.1] (mamba-ssm's initialisation
    of the time step), both drawn from ``numpy.random.default_rng(seed)``.

    Parameters
    ----------
    q, k, v : array, shape (B, T, H, Dh)
    seed : int, default 0

    Returns
    -------
    dict
        The keyword arguments u, delta, A, B, C, D, delta_bias, delta_softplus of :func:`selective_scan`.
    """
    xp = _checks.namespace_of(q=q, k=k, v=v)
    batch, T, H, Dh = (int(s) for s in v.shape)
    channels = H * Dh
    device = array_api_compat.device(v)

    def channels_first(x: Any) -> Any:  # (B, T, H, Dh) -> (B, H, Dh, T)
        return xp.permute_dims(x, (0, 2, 3, 1))

    rng = np.random.default_rng(seed)
    w = rng.standard_normal(channels) / 2
    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), channels))
    as_array = lambda x: xp.asarray(x, dtype=v.dtype, device=device)  # noqa: E731
    u = xp.reshape(channels_first(v), (batch, channels, T))
    return {
        "u": u,
        "delta": u * as_array(w)[:, None],
        "A": as_array(-np.broadcast_to(np.arange(1, Dh + 1, dtype=np.float64), (channels, Dh))),
        "B": channels_first(k),
        "C": channels_first(q),
        "D": as_array(np.ones(channels)),
        "delta_bias": as_array(np.log(np.expm1(dt))),
        "delta_softplus": True,
    }


def _compared(form: str) -> Any:
    def run(q: Any, k: Any, v: Any, *, causal: bool) -> Any:
        if not causal:
            raise ValueError("mamba (selective scan) is causal only; compare it without --non-causal")
        batch, T, H, Dh = (int(s) for s in v.shape)
        xp = array_api_compat.array_namespace(v)
        y = selective_scan(**compare_problem(q, k, v), form=form)
        return xp.permute_dims(xp.reshape(y, (batch, H, Dh, T)), (0, 3, 1, 2))

    return run


# The recurrent form is the fast one for S6 on a CPU: the chunked form does C times its
# arithmetic with Dv = 1 (see docs/methods/mamba.rst); the reference is the same loop in float64.
register_method(
    "mamba",
    _compared("recurrent"),
    description="Mamba (S6) selective scan, N = D; channels, B, C from v, k, q (see linattn.mamba.compare_problem)",
    reference=_compared("recurrent"),
    supports_noncausal=False,
)
