"""Hypothesis strategies that draw valid attention problems.

The shapes and options come from hypothesis (so failures shrink to small shapes and
simple options); the array values come from a NumPy generator seeded by a drawn
integer, so drawing stays fast at any size. The cases that break kernels are all in
the space: T = 1, S != T, Dk != Dv, head dims that are not powers of two, GQA and MQA,
boolean and additive masks of every broadcastable shape, windows with unbounded sides,
ALiBi, ``cu_seqlens`` with empty and length-1 segments, and logits of magnitude 1e4.

Requires the ``hypothesis`` package (``pip install linattn[test]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised only without the test extra
    raise ImportError("linattn.testing.strategies needs hypothesis: pip install 'linattn[test]'") from err

from linattn.softmax import alibi_slopes as _alibi_slopes

__all__ = ["AttentionProblem", "attention_problems", "segment_lengths"]

# q and k scaled by this make logits of magnitude ~1e4 (100 · 100 · q·k / sqrt(Dk)).
LARGE_MAGNITUDE = 100.0


@dataclass
class AttentionProblem:
    """A drawn problem: call ``fn(p.q, p.k, p.v, **p.kwargs)``.

    Attributes
    ----------
    q, k, v : numpy.ndarray
        In ``kwargs["layout"]`` (default "bthd").
    kwargs : dict
        Keyword arguments of :func:`linattn.softmax_attention` (causal, mask, window,
        alibi_slopes, cu_seqlens, layout, scale).
    magnitude : float
        Factor applied to q and k (1 or :data:`LARGE_MAGNITUDE`).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict[str, Any] = field(default_factory=dict)
    magnitude: float = 1.0

    @property
    def layout(self) -> str:
        """The arrays' layout."""
        return self.kwargs.get("layout", "bthd")

    def __repr__(self) -> str:
        options = {
            name: (f"<{value.dtype} {value.shape}>" if isinstance(value, np.ndarray) else value)
            for name, value in self.kwargs.items()
        }
        return (
            f"AttentionProblem(q={self.q.shape}, k={self.k.shape}, v={self.v.shape}, dtype={self.q.dtype}, "
            f"magnitude={self.magnitude}, {options})"
        )


@st.composite
def segment_lengths(draw: st.DrawFn, *, max_segments: int = 4, max_length: int = 12) -> list[int]:
    """Lengths of packed sequences; empty and length-1 segments are drawn often.

    Examples
    --------
    >>> from hypothesis import given, settings
    >>> from linattn.testing.strategies import segment_lengths
    >>> @settings(max_examples=10)
    ... @given(segment_lengths())
    ... def check(lengths):
    ...     assert all(n >= 0 for n in lengths)
    >>> check()
    """
    length = st.one_of(st.just(0), st.just(1), st.integers(0, max_length))
    return draw(st.lists(length, min_size=1, max_size=max_segments))


def _mask_shape(draw: st.DrawFn, full: tuple[int, int, int, int]) -> tuple[int, ...]:
    keep = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    shape = tuple(n if k else 1 for n, k in zip(full, keep, strict=True))
    drop = draw(st.integers(0, 2))  # fewer dims read as trailing dims, as in broadcasting
    while drop and shape[0] == 1:
        shape, drop = shape[1:], drop - 1
    return shape


@st.composite
def attention_problems(
    draw: st.DrawFn,
    *,
    dtype: Any = np.float64,
    max_batch: int = 2,
    max_len: int = 20,
    max_kv_heads: int = 3,
    max_group: int = 3,
    max_dim: int = 9,
    causal: bool | None = None,
    cross: bool = True,
    masks: bool = True,
    windows: bool = True,
    alibi: bool = True,
    varlen: bool = True,
    large_magnitude: bool = True,
    layouts: tuple[str, ...] = ("bthd", "bhtd"),
) -> AttentionProblem:
    """Draw a valid softmax-attention problem.

    Parameters
    ----------
    dtype : dtype, default float64
        Dtype of q, k, v (and of a float mask).
    max_batch, max_len, max_kv_heads, max_group, max_dim : int
        Upper bounds of B, T and S, Hkv, Hq/Hkv, and Dk and Dv.
    causal : bool, optional
        Fix ``causal``; None draws it.
    cross : bool, default True
        Allow S != T.
    masks, windows, alibi, varlen : bool, default True
        Allow each option to be drawn.
    large_magnitude : bool, default True
        Allow q and k scaled so that logits reach ~1e4.
    layouts : tuple of str
        Layouts to draw from.

    Returns
    -------
    AttentionProblem

    Examples
    --------
    >>> import linattn
    >>> from hypothesis import given, settings
    >>> from linattn.testing.strategies import attention_problems
    >>> @settings(max_examples=10)
    ... @given(attention_problems())
    ... def check(p):
    ...     o = linattn.softmax_attention(p.q, p.k, p.v, **p.kwargs)
    ...     assert o.shape[0] == p.q.shape[0]
    >>> check()
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kwargs: dict[str, Any] = {}
    use_varlen = varlen and draw(st.booleans())
    if use_varlen:
        lengths = draw(segment_lengths(max_length=max(1, max_len // 2)))
        cu = [0, *np.cumsum(lengths).tolist()]
        kwargs["cu_seqlens"] = cu
        batch, t, s = 1, cu[-1], cu[-1]
    else:
        batch = draw(st.integers(1, max_batch))
        t = draw(st.integers(1, max_len))
        s = draw(st.integers(1, max_len)) if cross and draw(st.booleans()) else t
    kv_heads = draw(st.integers(1, max_kv_heads))
    q_heads = kv_heads * draw(st.integers(1, max_group))
    dk = draw(st.integers(1, max_dim))
    dv = draw(st.integers(1, max_dim)) if draw(st.booleans()) else dk
    layout = draw(st.sampled_from(layouts))
    magnitude = LARGE_MAGNITUDE if large_magnitude and draw(st.integers(0, 4)) == 0 else 1.0

    def make(length: int, heads: int, dim: int, factor: float) -> np.ndarray:
        x = rng.standard_normal((batch, length, heads, dim)) * factor
        if layout == "bhtd":
            x = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
        return x.astype(dtype)

    q = make(t, q_heads, dk, magnitude)
    k = make(s, kv_heads, dk, magnitude)
    v = make(s, kv_heads, dv, 1.0)
    kwargs["layout"] = layout
    kwargs["causal"] = draw(st.booleans()) if causal is None else causal
    if windows and draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(0, max(t, s) + 1))
        kwargs["window"] = (draw(side), draw(side))
    if alibi and draw(st.booleans()):
        kwargs["alibi_slopes"] = _alibi_slopes(q_heads).astype(dtype)
    if masks:
        kind = draw(st.sampled_from(["none", "bool", "float"]))
        if kind != "none":
            shape = _mask_shape(draw, (batch, q_heads, t, s))
            if kind == "bool":
                kwargs["mask"] = rng.random(shape) < 0.8
            else:
                mask = rng.standard_normal(shape)
                mask[rng.random(shape) < 0.15] = -math.inf
                kwargs["mask"] = mask.astype(dtype)
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    return AttentionProblem(q=q, k=k, v=v, kwargs=kwargs, magnitude=magnitude)
