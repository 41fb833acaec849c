r"""Hybrid attention: some heads exact sliding-window softmax, the others linear and global.

The compromise the seed documents describe: local heads keep softmax's sharp, exact view
of the last few tokens (O(T·w)), global heads see the whole past through a linear
attention state (O(T·m·Dv)); memory stays linear in T. Query head h is local when h is
in ``local_heads``; every head reads key/value head h // (Hq/Hkv), as under GQA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat

from linattn import _checks
from linattn.compare import register_method
from linattn.feature_maps import FeatureMap
from linattn.flash import flash_attention
from linattn.linear import linear_attention

__all__ = ["hybrid_attention", "split_heads"]


def _windowed_softmax(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    # The tiled exact form visits only the key tiles inside the window, so the local heads
    # cost O(T·w) time and O(T) memory instead of softmax_attention's O(T²).
    return flash_attention(q, k, v, **kw)[0]


def split_heads(local_heads: int | Sequence[int], q_heads: int) -> tuple[list[int], list[int]]:
    """Return (local, global) query-head indices, in increasing order.

    Parameters
    ----------
    local_heads : int or sequence of int
        A count n (the first n heads are local) or the indices of the local heads.
    q_heads : int
        Hq.

    Returns
    -------
    local, global : list of int

    Raises
    ------
    ValueError
        A count outside 0..Hq, an index out of range, or a repeated index.

    Examples
    --------
    >>> from linattn.hybrid import split_heads
    >>> split_heads(2, 4)
    ([0, 1], [2, 3])
    >>> split_heads([3, 0], 4)
    ([0, 3], [1, 2])
    """
    if isinstance(local_heads, int) and not isinstance(local_heads, bool):
        if not 0 <= local_heads <= q_heads:
            raise ValueError(f"local_heads as a count must be in 0..Hq={q_heads}, got {local_heads}")
        local = list(range(local_heads))
    elif isinstance(local_heads, Sequence) and all(isinstance(h, int) and not isinstance(h, bool) for h in local_heads):
        if any(not 0 <= h < q_heads for h in local_heads) or len(set(local_heads)) != len(local_heads):
            raise ValueError(f"local_heads must be distinct head indices in 0..{q_heads - 1}, got {list(local_heads)}")
        local = sorted(local_heads)
    else:
        raise TypeError(f"local_heads must be a count or a sequence of head indices, got {local_heads!r}")
    return local, [h for h in range(q_heads) if h not in local]


def hybrid_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    local_heads: int | Sequence[int],
    window: int,
    causal: bool = True,
    scale: float | None = None,
    feature_map: str | FeatureMap = "elu+1",
    normalize: bool = True,
    eps: float = 1e-6,
    linear_scale: float | None = None,
    form: str = "chunked",
    chunk_size: int = 64,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> Any:
    r"""Sliding-window softmax on the local heads, linear attention on the global ones.

    .. math::

        o^{(h)}_i = \begin{cases}
            \mathrm{softmax}_{\,j:\ i - w \le j \le i}\big(\text{scale}\; q_i\cdot k_j\big)\, v
                & h \in \text{local heads}, \\
            \dfrac{\phi(q_i)^\top \sum_{j \le i} \phi(k_j) v_j^\top}
                  {\phi(q_i)^\top \sum_{j\le i} \phi(k_j) + \varepsilon}
                & \text{otherwise},
        \end{cases}

    (non-causal: the window is symmetric, i − w ≤ j ≤ i + w, and the linear heads sum
    over every key).

    Parameters
    ----------
    q, k, v : array
        (B, T, Hq, Dk), (B, T, Hkv, Dk), (B, T, Hkv, Dv) (``layout="bthd"``).
    local_heads : int or sequence of int
        Which query heads are local: a count (the first n) or indices.
    window : int
        w >= 0: a local head sees the w previous keys and its own.
    causal : bool, default True
    scale : float, optional
        Softmax scale of the local heads; default 1/sqrt(Dk).
    feature_map, normalize, eps : optional
        φ and the normaliser of the global heads (see :func:`linattn.linear_attention`).
    linear_scale : float, optional
        The global heads' ``scale`` (default 1, as :func:`linattn.linear_attention`).
    form, chunk_size : optional
        The global heads' scan form.
    layout, cu_seqlens, backend : optional
        As in :func:`linattn.softmax_attention`.

    Returns
    -------
    array, shape (B, T, Hq, Dv)

    Raises
    ------
    TypeError, ValueError
        Bad head selection or window, and the errors of the two methods.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> q, k, v = (np.random.default_rng(0).standard_normal((1, 12, 4, 8)) for _ in range(3))
    >>> o = linattn.hybrid_attention(q, k, v, local_heads=2, window=3)
    >>> local = linattn.softmax_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], causal=True, window=(3, 0))
    >>> bool(np.allclose(o[:, :, :2], local))
    True
    """
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(q=q, k=k, v=v)
    shapes = _checks.check_qkv(q, k, v, layout, xp)
    window = _checks.check_nonnegative_int("window", window)
    local, global_ = split_heads(local_heads, shapes.q_heads)
    head_axis = 2 if layout == "bthd" else 1
    local_kw = {"scale": scale, "window": (window, 0 if causal else window)}
    global_kw = {"feature_map": feature_map, "normalize": normalize, "eps": eps, "scale": linear_scale,
                 "form": form, "chunk_size": chunk_size}
    common = {"layout": layout, "cu_seqlens": cu_seqlens, "backend": backend, "causal": causal}
    if not global_:  # every head local (or every head global, below): one call, no head shuffling
        return _windowed_softmax(q, k, v, **local_kw, **common)
    if not local:
        return linear_attention(q, k, v, **global_kw, **common)

    def heads(x: Any, index: list[int]) -> Any:
        return xp.take(x, xp.asarray(index, dtype=xp.int64, device=array_api_compat.device(x)), axis=head_axis)

    def run(index: list[int], fn: Any, **kw: Any) -> Any:
        kv_index = [h // shapes.group for h in index]
        return fn(heads(q, index), heads(k, kv_index), heads(v, kv_index), **kw, **common)

    joined = xp.concat([run(local, _windowed_softmax, **local_kw), run(global_, linear_attention, **global_kw)],
                       axis=head_axis)
    order = local + global_
    return heads(joined, [order.index(h) for h in range(shapes.q_heads)])


register_method(
    "hybrid",
    lambda q, k, v, causal: hybrid_attention(q, k, v, causal=causal, local_heads=q.shape[2] // 2, window=64),
    description="half the heads sliding-window softmax (w = 64), half linear (elu+1)",
)
