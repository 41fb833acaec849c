"""Block-sparse attention patterns: which key blocks each query block attends.

A :class:`BlockLayout` stores, for a block size b, the attended key blocks of every query
block as compressed rows (``indptr``, ``indices``, as SciPy's CSR/BSR formats), so its
size is the number of attended blocks, never T×S. :func:`bigbird_layout` and
:func:`longformer_layout` build the two published patterns; :func:`layout_to_mask` expands
a layout to a dense (T, S) mask, for tests and small inspections only.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._random import as_generator

__all__ = ["BlockLayout", "bigbird_layout", "layout_to_mask", "longformer_layout"]


@dataclass(frozen=True)
class BlockLayout:
    """Which key blocks each query block attends, in compressed rows.

    Query block i covers queries [i·b, min((i+1)·b, T)); key block j covers keys
    [j·b, min((j+1)·b, S)). Row i's key blocks are ``indices[indptr[i]:indptr[i+1]]``,
    sorted and distinct.

    Attributes
    ----------
    block_size : int
        b.
    num_query_blocks, num_key_blocks : int
        ceil(T / b) and ceil(S / b).
    indptr : numpy.ndarray, shape (num_query_blocks + 1,), int64
    indices : numpy.ndarray, shape (indptr[-1],), int64

    Examples
    --------
    >>> from linattn.sparse import BlockLayout
    >>> layout = BlockLayout.from_rows(4, 3, [[0], [0, 1], [1, 2]])
    >>> layout.key_blocks(1).tolist(), layout.num_blocks
    ([0, 1], 5)
    """

    block_size: int
    num_query_blocks: int
    num_key_blocks: int
    indptr: np.ndarray
    indices: np.ndarray

    def __post_init__(self) -> None:
        _checks.check_positive_int("block_size", self.block_size)
        _checks.check_nonnegative_int("num_query_blocks", self.num_query_blocks)
        _checks.check_nonnegative_int("num_key_blocks", self.num_key_blocks)
        indptr, indices = np.asarray(self.indptr), np.asarray(self.indices)
        if indptr.shape != (self.num_query_blocks + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            raise ValueError(f"indptr must be {self.num_query_blocks + 1} non-decreasing offsets from 0, got {indptr}")
        if indices.shape != (int(indptr[-1]),) or np.any((indices < 0) | (indices >= self.num_key_blocks)):
            raise ValueError(
                f"indices must hold indptr[-1] = {int(indptr[-1])} key blocks in [0, {self.num_key_blocks}), "
                f"got {indices}"
            )
        for i in range(self.num_query_blocks):
            if np.any(np.diff(indices[indptr[i]: indptr[i + 1]]) <= 0):
                raise ValueError(f"the key blocks of query block {i} must be sorted and distinct, got {indices}")
        object.__setattr__(self, "indptr", indptr.astype(np.int64))
        object.__setattr__(self, "indices", indices.astype(np.int64))

    @classmethod
    def from_rows(cls, block_size: int, num_key_blocks: int, rows: Sequence[Any]) -> BlockLayout:
        """Build a layout from one collection of key-block indices per query block (deduplicated, sorted)."""
        sorted_rows = [np.unique(np.asarray(list(row), dtype=np.int64)) for row in rows]
        indptr = np.cumsum([0, *(r.size for r in sorted_rows)], dtype=np.int64)
        indices = np.concatenate(sorted_rows) if sorted_rows else np.zeros(0, np.int64)
        return cls(block_size, len(sorted_rows), num_key_blocks, indptr, indices)

    def key_blocks(self, i: int) -> np.ndarray:
        """The key blocks query block ``i`` attends (sorted)."""
        return self.indices[self.indptr[i]: self.indptr[i + 1]]

    @property
    def num_blocks(self) -> int:
        """The number of (query block, key block) pairs attended."""
        return int(self.indices.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the layout's arrays: O(num_query_blocks + num_blocks)."""
        return int(self.indptr.nbytes + self.indices.nbytes)


def _num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def _check_layout_fits(block_layout: Any, T: int, S: int) -> BlockLayout:
    if not isinstance(block_layout, BlockLayout):
        raise TypeError(f"block_layout must be a linattn.sparse.BlockLayout, got {type(block_layout).__name__}")
    b = block_layout.block_size
    want = (_num_blocks(T, b), _num_blocks(S, b))
    got = (block_layout.num_query_blocks, block_layout.num_key_blocks)
    if got != want:
        raise ValueError(
            f"block_layout has {got[0]} query blocks and {got[1]} key blocks of size {b}, but T={T}, S={S} "
            f"need ceil(T/b), ceil(S/b) = {want}"
        )
    return block_layout


def layout_to_mask(block_layout: BlockLayout, T: int, S: int) -> np.ndarray:
    r"""Expand a block layout to its dense boolean (T, S) mask (True = may attend).

    For tests and for inspecting small problems only: this is the T×S array the sparse
    functions never form.

    .. math::

        M_{ij} = [\,\lfloor j / b \rfloor \in \text{key blocks of query block } \lfloor i / b \rfloor\,]

    Parameters
    ----------
    block_layout : BlockLayout
        The layout, with block size b.
    T, S : int
        Numbers of queries and keys the layout must cover.

    Returns
    -------
    numpy.ndarray of bool, shape (T, S)

    Raises
    ------
    TypeError
        If ``block_layout`` is not a :class:`BlockLayout`.
    ValueError
        If the layout does not fit (T, S).

    Examples
    --------
    >>> from linattn.sparse import BlockLayout, layout_to_mask
    >>> layout_to_mask(BlockLayout.from_rows(2, 2, [[0], [0, 1]]), 3, 4).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 1]])
    """
    T = _checks.check_nonnegative_int("T", T)
    S = _checks.check_nonnegative_int("S", S)
    _check_layout_fits(block_layout, T, S)
    b = block_layout.block_size
    blocks = np.zeros((block_layout.num_query_blocks, block_layout.num_key_blocks), dtype=bool)
    for i in range(block_layout.num_query_blocks):
        blocks[i, block_layout.key_blocks(i)] = True
    return np.repeat(np.repeat(blocks, b, axis=0), b, axis=1)[:T, :S]


# ---- the pattern builders ----


def _check_block_indices(name: str, values: Any, count: int, unit: str) -> list[int]:
    if isinstance(values, str) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{name} must be a sequence of integer indices, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < count:
            raise ValueError(f"{name} must hold {unit} indices in [0, {count}), got {value!r} in {list(values)!r}")
        out.append(int(value))
    return sorted(set(out))


def bigbird_layout(
    seq_len: int,
    *,
    block_size: int = 64,
    window_blocks: int = 3,
    global_blocks: int | Sequence[int] = 2,
    random_blocks: int = 3,
    rng: Any = None,
    causal: bool = False,
) -> BlockLayout:
    """The BigBird block pattern (Zaheer et al. 2020, ITC): window + global + random blocks.

    With n_b = ceil(seq_len / b) blocks, query block i attends

    - the ``window_blocks`` = w blocks i − (w−1)/2 … i + (w−1)/2 (those that exist);
    - every global block; a global query block attends every block;
    - ``random_blocks`` = r blocks drawn, for each non-global query block i in increasing
      order, by ``rng.choice(candidates, size=min(r, len(candidates)), replace=False)``
      where ``candidates`` are the blocks (increasing) outside i's window and the global
      blocks (no draw when there are none).

    With ``causal=True`` every block j > i is dropped and random candidates are the
    blocks j < i, so no block is held that causality would hide entirely.

    Parameters
    ----------
    seq_len : int
        T (= S).
    block_size : int, default 64
        b, as BigBird's default.
    window_blocks : int, default 3
        w, a positive odd number (BigBird uses 3).
    global_blocks : int or sequence of int, default 2
        An int g makes the first g blocks global (all of them if fewer exist), the ITC
        variant; a sequence names the global blocks, e.g. ``(0, n_b - 1)`` for the first
        and last block as in the authors' code.
    random_blocks : int, default 3
        r >= 0.
    rng : numpy.random.Generator or int, optional
        Required when r > 0.
    causal : bool, default False

    Returns
    -------
    BlockLayout

    Raises
    ------
    TypeError
        ``rng`` missing while r > 0.
    ValueError
        block_size < 1, w even or < 1, r < 0, a global block out of range.

    Examples
    --------
    >>> from linattn.sparse import bigbird_layout
    >>> layout = bigbird_layout(16, block_size=2, global_blocks=1, random_blocks=1, rng=0)
    >>> layout.key_blocks(0).tolist()  # a global block sees every block
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> layout.key_blocks(3).tolist()  # global 0, window 2-4, random 6
    [0, 2, 3, 4, 6]
    """
    T = _checks.check_nonnegative_int("seq_len", seq_len)
    b = _checks.check_positive_int("block_size", block_size)
    w = _checks.check_positive_int("window_blocks", window_blocks)
    if w % 2 == 0:
        raise ValueError(f"window_blocks must be odd (the query block and (w-1)/2 blocks each side), got {w}")
    r = _checks.check_nonnegative_int("random_blocks", random_blocks)
    _checks.check_bool("causal", causal)
    nb = _num_blocks(T, b)
    if isinstance(global_blocks, numbers.Integral) and not isinstance(global_blocks, bool):
        glob = list(range(min(_checks.check_nonnegative_int("global_blocks", global_blocks), nb)))
    else:
        glob = _check_block_indices("global_blocks", global_blocks, nb, f"block (n_b = ceil({T}/{b}) = {nb})")
    generator = None
    if r > 0:
        if rng is None:
            raise TypeError("rng must be a numpy.random.Generator or an integer seed when random_blocks > 0, got None")
        generator = as_generator(rng)
    half, is_global = w // 2, np.zeros(nb, dtype=bool)
    is_global[glob] = True
    rows = []
    for i in range(nb):
        last = i if causal else nb - 1  # the last key block row i may hold
        if is_global[i]:
            rows.append(range(last + 1))
            continue
        row = set(range(max(0, i - half), min(last, i + half) + 1))
        row.update(j for j in glob if j <= last)
        free = np.ones(last + 1, dtype=bool)
        free[list(row)] = False
        candidates = np.flatnonzero(free)  # increasing
        if generator is not None and candidates.size:
            row.update(generator.choice(candidates, size=min(r, candidates.size), replace=False).tolist())
        rows.append(row)
    return BlockLayout.from_rows(b, nb, rows)


def _check_global_tokens(global_tokens: Any, T: int) -> np.ndarray:
    if array_api_compat.is_array_api_obj(global_tokens):  # read element by element, as cu_seqlens is
        if global_tokens.ndim != 1:
            raise ValueError(f"global_tokens must be 1-D, got shape {tuple(global_tokens.shape)}")
        global_tokens = [global_tokens[i] for i in range(int(global_tokens.shape[0]))]
        global_tokens = [int(t) if array_api_compat.array_namespace(t).isdtype(t.dtype, "integral") else t
                         for t in global_tokens]
    return np.asarray(_check_block_indices("global_tokens", global_tokens, T, f"token (T = {T})"), dtype=np.int64)


def longformer_layout(
    seq_len: int,
    *,
    window: tuple[int | None, int | None],
    global_tokens: Sequence[int] = (),
    block_size: int = 64,
    causal: bool = False,
) -> BlockLayout:
    """The key blocks Longformer's token pattern touches, query block by query block.

    Query block i holds key block j iff some query in i may see some key in j under
    :func:`longformer_attention`'s rule; so the layout is tight: every block it holds has
    a visible pair and every visible pair lies in a held block. The token-level rule
    itself is applied inside the blocks by :func:`longformer_attention`.

    Parameters
    ----------
    seq_len : int
        T (= S).
    window, global_tokens, causal
        As in :func:`longformer_attention`.
    block_size : int, default 64

    Returns
    -------
    BlockLayout

    Examples
    --------
    >>> from linattn.sparse import longformer_layout
    >>> layout = longformer_layout(8, window=(1, 1), global_tokens=[7], block_size=2)
    >>> [layout.key_blocks(i).tolist() for i in range(layout.num_query_blocks)]
    [[0, 1, 3], [0, 1, 2, 3], [1, 2, 3], [0, 1, 2, 3]]
    """
    T = _checks.check_nonnegative_int("seq_len", seq_len)
    b = _checks.check_positive_int("block_size", block_size)
    left, right = _check_longformer_window(window)
    _checks.check_bool("causal", causal)
    tokens = _check_global_tokens(global_tokens, T)
    if causal:
        right = 0 if right is None else min(right, 0)
    nb = _num_blocks(T, b)
    global_blocks = np.unique(tokens // b)
    rows = []
    for i in range(nb):
        q_lo, q_hi = i * b, min((i + 1) * b, T)
        last = i if causal else nb - 1
        if i in global_blocks:  # a global query in this block sees every key (up to itself if causal)
            rows.append(range(last + 1))
            continue
        k_lo = 0 if left is None else max(0, q_lo - left)
        k_hi = T - 1 if right is None else min(T - 1, q_hi - 1 + right)
        row = set(range(k_lo // b, k_hi // b + 1))
        row.update(int(j) for j in global_blocks if j <= last)
        rows.append(row)
    return BlockLayout.from_rows(b, nb, rows)


def _check_longformer_window(window: Any) -> tuple[int | None, int | None]:
    if window is None:
        raise ValueError("window must be a pair (left, right) of non-negative ints (None = unbounded), got None")
    return _checks.check_window(window)


