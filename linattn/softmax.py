"""Exact softmax attention: the direct definition, its gradient, and ALiBi slopes.

This module is the definition every other method is measured against. It forms the full
(T, S) score matrix per head, so its memory is O(T·S); :mod:`linattn.flash` computes the
same numbers in O(T) memory.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from linattn import _checks
from linattn._problem import SoftmaxProblem, prepare

__all__ = ["alibi_slopes", "softmax_attention", "softmax_attention_vjp"]


def _probabilities(problem: SoftmaxProblem) -> tuple[Any, Any]:
    """P = softmax(scores) row by row, and lse; rows with no visible key give P = 0, lse = -inf."""
    xp = problem.xp
    s = problem.scores(0, problem.q_len, 0, problem.kv_len)
    m = xp.max(s, axis=-1, keepdims=True)
    # A row with no visible key has m = -inf; shifting it by 0 keeps exp(-inf) = 0, not NaN.
    m = xp.where(xp.isinf(m), 0.0, m)
    p = xp.exp(s - m)
    row_sum = xp.sum(p, axis=-1, keepdims=True)
    seen = row_sum > 0
    lse = xp.where(seen, m + xp.log(xp.where(seen, row_sum, 1.0)), -math.inf)
    return p / xp.where(seen, row_sum, 1.0), lse


def _forward(problem: SoftmaxProblem) -> tuple[Any, Any]:
    if problem.kv_len == 0:
        return problem.empty_result()
    p, lse = _probabilities(problem)
    return problem.xp.matmul(p, problem.v), lse


def _vjp(problem: SoftmaxProblem, do: Any) -> tuple[Any, Any, Any]:
    xp = problem.xp
    if problem.kv_len == 0:
        return problem.zero_gradients()
    p, _ = _probabilities(problem)
    dv = xp.matmul(xp.matrix_transpose(p), do)
    dp = xp.matmul(do, xp.matrix_transpose(problem.v))
    # Jacobian of the row softmax: dS = P ⊙ (dP − rowsum(P ⊙ dP)).
    ds = p * (dp - xp.sum(p * dp, axis=-1, keepdims=True))
    dq = xp.matmul(ds, problem.k) * problem.scale
    dk = xp.matmul(xp.matrix_transpose(ds), problem.q) * problem.scale
    return dq, dk, dv


def softmax_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: Any = None,
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: Any = None,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Any:
    r"""Exact softmax attention, by its definition.

    For each batch b, query head h (reading key/value head h // (Hq/Hkv)) and query i,

    .. math::

        s_{ij} = \text{scale}\; q_i \cdot k_j - m_h\,|p_i - j| + M_{ij}, \qquad
        o_i = \sum_{j \in V(i)} \frac{e^{s_{ij}}}{\sum_{l \in V(i)} e^{s_{il}}}\, v_j, \qquad
        \text{lse}_i = \log \sum_{j \in V(i)} e^{s_{ij}},

    where p_i = i + S − T is query i's position among the keys (bottom-right alignment),
    m_h the ALiBi slope, M the additive mask, and V(i) the keys visible to query i:
    j ≤ p_i if causal, p_i − left ≤ j ≤ p_i + right with a window, and M_ij ≠ -inf /
    ``mask[..., i, j]`` True. A query with no visible key gets o_i = 0 and lse_i = -inf.

    Parameters
    ----------
    q : array, shape (B, T, Hq, Dk)
        Queries (``(B, Hq, T, Dk)`` with ``layout="bhtd"``).
    k : array, shape (B, S, Hkv, Dk)
        Keys; Hq must be a multiple of Hkv (MHA, GQA, MQA).
    v : array, shape (B, S, Hkv, Dv)
        Values; Dv may differ from Dk.
    causal : bool, default False
        Hide keys after each query's position (aligned bottom-right when S != T).
    scale : float, optional
        Logit scale; default 1/sqrt(Dk).
    mask : array, optional
        Boolean (True = may attend, as in PyTorch SDPA) or additive float mask,
        broadcastable to (B, Hq, T, S) in every layout; each dim equal or 1.
    window : (int or None, int or None), optional
        ``(left, right)``: key j visible to query i iff p_i − left ≤ j ≤ p_i + right;
        None leaves that side unbounded.
    alibi_slopes : array, shape (Hq,), optional
        ALiBi slopes (see :func:`alibi_slopes`); adds :math:`-m_h |p_i - j|` to the logits.
    layout : {"bthd", "bhtd"}, default "bthd"
        Axis order of q, k, v and the output.
    cu_seqlens : array or sequence of int, shape (N+1,), optional
        Offsets of N sequences packed along T in a batch of one (T must equal S); each
        sequence attends only within itself, as if run alone.
    return_lse : bool, default False
        Also return the log-sum-exp of each row.
    backend : str, optional
        ``"numpy"`` or another registered backend; None follows the inputs.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
        The output, in the layout and dtype of q.
    lse : array, shape (B, Hq, T)
        Only with ``return_lse=True``; float32 for half-precision inputs, else q's dtype.

    Raises
    ------
    TypeError
        Non-array or non-floating inputs, differing dtypes, a mask of another dtype.
    ValueError
        Shapes that do not fit (see :doc:`/conventions`), a negative window, an unknown
        layout, malformed ``cu_seqlens``, a mask not broadcastable to (B, Hq, T, S).

    Notes
    -----
    float16 inputs are computed in float32 and the output is cast back. Memory is
    O(B·Hq·T·S): the score matrix is formed. :func:`linattn.flash_attention` computes the
    same function tile by tile.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 2, 8)) for _ in range(3))
    >>> o, lse = linattn.softmax_attention(q, k, v, causal=True, return_lse=True)
    >>> o.shape, lse.shape
    ((1, 5, 2, 8), (1, 2, 5))
    >>> bool(np.allclose(o[:, 0], v[:, 0]))  # the first query sees only the first key
    True
    """
    problem = prepare(
        q, k, v, causal=causal, scale=scale, mask=mask, window=window, alibi_slopes=alibi_slopes,
        layout=layout, cu_seqlens=cu_seqlens, backend=backend,
    )
    _checks.check_bool("return_lse", return_lse)
    o, lse = problem.map_segments(_forward)
    if return_lse:
        return problem.output(o), problem.lse_output(lse)
    return problem.output(o)


def softmax_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    do: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: Any = None,
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: Any = None,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> tuple[Any, Any, Any]:
    r"""Compute the gradients of :func:`softmax_attention` w.r.t. q, k, v by the direct formula.

    With P the attention probabilities of the forward pass and dO the cotangent of o,

    .. math::

        dV = P^\top dO, \quad dP = dO\, V^\top, \quad
        dS = P \odot \big(dP - \operatorname{rowsum}(P \odot dP)\big), \quad
        dQ = \text{scale}\; dS\, K, \quad dK = \text{scale}\; dS^\top Q,

    where dK and dV sum over the query heads that share a key/value head (GQA).

    Parameters
    ----------
    q, k, v : array
        As in :func:`softmax_attention`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output, in the output's layout.
    causal, scale, mask, window, alibi_slopes, layout, cu_seqlens, backend
        As in :func:`softmax_attention`.

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.

    Raises
    ------
    TypeError, ValueError
        As :func:`softmax_attention`, and when ``do`` has the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 4, 2, 3)) for _ in range(4))
    >>> dq, dk, dv = linattn.softmax_attention_vjp(q, k, v, do, causal=True)
    >>> bool(np.allclose(dv.sum(axis=1), do.sum(axis=1)))  # each row of P sums to 1
    True
    """
    problem = prepare(
        q, k, v, causal=causal, scale=scale, mask=mask, window=window, alibi_slopes=alibi_slopes,
        layout=layout, cu_seqlens=cu_seqlens, backend=backend,
    )
    do5 = problem.grouped_query_like("do", do, problem.shapes.value_dim)
    dq, dk, dv = problem.map_segments(_vjp, do5)
    return problem.output(dq), problem.kv_gradient(dk), problem.kv_gradient(dv)


def alibi_slopes(n_heads: int) -> np.ndarray:
    r"""The ALiBi slopes of Press et al. (2022) for ``n_heads`` heads.

    For n a power of two the slopes are the geometric sequence
    :math:`m_h = 2^{-8(h+1)/n}`, h = 0..n−1. Otherwise, with p the largest power of two
    below n, they are the p slopes for p heads followed by the first n − p of the
    odd-indexed slopes (h = 0, 2, 4, ...) for 2p heads, as in the paper's reference code.

    Parameters
    ----------
    n_heads : int
        Number of (query) heads, >= 1.

    Returns
    -------
    numpy.ndarray, shape (n_heads,), float64

    Raises
    ------
    ValueError
        If ``n_heads`` is not a positive integer.

    References
    ----------
    O. Press, N. A. Smith, M. Lewis. "Train Short, Test Long: Attention with Linear
    Biases Enables Input Length Extrapolation." ICLR 2022.

    Examples
    --------
    >>> import linattn
    >>> linattn.alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    >>> linattn.alibi_slopes(6).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    """
    n = _checks.check_positive_int("n_heads", n_heads)

    def geometric(count: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / count) for h in range(count)]

    power = 1 << (n.bit_length() - 1)
    slopes = geometric(power) + geometric(2 * power)[0::2][: n - power]
    return np.asarray(slopes, dtype=np.float64)
