"""One softmax-attention problem, checked and laid out once, shared by every softmax form.

The public functions (:func:`~linattn.softmax_attention`, :func:`~linattn.flash_attention`
and their backward passes) check their arguments here and then work on a
:class:`SoftmaxProblem`, whose arrays are in a grouped internal layout:

    q (B, Hkv, G, T, Dk)    k (B, Hkv, 1, S, Dk)    v (B, Hkv, 1, S, Dv)

with G = Hq / Hkv query heads per key/value head, so that GQA is a broadcast in
``matmul`` and never a copy of K and V. Query head h is (h // G, h % G). All internal
arrays are 5-D with time on axis 3, so a variable-length batch is a slice on that axis.

The scores of any block of queries and keys, with every mask applied, come from one
method, :meth:`SoftmaxProblem.scores`; the direct forms ask for one block covering
everything, the tiled forms for one tile at a time, so the masking rules exist once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat

from linattn import _checks
from linattn.backends import Backend, resolve_backend

TIME_AXIS = 3


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """Return the dtype the math runs in: float32 for half precision, else the input's own."""
    return dtype if dtype in (xp.float32, xp.float64) else xp.float32


def to_grouped(xp: Any, x: Any, layout: str, kv_heads: int) -> Any:
    """(B, T, H, D) or (B, H, T, D) -> (B, Hkv, H // Hkv, T, D), in row-major memory.

    From "bthd" the transpose is copied into row-major order (flattening a transposed
    view copies it in C order, in any array-API library): every later step then reads
    contiguous (T, D) rows, which elementwise maps and matrix products need to be fast.
    """
    if layout == "bthd":
        x = xp.permute_dims(x, (0, 2, 1, 3))
        x = xp.reshape(xp.reshape(x, (-1,)), x.shape)
    b, h, t, d = x.shape
    return xp.reshape(x, (b, kv_heads, h // kv_heads, t, d))


def from_grouped(xp: Any, x: Any, layout: str) -> Any:
    """(B, Hkv, G, T, D) -> the caller's layout with Hkv * G heads, in row-major memory."""
    b, hkv, g, t, d = x.shape
    x = xp.reshape(x, (b, hkv * g, t, d))
    if layout == "bthd":
        x = xp.permute_dims(x, (0, 2, 1, 3))
        x = xp.reshape(xp.reshape(x, (-1,)), x.shape)  # a C-order copy, as in to_grouped
    return x


@dataclass(frozen=True)
class SoftmaxProblem:
    """A checked softmax-attention problem in the grouped internal layout (see module doc)."""

    xp: Any
    backend: Backend
    shapes: _checks.AttentionShapes
    layout: str
    input_dtype: Any
    q: Any
    k: Any
    v: Any
    scale: float
    causal: bool
    window: tuple[int | None, int | None] | None
    alibi: Any  # (1, Hkv, G, 1, 1) or None
    mask: Any  # (B|1, Hkv|1, G|1, T|1, S|1) or None
    cu_seqlens: tuple[int, ...] | None

    @property
    def q_len(self) -> int:
        """Number of queries T in this problem (or segment)."""
        return int(self.q.shape[TIME_AXIS])

    @property
    def kv_len(self) -> int:
        """Number of keys S in this problem (or segment)."""
        return int(self.k.shape[TIME_AXIS])

    @property
    def offset(self) -> int:
        """Position of query 0 among the keys: S - T (queries align bottom-right)."""
        return self.kv_len - self.q_len

    @property
    def dtype(self) -> Any:
        """The dtype the math runs in."""
        return self.q.dtype

    def key_range(self, q_lo: int, q_hi: int) -> tuple[int, int]:
        """Keys [lo, hi) that causal/window rules may let queries [q_lo, q_hi) see.

        Only geometry counts here (masks and ALiBi can hide more, never less), so a
        tiled form can skip every key block outside this range without changing a bit
        of the result.
        """
        lo, hi = 0, self.kv_len
        if q_hi <= q_lo:
            return 0, 0
        first, last = q_lo + self.offset, q_hi - 1 + self.offset  # query positions
        right = 0 if self.causal else None
        if self.window is not None:
            left_w, right_w = self.window
            if left_w is not None:
                lo = max(lo, first - left_w)
            if right_w is not None:
                right = right_w if right is None else min(right, right_w)
        if right is not None:
            hi = min(hi, last + right + 1)
        return lo, max(lo, hi)

    def scores(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> Any:
        """Masked, scaled logits of queries [q_lo, q_hi) against keys [k_lo, k_hi).

        Returns (B, Hkv, G, q_hi - q_lo, k_hi - k_lo) holding
        ``scale * q_i·k_j - slope * |p_i - j| + mask_ij`` where key j is visible to
        query i, and -inf where it is not; p_i = i + S - T is query i's position.
        """
        xp = self.xp
        q = self.q[..., q_lo:q_hi, :]
        k = self.k[..., k_lo:k_hi, :]
        s = xp.matmul(q, xp.matrix_transpose(k)) * self.scale
        visible = None

        def restrict(cond: Any) -> None:
            nonlocal visible
            visible = cond if visible is None else xp.logical_and(visible, cond)

        if self.causal or self.window is not None or self.alibi is not None:
            device = array_api_compat.device(s)
            q_pos = xp.arange(q_lo + self.offset, q_hi + self.offset, device=device)
            k_pos = xp.arange(k_lo, k_hi, device=device)
            distance = xp.reshape(q_pos, (-1, 1)) - xp.reshape(k_pos, (1, -1))  # p_i - j
        if self.causal:
            restrict(distance >= 0)
        if self.window is not None:
            left, right = self.window
            if left is not None:
                restrict(distance <= left)
            if right is not None:
                restrict(distance >= -right)
        if self.alibi is not None:
            s = s - self.alibi * xp.astype(xp.abs(distance), self.dtype)
        if self.mask is not None:
            rows = slice(None) if self.mask.shape[3] == 1 else slice(q_lo, q_hi)
            cols = slice(None) if self.mask.shape[4] == 1 else slice(k_lo, k_hi)
            block = self.mask[..., rows, cols]
            if xp.isdtype(block.dtype, "bool"):
                restrict(block)
            else:
                s = s + block
        if visible is not None:
            s = xp.where(visible, s, -math.inf)
        return s

    def segment(self, lo: int, hi: int) -> SoftmaxProblem:
        """The sub-problem of packed positions [lo, hi) (queries and keys alike)."""
        mask = self.mask
        if mask is not None:
            rows = slice(None) if mask.shape[3] == 1 else slice(lo, hi)
            cols = slice(None) if mask.shape[4] == 1 else slice(lo, hi)
            mask = mask[..., rows, cols]
        return replace(
            self,
            q=self.q[..., lo:hi, :],
            k=self.k[..., lo:hi, :],
            v=self.v[..., lo:hi, :],
            mask=mask,
            cu_seqlens=None,
        )

    def map_segments(self, fn: Any, *per_query: Any) -> tuple[Any, ...]:
        """Run ``fn(problem, *per_query)`` on each ``cu_seqlens`` segment and join the results.

        ``per_query`` are extra grouped arrays with time on axis 3 (o, lse, do); each
        result of ``fn`` is a grouped array with time on axis 3. Without ``cu_seqlens``
        this is one call on the whole problem.
        """
        if self.cu_seqlens is None:
            return fn(self, *per_query)
        parts = []
        for lo, hi in itertools.pairwise(self.cu_seqlens):
            extras = [x[..., lo:hi, :] for x in per_query]
            parts.append(fn(self.segment(lo, hi), *extras))
        return tuple(self.xp.concat(list(results), axis=TIME_AXIS) for results in zip(*parts, strict=True))

    def empty_result(self) -> tuple[Any, Any]:
        """Output and lse of queries that see no key: zeros and -inf."""
        m, _, o = self.empty_result_rows(0, self.q_len)
        return o, m

    def empty_result_rows(self, q_lo: int, q_hi: int) -> tuple[Any, Any, Any]:
        """Online-softmax accumulators for queries [q_lo, q_hi): m = -inf, l = 0, Õ = 0."""
        xp = self.xp
        rows = (*self.q.shape[:3], q_hi - q_lo)
        device = array_api_compat.device(self.q)
        m = xp.full((*rows, 1), -math.inf, dtype=self.dtype, device=device)
        l = xp.zeros((*rows, 1), dtype=self.dtype, device=device)
        o = xp.zeros((*rows, int(self.v.shape[-1])), dtype=self.dtype, device=device)
        return m, l, o

    def zero_kv_gradients(self, n_keys: int) -> tuple[Any, Any]:
        """Zero dk, dv for ``n_keys`` keys, per query head: (B, Hkv, G, n_keys, D)."""
        xp = self.xp
        lead = (*self.q.shape[:3], n_keys)
        device = array_api_compat.device(self.q)
        dk = xp.zeros((*lead, int(self.k.shape[-1])), dtype=self.dtype, device=device)
        dv = xp.zeros((*lead, int(self.v.shape[-1])), dtype=self.dtype, device=device)
        return dk, dv

    def zero_gradients(self) -> tuple[Any, Any, Any]:
        """Zero (dq, dk, dv) in the grouped layout, dk and dv per query head."""
        return (self.xp.zeros_like(self.q), *self.zero_kv_gradients(self.kv_len))

    # ---- conversions between the caller's arrays and the grouped layout ----

    def grouped_query_like(self, name: str, x: Any, dim: int) -> Any:
        """Check that ``x`` has the shape of the output (B, T, Hq, dim) and group it."""
        _checks.namespace_of(q=self.q, **{name: x})
        s = self.shapes
        expected = (
            (s.batch, s.q_len, s.q_heads, dim) if self.layout == "bthd" else (s.batch, s.q_heads, s.q_len, dim)
        )
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (layout={self.layout!r}), got {tuple(x.shape)}")
        _checks.require_floating(name, x, self.xp)
        return to_grouped(self.xp, self.xp.astype(x, self.dtype), self.layout, s.kv_heads)

    def grouped_lse(self, lse: Any) -> Any:
        """Check that ``lse`` is (B, Hq, T) and return it as (B, Hkv, G, T, 1)."""
        _checks.namespace_of(q=self.q, lse=lse)
        s = self.shapes
        expected = (s.batch, s.q_heads, s.q_len)
        if tuple(lse.shape) != expected:
            raise ValueError(f"lse must have shape (B, Hq, T) = {expected}, got {tuple(lse.shape)}")
        _checks.require_floating("lse", lse, self.xp)
        lse = self.xp.astype(lse, self.dtype)
        return self.xp.reshape(lse, (s.batch, s.kv_heads, s.group, s.q_len, 1))

    def output(self, o: Any) -> Any:
        """Grouped (B, Hkv, G, T, D) -> the caller's layout and dtype."""
        return self.xp.astype(from_grouped(self.xp, o, self.layout), self.input_dtype, copy=False)

    def lse_output(self, lse: Any) -> Any:
        """Grouped (B, Hkv, G, T, 1) -> (B, Hq, T) in the compute dtype."""
        s = self.shapes
        return self.xp.reshape(lse, (s.batch, s.q_heads, s.q_len))

    def kv_gradient(self, dx: Any) -> Any:
        """Gradient w.r.t. k or v: sum the (B, Hkv, G, S, D) group axis, then the caller's layout."""
        return self.output(self.xp.sum(dx, axis=2, keepdims=True))


def prepare(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool,
    scale: float | None,
    mask: Any,
    window: Any,
    alibi_slopes: Any,
    layout: str,
    cu_seqlens: Any,
    backend: str | None,
) -> SoftmaxProblem:
    """Check every argument of a softmax-attention call and build its :class:`SoftmaxProblem`."""
    layout = _checks.check_layout(layout)
    xp = _checks.namespace_of(q=q, k=k, v=v, mask=mask, alibi_slopes=alibi_slopes)
    chosen = resolve_backend(backend, xp)
    shapes = _checks.check_qkv(q, k, v, layout, xp)
    _checks.check_bool("causal", causal)
    scale = _checks.check_scale(scale, shapes.key_dim)
    window = _checks.check_window(window)
    offsets = _checks.check_cu_seqlens(cu_seqlens, shapes)
    dtype = compute_dtype(xp, q.dtype)

    slopes = _checks.check_alibi_slopes(alibi_slopes, shapes.q_heads, xp)
    if slopes is not None:
        slopes = xp.reshape(xp.astype(slopes, dtype), (1, shapes.kv_heads, shapes.group, 1, 1))
    mask4 = _checks.check_mask(mask, shapes, xp)
    mask5 = None
    if mask4 is not None:
        b, h, t, s = mask4.shape
        heads = (shapes.kv_heads, shapes.group) if h != 1 else (1, 1)
        mask5 = xp.reshape(mask4, (b, *heads, t, s))
        if not xp.isdtype(mask5.dtype, "bool"):
            mask5 = xp.astype(mask5, dtype)

    def grouped(x: Any, heads: int) -> Any:
        return to_grouped(xp, xp.astype(x, dtype, copy=False), layout, heads)

    # k and v have Hkv heads, so grouping them by Hkv gives a group axis of size 1.
    q5, k5, v5 = (grouped(x, shapes.kv_heads) for x in (q, k, v))
    return SoftmaxProblem(
        xp=xp,
        backend=chosen,
        shapes=shapes,
        layout=layout,
        input_dtype=q.dtype,
        q=q5,
        k=k5,
        v=v5,
        scale=scale,
        causal=causal,
        window=window,
        alibi=slopes,
        mask=mask5,
        cu_seqlens=offsets,
    )
