"""Launcher for the causal linear scan with a log-gate per key on tensor cores (``cuda/gla_chunk.cu``).

It covers what GLA's kernels see most: float16 or bfloat16 data, a log-gate per key
(..., T, Dk) and none per value, Dk ≤ 256 and Dv multiples of 8, and operands whose rows
start on 16 bytes. Anything else is declined (None) and
:func:`linattn.backends._cuda_scan.linear_scan` runs its CUDA-core kernel.

Two launches. ``gla_chunk_prepare`` runs every chunk of 64 steps at once: the chunk's
intra-chunk scores P_ij = Σ_d q_id k_jd e^{G_id − G_jd} (j ≤ i; 64 × 64, two parts of the
storage type), which do not depend on the state. ``gla_chunk_scan`` then walks each
(leading index, tile of value columns) through its chunks in order with the state in
registers: o = (q ⊙ e^G) S + P V and the update. P costs 4·64 bytes per step and leading
index, written once and read once per tile of value columns.

When the blocks would leave multiprocessors idle and T is long (few leading indices), the
scan splits T into time segments as the linear one does: a first launch of the scan
without outputs gives each segment's own state from zero and its log-decay per key (the
sum of g over its steps), ``cuda/segments.cu`` joins them into each segment's entering
state, and the scan then computes every segment's outputs at once. One block then takes
all of a leading index's value columns there too, forming each chunk's decays once.

The kernels hold at most 128 keys (their tiles of q, k, g and the decayed q and k fill
the shared memory). Past that, both launches run once for each of two parts of the keys:
the gate decays each key's row of the state on its own, so the state is the two parts'
states stacked and o the sum of their outputs (the first part's kept in float32, the
second's added to it before the one rounding to the storage type).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from linattn.backends import _cuda_launch as cl
from linattn.backends import _cuda_scan as cs
from linattn.backends._cuda_chunk import _GROUP_WARPS, _ChunkPlan, _shared_limit, narrowing_plans, widest_filling

# Tests and benchmarks switch the kernels off to compare with the CUDA-core one.
ENABLED = True

_CHUNK = 64
_MAX_DK = 128
# Past _MAX_DK keys, two launches of the kernels over two parts of the keys (``key_parts``).
_MAX_SPLIT_DK = 256
_PREPARE_THREADS = 512
# (value columns per group of four warps, groups), widest first; of equal widths, two
# groups first: eight warps per multiprocessor share the per-chunk gate work.
_TILINGS = ((64, 2), (32, 2), (64, 1), (16, 2), (32, 1), (16, 1))
# The widest tiling that gives at least this share of the multiprocessors a block, time
# segments included (see ``choose_tiling``); tests set 0 to run the widest.
_FILL = 0.7


class _GlaPlan(_ChunkPlan):
    """The scan's tiling (as the linear kernel's), with this scan's shared memory."""

    @property
    def segments(self) -> int:
        """Threads per pair of keys forming the decays: the largest power of two that fits the block (≤ 64 steps)."""
        return min(_CHUNK, 1 << int(math.log2(self.threads // (self.dkp // 2))))

    @property
    def shared_bytes(self) -> int:
        return _scan_shared_bytes(self.dkp, self.columns, self.groups, self.segments, True)

    @property
    def first_pass_shared_bytes(self) -> int:
        """The first pass of a time-segmented scan's: without the tiles of q, P and the shared state."""
        return _scan_shared_bytes(self.dkp, self.columns, self.groups, self.segments, False)


def _scan_shared_bytes(dkp: int, columns: int, groups: int, segments: int, write_o: bool) -> int:
    """The scan's shared memory: q, k, g as stored; decayed q, k; v and P; the state; gates.

    The decayed q and k, P and the state have two parts each; every tile is held once
    (224.5 KiB at Dk = 128 and 128 value columns). The gates, float32: each segment's
    product of the factors e^{g} per key, e^{G_C} per key, and a maximum per warp. The
    first pass of a time-segmented scan (``write_o`` False) holds k, g, their decayed
    parts and v, and each segment's sum of g per key.
    """
    qk, vs, p = dkp + 8, columns + 8, _CHUNK + 8
    if write_o:
        elements = 7 * _CHUNK * qk + _CHUNK * vs + 2 * _CHUNK * p + 2 * dkp * vs
        return 2 * elements + 4 * segments * dkp + 4 * dkp + 4 * _GROUP_WARPS * groups
    elements = 4 * _CHUNK * qk + _CHUNK * vs
    return 2 * elements + 8 * segments * dkp + 4 * dkp + 4 * _GROUP_WARPS * groups


def _prepare_shared_bytes(dkp: int) -> int:
    """The preparation's shared memory: q, k, g as stored, the decayed queries and keys, P, gates.

    The decayed queries and keys (112 rows each) have two parts; P is float32 (64 × 68);
    the gates: each 8-step half block's product of e^{g} per key (float32) and four flags;
    sixteen maxima. e^{g} (float32) and the diagonal blocks' partial scores reuse the decayed
    operands' space.
    """
    return 2 * (3 * _CHUNK + 4 * 112) * (dkp + 8) + 4 * _CHUNK * (_CHUNK + 4) + 4 * 8 * dkp + 4 * 4 + 4 * 16


@functools.cache
def _scan_plans(dtype: str, Dk: int, Dv: int, shared_limit: int) -> tuple[_GlaPlan, ...]:
    """The scan's tilings for these sizes, widest first (empty when the kernels do not cover them)."""
    if 16 * math.ceil(Dk / 16) > _MAX_DK or _prepare_shared_bytes(16 * math.ceil(Dk / 16)) > shared_limit:
        return ()
    return narrowing_plans(_GlaPlan, dtype, Dk, Dv, _MAX_DK, shared_limit, _TILINGS)


def choose_tiling(plans: tuple[_GlaPlan, ...], n_lead: int, Dv: int, T: int, sms: int) -> tuple[_GlaPlan, int, int]:
    """The widest of ``plans`` whose blocks, time segments included, give ``_FILL`` of the multiprocessors one.

    Returns (plan, time segments, steps per segment) (``widest_filling``). Each block forms
    its chunks' decays for its own value columns: a wide block over time segments does that
    once per chunk and leading index, where narrow blocks repeat it per tile of columns.
    Where nothing fills the multiprocessors, the narrowest tiling (the most blocks).
    """
    return widest_filling(plans, n_lead, Dv, T, sms, _FILL)


def key_parts(Dk: int) -> tuple[tuple[int, int], ...]:
    """The (first key, keys) of each launch: all Dk up to ``_MAX_DK`` padded, else two parts of at most that.

    The first part's keys are a multiple of 8, so the second's rows start on 16 bytes as
    the first's do; past ``_MAX_SPLIT_DK`` (two parts of ``_MAX_DK``) nothing.
    """
    if 16 * math.ceil(Dk / 16) <= _MAX_DK:
        return ((0, Dk),)
    if Dk > _MAX_SPLIT_DK:
        return ()
    first = 8 * math.ceil(Dk / 16)
    return ((0, first), (first, Dk - first))


def _key_columns(ref: cl.Ref, first: int, keys: int, itemsize: int) -> cl.Ref:
    """The view of keys [first, first + keys) of a (..., T, Dk) operand (the last axis contiguous)."""
    return cl.Ref(ref.ptr + first * itemsize, (*ref.shape[:-1], keys), ref.strides)


def _key_rows(ref: cl.Ref | None, first: int, keys: int) -> cl.Ref | None:
    """The view of rows [first, first + keys) of a (..., Dk, Dv) float32 state."""
    if ref is None:
        return None
    return cl.Ref(ref.ptr + 4 * first * ref.strides[-2], (*ref.shape[:-2], keys, ref.shape[-1]), ref.strides)


def chunked_gla_scan(call: cs.Call) -> tuple[Any, Any] | None:
    """The scan of ``causal_scan`` on tensor cores, with a log-gate per key (..., T, Dk) and none per value.

    ``call`` holds the operands q, k, v, gk, gv, state; returns ``(o, final_state)`` in
    the caller's library, or None when the kernels do not cover the call (outputs in
    float32 from 16-bit data, ``wide``, included: the CUDA-core kernel writes those).
    Past 128 keys, the kernels run once for each of two parts of the keys
    (:func:`key_parts`): the state's rows are the parts' states, o the sum of their outputs.
    """
    qr, kr, vr, gr, gvr, sr = call.refs
    T, Dk, Dv = qr.shape[-2], qr.shape[-1], vr.shape[-1]
    if not ENABLED or call.wide or gvr is not None or gr is None or gr.shape[-1] != Dk or Dk == 1:
        return None
    parts = key_parts(Dk)
    limit = _shared_limit(call.device)
    plans = [_scan_plans(call.dtype, keys, Dv, limit) for _, keys in parts]
    present = [r for r in call.refs if r is not None]
    lead = cs.broadcast_lead(tuple(r.shape for r in present)) if all(len(r.shape) >= 2 for r in present) else None
    if not parts or not all(plans) or T == 0 or lead is None or len(lead) > 3:
        return None
    size = cl.itemsize(call.dtype)
    keyed = [[cs.operand(_key_columns(r, first, keys, size)) for r in (qr, kr, gr)] for first, keys in parts]
    vo = cs.operand(vr)
    # Rows on 16 bytes (8 elements) for cp.async, g's and every key part's included.
    if cs._vector_width([vo, *(op for ops in keyed for op in ops)], 2, 8, 8) != 8:
        return None
    lead3 = (1,) * (3 - len(lead)) + lead
    n_lead = math.prod(lead3)
    o, oo = call.output(lead, T, Dv)
    state, state_ptr = call.empty((n_lead, Dk, Dv), "float32")
    # The first key part's outputs, float32, held (by this name) until both parts are queued.
    _o_part, o_part_ptr = call.empty((n_lead, T, Dv), "float32") if len(parts) > 1 else (None, 0)
    for index, ((first, keys), part_plans, (qo, ko, go)) in enumerate(zip(parts, plans, keyed, strict=True)):
        part = _KeyPart(first, keys, 0 if len(parts) == 1 else index + 1)
        last = _scan_keys(call, part_plans, part, (qo, ko, vo, go), _key_rows(sr, first, keys), (oo, o_part_ptr),
                          (state, state_ptr), lead3, T, Dk, Dv)
        if last is not None:  # a time-segmented scan's final state, from the join of the segments
            state[:, first:first + keys] = last  # (on the launches' stream: the library's current one)
    state_lead = cs.broadcast_lead(tuple(r.shape for r in (kr, vr, gr, sr) if r is not None))
    return o, cs.final_state(state, lead3, state_lead, Dk, Dv)


@dataclass(frozen=True)
class _KeyPart:
    """Keys [first, first + keys) of the call's, and the scan's ``O_PART`` (0: all; 1, 2: the first, second part)."""

    first: int
    keys: int
    o_part: int


def _scan_keys(call: cs.Call, plans: tuple[_GlaPlan, ...], part: _KeyPart, operands: tuple[cs.Operand, ...],
               initial: cl.Ref | None, outputs: tuple[cs.Operand, int], state: tuple[Any, int],
               lead3: tuple[int, int, int], T: int, Dk: int, Dv: int) -> Any | None:
    """Both kernels over one part of the keys: P, then the scan (time segments where they fill the GPU).

    ``operands`` are q, k, v, g with the part's keys; ``initial`` the part's rows of the
    initial state; ``outputs`` o and the float32 first part's outputs (``part.o_part``);
    ``state`` the (n_lead, Dk, Dv) float32 final state, whose rows ``part`` a one-pass scan
    writes. Returns the part's final state where time segments formed it (join), else None.
    """
    qo, ko, vo, go = operands
    oo, o_part_ptr = outputs
    keys, n_lead = part.keys, math.prod(lead3)
    plan, segments, seg_len = choose_tiling(plans, n_lead, Dv, T, cs._sm_count(call.device))
    n_chunks = math.ceil(T / _CHUNK)
    half = int(call.dtype == "float16")
    run = call.launcher()

    # P and its scales, held (by these names) until both launches are queued.
    _p_hi, p_hi_ptr = call.empty((n_lead, n_chunks, _CHUNK, _CHUNK))
    _p_lo, p_lo_ptr = call.empty((n_lead, n_chunks, _CHUNK, _CHUNK))
    _p_scale, p_scale_ptr = call.empty((n_lead, n_chunks), "float32")
    run("gla_chunk.cu", "gla_chunk_prepare", {"ELEM_HALF": half, "DKP": plan.dkp, "PREPARE": 1},
        (n_chunks, n_lead, 1), _PREPARE_THREADS,
        [qo.ptr, ko.ptr, go.ptr, p_hi_ptr, p_lo_ptr, p_scale_ptr, T, keys, lead3[1], lead3[2], *qo.strides,
         *ko.strides, *go.strides],
        _prepare_shared_bytes(plan.dkp))

    col_blocks = math.ceil(Dv / plan.columns)
    defines = {"ELEM_HALF": half, "DKP": plan.dkp, "VB": plan.vb, "GROUPS": plan.groups, "WM": plan.wm,
               "SEGS": plan.segments, "TIME_SEGMENTS": int(segments > 1)}

    def scan(write_o: bool, s_in: int, s_in_strides: list[int], s_out: tuple[Any, int, int]) -> tuple[Any, int]:
        """One launch over the time segments; returns (first pass) their log-decays and its address.

        Their exit states go to ``s_out``: (array, address, elements per leading index and segment).
        """
        _s_out, s_out_ptr, s_lead = s_out
        g_sum, g_sum_ptr = (None, 0) if write_o else call.empty((n_lead, segments, keys), "float32")
        o_part = part.o_part if write_o else 0
        run("gla_chunk.cu", "gla_chunk_scan",
            {**defines, "HAS_SIN": int(s_in != 0), "WRITE_O": int(write_o), **({"O_PART": o_part} if o_part else {})},
            (n_lead * col_blocks, segments, 1), plan.threads,
            [qo.ptr, ko.ptr, vo.ptr, go.ptr, p_hi_ptr, p_lo_ptr, p_scale_ptr, s_in or s_out_ptr, oo.ptr, s_out_ptr,
             o_part_ptr or s_out_ptr, s_lead, T, keys, Dv, lead3[1], lead3[2], col_blocks, *qo.strides, *ko.strides,
             *vo.strides, *oo.strides, *go.strides, *s_in_strides, seg_len, g_sum_ptr or s_out_ptr],
            plan.shared_bytes if write_o else plan.first_pass_shared_bytes)
        return g_sum, g_sum_ptr

    def segment_states() -> tuple[Any, int, int]:
        """A new (n_lead, segments, keys, Dv) float32 array for each segment's exit state."""
        return (*call.empty((n_lead, segments, keys, Dv), "float32"), keys * Dv)

    if segments == 1:
        whole, whole_ptr = state
        scan(True, *cs.state_in(initial), (whole, whole_ptr + 4 * part.first * Dv, Dk * Dv))
        return None
    # Each segment's own state from zero and its log-decays (held by these names till queued).
    local = segment_states()
    _g_sum, g_sum_ptr = scan(False, 0, [0] * 6, local)
    _entering, last, entering_ptr = cs.join_segments(call, run, local[1], [(go, keys), (None, 0)], lead3, T, keys,
                                                     Dv, segments, seg_len, formed=[g_sum_ptr, 0],
                                                     initial=cs.state_in(initial))
    scan(True, entering_ptr, cs.segment_state_strides(lead3, segments, keys, Dv), segment_states())
    return last
