r"""Gated linear attention with a decay per step or per key: simple GLA, RetNet, GLA.

Each is the causal scan of :mod:`linattn.scan` with log-space gates and an inclusive
readout (o_t reads S_t, which holds k_t v_tᵀ), per batch element and key/value head:

.. math::

    \text{simple GLA, RetNet:}\quad S_t = e^{g_t} S_{t-1} + k_t v_t^\top, \qquad
    \text{GLA:}\quad S_t = \big(e^{g^k_t} (e^{g^v_t})^\top\big) \odot S_{t-1} + k_t v_t^\top,

    o_t = s\, S_t^\top q_t ,

with g_t a scalar per (batch, step, head) (or ``g_gamma``, a constant per head:
RetNet), g^k_t a vector over the key dim and g^v_t an optional one over the value dim,
every log-decay ≤ 0. The argument names, shapes and conventions are
flash-linear-attention's (``chunk_simple_gla``, ``chunk_retention``,
``fused_recurrent_gla``); each function's Notes list where linattn differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from linattn import _checks, _gated
from linattn._problem import compute_dtype, from_grouped
from linattn.compare import register_method
from linattn.decoding import _allocator, _sizes, _tokens, register_state

__all__ = [
    "GLAGradients",
    "GLAState",
    "RetentionState",
    "SimpleGLAGradients",
    "SimpleGLAState",
    "gla",
    "gla_vjp",
    "retention",
    "retention_log_decays",
    "retention_vjp",
    "simple_gla",
    "simple_gla_vjp",
]


class SimpleGLAGradients(NamedTuple):
    """Gradients of :func:`simple_gla` (and :func:`retention`); None where the input was None."""

    dq: Any
    dk: Any
    dv: Any
    dg: Any
    dg_gamma: Any
    dinitial_state: Any


class GLAGradients(NamedTuple):
    """Gradients of :func:`gla`; None where the input was None."""

    dq: Any
    dk: Any
    dv: Any
    dgk: Any
    dgv: Any
    dinitial_state: Any


def _against(p: _gated.QKVProblem, q: Any, k: Any) -> str:
    return f"q {tuple(q.shape)} and k {tuple(k.shape)} (layout={p.layout!r})"


def _simple_gates(p: _gated.QKVProblem, q: Any, k: Any, g: Any, g_gamma: Any) -> _gated.QKVProblem:
    """Check g (B, T, Hkv) or g_gamma (Hkv,) and attach them as a per-step key gate."""
    xp = p.xp
    if g is not None and g_gamma is not None:
        raise ValueError("pass at most one of g (a log-decay per step) and g_gamma (a constant per head), got both")
    if g is not None:
        _gated.check_log_decay("g", g, p.gate_shape(None), xp, _against(p, q, k))
        return replace(p, gk=p.grouped_gate(g, per_step=True))
    if g_gamma is not None:
        _gated.check_log_decay("g_gamma", g_gamma, (p.shapes.kv_heads,), xp, _against(p, q, k))
        column = xp.reshape(xp.astype(g_gamma, p.q.dtype, copy=False), (1, p.shapes.kv_heads, 1, 1, 1))
        return replace(p, gk=xp.broadcast_to(column, (1, p.shapes.kv_heads, 1, p.shapes.q_len, 1)))
    return p


def _forward(p: _gated.QKVProblem, output_final_state: bool, dtype: Any) -> Any:
    o, final = _gated.scan(p.q, p.k, p.v, gk=p.gk, gv=p.gv, initial_state=p.state, offsets=p.offsets, form=p.form,
                           chunk_size=p.chunk_size, backend=p.backend)
    o = p.output(o, dtype)
    return (o, final[:, :, 0, ...]) if output_final_state else o


def _backward(p: _gated.QKVProblem, do: Any, dfinal_state: Any) -> Any:
    """The scan's VJP on the grouped problem; returns ScanGradients (dq already times the scale)."""
    do5, ds = _gated.qkv_cotangents(p, do, dfinal_state)
    g = _gated.scan_vjp(p.q, p.k, p.v, do5, gk=p.gk, gv=p.gv, initial_state=p.state, dfinal_state=ds,
                        offsets=p.offsets, form=p.form, chunk_size=p.chunk_size, backend=p.backend)
    return replace(g, dq=g.dq * p.scale)


def _state_gradient(p: _gated.QKVProblem, g: Any, initial_state: Any) -> Any:
    if initial_state is None:
        return None
    return p.xp.astype(g.dinitial_state[:, :, 0, ...], initial_state.dtype, copy=False)


def _grouped_gate_gradient(p: _gated.QKVProblem, dg: Any, like: Any, per_step: bool) -> Any:
    """Grouped (B, Hkv, 1, T, D|1) -> the gate's own shape, layout and dtype."""
    out = from_grouped(p.xp, dg, p.layout)
    if per_step:
        out = out[..., 0]
    return p.xp.astype(out, like.dtype, copy=False)


# ---------------------------------------------------------------------------------------
# simple GLA and RetNet
# ---------------------------------------------------------------------------------------


def simple_gla(
    q: Any,
    k: Any,
    v: Any,
    g: Any = None,
    *,
    g_gamma: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    cu_seqlens: Any = None,
    form: str = "chunked",
    chunk_size: int = 64,
    layout: str = "bthd",
    backend: str | None = None,
) -> Any:
    r"""Simple gated linear attention: a scalar log-decay per head and step (FLA's ``chunk_simple_gla``).

    .. math::

        S_t = e^{g_t} S_{t-1} + k_t v_t^\top, \qquad o_t = s\, S_t^\top q_t
        = s \sum_{r \le t} e^{G_t - G_r} (q_t \cdot k_r)\, v_r + s\, e^{G_t} S_{-1}^\top q_t ,

    with G_t = Σ_{r≤t} g_r, S_{−1} = ``initial_state`` (zeros when None), per batch
    element and key/value head. With ``g_gamma`` the decay is the constant e^{γ_h} of
    head h (g_t = γ_h); with neither, there is no decay (linear attention, unnormalised).

    Parameters
    ----------
    q : array, shape (B, T, Hq, Dk)
        Queries (``(B, Hq, T, Dk)`` with ``layout="bhtd"``); Hq a multiple of Hkv.
    k : array, shape (B, T, Hkv, Dk)
    v : array, shape (B, T, Hkv, Dv)
    g : array, shape (B, T, Hkv), optional
        Log-decays, finite and <= 0 (``(B, Hkv, T)`` with ``layout="bhtd"``).
    g_gamma : array, shape (Hkv,), optional
        A constant log-decay per head, finite and <= 0. At most one of g and g_gamma.
    scale : float, optional
        s; default 1/sqrt(Dk).
    initial_state : array, shape (N, Hkv, Dk, Dv), optional
        S_{−1}, one per sequence: N = B, or the number of sequences under ``cu_seqlens``.
    output_final_state : bool, default False
        Also return the state after the last step, (N, Hkv, Dk, Dv).
    cu_seqlens : array or sequence of int, optional
        N+1 offsets of sequences packed in a batch of one; each runs alone with its state.
    form : {"chunked", "parallel", "recurrent"}, default "chunked"
        The algorithm of :func:`linattn.causal_scan`; all three agree to rounding.
    chunk_size : int, default 64
        Steps per chunk of the chunked form (any value >= 1, any T).
    layout : {"bthd", "bhtd"}, default "bthd"
    backend : str, optional
        A registered backend; None follows the inputs.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
        In q's layout and dtype.
    final_state : array, shape (N, Hkv, Dk, Dv)
        Only with ``output_final_state=True``; in the compute dtype (float32 for float16
        and bfloat16 inputs).

    Raises
    ------
    TypeError, ValueError
        Bad shapes or dtypes (a gate's error names its shape and q's and k's), both g and
        g_gamma, a log-decay > 0 or not finite, T != S, bad ``cu_seqlens``, form or state.

    Notes
    -----
    Differences from flash-linear-attention's ``chunk_simple_gla`` (same definition,
    inclusive readout, scale default and state layout (N, H, K, V)):

    - grouped-query heads: FLA needs Hq = Hkv; here query head h reads key/value head
      h // (Hq/Hkv), and g and the state are per key/value head;
    - a log-decay > 0 (a growing state) raises ValueError; FLA does not check;
    - any ``chunk_size`` >= 1 (FLA: a power of 2), and three forms that agree to
      rounding: ``chunked`` (FLA's chunk), ``recurrent`` (fused_recurrent),
      ``parallel`` (parallel); float64 inputs compute in float64;
    - states stay in the compute dtype (FLA's chunk forward stores per-chunk states in
      bf16/fp16); the final state is float64 for float64 inputs, float32 otherwise;
    - no ``reverse``, ``state_v_first``, ``head_first`` (use ``layout="bhtd"``).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.gated import simple_gla
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 10, 2, 4)) for _ in range(3))
    >>> g = -rng.random((1, 10, 2))
    >>> o = simple_gla(q, k, v, g, chunk_size=4)
    >>> bool(np.allclose(o, simple_gla(q, k, v, g, form="recurrent")))
    True
    """
    p = _gated.prepare_qkv(q, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                 chunk_size=chunk_size, layout=layout, backend=backend)
    _checks.check_bool("output_final_state", output_final_state)
    return _forward(_simple_gates(p, q, k, g, g_gamma), output_final_state, q.dtype)


def simple_gla_vjp(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    do: Any,
    *,
    g_gamma: Any = None,
    scale: float | None = None,
    initial_state: Any = None,
    dfinal_state: Any = None,
    cu_seqlens: Any = None,
    form: str = "chunked",
    chunk_size: int = 64,
    layout: str = "bthd",
    backend: str | None = None,
) -> SimpleGLAGradients:
    r"""Gradients of :func:`simple_gla` for every input, by :func:`linattn.causal_scan_vjp`.

    The scan runs on (s·q, k, v) with the per-step key gate g, so dq = s·dq_scan and
    dk, dv, dg, dS_{−1} are the scan's; for ``g_gamma`` (the same gate at every step)
    dγ_h = Σ_{b,t} dg_{b,t,h}.

    Parameters
    ----------
    q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`simple_gla` (g may be None).
    do : array, shape (B, T, Hq, Dv)
        Cotangent of o.
    dfinal_state : array, shape (N, Hkv, Dk, Dv), optional
        Cotangent of the final state.

    Returns
    -------
    SimpleGLAGradients
        (dq, dk, dv, dg, dg_gamma, dinitial_state), each shaped like its input and in its
        dtype; None for an input that was None.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.gated import simple_gla, simple_gla_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 5, 1, 3)) for _ in range(4))
    >>> g = -rng.random((1, 5, 1))
    >>> grads = simple_gla_vjp(q, k, v, g, do)
    >>> e = np.zeros_like(g); e[0, 2, 0] = 1e-6
    >>> fd = ((simple_gla(q, k, v, g + e) - simple_gla(q, k, v, g - e)) * do).sum() / 2e-6
    >>> bool(np.isclose(grads.dg[0, 2, 0], fd))
    True
    """
    p = _gated.prepare_qkv(q, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                 chunk_size=chunk_size, layout=layout, backend=backend)
    p = _simple_gates(p, q, k, g, g_gamma)
    grads = _backward(p, do, dfinal_state)
    dg = dg_gamma = None
    if g is not None:
        dg = _grouped_gate_gradient(p, grads.dgk, g, per_step=True)
    elif g_gamma is not None:
        dg_gamma = p.xp.astype(p.xp.reshape(p.xp.sum(grads.dgk, axis=(0, 2, 3, 4)), g_gamma.shape), g_gamma.dtype)
    return SimpleGLAGradients(p.output(grads.dq, q.dtype), p.output(grads.dk, k.dtype), p.output(grads.dv, v.dtype),
                              dg, dg_gamma, _state_gradient(p, grads, initial_state))


def retention_log_decays(heads: int, *, xp: Any = None, dtype: Any = None) -> Any:
    r"""RetNet's decays in log space: γ_h = log(1 − 2^{−5−h}), h = 0 … H−1.

    Parameters
    ----------
    heads : int
        H.
    xp : module, optional
        The array library (NumPy by default).
    dtype : dtype, optional
        Default float64.

    Returns
    -------
    array, shape (H,)

    Examples
    --------
    >>> from linattn.gated import retention_log_decays
    >>> [round(float(x), 4) for x in retention_log_decays(3)]
    [-0.0317, -0.0157, -0.0078]
    """
    heads = _checks.check_positive_int("heads", heads)
    ns, dtype, device = _allocator(xp, dtype, None)
    values = [math.log1p(-(2.0 ** (-5 - h))) for h in range(heads)]
    return ns.asarray(values, dtype=dtype, device=device)


def _retention_gamma(q: Any, k: Any, layout: Any, g_gamma: Any) -> Any:
    if g_gamma is not None:
        return g_gamma
    xp = _checks.namespace_of(q=q, k=k)
    if k.ndim != 4 or layout not in _checks.LAYOUTS or not xp.isdtype(q.dtype, "real floating"):
        return None  # simple_gla reports what is wrong
    heads = int(k.shape[2] if layout == "bthd" else k.shape[1])
    return retention_log_decays(heads, xp=xp, dtype=compute_dtype(xp, q.dtype)) if heads > 0 else None


def retention(q: Any, k: Any, v: Any, *, g_gamma: Any = None, scale: float | None = None, initial_state: Any = None,
              output_final_state: bool = False, cu_seqlens: Any = None, form: str = "chunked", chunk_size: int = 64,
              layout: str = "bthd", backend: str | None = None) -> Any:
    r"""Retention (RetNet, Sun et al., 2023): simple GLA with a fixed decay per head.

    .. math::

        S_t = \gamma_h S_{t-1} + k_t v_t^\top, \quad o_t = s\, S_t^\top q_t
        \quad\Longleftrightarrow\quad
        O = s\,\big((Q K^\top) \odot D\big) V, \quad D_{ts} = \gamma_h^{t-s} [s \le t],

    with log γ_h = ``g_gamma[h]``, by default log(1 − 2^{−5−h}) for key/value head h
    (:func:`retention_log_decays`): the multi-scale decays of the paper.

    Parameters
    ----------
    q, k, v, scale, initial_state, output_final_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`simple_gla`.
    g_gamma : array, shape (Hkv,), optional
        log γ per key/value head; default the paper's.

    Returns
    -------
    o, final_state
        As in :func:`simple_gla`.

    Raises
    ------
    TypeError, ValueError
        As :func:`simple_gla`.

    Notes
    -----
    FLA's ``chunk_retention`` computes the same (scale default 1/sqrt(Dk), which is the
    paper's scaling of k). The decays count key/value heads (FLA: all heads, which are
    equal there) and may be overridden. RetNet's group norm, swish gate and xPos rotation
    belong to the layer, not to this function, as in FLA.

    References
    ----------
    Y. Sun et al. "Retentive Network: A Successor to Transformer for Large Language
    Models." 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.gated import retention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 6, 1, 2)) for _ in range(3))
    >>> gamma = 1 - 2.0 ** -5
    >>> D = np.tril(gamma ** np.subtract.outer(np.arange(6), np.arange(6)))
    >>> o_def = ((q[0, :, 0] @ k[0, :, 0].T) * D) @ v[0, :, 0] / np.sqrt(2)
    >>> bool(np.allclose(retention(q, k, v)[0, :, 0], o_def))
    True
    """
    return simple_gla(q, k, v, g_gamma=_retention_gamma(q, k, layout, g_gamma), scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      form=form, chunk_size=chunk_size, layout=layout, backend=backend)


def retention_vjp(q: Any, k: Any, v: Any, do: Any, *, g_gamma: Any = None, scale: float | None = None,
                  initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None, form: str = "chunked",
                  chunk_size: int = 64, layout: str = "bthd", backend: str | None = None) -> SimpleGLAGradients:
    """Gradients of :func:`retention` (see :func:`simple_gla_vjp`); dg_gamma only when g_gamma is given.

    Parameters
    ----------
    q, k, v, do, g_gamma, scale, initial_state, dfinal_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`simple_gla_vjp`.

    Returns
    -------
    SimpleGLAGradients
        dg is None; dg_gamma is None unless ``g_gamma`` was given.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn import retention_vjp
    >>> q, k, v, do = (np.random.default_rng(0).standard_normal((1, 5, 2, 3)) for _ in range(4))
    >>> grads = retention_vjp(q, k, v, do)
    >>> grads.dq.shape, grads.dg_gamma is None
    ((1, 5, 2, 3), True)
    """
    grads = simple_gla_vjp(q, k, v, None, do, g_gamma=_retention_gamma(q, k, layout, g_gamma), scale=scale,
                           initial_state=initial_state, dfinal_state=dfinal_state, cu_seqlens=cu_seqlens, form=form,
                           chunk_size=chunk_size, layout=layout, backend=backend)
    return grads if g_gamma is not None else grads._replace(dg_gamma=None)


# ---------------------------------------------------------------------------------------
# GLA
# ---------------------------------------------------------------------------------------


def _gla_gates(p: _gated.QKVProblem, q: Any, k: Any, v: Any, gk: Any, gv: Any) -> _gated.QKVProblem:
    if gk is not None:
        _gated.check_log_decay("gk", gk, p.gate_shape(p.shapes.key_dim), p.xp, _against(p, q, k))
        p = replace(p, gk=p.grouped_gate(gk, per_step=False))
    if gv is not None:
        against = f"q {tuple(q.shape)} and v {tuple(v.shape)} (layout={p.layout!r})"
        _gated.check_log_decay("gv", gv, p.gate_shape(p.shapes.value_dim), p.xp, against)
        p = replace(p, gv=p.grouped_gate(gv, per_step=False))
    return p


def gla(q: Any, k: Any, v: Any, gk: Any, *, gv: Any = None, scale: float | None = None, initial_state: Any = None,
        output_final_state: bool = False, cu_seqlens: Any = None, form: str = "chunked", chunk_size: int = 64,
        layout: str = "bthd", backend: str | None = None) -> Any:
    r"""Gated linear attention (Yang et al., 2024): a log-decay per key channel, optionally per value channel.

    .. math::

        S_t = \big(e^{g^k_t} (e^{g^v_t})^\top\big) \odot S_{t-1} + k_t v_t^\top
            = \operatorname{Diag}(e^{g^k_t})\, S_{t-1} \operatorname{Diag}(e^{g^v_t}) + k_t v_t^\top,
        \qquad o_t = s\, S_t^\top q_t ,

    so o_t = s Σ_{r≤t} Σ_d q_{t,d} e^{G^k_{t,d} − G^k_{r,d}} k_{r,d} (e^{G^v_t − G^v_r} ⊙ v_r)
    (plus the decayed initial state), with G the cumulative log-decays.

    Parameters
    ----------
    q, k, v, scale, initial_state, output_final_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`simple_gla`.
    gk : array, shape (B, T, Hkv, Dk), or None
        Log-decays over the key dim, finite and <= 0 (``(B, Hkv, T, Dk)`` for "bhtd").
    gv : array, shape (B, T, Hkv, Dv), optional
        Log-decays over the value dim, finite and <= 0.

    Returns
    -------
    o, final_state
        As in :func:`simple_gla`.

    Raises
    ------
    TypeError, ValueError
        As :func:`simple_gla`.

    Notes
    -----
    Differences from flash-linear-attention: ``chunk_gla`` names the key gate ``g`` and
    has no ``gv``; ``fused_recurrent_gla(q, k, v, gk, gv)`` has both, with the same
    recurrence (decays first, then k vᵀ, then the inclusive readout); here every form
    takes both. FLA's ``naive_recurrent_gla`` always scales by 1/sqrt(Dk); ``scale`` here
    is that of ``chunk_gla``. The gate of the GLA paper, α_t = σ(x_t W)^{1/τ}, is
    computed by the layer; this function takes its logarithm. The other differences are
    those of :func:`simple_gla` (grouped-query heads, the check of positive log-decays,
    any chunk size, float64).

    References
    ----------
    S. Yang, B. Wang, Y. Shen, R. Panda, Y. Kim. "Gated Linear Attention Transformers
    with Hardware-Efficient Training." ICML 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.gated import gla
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 9, 2, 3)) for _ in range(3))
    >>> gk = -rng.random((2, 9, 2, 3))
    >>> o, S = gla(q, k, v, gk, output_final_state=True, chunk_size=4)
    >>> o.shape, S.shape
    ((2, 9, 2, 3), (2, 2, 3, 3))
    >>> bool(np.allclose(o, gla(q, k, v, gk, form="parallel")))
    True
    """
    p = _gated.prepare_qkv(q, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                 chunk_size=chunk_size, layout=layout, backend=backend)
    _checks.check_bool("output_final_state", output_final_state)
    return _forward(_gla_gates(p, q, k, v, gk, gv), output_final_state, q.dtype)


def gla_vjp(q: Any, k: Any, v: Any, gk: Any, do: Any, *, gv: Any = None, scale: float | None = None,
            initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None, form: str = "chunked",
            chunk_size: int = 64, layout: str = "bthd", backend: str | None = None) -> GLAGradients:
    r"""Gradients of :func:`gla` for every input, by :func:`linattn.causal_scan_vjp`.

    dq = s·dq_scan; dk, dv, dgk, dgv, dS_{−1} are the scan's (its gate gradients are the
    reverse cumulative sums of q⊙dq − k⊙dk and o⊙do − v⊙dv, see the scan's VJP).

    Parameters
    ----------
    q, k, v, gk, gv, scale, initial_state, cu_seqlens, form, chunk_size, layout, backend
        As in :func:`gla`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of o.
    dfinal_state : array, shape (N, Hkv, Dk, Dv), optional
        Cotangent of the final state.

    Returns
    -------
    GLAGradients
        (dq, dk, dv, dgk, dgv, dinitial_state); None for an input that was None.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.gated import gla_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 4, 1, 2)) for _ in range(4))
    >>> grads = gla_vjp(q, k, v, -rng.random((1, 4, 1, 2)), do)
    >>> grads.dgk.shape, grads.dgv
    ((1, 4, 1, 2), None)
    """
    p = _gated.prepare_qkv(q, k, v, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                 chunk_size=chunk_size, layout=layout, backend=backend)
    p = _gla_gates(p, q, k, v, gk, gv)
    grads = _backward(p, do, dfinal_state)
    dgk = None if gk is None else _grouped_gate_gradient(p, grads.dgk, gk, per_step=False)
    dgv = None if gv is None else _grouped_gate_gradient(p, grads.dgv, gv, per_step=False)
    return GLAGradients(p.output(grads.dq, q.dtype), p.output(grads.dk, k.dtype), p.output(grads.dv, v.dtype), dgk,
                        dgv, _state_gradient(p, grads, initial_state))


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def _state_sizes(S: Any, name: str = "final_state") -> tuple[Any, tuple[int, ...]]:
    xp = _checks.namespace_of(**{name: S})
    _checks.require_floating(name, S, xp)
    if S.ndim != 4:
        raise ValueError(f"{name} must have shape (B, Hkv, Dk, Dv), got {tuple(S.shape)}")
    if compute_dtype(xp, S.dtype) != S.dtype:
        raise TypeError(f"{name} must be float32 or float64 (states are kept in at least float32), got {S.dtype}")
    return xp, tuple(int(n) for n in S.shape)


def _zero_state(batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype: Any, xp: Any, device: Any) -> Any:
    """The zero state S (B, Hkv, Dk, Dv) of a decoding state before any token."""
    sizes = _sizes(batch=batch, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim)
    ns, dtype, device = _allocator(xp, dtype, device)
    return ns.zeros((sizes["batch"], sizes["kv_heads"], sizes["key_dim"], sizes["value_dim"]), dtype=dtype,
                    device=device)


@dataclass(frozen=True, eq=False)
class SimpleGLAState:
    r"""Decoding state of :func:`simple_gla`: S (B, Hkv, Dk, Dv), advanced by S_t = e^{g_t} S_{t−1} + k_t v_tᵀ.

    ``step(state, q, k, v, g=g)`` with g of shape (B, n, Hkv) (``(B, Hkv, n)`` for
    "bhtd"); a state made with ``g_gamma`` takes no g (its decay is fixed); with neither,
    no decay. ``final_state`` is S, exactly the ``final_state`` of ``simple_gla(...,
    output_final_state=True)`` and its ``initial_state``.

    Attributes
    ----------
    S : array, shape (B, Hkv, Dk, Dv)
    scale : float
    g_gamma : array, shape (Hkv,), or None

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import init_state, step
    >>> from linattn.gated import simple_gla
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 2, 3)) for _ in range(3))
    >>> g = -rng.random((1, 5, 2))
    >>> state = init_state("simple_gla", batch=1, kv_heads=2, key_dim=3, value_dim=3)
    >>> outs = []
    >>> for t in range(5):
    ...     o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g=g[:, t:t + 1])
    ...     outs.append(o)
    >>> bool(np.allclose(np.concatenate(outs, axis=1), simple_gla(q, k, v, g)))
    True
    """

    S: Any
    scale: float
    g_gamma: Any = None

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype: Any = None, xp: Any = None,
                device: Any = None, g_gamma: Any = None, scale: float | None = None) -> SimpleGLAState:
        """The state before any token: S = 0.

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim : int
            B, Hkv, Dk, Dv.
        dtype : dtype, optional
            The tokens' dtype (default float64); the state is float32 for half precision.
        xp : module, optional
            The array library (NumPy by default).
        device : optional
            Where the state lives.
        g_gamma : array, shape (Hkv,), optional
            A constant log-decay per head (then step takes no g).
        scale : float, optional
            Default 1/sqrt(Dk).

        Returns
        -------
        SimpleGLAState
        """
        S = _zero_state(batch, kv_heads, key_dim, value_dim, dtype, xp, device)
        return cls.from_final_state(S, g_gamma=g_gamma, scale=scale)

    @classmethod
    def from_final_state(cls, final_state: Any, *, g_gamma: Any = None, scale: float | None = None) -> SimpleGLAState:
        """Continue from the ``final_state`` (B, Hkv, Dk, Dv) of :func:`simple_gla`.

        Parameters
        ----------
        final_state : array, shape (B, Hkv, Dk, Dv)
            float32 or float64; used as is (nothing ever writes into it).
        g_gamma, scale
            The options of the forward that produced it.

        Returns
        -------
        SimpleGLAState
        """
        xp, (_, hkv, dk, _) = _state_sizes(final_state)
        if g_gamma is not None:
            _gated.check_log_decay("g_gamma", g_gamma, (hkv,), xp, f"the state's Hkv = {hkv}")
        return cls(final_state, _checks.check_scale(scale, dk), g_gamma)

    @property
    def final_state(self) -> Any:
        """S (B, Hkv, Dk, Dv): the form of ``simple_gla``'s states."""
        return self.S

    def _step(self, q: Any, k: Any, v: Any, layout: str, g: Any = None) -> tuple[Any, SimpleGLAState]:
        B, Hkv, Dk, Dv = (int(n) for n in self.S.shape)
        tokens = _tokens(q, k, v, layout, like=self.S, batch=B, kv_heads=Hkv, value_dim=Dv, key_dim=Dk)
        o, S = simple_gla(q, k, v, g, g_gamma=self.g_gamma, scale=self.scale, initial_state=self.S,
                          output_final_state=True, chunk_size=_gated.step_chunk(tokens.n), layout=layout)
        return o, replace(self, S=S)


@dataclass(frozen=True, eq=False)
class RetentionState(SimpleGLAState):
    """Decoding state of :func:`retention`: a :class:`SimpleGLAState` whose g_gamma defaults to RetNet's.

    ``step(state, q, k, v)`` takes no gate.

    Examples
    --------
    >>> from linattn.decoding import init_state
    >>> state = init_state("retention", batch=1, kv_heads=2, key_dim=4, value_dim=4)
    >>> [round(float(x), 4) for x in state.g_gamma]
    [-0.0317, -0.0157]
    """

    @classmethod
    def from_final_state(cls, final_state: Any, *, g_gamma: Any = None, scale: float | None = None) -> RetentionState:
        """Continue from the ``final_state`` of :func:`retention` (g_gamma default RetNet's).

        Parameters
        ----------
        final_state, g_gamma, scale
            As in :meth:`SimpleGLAState.from_final_state`.

        Returns
        -------
        RetentionState
        """
        xp, (_, hkv, _, _) = _state_sizes(final_state)
        if g_gamma is None:
            g_gamma = retention_log_decays(hkv, xp=xp, dtype=final_state.dtype)
        return super().from_final_state(final_state, g_gamma=g_gamma, scale=scale)

    def _step(self, q: Any, k: Any, v: Any, layout: str) -> tuple[Any, RetentionState]:
        return super()._step(q, k, v, layout)


@dataclass(frozen=True, eq=False)
class GLAState:
    r"""Decoding state of :func:`gla`: S (B, Hkv, Dk, Dv), advanced by (e^{gk} e^{gv}ᵀ) ⊙ S + k vᵀ.

    ``step(state, q, k, v, gk=gk, gv=gv)`` with gk (B, n, Hkv, Dk) and optionally gv
    (B, n, Hkv, Dv).

    Attributes
    ----------
    S : array, shape (B, Hkv, Dk, Dv)
    scale : float

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.decoding import step
    >>> from linattn.gated import GLAState, gla
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 6, 1, 2)) for _ in range(3))
    >>> gk = -rng.random((1, 6, 1, 2))
    >>> o4, S = gla(q[:, :4], k[:, :4], v[:, :4], gk[:, :4], output_final_state=True)  # a prompt
    >>> o2, state = step(GLAState.from_final_state(S), q[:, 4:], k[:, 4:], v[:, 4:], gk=gk[:, 4:])
    >>> bool(np.allclose(np.concatenate([o4, o2], axis=1), gla(q, k, v, gk)))
    True
    """

    S: Any
    scale: float

    @classmethod
    def initial(cls, *, batch: int, kv_heads: int, key_dim: int, value_dim: int, dtype: Any = None, xp: Any = None,
                device: Any = None, scale: float | None = None) -> GLAState:
        """The state before any token: S = 0 (arguments as :meth:`SimpleGLAState.initial`).

        Parameters
        ----------
        batch, kv_heads, key_dim, value_dim, dtype, xp, device, scale
            As in :meth:`SimpleGLAState.initial`.

        Returns
        -------
        GLAState
        """
        S = _zero_state(batch, kv_heads, key_dim, value_dim, dtype, xp, device)
        return cls.from_final_state(S, scale=scale)

    @classmethod
    def from_final_state(cls, final_state: Any, *, scale: float | None = None) -> GLAState:
        """Continue from the ``final_state`` (B, Hkv, Dk, Dv) of :func:`gla`.

        Parameters
        ----------
        final_state : array, shape (B, Hkv, Dk, Dv)
        scale : float, optional

        Returns
        -------
        GLAState
        """
        _, (_, _, dk, _) = _state_sizes(final_state)
        return cls(final_state, _checks.check_scale(scale, dk))

    @property
    def final_state(self) -> Any:
        """S (B, Hkv, Dk, Dv)."""
        return self.S

    def _step(self, q: Any, k: Any, v: Any, layout: str, gk: Any = None, gv: Any = None) -> tuple[Any, GLAState]:
        B, Hkv, Dk, Dv = (int(n) for n in self.S.shape)
        tokens = _tokens(q, k, v, layout, like=self.S, batch=B, kv_heads=Hkv, value_dim=Dv, key_dim=Dk)
        o, S = gla(q, k, v, gk, gv=gv, scale=self.scale, initial_state=self.S, output_final_state=True,
                   chunk_size=_gated.step_chunk(tokens.n), layout=layout)
        return o, replace(self, S=S)


register_state("simple_gla", SimpleGLAState)
register_state("retention", RetentionState)
register_state("gla", GLAState)


# ---------------------------------------------------------------------------------------
# linattn compare: fixed gates, the recurrent form in float64 as the reference
# ---------------------------------------------------------------------------------------


def _compare_g(q: Any) -> Any:
    B, T, H, _ = q.shape
    return _gated.cycling((B, T, H), _gated.COMPARE_LOG_DECAYS, q)


def _compare_gk(q: Any) -> Any:
    return _gated.cycling(tuple(q.shape), _gated.COMPARE_LOG_DECAYS, q)


def _compare(name: str, fn: Any, gate: Any, description: str) -> None:
    def run(q: Any, k: Any, v: Any, causal: bool, form: str = "chunked") -> Any:
        _gated.causal_only(name, causal)
        return fn(q, k, v, *(() if gate is None else (gate(q),)), form=form)

    register_method(name, run, description=description,
                    reference=lambda q, k, v, causal: run(q, k, v, causal, form="recurrent"),
                    supports_noncausal=False)


_compare("simple_gla", simple_gla, _compare_g,
         "simple GLA: fixed log-decays per step and head in [-1/2, -1/16], chunked scan")
_compare("retention", retention, None, "RetNet retention: decay 1 - 2^(-5-h) per head, chunked scan")
_compare("gla", gla, _compare_gk, "GLA: fixed log-decays per key channel in [-1/2, -1/16], chunked scan")
