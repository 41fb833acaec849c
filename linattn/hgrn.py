r"""HGRN (Qin et al., 2023): an elementwise gated recurrence, one state per channel.

For each batch element and channel d, with the log-decay g_{t,d} ≤ 0,

.. math::

    h_t = e^{g_t} \odot h_{t-1} + x_t, \qquad o_t = h_t ,

exactly flash-linear-attention's ``naive_recurrent_hgrn`` / ``fused_recurrent_hgrn``:
the input is added as it comes, and the (1 − e^{g_t}) factor of the HGRN paper (and of
FLA's layer, x = silu(i) ⊙ (1 − e^g)) is the caller's. It is the causal scan of
:mod:`linattn.scan` with one key dim of ones and the channels as values:
q_t = k_t = 1, v_t = x_t and the value gate g, so that S_t ∈ R^{1×D} is h_tᵀ. The scan
runs the parallel and recurrent forms; the chunked form has its own code
(:mod:`linattn._hgrn_chunked`): with a state of one vector per sequence, it computes every sub-block
of every chunk at once and carries only that vector, where the scan goes chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import array_api_compat

from linattn import _checks, _gated, _hgrn_chunked
from linattn._problem import compute_dtype
from linattn.backends import resolve_backend
from linattn.compare import register_method
from linattn.decoding import _allocator, _sizes, register_state

__all__ = ["HGRNGradients", "HGRNState", "hgrn", "hgrn_vjp"]


class HGRNGradients(NamedTuple):
    """Gradients of :func:`hgrn`; dinitial_state is None without an initial state."""

    dx: Any
    dg: Any
    dinitial_state: Any


@dataclass(frozen=True)
class _Problem:
    xp: Any
    offsets: tuple[int, ...] | None
    ones: Any  # (1, T, 1): q and k of the scan
    x: Any  # (B, T, D)
    g: Any
    state: Any  # (N, 1, D) or None
    form: str
    chunk_size: int
    backend: Any


def _prepare(x, g, *, initial_state, cu_seqlens, form, chunk_size, backend) -> _Problem:
    xp = _checks.namespace_of(x=x, g=g, initial_state=initial_state)
    chosen = resolve_backend(backend, xp)
    chunk_size = _gated.check_form(form, chunk_size)
    _checks.require_floating("x", x, xp)
    if x.ndim != 3 or x.shape[-1] < 1:
        raise ValueError(f"x must be 3-D (B, T, D) with D >= 1 (HGRN has no heads), got shape {tuple(x.shape)}")
    batch, T, D = (int(n) for n in x.shape)
    _gated.check_log_decay("g", g, (batch, T, D), xp, f"x {tuple(x.shape)}")
    offsets = _gated.offsets(cu_seqlens, batch, T)
    dtype = compute_dtype(xp, x.dtype)
    state = None
    if initial_state is not None:
        _gated.check_state("initial_state", initial_state, (_gated.n_states(offsets, batch), D), xp, "(N, D)")
        state = xp.expand_dims(xp.astype(initial_state, dtype, copy=False), axis=1)
    ones = xp.ones((1, T, 1), dtype=dtype, device=array_api_compat.device(x))
    return _Problem(xp, offsets, ones, xp.astype(x, dtype, copy=False), xp.astype(g, dtype, copy=False), state, form,
                    chunk_size, chosen)


def _run(p: _Problem) -> tuple[Any, Any]:
    """The outputs (B, T, D) and final states (N, 1, D): the chunked form per sequence, or the scan.

    The scan (with q = k = 1) runs the other forms, and the chunked form wherever the
    backend has a kernel for it.
    """
    if p.form != "chunked" or p.backend.kernel("causal_scan") is not None or p.x.shape[1] == 0:
        return _gated.scan(p.ones, p.ones, p.x, gk=None, gv=p.g, initial_state=p.state, offsets=p.offsets,
                           form=p.form, chunk_size=p.chunk_size, backend=p.backend)

    def run(seg: list[Any], states: list[Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        x, g = seg
        h0 = None if states[0] is None else states[0][:, 0, :]
        if x.shape[1] == 0:  # an empty sequence of cu_seqlens keeps its state
            zero = xp.zeros((x.shape[0], 1, x.shape[2]), dtype=x.dtype, device=array_api_compat.device(x))
            return (x,), (zero if h0 is None else states[0],)
        o, final = _hgrn_chunked.chunked(xp, x, g, h0, p.chunk_size)
        return (o,), (xp.expand_dims(final, axis=1),)

    xp = p.xp
    (o,), (final,) = _gated.map_sequences(run, p.offsets, (p.x, p.g), (p.state,))
    return o, final


def hgrn(x: Any, g: Any, *, initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
         form: str = "chunked", chunk_size: int = 64, backend: str | None = None) -> Any:
    r"""The HGRN recurrence h_t = e^{g_t} ⊙ h_{t−1} + x_t, o_t = h_t (FLA's ``fused_recurrent_hgrn``).

    .. math::

        o_t = \sum_{r \le t} e^{G_t - G_r} \odot x_r + e^{G_t} \odot h_{-1}, \qquad
        G_t = \sum_{r \le t} g_r ,

    elementwise over the D channels, h_{−1} = ``initial_state`` (zeros when None).

    Parameters
    ----------
    x : array, shape (B, T, D)
        The inputs (no heads, so no ``layout``).
    g : array, shape (B, T, D)
        Log-decays, finite and <= 0 (FLA's layer: log σ(f), optionally lower-bounded).
    initial_state : array, shape (N, D), optional
        h_{−1} per sequence (N = B, or the sequences of ``cu_seqlens``).
    output_final_state : bool, default False
        Also return h after the last step, (N, D).
    cu_seqlens, form, chunk_size, backend
        As in :func:`linattn.gated.simple_gla`.

    Returns
    -------
    o : array, shape (B, T, D)
        In x's dtype.
    final_state : array, shape (N, D)
        Only with ``output_final_state=True``, in the compute dtype.

    Raises
    ------
    TypeError, ValueError
        x not 3-D, g of another shape (both shapes named), g > 0 or not finite, bad
        ``cu_seqlens``, form or state.

    Notes
    -----
    - Same recurrence as FLA's ``naive_recurrent_hgrn`` (x added as is); the HGRN paper
      writes h_t = λ_t ⊙ h_{t−1} + (1 − λ_t) ⊙ c_t: pass x = (1 − e^{g}) ⊙ c.
    - FLA's chunk kernel scans each chunk elementwise; linattn's chunked form factors the
      decays of each sub-block of a chunk (16 steps in float32, 64 in float64, at most
      ``chunk_size``) and takes its outputs by a product with the lower triangle, all
      sub-blocks at once, then carries the state between sub-blocks and chunks (on the
      CuPy backend, the scan's kernel). All three forms agree to rounding, in float64 for
      float64 inputs.
    - Positive g raises ValueError (FLA does not check); any ``chunk_size``.

    References
    ----------
    Z. Qin, S. Yang, Y. Zhong. "Hierarchically Gated Recurrent Neural Network for
    Sequence Modeling." NeurIPS 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.hgrn import hgrn
    >>> rng = np.random.default_rng(0)
    >>> x, g = rng.standard_normal((2, 6, 3)), -rng.random((2, 6, 3))
    >>> h, expected = np.zeros((2, 3)), []
    >>> for t in range(6):
    ...     h = np.exp(g[:, t]) * h + x[:, t]
    ...     expected.append(h)
    >>> bool(np.allclose(hgrn(x, g, chunk_size=4), np.stack(expected, axis=1)))
    True
    """
    p = _prepare(x, g, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form, chunk_size=chunk_size,
                 backend=backend)
    _checks.check_bool("output_final_state", output_final_state)
    o, final = _run(p)
    o = p.xp.astype(o, x.dtype, copy=False)
    return (o, final[:, 0, :]) if output_final_state else o


def hgrn_vjp(x: Any, g: Any, do: Any, *, initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None,
             form: str = "chunked", chunk_size: int = 64, backend: str | None = None) -> HGRNGradients:
    r"""Gradients of :func:`hgrn`: the scan's dv and dgv (value gate) and its dS_{−1}.

    .. math::

        dx_r = \sum_{t \ge r} e^{G_t - G_r} \odot do_t\ (+\ e^{G_{T-1} - G_r} \odot dh_{T-1}),
        \qquad dg_t = \sum_{t' \ge t} \big(o_{t'} \odot do_{t'} - x_{t'} \odot dx_{t'}\big)

    (the second with the final-state term at t' = T − 1, see :func:`linattn.causal_scan_vjp`).

    Parameters
    ----------
    x, g, initial_state, cu_seqlens, form, chunk_size, backend
        As in :func:`hgrn`.
    do : array, shape (B, T, D)
        Cotangent of o.
    dfinal_state : array, shape (N, D), optional

    Returns
    -------
    HGRNGradients
        (dx, dg, dinitial_state).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.hgrn import hgrn, hgrn_vjp
    >>> rng = np.random.default_rng(0)
    >>> x, do, g = rng.standard_normal((1, 5, 2)), rng.standard_normal((1, 5, 2)), -rng.random((1, 5, 2))
    >>> e = np.zeros_like(g); e[0, 3, 1] = 1e-6
    >>> fd = ((hgrn(x, g + e) - hgrn(x, g - e)) * do).sum() / 2e-6
    >>> bool(np.isclose(hgrn_vjp(x, g, do).dg[0, 3, 1], fd))
    True
    """
    p = _prepare(x, g, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form, chunk_size=chunk_size,
                 backend=backend)
    xp = p.xp
    _gated.check_shape("do", do, tuple(x.shape), xp, f"the output, x {tuple(x.shape)}")
    ds = None
    if dfinal_state is not None:
        _gated.check_state("dfinal_state", dfinal_state, (_gated.n_states(p.offsets, int(x.shape[0])),
                                                          int(x.shape[2])), xp, "(N, D)")
        ds = xp.expand_dims(xp.astype(dfinal_state, p.x.dtype, copy=False), axis=1)
    grads = _gated.scan_vjp(p.ones, p.ones, p.x, xp.astype(do, p.x.dtype, copy=False), gk=None, gv=p.g,
                            initial_state=p.state, dfinal_state=ds, offsets=p.offsets, form=p.form,
                            chunk_size=p.chunk_size, backend=p.backend)
    return HGRNGradients(
        dx=xp.astype(grads.dv, x.dtype, copy=False),
        dg=xp.astype(grads.dgv, g.dtype, copy=False),
        dinitial_state=None if initial_state is None else xp.astype(grads.dinitial_state[:, 0, :],
                                                                    initial_state.dtype, copy=False),
    )


@dataclass(frozen=True, eq=False)
class HGRNState:
    r"""Decoding state of :func:`hgrn`: h (B, D).

    ``step(state, None, None, x, g=g)`` with x and g of shape (B, n, D): x goes where
    :func:`linattn.decoding.step` takes v, the role the scan gives it (its q and k are
    ones, so step takes None for them).

    Attributes
    ----------
    h : array, shape (B, D)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import init_state, step
    >>> from linattn.hgrn import hgrn
    >>> rng = np.random.default_rng(0)
    >>> x, g = rng.standard_normal((1, 3, 2)), -rng.random((1, 3, 2))
    >>> state = init_state("hgrn", batch=1, dim=2)
    >>> outs = []
    >>> for t in range(3):
    ...     o, state = step(state, None, None, x[:, t:t + 1], g=g[:, t:t + 1])
    ...     outs.append(o)
    >>> bool(np.allclose(np.concatenate(outs, axis=1), hgrn(x, g)))
    True
    """

    h: Any

    @classmethod
    def initial(cls, *, batch: int, dim: int, dtype: Any = None, xp: Any = None, device: Any = None) -> HGRNState:
        """The state before any token: h = 0.

        Parameters
        ----------
        batch, dim : int
            B and D.
        dtype, xp, device
            As in :meth:`linattn.gated.SimpleGLAState.initial`.

        Returns
        -------
        HGRNState
        """
        sizes = _sizes(batch=batch, dim=dim)
        ns, dtype, device = _allocator(xp, dtype, device)
        return cls.from_final_state(ns.zeros((sizes["batch"], sizes["dim"]), dtype=dtype, device=device))

    @classmethod
    def from_final_state(cls, final_state: Any) -> HGRNState:
        """Continue from the ``final_state`` (B, D) of :func:`hgrn`.

        Parameters
        ----------
        final_state : array, shape (B, D)
            float32 or float64.

        Returns
        -------
        HGRNState
        """
        xp = _checks.namespace_of(final_state=final_state)
        _checks.require_floating("final_state", final_state, xp)
        if final_state.ndim != 2 or compute_dtype(xp, final_state.dtype) != final_state.dtype:
            raise ValueError(f"final_state must be a float32 or float64 array (B, D), got shape "
                             f"{tuple(final_state.shape)} and dtype {final_state.dtype}")
        return cls(final_state)

    @property
    def final_state(self) -> Any:
        """The state h (B, D)."""
        return self.h

    def _step(self, q: Any, k: Any, v: Any, layout: str, g: Any = None) -> tuple[Any, HGRNState]:
        if q is not None or k is not None or v is None:
            raise TypeError("an hgrn step takes its input as v: step(state, None, None, x, g=g)")
        if g is None:
            raise TypeError("an hgrn step needs g=..., the log-decays of the new tokens (B, n, D)")
        _checks.check_layout(layout)
        xp = _checks.namespace_of(x=v, state=self.h)
        _checks.require_floating("x", v, xp)
        _gated.token_dtype(xp, v, self.h, "hgrn")
        n = int(v.shape[1]) if v.ndim == 3 else 1
        o, h = hgrn(v, g, initial_state=self.h, output_final_state=True, chunk_size=_gated.step_chunk(n))
        return o, replace(self, h=h)


register_state("hgrn", HGRNState)


def _compare_run(q: Any, k: Any, v: Any, causal: bool, form: str = "chunked") -> Any:
    """HGRN on v's channels, all heads side by side: x (B, T, H·D)."""
    _gated.causal_only("hgrn", causal)
    B, T, H, D = v.shape
    x = v.reshape(B, T, H * D)
    return hgrn(x, _gated.cycling((B, T, H * D), _gated.COMPARE_LOG_DECAYS, v), form=form)


register_method("hgrn", _compare_run,
                description="HGRN: h = e^g h + x on the H*D channels of v, fixed log-decays, chunked scan",
                reference=lambda q, k, v, causal: _compare_run(q, k, v, causal, form="recurrent"),
                supports_noncausal=False)
