"""Argument checks shared by every public function.

Every check raises :class:`TypeError` (wrong kind of thing) or :class:`ValueError`
(right kind, wrong value or shape) with a message that names the argument and the
shape or value it received. Nothing here broadcasts, truncates or repairs an input.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat

LAYOUTS = ("bthd", "bhtd")


def require_array(name: str, x: Any) -> None:
    """Raise TypeError unless ``x`` is an array-API array."""
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(f"{name} must be an array (NumPy, CuPy or any array-API array), got {type(x).__name__}")


def namespace_of(**arrays: Any) -> Any:
    """Return the single array namespace shared by the named arrays (``None`` values skipped)."""
    present = {name: x for name, x in arrays.items() if x is not None}
    for name, x in present.items():
        require_array(name, x)
    try:
        return array_api_compat.array_namespace(*present.values())
    except TypeError as err:
        kinds = ", ".join(f"{name}: {type(x).__module__}.{type(x).__name__}" for name, x in present.items())
        raise TypeError(f"all arrays must come from one array library, got {kinds}") from err


def require_floating(name: str, x: Any, xp: Any) -> None:
    """Raise TypeError unless ``x`` has a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype (float16, float32, float64), got {x.dtype}")


def check_layout(layout: str) -> str:
    """Validate ``layout`` ("bthd" or "bhtd")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


@dataclass(frozen=True)
class AttentionShapes:
    """Sizes of an attention problem: queries (B, T, Hq, Dk), keys (B, S, Hkv, Dk), values (B, S, Hkv, Dv)."""

    batch: int
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    key_dim: int
    value_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 = MHA, Hq = MQA)."""
        return self.q_heads // self.kv_heads


def _btHd(x: Any, layout: str) -> tuple[int, int, int, int]:
    b, a1, a2, d = (int(n) for n in x.shape)
    return (b, a1, a2, d) if layout == "bthd" else (b, a2, a1, d)


def check_qkv(q: Any, k: Any, v: Any, layout: str, xp: Any) -> AttentionShapes:
    """Validate the ranks, dtypes and sizes of q, k, v and return their sizes.

    Raises
    ------
    TypeError
        If an input is not a floating array or the three dtypes differ.
    ValueError
        If an input is not 4-D, the batch sizes, key dims or key/value lengths or heads
        disagree, or Hq is not a multiple of Hkv.
    """
    order = "(B, T, H, D)" if layout == "bthd" else "(B, H, T, D)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        require_floating(name, x, xp)
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D {order} for layout={layout!r}, got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bq, t, hq, dk = _btHd(q, layout)
    bk, s, hk, dk2 = _btHd(k, layout)
    bv, s2, hv, dv = _btHd(v, layout)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (layout={layout!r})"
    if not (bq == bk == bv):
        raise ValueError(f"q, k and v must have the same batch size, got {shapes}")
    if dk != dk2:
        raise ValueError(f"q and k must have the same head dim Dk, got {shapes}")
    if s != s2:
        raise ValueError(f"k and v must have the same length S, got {shapes}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got {shapes}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads must be a multiple of the key/value heads, got {shapes}")
    if dk == 0 or dv == 0:
        raise ValueError(f"head dims must be positive, got {shapes}")
    return AttentionShapes(bq, t, s, hq, hk, dk, dv)


def check_scale(scale: float | None, key_dim: int) -> float:
    """Return ``scale``, defaulting to 1/sqrt(Dk); it must be a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(key_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value``, raising TypeError unless it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, raising unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, raising unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_window(window: Any) -> tuple[int | None, int | None] | None:
    """Validate ``window=(left, right)``; each side an int >= 0 or None (unbounded)."""
    if window is None:
        return None
    if not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    sides = []
    for side, value in zip(("left", "right"), window, strict=True):
        if value is None:
            sides.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(
                f"window {side} must be a non-negative integer or None (unbounded), got window={tuple(window)!r}"
            )
        sides.append(int(value))
    return sides[0], sides[1]


def check_alibi_slopes(alibi_slopes: Any, q_heads: int, xp: Any) -> Any:
    """Validate ALiBi slopes: a floating array of shape (Hq,), one slope per query head."""
    if alibi_slopes is None:
        return None
    require_array("alibi_slopes", alibi_slopes)
    require_floating("alibi_slopes", alibi_slopes, xp)
    if tuple(alibi_slopes.shape) != (q_heads,):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({q_heads},), got {tuple(alibi_slopes.shape)}")
    return alibi_slopes


def check_mask(mask: Any, shapes: AttentionShapes, xp: Any) -> Any:
    """Validate ``mask``: boolean (True = may attend) or additive float, broadcastable to (B, Hq, T, S).

    A mask of fewer than four dims is read as the trailing dims of (B, Hq, T, S), as in
    NumPy broadcasting; every dim must equal the matching size or 1. Float masks must be
    free of NaN and +inf.
    """
    if mask is None:
        return None
    require_array("mask", mask)
    full = (shapes.batch, shapes.q_heads, shapes.q_len, shapes.kv_len)
    is_bool = xp.isdtype(mask.dtype, "bool")
    if not is_bool and not xp.isdtype(mask.dtype, "real floating"):
        raise TypeError(f"mask must be boolean (True = may attend) or an additive float mask, got {mask.dtype}")
    got = tuple(int(n) for n in mask.shape)
    padded = (1,) * (4 - len(got)) + got if len(got) <= 4 else None
    if padded is None or any(g not in (1, f) for g, f in zip(padded, full, strict=True)):
        raise ValueError(
            f"mask must be broadcastable to (B, Hq, T, S) = {full} (each dim equal or 1), got shape {got}"
        )
    if not is_bool and bool(xp.any(xp.isnan(mask) | (mask == math.inf))):
        raise ValueError("mask (additive float) must not contain NaN or +inf; use -inf to hide a key")
    return xp.reshape(mask, padded)


def check_cu_seqlens(cu_seqlens: Any, shapes: AttentionShapes) -> tuple[int, ...] | None:
    """Validate ``cu_seqlens``: N+1 non-decreasing offsets from 0 to T over a batch of one.

    Returns the offsets as Python ints.
    """
    if cu_seqlens is None:
        return None
    if array_api_compat.is_array_api_obj(cu_seqlens):
        xp = array_api_compat.array_namespace(cu_seqlens)
        if not xp.isdtype(cu_seqlens.dtype, "integral"):
            raise TypeError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.ndim != 1:
            raise ValueError(f"cu_seqlens must be 1-D (N+1,), got shape {tuple(cu_seqlens.shape)}")
        offsets = tuple(int(cu_seqlens[i]) for i in range(int(cu_seqlens.shape[0])))
    elif isinstance(cu_seqlens, Sequence) and all(
        isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in cu_seqlens
    ):
        offsets = tuple(int(x) for x in cu_seqlens)
    else:
        raise TypeError(f"cu_seqlens must be a 1-D integer array or a sequence of ints, got {cu_seqlens!r}")
    if shapes.batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of one (sequences packed along T), got batch size {shapes.batch}")
    if shapes.q_len != shapes.kv_len:
        raise ValueError(
            f"cu_seqlens needs queries and keys of one packed length, got T={shapes.q_len}, S={shapes.kv_len}"
        )
    if len(offsets) < 2:
        raise ValueError(f"cu_seqlens must hold at least two offsets (N+1 for N sequences), got {offsets}")
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets}")
    if any(b < a for a, b in itertools.pairwise(offsets)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    if offsets[-1] != shapes.q_len:
        raise ValueError(f"cu_seqlens must end at the packed length T={shapes.q_len}, got {offsets}")
    return offsets
