r"""RWKV-6 (Finch, Peng et al., 2024): a per-key decay, an exclusive readout and a bonus for the current token.

Per batch element and key/value head, with the log-decays w_t ≤ 0 and the bonus u,

.. math::

    o_t = s\,\big(S_{t-1} + \operatorname{Diag}(u)\, k_t v_t^\top\big)^\top r_t
        = s\, S_{t-1}^\top r_t + s\,\big(r_t \cdot (u \odot k_t)\big)\, v_t, \qquad
    S_t = \operatorname{Diag}(e^{w_t})\, S_{t-1} + k_t v_t^\top .

The state is the causal scan's (:mod:`linattn.scan`, key gate w), but the readout is
*exclusive*: o_t reads S_{t−1}, before k_t v_tᵀ enters. The scan's own readout is
inclusive, o'_t = S_tᵀ q_t, so the exclusive part is the scan read with the next step's
query — q_t = s·r_{t+1} gives o'_t = s S_tᵀ r_{t+1}, the output of step t + 1 — and the
first step reads the initial state; the current token enters through the bonus alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from linattn import _checks, _gated
from linattn._problem import compute_dtype
from linattn.compare import register_method
from linattn.decoding import _allocator, _sizes, _tokens, register_state
from linattn.scan import causal_scan, causal_scan_vjp

__all__ = ["RWKV6Gradients", "RWKV6State", "rwkv6", "rwkv6_vjp"]


class RWKV6Gradients(NamedTuple):
    """Gradients of :func:`rwkv6`; None where the input was None."""

    dr: Any
    dk: Any
    dv: Any
    dw: Any
    du: Any
    dinitial_state: Any


def _prepare(r, k, v, w, u, *, scale, initial_state, cu_seqlens, form, chunk_size, layout, backend):
    p = _gated.prepare_qkv(r, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                           chunk_size=chunk_size, layout=layout, backend=backend)
    against = f"r {tuple(r.shape)} and k {tuple(k.shape)} (layout={p.layout!r})"
    _gated.check_log_decay("w", w, p.gate_shape(p.shapes.key_dim), p.xp, against)
    _gated.check_shape("u", u, (p.shapes.kv_heads, p.shapes.key_dim), p.xp, f"(Hkv, Dk) of {against}")
    _gated.check_range("u", u, p.xp, "finite values (the bonus of the current token)")
    u5 = p.xp.reshape(p.xp.astype(u, p.q.dtype, copy=False), (1, p.shapes.kv_heads, 1, 1, p.shapes.key_dim))
    return replace(p, gk=p.grouped_gate(w, per_step=False)), u5


def _shifted(xp: Any, x: Any) -> Any:
    """x_{t+1} at row t, zero in the last row: (..., T, D)."""
    if x.shape[-2] == 0:
        return x
    return xp.concat([x[..., 1:, :], xp.zeros_like(x[..., :1, :])], axis=-2)


def _readout(p: _gated.QKVProblem, u5: Any) -> tuple[Any, Any]:
    """The outputs s S_{t−1}ᵀ r_t + a_t v_t of every step of every sequence, and the final states."""
    xp = p.xp

    def run(seg: list[Any], states: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        r, k, v, w = seg
        S0 = states[0]
        o = _bonus_weight(xp, r, k, u5) * v  # a fresh array: the readouts are added in place
        if r.shape[-2] == 0:
            _, final = causal_scan(r, k, v, gk=w, initial_state=S0, form=p.form, chunk_size=p.chunk_size,
                                   backend=p.backend)
            return (o,), (final,)
        # Steps 0..T−2 read with the next step's query (views, no shifted copy): row t is
        # s S_tᵀ r_{t+1}, the output of step t + 1. The last step only enters the state.
        before_last = S0
        if r.shape[-2] > 1:
            read_next, before_last = causal_scan(r[..., 1:, :], k[..., :-1, :], v[..., :-1, :], gk=w[..., :-1, :],
                                                 initial_state=S0, form=p.form, chunk_size=p.chunk_size,
                                                 backend=p.backend)
            o[..., 1:, :] += read_next
        _, final = causal_scan(r[..., -1:, :], k[..., -1:, :], v[..., -1:, :], gk=w[..., -1:, :],
                               initial_state=before_last, form="recurrent")
        if S0 is not None:  # step 0 reads S_{−1}
            o[..., :1, :] += xp.matmul(r[..., :1, :], S0)
        return (o,), (final,)

    (o,), (final,) = _gated.map_sequences(run, p.offsets, (p.q, p.k, p.v, p.gk), (p.state,))
    return o, final


def _bonus_weight(xp: Any, q: Any, k: Any, u5: Any) -> Any:
    """a_t = s r_t · (u ⊙ k_t) = (s r_t ⊙ k_t) · u, a product with the column u: (B, Hkv, G, T, 1)."""
    return xp.matmul(q * k, xp.matrix_transpose(u5))


def rwkv6(r: Any, k: Any, v: Any, w: Any, u: Any, *, scale: float | None = None, initial_state: Any = None,
          output_final_state: bool = False, cu_seqlens: Any = None, form: str = "chunked", chunk_size: int = 64,
          layout: str = "bthd", backend: str | None = None) -> Any:
    r"""RWKV-6 time mixing (flash-linear-attention's ``chunk_rwkv6``): exclusive readout plus the bonus u.

    .. math::

        o_t = s\, S_{t-1}^\top r_t + s\,\big(r_t \cdot (u \odot k_t)\big)\, v_t, \qquad
        S_t = \operatorname{Diag}(e^{w_t})\, S_{t-1} + k_t v_t^\top ,

    S_{−1} = ``initial_state`` (zeros when None), per batch element and key/value head.

    Parameters
    ----------
    r : array, shape (B, T, Hq, Dk)
        The receptance (the query), ``(B, Hq, T, Dk)`` with ``layout="bhtd"``.
    k : array, shape (B, T, Hkv, Dk)
    v : array, shape (B, T, Hkv, Dv)
    w : array, shape (B, T, Hkv, Dk)
        Log-decays, finite and <= 0: from RWKV's own parameter w_raw, w = −exp(w_raw).
    u : array, shape (Hkv, Dk)
        The bonus of the current token (RWKV's ``time_first`` / ``time_faaaa``).
    scale : float, optional
        s; default 1/sqrt(Dk) as in FLA's op (RWKV-6 itself uses 1: pass ``scale=1.0``).
    initial_state, output_final_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`linattn.gated.simple_gla`; the state is (N, Hkv, Dk, Dv).

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
    final_state : array, shape (N, Hkv, Dk, Dv)
        Only with ``output_final_state=True``.

    Raises
    ------
    TypeError, ValueError
        Bad shapes or dtypes (naming the argument and r's and k's shapes), w > 0 or not
        finite, u not finite, T != S, bad ``cu_seqlens``, form or state.

    Notes
    -----
    - The readout is exclusive (o_t reads S_{t−1}), unlike every other method of linattn
      and FLA, and the current token enters only through u. FLA's ``chunk_rwkv6`` and
      ``naive_recurrent_rwkv6`` compute the same.
    - w is the log-decay, as in FLA. RWKV-6's code keeps w_raw with decay
      exp(−exp(w_raw)); pass w = −exp(w_raw) (FLA issue #351 is this confusion for RWKV-7).
    - ``scale`` defaults to 1/sqrt(Dk) (FLA's op); the RWKV-6 model uses scale = 1.
    - The state is (N, Hkv, Dk, Dv), K-major, as FLA's; RWKV's CUDA kernels keep its
      transpose per head.
    - Grouped-query heads (FLA: Hq = Hkv); w, u and the state are per key/value head.
      Any ``chunk_size``; float64; no ``reverse``.

    References
    ----------
    B. Peng et al. "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
    Recurrence." 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.rwkv import rwkv6
    >>> rng = np.random.default_rng(0)
    >>> r, k, v = (rng.standard_normal((1, 7, 2, 3)) for _ in range(3))
    >>> w, u = -rng.random((1, 7, 2, 3)), rng.standard_normal((2, 3))
    >>> o = rwkv6(r, k, v, w, u, chunk_size=3)
    >>> bool(np.allclose(o, rwkv6(r, k, v, w, u, form="recurrent")))
    True
    >>> # the first output sees only the bonus: s (r_0 · (u ⊙ k_0)) v_0
    >>> bool(np.allclose(o[0, 0, 0], (r[0, 0, 0] * u[0] * k[0, 0, 0]).sum() * v[0, 0, 0] / np.sqrt(3)))
    True
    """
    p, u5 = _prepare(r, k, v, w, u, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                     chunk_size=chunk_size, layout=layout, backend=backend)
    _checks.check_bool("output_final_state", output_final_state)
    o, final = _readout(p, u5)
    o = p.output(o, r.dtype)
    return (o, final[:, :, 0, ...]) if output_final_state else o


def rwkv6_vjp(r: Any, k: Any, v: Any, w: Any, u: Any, do: Any, *, scale: float | None = None,
              initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None, form: str = "chunked",
              chunk_size: int = 64, layout: str = "bthd", backend: str | None = None) -> RWKV6Gradients:
    r"""Gradients of :func:`rwkv6` for every input, by :func:`linattn.causal_scan_vjp` and the chain rule.

    The exclusive part is the scan on (s·r_{t+1}, k, v) with gate w, read against the
    cotangent shifted the same way (do_{t+1} at row t); so ds·r_{t+1} is the scan's dq at
    row t, and the first step adds S_{−1} do_0 to d(s·r_0) and s·r_0 do_0ᵀ to dS_{−1}.
    With a_t = s r_t · (u ⊙ k_t) and da_t = do_t · v_t, the bonus adds

    .. math::

        dr_t \mathrel{+}= s\, da_t\, u \odot k_t, \quad
        dk_t \mathrel{+}= da_t\, u \odot s r_t, \quad
        dv_t \mathrel{+}= a_t\, do_t, \quad
        du = \textstyle\sum_{b,t} da_t\, s r_t \odot k_t .

    Parameters
    ----------
    r, k, v, w, u, scale, initial_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`rwkv6`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of o.
    dfinal_state : array, shape (N, Hkv, Dk, Dv), optional

    Returns
    -------
    RWKV6Gradients
        (dr, dk, dv, dw, du, dinitial_state); dinitial_state None without an initial state.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.rwkv import rwkv6, rwkv6_vjp
    >>> rng = np.random.default_rng(0)
    >>> r, k, v, do = (rng.standard_normal((1, 5, 1, 2)) for _ in range(4))
    >>> w, u = -rng.random((1, 5, 1, 2)), rng.standard_normal((1, 2))
    >>> grads = rwkv6_vjp(r, k, v, w, u, do)
    >>> e = np.array([[1e-6, 0.0]])
    >>> fd = ((rwkv6(r, k, v, w, u + e) - rwkv6(r, k, v, w, u - e)) * do).sum() / 2e-6
    >>> bool(np.isclose(grads.du[0, 0], fd))
    True
    """
    p, u5 = _prepare(r, k, v, w, u, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                     chunk_size=chunk_size, layout=layout, backend=backend)
    xp = p.xp
    do5, ds = _gated.qkv_cotangents(p, do, dfinal_state)

    def run(seg: list[Any], states: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        r, k, v, w, do = seg
        S0, dS = states
        g = causal_scan_vjp(_shifted(xp, r), k, v, _shifted(xp, do), gk=w, initial_state=S0, dfinal_state=dS,
                            form=p.form, chunk_size=p.chunk_size, backend=p.backend)
        dr, dS0 = g.dq, g.dinitial_state
        if r.shape[-2] > 0:  # row t of the scan's dq belongs to r_{t+1}; r_0 read S_{−1}
            first = xp.zeros_like(dr[..., :1, :]) if S0 is None else xp.matmul(do[..., :1, :], xp.matrix_transpose(S0))
            dr = xp.concat([xp.broadcast_to(first, dr[..., :1, :].shape), dr[..., :-1, :]], axis=-2)
            if S0 is not None:
                dS0 = dS0 + _gated.sum_to(xp, xp.matmul(xp.matrix_transpose(r[..., :1, :]), do[..., :1, :]),
                                          tuple(S0.shape))
        return (dr, g.dk, g.dv, g.dgk), (dS0,)

    (dr, dk, dv, dw), (dS0,) = _gated.map_sequences(run, p.offsets, (p.q, p.k, p.v, p.gk, do5), (p.state, ds))
    a = _bonus_weight(xp, p.q, p.k, u5)
    da = xp.sum(do5 * p.v, axis=-1, keepdims=True)
    dr = dr + da * u5 * p.k
    dk = dk + _gated.sum_to(xp, da * u5 * p.q, tuple(p.k.shape))
    dv = dv + _gated.sum_to(xp, a * do5, tuple(p.v.shape))
    du = xp.reshape(xp.sum(da * p.q * p.k, axis=(0, 2, 3)), tuple(u.shape))
    return RWKV6Gradients(
        dr=p.output(dr * p.scale, r.dtype),
        dk=p.output(dk, k.dtype),
        dv=p.output(dv, v.dtype),
        dw=p.output(dw, w.dtype),
        du=xp.astype(du, u.dtype, copy=False),
        dinitial_state=None if initial_state is None else xp.astype(dS0[:, :, 0, ...], initial_state.dtype, copy=False),
    )


@dataclass(frozen=True, eq=False)
class RWKV6State:
    r"""Decoding state of :func:`rwkv6`: S (B, Hkv, Dk, Dv), the bonus u and the scale.

    ``step(state, r, k, v, w=w)`` with w of shape (B, n, Hkv, Dk): each token reads S
    (before its own k vᵀ) plus its bonus, then enters S.

    Attributes
    ----------
    S : array, shape (B, Hkv, Dk, Dv)
    u : array, shape (Hkv, Dk)
    scale : float

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import init_state, step
    >>> from linattn.rwkv import rwkv6
    >>> rng = np.random.default_rng(0)
    >>> r, k, v = (rng.standard_normal((1, 4, 1, 2)) for _ in range(3))
    >>> w, u = -rng.random((1, 4, 1, 2)), rng.standard_normal((1, 2))
    >>> state = init_state("rwkv6", batch=1, kv_heads=1, key_dim=2, value_dim=2, u=u)
    >>> o1, state = step(state, r[:, :1], k[:, :1], v[:, :1], w=w[:, :1])
    >>> o2, state = step(state, r[:, 1:], k[:, 1:], v[:, 1:], w=w[:, 1:])
    >>> bool(np.allclose(np.concatenate([o1, o2], axis=1), rwkv6(r, k, v, w, u)))
    True
    """

    S: Any
    u: Any
    scale: float

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, u: Any, dtype: Any = None,
                xp: Any = None, device: Any = None, scale: float | None = None) -> RWKV6State:
        """The state before any token: S = 0.

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim : int
            B, Hkv, Dk, Dv.
        u : array, shape (Hkv, Dk)
            The bonus.
        dtype, xp, device
            As in :meth:`linattn.gated.SimpleGLAState.initial`.
        scale : float, optional
            Default 1/sqrt(Dk).

        Returns
        -------
        RWKV6State
        """
        sizes = _sizes(batch=batch, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
        ns, dtype, device = _allocator(xp, dtype, device)
        S = ns.zeros((sizes["batch"], sizes["kv_heads"], sizes["key_dim"], sizes["value_dim"]), dtype=dtype,
                     device=device)
        return cls.from_final_state(S, u=u, scale=scale)

    @classmethod
    def from_final_state(cls, final_state: Any, *, u: Any, scale: float | None = None) -> RWKV6State:
        """Continue from the ``final_state`` (B, Hkv, Dk, Dv) of :func:`rwkv6`.

        Parameters
        ----------
        final_state : array, shape (B, Hkv, Dk, Dv)
        u : array, shape (Hkv, Dk)
        scale : float, optional

        Returns
        -------
        RWKV6State
        """
        xp = _checks.namespace_of(final_state=final_state, u=u)
        _checks.require_floating("final_state", final_state, xp)
        if final_state.ndim != 4 or compute_dtype(xp, final_state.dtype) != final_state.dtype:
            raise ValueError(f"final_state must be a float32 or float64 array (B, Hkv, Dk, Dv), got shape "
                             f"{tuple(final_state.shape)} and dtype {final_state.dtype}")
        _, hkv, dk, _ = (int(n) for n in final_state.shape)
        _gated.check_shape("u", u, (hkv, dk), xp, f"the state's (Hkv, Dk) = {(hkv, dk)}")
        return cls(final_state, u, _checks.check_scale(scale, dk))

    @property
    def final_state(self) -> Any:
        """S (B, Hkv, Dk, Dv)."""
        return self.S

    def _step(self, r: Any, k: Any, v: Any, layout: str, w: Any = None) -> tuple[Any, RWKV6State]:
        if w is None:
            raise TypeError("an rwkv6 step needs w=..., the log-decays of the new tokens (B, n, Hkv, Dk)")
        B, Hkv, Dk, Dv = (int(n) for n in self.S.shape)
        tokens = _tokens(r, k, v, layout, like=self.S, batch=B, kv_heads=Hkv, value_dim=Dv, key_dim=Dk)
        o, S = rwkv6(r, k, v, w, self.u, scale=self.scale, initial_state=self.S, output_final_state=True,
                     chunk_size=_gated.step_chunk(tokens.n), layout=layout)
        return o, replace(self, S=S)


register_state("rwkv6", RWKV6State)


def _compare_run(q: Any, k: Any, v: Any, causal: bool, form: str = "chunked") -> Any:
    _gated.causal_only("rwkv6", causal)
    _, _, H, D = q.shape
    w = _gated.cycling(tuple(q.shape), _gated.COMPARE_LOG_DECAYS, q)
    u = _gated.cycling((H, D), (1 / 2, -1 / 4, 1.0), q)
    return rwkv6(q, k, v, w, u, form=form)


register_method("rwkv6", _compare_run,
                description="RWKV-6: fixed log-decays per key channel, fixed bonus u, exclusive readout, chunked",
                reference=lambda q, k, v, causal: _compare_run(q, k, v, causal, form="recurrent"),
                supports_noncausal=False)
