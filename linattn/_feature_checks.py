"""Argument checks shared by the feature maps (:mod:`linattn.feature_maps`, :mod:`linattn.favor`)."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import array_api_compat

from linattn import _checks

SCALINGS = ("chi", "sqrt")
ROLES = ("query", "key")


# --------------------------------------------------------------------------- checks


def _check_x(x: Any) -> Any:
    """Return x's namespace; x must be a floating array of shape (..., T, D)."""
    _checks.require_array("x", x)
    xp = array_api_compat.array_namespace(x)
    _checks.require_floating("x", x, xp)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., T, D) (at least 2-D), got shape {tuple(x.shape)}")
    return xp


def _check_cotangent(dphi: Any, x: Any, shape: tuple[int, ...]) -> None:
    xp = _checks.namespace_of(x=x, dphi=dphi)
    _checks.require_floating("dphi", dphi, xp)
    if tuple(dphi.shape) != shape:
        raise ValueError(
            f"dphi must have the shape of the map's output {shape} (x has shape {tuple(x.shape)}), "
            f"got shape {tuple(dphi.shape)}"
        )


def _check_projection(projection: Any, x: Any) -> Any:
    """Validate W of shape (m, Dk) against x (..., T, Dk) and return it in x's dtype."""
    xp = _checks.namespace_of(x=x, projection=projection)
    _checks.require_floating("projection", projection, xp)
    dim = int(x.shape[-1])
    if projection.ndim != 2 or int(projection.shape[1]) != dim or int(projection.shape[0]) < 1:
        raise ValueError(
            f"projection must have shape (m, Dk) = (m, {dim}) with m >= 1 to match x of shape "
            f"{tuple(x.shape)}, got shape {tuple(projection.shape)}"
        )
    return xp.astype(projection, x.dtype, copy=False)


def _input_scale(scale: float | None, dim: int) -> float:
    """sqrt(scale): x' = sqrt(scale)·x makes x'·y' = scale·x·y; default scale 1/sqrt(Dk)."""
    scale = _checks.check_scale(scale, dim)
    if scale <= 0:
        raise ValueError(f"scale must be positive (the features use sqrt(scale)), got {scale!r}")
    return math.sqrt(scale)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return float(eps)


def _check_role(role: Any) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


def _segments(cu_seqlens: Any, length: int) -> tuple[tuple[int, int], ...]:
    """The (start, stop) of each packed sequence along T; one segment when cu_seqlens is None."""
    if cu_seqlens is None:
        return ((0, length),)
    if array_api_compat.is_array_api_obj(cu_seqlens):
        xp = array_api_compat.array_namespace(cu_seqlens)
        if not xp.isdtype(cu_seqlens.dtype, "integral"):
            raise TypeError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.ndim != 1:
            raise ValueError(f"cu_seqlens must be 1-D (N+1,), got shape {tuple(cu_seqlens.shape)}")
        offsets = tuple(int(cu_seqlens[i]) for i in range(int(cu_seqlens.shape[0])))
    elif isinstance(cu_seqlens, Sequence) and all(
        isinstance(o, numbers.Integral) and not isinstance(o, bool) for o in cu_seqlens
    ):
        offsets = tuple(int(o) for o in cu_seqlens)
    else:
        raise TypeError(f"cu_seqlens must be a 1-D integer array or a sequence of ints, got {cu_seqlens!r}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != length or any(
        b < a for a, b in itertools.pairwise(offsets)
    ):
        raise ValueError(
            f"cu_seqlens must be non-decreasing offsets from 0 to T={length} (N+1 for N sequences), got {offsets}"
        )
    return tuple(itertools.pairwise(offsets))


