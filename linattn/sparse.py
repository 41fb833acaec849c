"""Exact softmax attention over block-sparse patterns: BigBird, Longformer, any block layout.

A pattern is a :class:`~linattn.block_layout.BlockLayout` (see :mod:`linattn.block_layout`,
whose names are re-exported here): for a block size b, the key blocks that each query block
attends, stored as compressed rows, so its size is the number of attended blocks, never
T×S. The attention is computed one query block at a time: gather that block's key blocks, build the token-level
mask of that (b × gathered keys) tile only, and run the online softmax of
:mod:`linattn.flash` over the gathered keys in tiles of b. Nothing of size T×S exists at
any point, neither a mask nor scores; the result is exactly the softmax of
:func:`linattn.softmax_attention` under the equivalent dense mask (up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._problem import SoftmaxProblem, prepare
from linattn.block_layout import (
    BlockLayout,
    _check_global_tokens,
    _check_layout_fits,
    bigbird_layout,
    layout_to_mask,
    longformer_layout,
)
from linattn.compare import register_method
from linattn.flash import _forward as _flash_forward
from linattn.softmax import _vjp as _softmax_vjp

__all__ = [
    "BlockLayout",
    "bigbird_attention",
    "bigbird_attention_vjp",
    "bigbird_layout",
    "block_sparse_attention",
    "block_sparse_attention_vjp",
    "layout_to_mask",
    "longformer_attention",
    "longformer_attention_vjp",
    "longformer_layout",
]

# visible(query positions (bq,), key positions (nk,)) -> bool (bq, nk), or None when all are visible.
Visibility = Callable[[np.ndarray, np.ndarray], "np.ndarray | None"]


# ---- the block-by-block engine ----


def _key_positions(block_layout: BlockLayout, i: int, S: int) -> np.ndarray:
    """Key positions of query block i's key blocks, concatenated in block order."""
    b = block_layout.block_size
    blocks = block_layout.key_blocks(i)
    positions = (blocks[:, None] * b + np.arange(b)[None, :]).reshape(-1)
    return positions[positions < S]


def _query_blocks(T: int, b: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + b, T)) for lo in range(0, T, b)]


def _row_problem(problem: SoftmaxProblem, q_lo: int, q_hi: int, keys: np.ndarray, visible: Visibility) -> Any:
    """Queries [q_lo, q_hi) against the gathered keys, with the token mask of this tile only."""
    xp = problem.xp
    device = array_api_compat.device(problem.q)
    index = xp.asarray(keys, device=device)
    allowed = visible(np.arange(q_lo, q_hi), keys)
    mask = None
    if allowed is not None:
        mask = xp.reshape(xp.asarray(allowed, device=device), (1, 1, 1, q_hi - q_lo, int(keys.size)))
    return replace(
        problem, q=problem.q[..., q_lo:q_hi, :], k=xp.take(problem.k, index, axis=3),
        v=xp.take(problem.v, index, axis=3), mask=mask,
    )


def _forward(problem: SoftmaxProblem, block_layout: BlockLayout, visible: Visibility) -> tuple[Any, Any]:
    xp, b = problem.xp, block_layout.block_size
    if problem.q_len == 0:
        return problem.empty_result()
    outputs, lses = [], []
    for i, (q_lo, q_hi) in enumerate(_query_blocks(problem.q_len, b)):
        keys = _key_positions(block_layout, i, problem.kv_len)
        if keys.size == 0:
            m, _, o = problem.empty_result_rows(q_lo, q_hi)
        else:
            # The online softmax over the gathered keys, one key block (b keys) at a time.
            o, m = _flash_forward(_row_problem(problem, q_lo, q_hi, keys, visible), b, b)
        outputs.append(o)
        lses.append(m)
    return xp.concat(outputs, axis=3), xp.concat(lses, axis=3)


def _vjp(problem: SoftmaxProblem, block_layout: BlockLayout, visible: Visibility, do: Any) -> tuple[Any, Any, Any]:
    """Direct softmax gradient per query block; dK, dV accumulated per key block (no scatter needed)."""
    xp, b, S = problem.xp, block_layout.block_size, problem.kv_len
    key_blocks = _query_blocks(S, b)
    dk_acc: list[Any] = [None] * len(key_blocks)
    dv_acc: list[Any] = [None] * len(key_blocks)
    dqs = []
    for i, (q_lo, q_hi) in enumerate(_query_blocks(problem.q_len, b)):
        keys = _key_positions(block_layout, i, S)
        if keys.size == 0:
            dqs.append(xp.zeros_like(problem.q[..., q_lo:q_hi, :]))
            continue
        dq, dk, dv = _softmax_vjp(_row_problem(problem, q_lo, q_hi, keys, visible), do[..., q_lo:q_hi, :])
        dqs.append(dq)
        dk, dv = xp.sum(dk, axis=2, keepdims=True), xp.sum(dv, axis=2, keepdims=True)
        start = 0
        for j in block_layout.key_blocks(i).tolist():
            k_lo, k_hi = key_blocks[j]
            part = slice(start, start + k_hi - k_lo)
            start += k_hi - k_lo
            dk_acc[j] = dk[..., part, :] if dk_acc[j] is None else dk_acc[j] + dk[..., part, :]
            dv_acc[j] = dv[..., part, :] if dv_acc[j] is None else dv_acc[j] + dv[..., part, :]
    for j, (k_lo, k_hi) in enumerate(key_blocks):
        if dk_acc[j] is None:  # no query attends this key block
            dk_acc[j] = xp.zeros_like(problem.k[..., k_lo:k_hi, :])
            dv_acc[j] = xp.zeros_like(problem.v[..., k_lo:k_hi, :])

    def joined(parts: list[Any], like: Any) -> Any:
        return xp.concat(parts, axis=3) if parts else xp.zeros_like(like)

    return joined(dqs, problem.q), joined(dk_acc, problem.k), joined(dv_acc, problem.v)


def _causal_rule(offset: int) -> Visibility:
    """Key j visible to query i iff j <= i + offset (bottom-right alignment)."""
    return lambda q_pos, k_pos: k_pos[None, :] <= q_pos[:, None] + offset


def _all_visible(q_pos: np.ndarray, k_pos: np.ndarray) -> None:
    return None


def _prepare(q: Any, k: Any, v: Any, scale: Any, layout: str, backend: Any, same_length: str | None) -> Any:
    problem = prepare(q, k, v, causal=False, scale=scale, mask=None, window=None, alibi_slopes=None, layout=layout,
                      cu_seqlens=None, backend=backend)
    if same_length is not None and problem.q_len != problem.kv_len:
        raise ValueError(
            f"{same_length} is a self-attention pattern: q and k must have one length, got T={problem.q_len}, "
            f"S={problem.kv_len}"
        )
    return problem


def _finish(problem: SoftmaxProblem, result: tuple[Any, Any], return_lse: bool) -> Any:
    o, lse = result
    return (problem.output(o), problem.lse_output(lse)) if return_lse else problem.output(o)


def _finish_vjp(problem: SoftmaxProblem, grads: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    dq, dk, dv = grads
    return problem.output(dq), problem.output(dk), problem.output(dv)


# ---- public attention functions ----


def block_sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    block_layout: BlockLayout,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bthd",
    backend: str | None = None,
    return_lse: bool = False,
) -> Any:
    r"""Exact softmax attention in which query i sees key j iff block (i // b, j // b) is in the layout.

    Equals :func:`linattn.softmax_attention` with ``mask=layout_to_mask(block_layout, T, S)``
    (and ``causal``, aligned bottom-right), computed one query block at a time over its
    gathered key blocks only: memory O(b · (keys of the widest row)), never O(T·S).

    Parameters
    ----------
    q, k, v : array
        As in :func:`linattn.softmax_attention`.
    block_layout : BlockLayout
        With ceil(T/b) query blocks and ceil(S/b) key blocks.
    causal, scale, layout, backend, return_lse
        As in :func:`linattn.softmax_attention`.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
    lse : array, shape (B, Hq, T)
        Only with ``return_lse=True``; −inf on rows with no visible key (whose o is 0).

    Raises
    ------
    TypeError, ValueError
        As :func:`linattn.softmax_attention`, and for a layout that does not fit T and S.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.sparse import BlockLayout, block_sparse_attention, layout_to_mask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 5, 1, 4)) for _ in range(3))
    >>> blocks = BlockLayout.from_rows(2, 3, [[0], [0, 1], [1, 2]])
    >>> o = block_sparse_attention(q, k, v, blocks)
    >>> dense = linattn.softmax_attention(q, k, v, mask=layout_to_mask(blocks, 5, 5))
    >>> bool(np.allclose(o, dense))
    True
    """
    problem = _prepare(q, k, v, scale, layout, backend, None)
    _checks.check_bool("causal", causal)
    _checks.check_bool("return_lse", return_lse)
    _check_layout_fits(block_layout, problem.q_len, problem.kv_len)
    rule = _causal_rule(problem.offset) if causal else _all_visible
    return _finish(problem, _forward(problem, block_layout, rule), return_lse)


def block_sparse_attention_vjp(
    q: Any, k: Any, v: Any, do: Any, block_layout: BlockLayout, *, causal: bool = False,
    scale: float | None = None, layout: str = "bthd", backend: str | None = None,
) -> tuple[Any, Any, Any]:
    """Gradients (dq, dk, dv) of :func:`block_sparse_attention`, query block by query block.

    The direct softmax gradient (:func:`linattn.softmax_attention_vjp`) of each query block
    against its gathered keys; dk and dv are summed per key block over the query blocks
    that attend it. Memory O(b · keys of the widest row).

    Parameters
    ----------
    q, k, v, block_layout, causal, scale, layout, backend
        As in :func:`block_sparse_attention`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output, in its layout.

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.sparse import BlockLayout, block_sparse_attention_vjp
    >>> q = np.ones((1, 3, 1, 2))
    >>> dq, dk, dv = block_sparse_attention_vjp(q, q, q, q, BlockLayout.from_rows(2, 2, [[0], [1]]))
    >>> dv[0, :, 0, 0].tolist()  # each query spreads do evenly over its block's keys
    [1.0, 1.0, 1.0]
    """
    problem = _prepare(q, k, v, scale, layout, backend, None)
    _checks.check_bool("causal", causal)
    _check_layout_fits(block_layout, problem.q_len, problem.kv_len)
    do5 = problem.grouped_query_like("do", do, problem.shapes.value_dim)
    rule = _causal_rule(problem.offset) if causal else _all_visible
    return _finish_vjp(problem, _vjp(problem, block_layout, rule, do5))


def _bigbird(
    q: Any, k: Any, v: Any, block_size: Any, window_blocks: Any, global_blocks: Any, random_blocks: Any, rng: Any,
    causal: Any, scale: Any, layout: str, backend: Any,
) -> tuple[SoftmaxProblem, BlockLayout, Visibility]:
    problem = _prepare(q, k, v, scale, layout, backend, "bigbird_attention")
    block_layout = bigbird_layout(problem.q_len, block_size=block_size, window_blocks=window_blocks,
                                  global_blocks=global_blocks, random_blocks=random_blocks, rng=rng, causal=causal)
    return problem, block_layout, _causal_rule(0) if causal else _all_visible


def bigbird_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    block_size: int = 64,
    window_blocks: int = 3,
    global_blocks: int | Sequence[int] = 2,
    random_blocks: int = 3,
    rng: Any = None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bthd",
    backend: str | None = None,
    return_lse: bool = False,
) -> Any:
    r"""BigBird attention (ITC): exact softmax over the window, global and random blocks.

    Query i sees key j iff block (i // b, j // b) is in ``bigbird_layout(T, ...)`` (see
    :func:`bigbird_layout` for the pattern and the order of the random draws) and, with
    ``causal=True``, j <= i:

    .. math::

        o_i = \sum_{j \in V(i)} \frac{e^{s_{ij}}}{\sum_{l \in V(i)} e^{s_{il}}} v_j,
        \qquad s_{ij} = \text{scale}\; q_i \cdot k_j .

    Equals ``softmax_attention(q, k, v, mask=layout_to_mask(bigbird_layout(T, ...), T, T),
    causal=causal)`` without forming the (T, T) mask or scores.

    Parameters
    ----------
    q : array, shape (B, T, Hq, Dk)
    k, v : array, shape (B, T, Hkv, Dk), (B, T, Hkv, Dv)
        Self-attention: S = T. T need not be a multiple of the block size.
    block_size, window_blocks, global_blocks, random_blocks, rng
        As in :func:`bigbird_layout`; ``rng`` is required when random_blocks > 0.
    causal, scale, layout, backend, return_lse
        As in :func:`linattn.softmax_attention`.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
    lse : array, shape (B, Hq, T)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError, ValueError
        As :func:`bigbird_layout` and :func:`linattn.softmax_attention`; S != T.

    Notes
    -----
    The authors' code (and Hugging Face's port) makes the first and the last block global
    and draws random blocks among the middle ones; ``global_blocks=(0, n_b - 1)`` gives
    that set of global blocks. BigBird-ETC's extra global tokens are not modelled.

    References
    ----------
    M. Zaheer et al. "Big Bird: Transformers for Longer Sequences." NeurIPS 2020.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.sparse import bigbird_attention, bigbird_layout, layout_to_mask
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 37, 2, 8)) for _ in range(3))
    >>> o = bigbird_attention(q, k, v, block_size=4, global_blocks=1, random_blocks=2, rng=7)
    >>> mask = layout_to_mask(bigbird_layout(37, block_size=4, global_blocks=1, random_blocks=2, rng=7), 37, 37)
    >>> bool(np.allclose(o, linattn.softmax_attention(q, k, v, mask=mask)))
    True
    """
    _checks.check_bool("return_lse", return_lse)
    problem, block_layout, rule = _bigbird(q, k, v, block_size, window_blocks, global_blocks, random_blocks, rng,
                                           causal, scale, layout, backend)
    return _finish(problem, _forward(problem, block_layout, rule), return_lse)


def bigbird_attention_vjp(
    q: Any, k: Any, v: Any, do: Any, *, block_size: int = 64, window_blocks: int = 3,
    global_blocks: int | Sequence[int] = 2, random_blocks: int = 3, rng: Any = None, causal: bool = False,
    scale: float | None = None, layout: str = "bthd", backend: str | None = None,
) -> tuple[Any, Any, Any]:
    """Compute the gradients (dq, dk, dv) of :func:`bigbird_attention` block by block.

    With P the probabilities over the keys the layout allows (the same P as the
    forward), dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = scale·dS K,
    dK = scale·dSᵀ Q, each computed one query block at a time over its gathered keys.

    Parameters
    ----------
    q, k, v : array
        The forward's inputs.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output.
    block_size, window_blocks, global_blocks, random_blocks, rng, causal, scale, layout, backend
        As in :func:`bigbird_attention`; they must be the forward's (the same ``rng`` seed).

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.sparse import bigbird_attention_vjp
    >>> x = np.ones((1, 6, 1, 2))
    >>> [g.shape for g in bigbird_attention_vjp(x, x, x, x, block_size=2, random_blocks=0)]
    [(1, 6, 1, 2), (1, 6, 1, 2), (1, 6, 1, 2)]
    """
    problem, block_layout, rule = _bigbird(q, k, v, block_size, window_blocks, global_blocks, random_blocks, rng,
                                           causal, scale, layout, backend)
    do5 = problem.grouped_query_like("do", do, problem.shapes.value_dim)
    return _finish_vjp(problem, _vjp(problem, block_layout, rule, do5))


def _longformer(
    q: Any, k: Any, v: Any, window: Any, global_tokens: Any, block_size: Any, causal: Any, scale: Any, layout: str,
    backend: Any,
) -> tuple[SoftmaxProblem, BlockLayout, Visibility]:
    problem = _prepare(q, k, v, scale, layout, backend, "longformer_attention")
    T = problem.q_len
    block_layout = longformer_layout(T, window=window, global_tokens=global_tokens, block_size=block_size,
                                     causal=causal)
    left, right = _checks.check_window(window)
    is_global = np.zeros(T, dtype=bool)
    is_global[_check_global_tokens(global_tokens, T)] = True

    def visible(q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        distance = q_pos[:, None] - k_pos[None, :]  # i - j
        seen = np.ones(distance.shape, dtype=bool)
        if left is not None:
            seen &= distance <= left
        if right is not None:
            seen &= distance >= -right
        seen |= is_global[q_pos][:, None] | is_global[k_pos][None, :]
        return seen & (distance >= 0) if causal else seen

    return problem, block_layout, visible


def longformer_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    window: tuple[int | None, int | None],
    global_tokens: Sequence[int] = (),
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bthd",
    block_size: int = 64,
    backend: str | None = None,
    return_lse: bool = False,
) -> Any:
    r"""Longformer attention: exact softmax over a sliding window plus global tokens.

    Query i sees key j iff

    .. math::

        i - \text{left} \le j \le i + \text{right}
        \quad\text{or}\quad i \in G \quad\text{or}\quad j \in G,

    and, with ``causal=True``, also j <= i; G is ``global_tokens`` (they attend to all and
    are attended by all). Computed block by block over the blocks of
    :func:`longformer_layout` with this rule applied inside each (b × gathered keys) tile;
    equals :func:`linattn.softmax_attention` with the dense (T, T) mask of the rule.

    Parameters
    ----------
    q : array, shape (B, T, Hq, Dk)
    k, v : array, shape (B, T, Hkv, Dk), (B, T, Hkv, Dv)
        Self-attention: S = T.
    window : (int or None, int or None)
        ``(left, right)`` as in :func:`linattn.softmax_attention`; None = unbounded side.
        Longformer's window of w tokens is ``(w // 2, w // 2)``.
    global_tokens : sequence of int, default ()
        Token indices in [0, T).
    causal, scale, layout, backend, return_lse
        As in :func:`linattn.softmax_attention`.
    block_size : int, default 64
        Granularity of the computation only; the result does not depend on it (beyond
        rounding).

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
    lse : array, shape (B, Hq, T)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError, ValueError
        A window that is not a pair of non-negative ints or None, a global token out of
        [0, T), block_size < 1, S != T, and the errors of :func:`linattn.softmax_attention`.

    Notes
    -----
    Longformer's dilated windows and its separate projections for global attention
    (Q_g, K_g, V_g) are not modelled: pass the projected q, k, v of the pattern you need.

    References
    ----------
    I. Beltagy, M. E. Peters, A. Cohan. "Longformer: The Long-Document Transformer."
    arXiv:2004.05150, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.sparse import longformer_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 9, 1, 4)) for _ in range(3))
    >>> o = longformer_attention(q, k, v, window=(2, 2), global_tokens=[0], block_size=4)
    >>> i, j = np.arange(9)[:, None], np.arange(9)[None, :]
    >>> mask = (np.abs(i - j) <= 2) | (i == 0) | (j == 0)
    >>> bool(np.allclose(o, linattn.softmax_attention(q, k, v, mask=mask)))
    True
    """
    _checks.check_bool("return_lse", return_lse)
    problem, block_layout, rule = _longformer(q, k, v, window, global_tokens, block_size, causal, scale, layout,
                                              backend)
    return _finish(problem, _forward(problem, block_layout, rule), return_lse)


def longformer_attention_vjp(
    q: Any, k: Any, v: Any, do: Any, *, window: tuple[int | None, int | None], global_tokens: Sequence[int] = (),
    causal: bool = False, scale: float | None = None, layout: str = "bthd", block_size: int = 64,
    backend: str | None = None,
) -> tuple[Any, Any, Any]:
    """Compute the gradients (dq, dk, dv) of :func:`longformer_attention` block by block.

    With P the probabilities over the keys the layout allows (the same P as the
    forward), dV = Pᵀ dO, dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), dQ = scale·dS K,
    dK = scale·dSᵀ Q, each computed one query block at a time over its gathered keys.

    Parameters
    ----------
    q, k, v : array
        The forward's inputs.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output.
    window, global_tokens, causal, scale, layout, block_size, backend
        As in :func:`longformer_attention`; they must be the forward's.

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.sparse import longformer_attention_vjp
    >>> x = np.ones((1, 5, 1, 2))
    >>> [g.shape for g in longformer_attention_vjp(x, x, x, x, window=(1, 0), block_size=2)]
    [(1, 5, 1, 2), (1, 5, 1, 2), (1, 5, 1, 2)]
    """
    problem, block_layout, rule = _longformer(q, k, v, window, global_tokens, block_size, causal, scale, layout,
                                              backend)
    do5 = problem.grouped_query_like("do", do, problem.shapes.value_dim)
    return _finish_vjp(problem, _vjp(problem, block_layout, rule, do5))


# Compared settings: BigBird's defaults (blocks of 64, 3 window blocks, 2 global, 3 random,
# seed 0); Longformer with 256 tokens each side and token 0 global (a [CLS] token).
register_method(
    "bigbird",
    lambda q, k, v, **kw: bigbird_attention(q, k, v, block_size=64, window_blocks=3, global_blocks=2,
                                            random_blocks=3, rng=0, **kw),
    description="BigBird ITC, exact softmax over 3 window + 2 global + 3 random blocks of 64 (seed 0)",
)
register_method(
    "longformer",
    lambda q, k, v, **kw: longformer_attention(q, k, v, window=(256, 256), global_tokens=(0,), **kw),
    description="Longformer, exact softmax over a ±256-token window + global token 0, blocks of 64",
)
