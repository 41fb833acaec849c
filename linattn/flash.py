"""The FlashAttention-2 algorithm: exact softmax attention computed tile by tile.

The forward pass (Dao, 2023, Algorithm 1) walks the key/value tiles of one query tile
and keeps, per query row, the running maximum m, the running sum l of exp(s − m) and an
unnormalised output Õ, rescaling both by exp(m_old − m_new) whenever the maximum grows.
Only one (block_q × block_k) tile of scores exists at a time, so beyond the inputs and
outputs the memory is O(block_q·block_k + T) per head instead of the O(T·S) of
:func:`linattn.softmax_attention`.

The backward pass (Algorithm 2) recomputes each tile of probabilities from the saved
log-sum-exp, P = exp(s − lse), and uses D = rowsum(dO ⊙ O) in place of rowsum(P ⊙ dP),
so it never stores P either.

Tiles that causal or window geometry hides completely are skipped, as the GPU kernels
do; that skipping never changes a result, because those tiles contribute exp(−inf) = 0.
"""

from __future__ import annotations

import math
from typing import Any

from linattn import _checks
from linattn._problem import SoftmaxProblem, prepare

__all__ = ["flash_attention", "flash_attention_backward"]


def _key_tiles(problem: SoftmaxProblem, q_lo: int, q_hi: int, block_k: int) -> range:
    """Starts of the key tiles (aligned to multiples of block_k) that queries [q_lo, q_hi) may see."""
    first, last = problem.key_range(q_lo, q_hi)
    if last <= first:
        return range(0)
    return range((first // block_k) * block_k, last, block_k)


def _forward(problem: SoftmaxProblem, block_q: int, block_k: int) -> tuple[Any, Any]:
    xp = problem.xp
    T, S = problem.q_len, problem.kv_len
    if T == 0 or S == 0:
        return problem.empty_result()
    outputs, lses = [], []
    for q_lo in range(0, T, block_q):
        q_hi = min(q_lo + block_q, T)
        m, l, o_tilde = problem.empty_result_rows(q_lo, q_hi)
        for k_lo in _key_tiles(problem, q_lo, q_hi, block_k):
            k_hi = min(k_lo + block_k, S)
            s = problem.scores(q_lo, q_hi, k_lo, k_hi)
            m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
            # Rows that have seen no visible key yet keep m = -inf; shift them by 0 so
            # that exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
            shift = xp.where(xp.isinf(m_new), 0.0, m_new)
            rescale = xp.exp(m - shift)
            p = xp.exp(s - shift)
            l = rescale * l + xp.sum(p, axis=-1, keepdims=True)
            o_tilde = rescale * o_tilde + xp.matmul(p, problem.v[..., k_lo:k_hi, :])
            m = m_new
        seen = l > 0
        safe_l = xp.where(seen, l, 1.0)
        outputs.append(o_tilde / safe_l)
        lses.append(xp.where(seen, m + xp.log(safe_l), -math.inf))
    return xp.concat(outputs, axis=3), xp.concat(lses, axis=3)


def _backward(
    problem: SoftmaxProblem, o: Any, lse: Any, do: Any, block_q: int, block_k: int
) -> tuple[Any, Any, Any]:
    xp = problem.xp
    T, S = problem.q_len, problem.kv_len
    if T == 0 or S == 0:
        return problem.zero_gradients()
    D = xp.sum(do * o, axis=-1, keepdims=True)  # = rowsum(P ⊙ dP), without P
    lse = xp.where(xp.isinf(lse), 0.0, lse)  # rows with no key: every s is -inf, P = 0
    q_tiles = [(lo, min(lo + block_q, T)) for lo in range(0, T, block_q)]
    dq = [xp.zeros_like(problem.q[..., lo:hi, :]) for lo, hi in q_tiles]
    dk, dv = [], []
    for k_lo in range(0, S, block_k):
        k_hi = min(k_lo + block_k, S)
        k, v = problem.k[..., k_lo:k_hi, :], problem.v[..., k_lo:k_hi, :]
        dk_j, dv_j = None, None
        for i, (q_lo, q_hi) in enumerate(q_tiles):
            first, last = problem.key_range(q_lo, q_hi)
            if k_hi <= first or k_lo >= last:
                continue
            q, do_i = problem.q[..., q_lo:q_hi, :], do[..., q_lo:q_hi, :]
            p = xp.exp(problem.scores(q_lo, q_hi, k_lo, k_hi) - lse[..., q_lo:q_hi, :])
            dp = xp.matmul(do_i, xp.matrix_transpose(v))
            ds = p * (dp - D[..., q_lo:q_hi, :])
            dq[i] = dq[i] + xp.matmul(ds, k) * problem.scale
            dk_part = xp.matmul(xp.matrix_transpose(ds), q) * problem.scale
            dv_part = xp.matmul(xp.matrix_transpose(p), do_i)
            dk_j = dk_part if dk_j is None else dk_j + dk_part
            dv_j = dv_part if dv_j is None else dv_j + dv_part
        if dk_j is None:  # no query sees this tile
            dk_j, dv_j = problem.zero_kv_gradients(k_hi - k_lo)
        dk.append(dk_j)
        dv.append(dv_j)
    return xp.concat(dq, axis=3), xp.concat(dk, axis=3), xp.concat(dv, axis=3)


def _check_blocks(block_q: int, block_k: int) -> tuple[int, int]:
    return _checks.check_positive_int("block_q", block_q), _checks.check_positive_int("block_k", block_k)


def flash_attention(
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
    block_q: int = 64,
    block_k: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any]:
    r"""Exact softmax attention by the tiled online-softmax forward of FlashAttention-2.

    Computes the same o and lse as :func:`linattn.softmax_attention` (see there for the
    definition and every argument's meaning). For each query tile and each key tile j,
    with s the tile's masked scores:

    .. math::

        m^{(j)} = \max\big(m^{(j-1)}, \operatorname{rowmax}(s)\big), \quad
        \tilde P = e^{s - m^{(j)}}, \quad
        l^{(j)} = e^{m^{(j-1)} - m^{(j)}} l^{(j-1)} + \operatorname{rowsum}(\tilde P),

    .. math::

        \tilde O^{(j)} = e^{m^{(j-1)} - m^{(j)}}\, \tilde O^{(j-1)} + \tilde P V_j, \qquad
        O = \tilde O / l, \quad \text{lse} = m + \log l.

    Parameters
    ----------
    q, k, v, causal, scale, mask, window, alibi_slopes, layout, cu_seqlens
        As in :func:`linattn.softmax_attention`.
    block_q, block_k : int, default 64
        Tile sizes (>= 1; a tile larger than T or S is one tile).
    backend : str, optional
        As in :func:`linattn.softmax_attention`.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
        In the layout and dtype of q.
    lse : array, shape (B, Hq, T)
        Log-sum-exp of each row (-inf where a query sees no key); float32 for
        half-precision inputs.

    Raises
    ------
    TypeError, ValueError
        As :func:`linattn.softmax_attention`, and for a block size that is not a positive
        integer.

    References
    ----------
    T. Dao. "FlashAttention-2: Faster Attention with Better Parallelism and Work
    Partitioning." ICLR 2024.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 37, 4, 16)) for _ in range(3))
    >>> o, lse = linattn.flash_attention(q, k, v, causal=True, block_q=8, block_k=16)
    >>> o_ref = linattn.softmax_attention(q, k, v, causal=True)
    >>> float(np.max(np.abs(o - o_ref))) < 1e-13
    True
    """
    block_q, block_k = _check_blocks(block_q, block_k)
    problem = prepare(
        q, k, v, causal=causal, scale=scale, mask=mask, window=window, alibi_slopes=alibi_slopes,
        layout=layout, cu_seqlens=cu_seqlens, backend=backend,
    )
    o, lse = problem.map_segments(lambda p: _forward(p, block_q, block_k))
    return problem.output(o), problem.lse_output(lse)


def flash_attention_backward(
    q: Any,
    k: Any,
    v: Any,
    o: Any,
    lse: Any,
    do: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: Any = None,
    window: tuple[int | None, int | None] | None = None,
    alibi_slopes: Any = None,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    block_q: int = 64,
    block_k: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any, Any]:
    r"""Compute the gradients of softmax attention by the tiled backward pass of FlashAttention-2.

    From the forward's o and lse, without storing P: with D = rowsum(dO ⊙ O), for every
    key tile j and query tile i,

    .. math::

        P_{ij} = e^{s_{ij} - \text{lse}_i}, \quad dV_j \mathrel{+}= P_{ij}^\top dO_i, \quad
        dP_{ij} = dO_i V_j^\top, \quad dS_{ij} = P_{ij} \odot (dP_{ij} - D_i),

    .. math::

        dQ_i \mathrel{+}= \text{scale}\; dS_{ij} K_j, \qquad
        dK_j \mathrel{+}= \text{scale}\; dS_{ij}^\top Q_i .

    D_i equals rowsum(P ⊙ dP) of :func:`linattn.softmax_attention_vjp` because
    O_i = Σ_j P_ij V_j.

    Parameters
    ----------
    q, k, v : array
        The forward's inputs.
    o : array, shape (B, T, Hq, Dv)
        The forward's output.
    lse : array, shape (B, Hq, T)
        The forward's log-sum-exp.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of o.
    causal, scale, mask, window, alibi_slopes, layout, cu_seqlens
        As in the forward; they must be the forward's.
    block_q, block_k : int, default 64
        Tile sizes.
    backend : str, optional
        As in the forward.

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.

    Raises
    ------
    TypeError, ValueError
        As the forward, and when o, lse or do have the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> rng = np.random.default_rng(1)
    >>> q, k, v, do = (rng.standard_normal((1, 20, 2, 8)) for _ in range(4))
    >>> o, lse = linattn.flash_attention(q, k, v, causal=True)
    >>> grads = linattn.flash_attention_backward(q, k, v, o, lse, do, causal=True, block_q=8)
    >>> direct = linattn.softmax_attention_vjp(q, k, v, do, causal=True)
    >>> all(np.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(grads, direct))
    True
    """
    block_q, block_k = _check_blocks(block_q, block_k)
    problem = prepare(
        q, k, v, causal=causal, scale=scale, mask=mask, window=window, alibi_slopes=alibi_slopes,
        layout=layout, cu_seqlens=cu_seqlens, backend=backend,
    )
    o5 = problem.grouped_query_like("o", o, problem.shapes.value_dim)
    do5 = problem.grouped_query_like("do", do, problem.shapes.value_dim)
    lse5 = problem.grouped_lse(lse)
    dq, dk, dv = problem.map_segments(
        lambda p, o_, lse_, do_: _backward(p, o_, lse_, do_, block_q, block_k), o5, lse5, do5
    )
    return problem.output(dq), problem.kv_gradient(dk), problem.kv_gradient(dv)
