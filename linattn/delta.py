r"""DeltaNet and Gated DeltaNet: linear attention whose state is corrected, not summed.

Per batch element and value head, with q_t, k_t ∈ R^{Dk} (optionally L2-normalised, then
q_t scaled by s), v_t ∈ R^{Dv}, β_t ∈ [0, 2], and the log-decay g_t ≤ 0 (gated only),

.. math::

    S_t = e^{g_t} \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top, \qquad
    o_t = S_t^\top q_t, \qquad S_t \in \mathbb{R}^{D_k \times D_v},

that is, u_t = β_t (v_t − e^{g_t} S_{t−1}ᵀ k_t) and S_t = e^{g_t} S_{t−1} + k_t u_tᵀ:
flash-linear-attention's ``chunk_delta_rule`` (g = 0) and ``chunk_gated_delta_rule``
with their ``[K, V]`` state. The heads follow FLA's GVA: q and k have H heads, v, β, g
and the state HV (a multiple of H), and query/key head h serves value heads
h·(HV/H) .. (h+1)·(HV/H) − 1. The scan itself is :func:`linattn.delta_scan.delta_scan`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from linattn._gated import like_array
from linattn.compare import register_method
from linattn.delta_problem import DeltaGradients, forward, l2norm, prepare, vjp

__all__ = [
    "DeltaGradients",
    "compare_gates",
    "delta_rule",
    "delta_rule_vjp",
    "gated_delta_rule",
    "gated_delta_rule_vjp",
    "l2norm",
]

_SHARED_DOC = """
    q, k : array, shape (B, T, H, Dk)
        Queries and keys (``(B, H, T, Dk)`` with ``layout="bhtd"``).
    v : array, shape (B, T, HV, Dv)
        Values; HV a multiple of H (GVA: head h of q, k serves value heads h·HV/H ..).
    beta : array, shape (B, T, HV) or (B, T, HV, Dv)
        Write strength in [0, 2], one per value head or one per value channel. Above 1
        the transition's eigenvalue 1 - beta along k_t is negative (FLA's allow_neg_eigval).
    scale : float, optional
        s, multiplying q (after the L2 norm). Default 1/sqrt(Dk).
    initial_state : array, shape (N, HV, Dk, Dv), optional
        S_0 for each sequence: N = B, or the number of sequences under ``cu_seqlens``.
    cu_seqlens : array or sequence of int, optional
        Offsets of N sequences packed in a batch of one; each runs alone with its state.
    chunk_size : int, default 64
        Chunk of the chunked form (any T); the VJP saves a state every ``chunk_size`` steps.
    use_qk_l2norm : bool, default False
        L2-normalise q and k first, x / sqrt(Σx² + 1e-6) (FLA's use_qk_l2norm_in_kernel).
    layout : {"bthd", "bhtd"}, default "bthd"
    backend : str, optional
        ``"numpy"`` or another registered backend; None follows the inputs."""


def delta_rule(q: Any, k: Any, v: Any, beta: Any, *, scale: float | None = None, initial_state: Any = None,
               output_final_state: bool = False, cu_seqlens: Any = None, form: str = "chunked", chunk_size: int = 64,
               use_qk_l2norm: bool = False, layout: str = "bthd", backend: str | None = None) -> Any:
    r"""DeltaNet: linear attention with the delta rule (Schlag et al., 2021; Yang et al., 2024).

    .. math::

        S_t = \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top, \qquad o_t = S_t^\top (s\, q_t).

    Parameters
    ----------
    output_final_state : bool, default False
        Also return S_{T−1} per sequence.
    form : {"chunked", "parallel", "recurrent"}, default "chunked"
        The chunked WY/UT form (O(T)), the (T, T) system (the definition as matrices), or
        the loop; they agree to rounding.
    %(shared)s

    Returns
    -------
    o : array, shape (B, T, HV, Dv)
        In q's layout and dtype.
    final_state : array, shape (N, HV, Dk, Dv)
        Only with ``output_final_state=True``; in the compute dtype (float32 for half).

    Raises
    ------
    TypeError, ValueError
        For bad dtypes, shapes (naming the argument and the shapes), beta outside [0, 2],
        an unknown form, a chunk size < 1, bad ``cu_seqlens``.

    Notes
    -----
    The readout o_t = s·S_tᵀq_t is inclusive and the state is ``[K, V]``, as in FLA's
    ``chunk_delta_rule`` and ``fused_recurrent_delta_rule``. Differences from FLA: every
    dtype is accepted (FLA's chunk form asserts against float32); q and k need not be
    normalised, but only unit keys (or |k| ≤ 1) with β ∈ [0, 2] make the transitions
    contractions; GVA (HV > H) is accepted here, FLA's delta_rule needs HV = H; beta per
    value channel works in every form (FLA: fused_recurrent only); any chunk size.

    References
    ----------
    I. Schlag, K. Irie, J. Schmidhuber. "Linear Transformers Are Secretly Fast Weight
    Programmers." ICML 2021. S. Yang, B. Wang, Y. Zhang, Y. Shen, Y. Kim. "Parallelizing
    Linear Transformers with the Delta Rule over Sequence Length." NeurIPS 2024.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn.delta as delta
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 9, 2, 4)) for _ in range(3))
    >>> beta = rng.random((1, 9, 2))
    >>> o = delta.delta_rule(q, k, v, beta, use_qk_l2norm=True, chunk_size=4)
    >>> o_loop = delta.delta_rule(q, k, v, beta, use_qk_l2norm=True, form="recurrent")
    >>> bool(np.allclose(o, o_loop))
    True
    """
    p = prepare(q, k, v, beta, None, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, layout=layout, backend=backend)
    return forward(p, output_final_state)


def gated_delta_rule(q: Any, k: Any, v: Any, g: Any, beta: Any, *, scale: float | None = None,
                     initial_state: Any = None, output_final_state: bool = False, cu_seqlens: Any = None,
                     form: str = "chunked", chunk_size: int = 64, use_qk_l2norm: bool = False, layout: str = "bthd",
                     backend: str | None = None) -> Any:
    r"""Gated DeltaNet: the delta rule with a decay e^{g_t} per step (Yang et al., 2025).

    .. math::

        S_t = e^{g_t} \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top, \qquad
        o_t = S_t^\top (s\, q_t).

    Parameters
    ----------
    g : array, shape (B, T, HV)
        Log-decay, finite and ≤ 0 (``(B, HV, T)`` with ``layout="bhtd"``).
    output_final_state : bool, default False
    form : {"chunked", "parallel", "recurrent"}, default "chunked"
    %(shared)s

    Returns
    -------
    o : array, shape (B, T, HV, Dv)
    final_state : array, shape (N, HV, Dk, Dv)
        Only with ``output_final_state=True``.

    Raises
    ------
    TypeError, ValueError
        As :func:`delta_rule`, and for g > 0, NaN or −inf.

    Notes
    -----
    FLA's ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` with the same
    argument order (q, k, v, g, beta). No exponential of a positive number is ever taken
    (see :mod:`linattn.delta_scan`), so no gate lower bound is needed. FLA's in-kernel
    gate (``use_gate_in_kernel``, g = −e^{A_log}·softplus(·)) and β sigmoid are outside
    this function: pass the resulting g and β.

    References
    ----------
    S. Yang, J. Kautz, A. Hatamizadeh. "Gated Delta Networks: Improving Mamba2 with Delta
    Rule." ICLR 2025.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn.delta as delta
    >>> rng = np.random.default_rng(0)
    >>> q, k = (rng.standard_normal((1, 7, 1, 4)) for _ in range(2))
    >>> v = rng.standard_normal((1, 7, 2, 3))  # GVA: 2 value heads share the q/k head
    >>> g, beta = -rng.random((1, 7, 2)), rng.random((1, 7, 2))
    >>> o, S = delta.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=True)
    >>> o.shape, S.shape
    ((1, 7, 2, 3), (1, 2, 4, 3))
    """
    p = prepare(q, k, v, beta, g, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, form=form,
                 chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, layout=layout, backend=backend)
    return forward(p, output_final_state)


def delta_rule_vjp(q: Any, k: Any, v: Any, beta: Any, do: Any, *, scale: float | None = None,
                   initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None, chunk_size: int = 64,
                   use_qk_l2norm: bool = False, layout: str = "bthd", backend: str | None = None) -> DeltaGradients:
    r"""Gradients of :func:`delta_rule` w.r.t. q, k, v, beta (and the initial state).

    By the reverse-mode recurrence (:func:`linattn.delta_grad.delta_scan_vjp`), then the
    chain rule through the scale and the L2 norm, dx = r(dy − y(y·dy)) with y = r·x,
    r = (Σx² + 1e-6)^{−1/2}.

    Parameters
    ----------
    do : array, shape (B, T, HV, Dv)
        Cotangent of o.
    dfinal_state : array, shape (N, HV, Dk, Dv), optional
        Cotangent of the final state.
    q, k, v, beta, scale, initial_state, cu_seqlens, chunk_size, use_qk_l2norm, layout, backend
        As in :func:`delta_rule`.

    Returns
    -------
    DeltaGradients
        dq, dk, dv, dbeta, dg (None), dinitial_state (None without an initial state).

    Examples
    --------
    >>> import numpy as np
    >>> import linattn.delta as delta
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 5, 1, 3)) for _ in range(4))
    >>> beta = rng.random((1, 5, 1))
    >>> grads = delta.delta_rule_vjp(q, k, v, beta, do, use_qk_l2norm=True)
    >>> grads.dbeta.shape == beta.shape and grads.dg is None
    True
    """
    p = prepare(q, k, v, beta, None, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                 form="recurrent", chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, layout=layout, backend=backend)
    return vjp(p, do, dfinal_state)


def gated_delta_rule_vjp(q: Any, k: Any, v: Any, g: Any, beta: Any, do: Any, *, scale: float | None = None,
                         initial_state: Any = None, dfinal_state: Any = None, cu_seqlens: Any = None,
                         chunk_size: int = 64, use_qk_l2norm: bool = False, layout: str = "bthd",
                         backend: str | None = None) -> DeltaGradients:
    r"""Gradients of :func:`gated_delta_rule` w.r.t. q, k, v, g, beta (and the initial state).

    As :func:`delta_rule_vjp`, with dg_t = ⟨dS̃_t, S̃_t⟩ where S̃_t = e^{g_t} S_{t−1}.

    Parameters
    ----------
    do : array, shape (B, T, HV, Dv)
    dfinal_state : array, shape (N, HV, Dk, Dv), optional
    q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size, use_qk_l2norm, layout, backend
        As in :func:`gated_delta_rule`.

    Returns
    -------
    DeltaGradients

    Examples
    --------
    >>> import numpy as np
    >>> import linattn.delta as delta
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 5, 1, 3)) for _ in range(4))
    >>> g, beta = -rng.random((1, 5, 1)), rng.random((1, 5, 1))
    >>> delta.gated_delta_rule_vjp(q, k, v, g, beta, do).dg.shape
    (1, 5, 1)
    """
    p = prepare(q, k, v, beta, g, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
                 form="recurrent", chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm, layout=layout, backend=backend)
    return vjp(p, do, dfinal_state)


for _fn in (delta_rule, gated_delta_rule):
    _fn.__doc__ = _fn.__doc__.replace("%(shared)s", _SHARED_DOC.strip("\n").lstrip())


# ---------------------------------------------------------------------------------------
# linattn compare: measured against the float64 recurrent form
# ---------------------------------------------------------------------------------------


def compare_gates(batch: int, length: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """The β and g ``linattn compare`` feeds: β = sigmoid(z₁), g = logsigmoid(z₂)/8, z ~ N(0, 1).

    Drawn from seed 0 (the same every call) and rounded to float16, so that the float16,
    float32 and float64 runs and the float64 reference all see the same values.

    Returns
    -------
    beta, g : numpy.ndarray, shape (B, T, H), float64
    """
    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((2, batch, length, heads))
    beta = 1.0 / (1.0 + np.exp(-z1))
    g = -np.logaddexp(0.0, -z2) / 8  # log sigmoid(z2) / 8, in (−inf, 0)
    return (beta.astype(np.float16).astype(np.float64), g.astype(np.float16).astype(np.float64))


def _compared(gated: bool, form: str):
    def run(q: Any, k: Any, v: Any, causal: bool = True) -> Any:
        if not causal:
            raise ValueError("the delta rule is causal only; compare it without --non-causal")
        beta, g = (like_array(x, q) for x in compare_gates(*(int(n) for n in q.shape[:3])))
        if gated:
            return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, form=form)
        return delta_rule(q, k, v, beta, use_qk_l2norm=True, form=form)
    return run


register_method("delta", _compared(False, "chunked"), reference=_compared(False, "recurrent"), supports_noncausal=False,
                description="DeltaNet: delta rule on L2-normalised q, k, chunked WY/UT form (vs. its recurrence)")
register_method("gated_delta", _compared(True, "chunked"), reference=_compared(True, "recurrent"),
                supports_noncausal=False,
                description="Gated DeltaNet: delta rule with decay, chunked WY/UT form (vs. its recurrence)")

from linattn import delta_state as _delta_state  # noqa: E402,F401  (registers the decoding states)
