"""Launcher for the tensor-core chunked linear scan in ``cuda/chunk_wgmma.cu`` and ``cuda/chunk_mma.cu``.

It covers what the causal linear scan's kernels see most: float16 or bfloat16 data, no
gate or one log-gate per step (linear attention, simple GLA, RetNet, Mamba-2), Dk and Dv
multiples of 8 up to 256 for Dk, and operands whose rows start on 16 bytes. Anything else
is declined (None) and :func:`linattn.backends._cuda_scan.linear_scan` runs its CUDA-core
kernel instead. On Hopper GPUs (compute capability 9.0) the kernel on warpgroup products
(wgmma) runs (its two warpgroups split the keys where Dk > 128); elsewhere the one on
mma.sync. Both compute the same arithmetic (two-part intermediates, float32 accumulation). float32 data
without a gate and with Dk <= 128 runs ``cuda/chunk_tf32.cu``: every product three TF32
products of two-part operands (3xTF32), float32-accurate, in chunks of 32 steps.

Work split: a block of one or two groups of four warps per (leading index, tile of
value columns, time segment) walks its segment in chunks of 64 steps; the groups share
the q and k tiles, and blocks of one leading index are neighbours in the grid, so that
the tiles they share come from L2 after the first read. When the blocks alone would
leave multiprocessors idle and the sequence is long, the scan runs in three passes as
the CUDA-core kernel does: each segment's own state, a prefix over the segments, then
each segment's outputs from its entering state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from linattn.backends import _cuda_launch as cl
from linattn.backends import _cuda_scan as cs

# Tests and benchmarks switch these: the tensor-core kernel at all, Hopper's warpgroup
# kernel (``cuda/chunk_wgmma.cu``) where it applies, the two-part (hi + lo)
# intermediates that make the products float32-accurate, and one warpgroup per block
# where that gives more blocks (``_one_warpgroup_where_it_fills``; off: two wherever Dv
# has the columns).
ENABLED = True
WGMMA = True
SPLIT = True
NARROW = True
# float32 data on tensor cores, each product three TF32 products of two-part operands
# (``cuda/chunk_tf32.cu``, float32-accurate); off: float32 runs on the CUDA-core kernel.
TF32X3 = True

_CHUNK = 64
_GROUP_WARPS = 4
_MAX_DK = 256
# Shared memory an SM holds (H100/H200: 228 KiB; a block may take 227 of them).
_SHARED_PER_SM = 228 * 1024


@dataclass(frozen=True)
class _ChunkPlan:
    """A tiling: padded keys, value columns per group of four warps, groups, warps along the state's rows."""

    dkp: int
    vb: int
    groups: int
    wm: int

    @property
    def columns(self) -> int:
        return self.groups * self.vb

    @property
    def threads(self) -> int:
        return 32 * _GROUP_WARPS * self.groups

    @property
    def shared_bytes(self) -> int:
        """The block's shared memory (each kernel's plan type knows its own)."""
        raise NotImplementedError


@dataclass(frozen=True)
class _LinearPlan(_ChunkPlan):
    """The linear kernel's tiling, with its q tiles in flight (1: ``Q_SINGLE``, for two groups at Dk = 256)."""

    q_tiles: int = 2

    @property
    def shared_bytes(self) -> int:
        return _shared_bytes(self.dkp, self.columns, self.groups, self.q_tiles)


def gate_table_bytes(warps: int) -> int:
    """The gated chunk kernels' gate tables in shared memory, for a block of ``warps`` warps.

    Two chunks of log-gates (float32), and per warp the chunk's cumulative log-gates
    (float64) with their row and key decay factors and the scores' two sets of factors
    (float32 each): ``chunk_decays`` in ``cuda/mma_common.cuh``.
    """
    return 4 * 2 * _CHUNK + (8 + 4 + 4 + 8) * warps * _CHUNK


def _shared_bytes(dkp: int, columns: int, groups: int, q_tiles: int) -> int:
    """The kernel's shared memory: ``q_tiles`` q tiles, two k and v tiles, the state (hi, lo), the output, gates.

    The gates: the gate tables (``gate_table_bytes``) and the per-warp maxima.
    """
    qk, vs = dkp + 8, columns + 8
    elements = (q_tiles + 2) * _CHUNK * qk + 2 * _CHUNK * vs + 2 * dkp * vs + _CHUNK * vs
    warps = _GROUP_WARPS * groups
    return 2 * elements + gate_table_bytes(warps) + 4 * warps


@functools.cache
def _chunk_plan(dtype: str, Dk: int, Dv: int, shared_limit: int) -> _LinearPlan | None:
    """The kernel's tiling for these sizes, or None when it does not cover them.

    Two groups of warps share a block's q and k tiles when Dv has the columns for both
    and the tiles fit in ``shared_limit`` bytes, with one q tile in flight where two do
    not fit (Dk = 256: two groups, each its own 256-row state, hold twice the warps per
    multiprocessor and read q and k half as often as one group of 32 columns would).
    """
    if dtype not in ("float16", "bfloat16") or Dk % 8 or Dv % 8 or Dk > _MAX_DK:
        return None
    dkp = 16 * math.ceil(Dk / 16)
    vb = min(64 if dkp <= 128 else 32, 16 * math.ceil(Dv / 16))
    wm = warps_along_rows(dkp, vb)
    if wm is None:
        return None
    plans = [_LinearPlan(dkp, vb, 2, wm, q_tiles) for q_tiles in (2, 1) if Dv > vb]
    plans.append(_LinearPlan(dkp, vb, 1, wm))
    return next((plan for plan in plans if plan.shared_bytes <= shared_limit), None)


@dataclass(frozen=True)
class _WarpgroupPlan:
    """The warpgroup kernel's tiling: keys padded to 64 (to 256 past 128), warpgroups, a gate or not.

    Each warpgroup owns 64 value columns, or at dkp = 256 (``key_split``) the two of a
    block split the keys of the same 64.
    """

    dkp: int
    groups: int
    gated: bool

    @property
    def key_split(self) -> bool:
        return self.dkp > 128

    @property
    def columns(self) -> int:
        return 64 if self.key_split else 64 * self.groups

    @property
    def threads(self) -> int:
        return 128 * self.groups

    @property
    def shared_bytes(self) -> int:
        """Swizzled 64 x 64 tiles (8 KB each, from 1 KB slack for their alignment), output staging, gates.

        Tiles: two chunks of k (``dkp / 64`` tiles each) and of q (one with a gate at
        ``key_split``), two of v and with a gate the decayed values (hi, lo) per 64 value
        columns, and the state (hi, lo) per warpgroup. Output staging: 16 rows of 72 per
        warp, or at ``key_split`` the partial outputs of the second warpgroup (float32).
        Then the per-warp maxima, and with a gate the gate tables (``gate_table_bytes``).
        """
        blocks, warps, value_tiles = self.dkp // 64, 4 * self.groups, self.columns // 64
        q_chunks = 1 if self.key_split and self.gated else 2
        state_blocks = blocks // 2 if self.key_split else blocks
        tiles = ((q_chunks + 2) * blocks + 2 * value_tiles + 2 * state_blocks * self.groups
                 + (2 * value_tiles if self.gated else 0))
        staging = 4 * 16 * 64 * 4 if self.key_split else warps * 16 * (64 + 8) * 2
        gates = gate_table_bytes(warps) if self.gated else 0
        return 1024 + 8192 * tiles + staging + 4 * warps + gates


def _warpgroup_plan(dtype: str, Dk: int, Dv: int, gated: bool, device: int) -> _WarpgroupPlan | None:
    """The warpgroup kernel's tiling on a Hopper GPU (compute capability 9.0), or None.

    It covers float16 and bfloat16 with Dk <= 256; two warpgroups share a block's q and k
    tiles when Dv has more than 64 columns, and split the keys when Dk > 128.
    """
    if not WGMMA or cl.compute_capability(device) != "90":
        return None
    if dtype not in ("float16", "bfloat16") or Dk > _MAX_DK or Dk % 8 or Dv % 8:
        return None
    dkp = 64 * math.ceil(Dk / 64) if Dk <= 128 else _MAX_DK
    plan = _WarpgroupPlan(dkp, 2 if Dv > 64 or dkp > 128 else 1, gated)
    return plan if plan.shared_bytes <= _shared_limit(device) else None


@dataclass(frozen=True)
class _Tf32Plan:
    """The float32 kernel's tiling: keys padded to 8, warps per block (each owns 16 value columns); chunks of 32."""

    dkp: int
    warps: int

    @property
    def columns(self) -> int:
        return 16 * self.warps

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def shared_bytes(self) -> int:
        """A chunk of q and k, hi and lo (rows of dkp + 4 words), of v (columns + 4), of the scores, hi and lo (32 + 8).

        84.5 KiB at Dk = 128 and four warps: two blocks share an H100 multiprocessor, as
        its registers (up to 255 per thread) allow.
        """
        return 4 * _TF32_CHUNK * (4 * (self.dkp + 4) + self.columns + 4 + 2 * (_TF32_CHUNK + 8))


# The float32 kernel's widths in warps, widest first: a narrower one where the widest
# leaves multiprocessors idle (``_tf32_width``).
_TF32_WARPS = (4, 2, 1)
# Its chunk: 32 steps, for which its q, k and score tiles fit split into hi and lo beside a
# second block. H100, GPU time at (B, T, H, D) = (1, 8192, 96, 128), (4, 2048, 16, 128),
# (16, 2048, 16, 128): 64 steps with the splits made in registers 2.373, 0.503, 1.202 ms;
# 32 steps 2.117, 0.422, 1.069; with split tiles, two accumulators and the next chunk's
# loads issued before the outputs' products 1.924, 0.353, 0.958 (``docs/gpu.rst``, stop 19).
_TF32_CHUNK = 32
_TF32_MAX_DK = 128
_TF32_FILL = 0.7


def _tf32_plans(dtype: str, Dk: int, Dv: int, gated: bool, device: int) -> tuple[_Tf32Plan, ...]:
    """The float32 kernel's tilings for these sizes, widest first (empty: not covered).

    It covers float32 data, no gate, Dk <= 128 and Dk, Dv multiples of 4 (rows of 16 bytes).
    """
    if not TF32X3 or dtype != "float32" or gated or Dk % 4 or Dv % 4 or Dk > _TF32_MAX_DK:
        return ()
    dkp, limit = 8 * math.ceil(Dk / 8), _shared_limit(device)
    plans = [_Tf32Plan(dkp, w) for w in _TF32_WARPS if 16 * w < Dv + 16 or w == _TF32_WARPS[-1]]
    return tuple(plan for plan in plans if plan.shared_bytes <= limit)


def _tf32_width(plans: tuple[_Tf32Plan, ...], n_lead: int, Dv: int, T: int, device: int) -> _Tf32Plan:
    """The widest of ``plans`` whose blocks, time segments included, give ``_TF32_FILL`` of the multiprocessors one.

    A narrower block recomputes the chunk's scores per fewer value columns, and each of its
    warps takes a larger share of them; where time segments can make up the blocks
    (a long T), the widest runs.
    """
    return widest_filling(plans, n_lead, Dv, T, cs._sm_count(device), _TF32_FILL)[0]


def linear_plan(dtype: str, Dk: int, Dv: int, gated: bool, device: int
                ) -> _WarpgroupPlan | _LinearPlan | _Tf32Plan | None:
    """The plan a call runs: the warpgroup kernel's where it applies, else the mma.sync kernel's, or None.

    float32 data: the widest of the float32 kernel's tilings (the launcher may narrow it).
    """
    if dtype == "float32":
        return next(iter(_tf32_plans(dtype, Dk, Dv, gated, device)), None)
    return _warpgroup_plan(dtype, Dk, Dv, gated, device) or _chunk_plan(dtype, Dk, Dv, _shared_limit(device))


def warps_along_rows(dkp: int, vb: int) -> int | None:
    """How a group's four warps split a (dkp × vb) state: warps along its rows (the rest along its columns).

    Each warp's tile must be whole 16-row tiles and an even number of 8-column tiles (one
    ldmatrix.x4 of the B operand feeds two); the most warps along the rows win. None: no split fits.
    """
    for wm in (4, 2, 1):
        wn = _GROUP_WARPS // wm
        if (dkp // 16) % wm == 0 and (vb // 8) % wn == 0 and (vb // 8 // wn) % 2 == 0:
            return wm
    return None


_NARROWING = ((64, 2), (64, 1), (32, 1), (16, 1))


def narrowing_plans(plan_type: type[_ChunkPlan], dtype: str, Dk: int, Dv: int, max_dk: int, shared_limit: int,
                    tilings: tuple[tuple[int, int], ...] = _NARROWING) -> tuple[Any, ...]:
    """Tilings of ``plan_type`` for these sizes that fit ``shared_limit``, widest first (empty: not covered).

    ``tilings`` are (value columns per group of four warps, groups), widest first. The
    default: two groups sharing a block's tiles, 64 value columns each; then one group of
    64, 32 or 16 columns, for more blocks when the leading indices are few.
    """
    if dtype not in ("float16", "bfloat16") or Dk % 8 or Dv % 8 or Dk > max_dk:
        return ()
    dkp = 16 * math.ceil(Dk / 16)
    plans = []
    for vb, groups in tilings:
        if vb > 16 * math.ceil(Dv / 16) or (groups == 2 and Dv <= vb):
            continue
        wm = warps_along_rows(dkp, vb)
        if wm is not None and plan_type(dkp, vb, groups, wm).shared_bytes <= shared_limit:
            plans.append(plan_type(dkp, vb, groups, wm))
    return tuple(plans)


def choose_plan(plans: tuple[Any, ...], n_lead: int, Dv: int, sms: int, fill: float) -> Any:
    """The widest of ``plans`` (widest first) that gives at least ``fill`` of the multiprocessors a block.

    One block fits a multiprocessor: a wave of fewer, wider blocks beats more waves of
    narrow ones, which recompute and reload per block what a wide one shares.
    """
    for plan in plans:
        if n_lead * math.ceil(Dv / plan.columns) >= fill * sms:
            return plan
    return plans[-1]


def _shared_limit(device: int) -> int:
    """Shared memory one block may opt into on this device."""
    return cl.device_attribute(device, "MaxSharedMemoryPerBlockOptin")


# Segments are at least this long: the extra passes read k and v once more and cost two
# more launches, worth it only when each segment has many chunks to walk. Measured on an
# H100 (bf16, D = 128, GPU time with the host hidden): at (B, T, H) = (4, 2048, 16), two
# segments of 1024 steps took 114.7 µs against 98.5 for one pass; at (2, 16384, 16), four
# of 4096 took 321.8 µs against 701.7 (``docs/gpu.rst``, stop 17).
_MIN_SEGMENT = 2048


def segment_split(n_blocks: int, T: int, shared_bytes: int, sms: int) -> tuple[int, int]:
    """(time segments, steps per segment) for ``n_blocks`` blocks of ``shared_bytes`` each on ``sms`` multiprocessors.

    As many segments as fill the resident blocks once, if T allows segments of at least
    ``_MIN_SEGMENT`` steps; each segment whole chunks of 64 steps (the last may be shorter).
    """
    P = 1
    if n_blocks < sms and T >= 2 * _MIN_SEGMENT:
        resident = sms * max(1, _SHARED_PER_SM // (shared_bytes + 1024))
        P = max(1, min(resident // n_blocks, T // _MIN_SEGMENT))
    L = _CHUNK * math.ceil(math.ceil(T / P) / _CHUNK)
    return math.ceil(T / L), L


def widest_filling(plans: tuple[Any, ...], n_lead: int, Dv: int, T: int, sms: int, fill: float
                   ) -> tuple[Any, int, int]:
    """The widest of ``plans`` whose blocks, time segments included, give ``fill`` of the ``sms`` multiprocessors one.

    Returns (plan, time segments, steps per segment) by ``segment_split``; where none
    fills them, the last (narrowest) plan.
    """
    for plan in plans:
        n_blocks = n_lead * math.ceil(Dv / plan.columns)
        P, L = segment_split(n_blocks, T, plan.shared_bytes, sms)
        if n_blocks * P >= fill * sms or plan is plans[-1]:
            return plan, P, L
    raise ValueError("plans is empty")


def _segments(n_blocks: int, T: int, plan: _ChunkPlan, device: int) -> int:
    """Time segments: as many as fill the resident blocks once, if T allows."""
    return _time_split(n_blocks, T, plan, device)[0]


def _time_split(n_blocks: int, T: int, plan: Any, device: int) -> tuple[int, int]:
    """(segments, steps per segment): ``segment_split``'s, on this device."""
    return segment_split(n_blocks, T, plan.shared_bytes, cs._sm_count(device))


def _blocks(plan: Any, n_lead: int, Dv: int, T: int, device: int) -> int:
    """The blocks a call launches with ``plan``: leading indices times column tiles times time segments."""
    n_blocks = n_lead * math.ceil(Dv / plan.columns)
    return n_blocks * _time_split(n_blocks, T, plan, device)[0]


def _one_warpgroup_where_it_fills(plan: Any, n_lead: int, Dv: int, T: int, device: int) -> Any:
    """The warpgroup plan with one warpgroup (64 value columns) per block where that runs more blocks.

    Two warpgroups share a block's q and k tiles, which pays where blocks fill the
    multiprocessors; where they would not, and time segments cannot make up the count
    (a short T), one warpgroup per block doubles the blocks, up to one per multiprocessor.
    H100, bf16, GPU time with the host hidden: at (B, T, H, D) = (4, 2048, 16, 128) the
    linear scan 98.6 -> 62.5 µs, simple GLA 152.2 -> 103.9; at (2, 4096, 16, 128)
    155.8 -> 118.0 and 247.5 -> 188.6; at (2, 16384, 16, 128), where segments fill the
    multiprocessors either way, one warpgroup was slower (371.0 against 315.9 µs), as at the
    shapes whose blocks fill them (``docs/gpu.rst``, stop 17).
    """
    if not NARROW or not isinstance(plan, _WarpgroupPlan) or plan.groups == 1 or plan.key_split:
        return plan
    one = _WarpgroupPlan(plan.dkp, 1, plan.gated)
    wide, narrow = (_blocks(p, n_lead, Dv, T, device) for p in (plan, one))
    return one if wide < narrow <= cs._sm_count(device) else plan


def chunked_linear_scan(call: cs.Call) -> tuple[Any, Any] | None:
    """The scan of ``causal_scan`` on tensor cores, with no gate or a per-step log-gate (..., T, 1).

    ``call`` holds the operands q, k, v, gk, gv, state; returns ``(o, final_state)`` in
    the caller's library, or None when the kernel does not cover the call.
    """
    qr, kr, vr, gr, gvr, sr = call.refs
    if not ENABLED or gvr is not None or (gr is not None and gr.shape[-1] != 1):
        return None
    T, Dk, Dv = qr.shape[-2], qr.shape[-1], vr.shape[-1]
    plan = linear_plan(call.dtype, Dk, Dv, gr is not None, call.device)
    present = [r for r in call.refs if r is not None]
    lead = cs.broadcast_lead(tuple(r.shape for r in present)) if all(len(r.shape) >= 2 for r in present) else None
    if plan is None or T == 0 or lead is None or len(lead) > 3:
        return None
    qo, ko, vo, go = (cs.operand(r) for r in (qr, kr, vr, gr))
    # Rows on 16 bytes for cp.async; the gate is read a value at a time. The output is new
    # and contiguous with Dv a multiple of the width, so its rows are aligned too.
    width = 16 // cl.itemsize(call.dtype)
    if cs._vector_width([qo, ko, vo], cl.itemsize(call.dtype), width, width) != width:
        return None
    lead3 = (1,) * (3 - len(lead)) + lead
    n_lead = math.prod(lead3)
    if isinstance(plan, _Tf32Plan):
        plan = _tf32_width(_tf32_plans(call.dtype, Dk, Dv, False, call.device), n_lead, Dv, T, call.device)
        defines = {"DKP": plan.dkp, "NW": plan.warps}
        source, kernel = "chunk_tf32.cu", "chunk_linear_scan_tf32"
    else:
        plan = _one_warpgroup_where_it_fills(plan, n_lead, Dv, T, call.device)
        defines = {"DKP": plan.dkp, "GROUPS": plan.groups, "ELEM_HALF": int(call.dtype == "float16"),
                   "GATED": int(go is not None), "SPLIT": int(SPLIT), "WIDE_O": int(call.wide)}
        if isinstance(plan, _WarpgroupPlan):
            source, kernel = "chunk_wgmma.cu", "chunk_linear_scan_wg"
        else:
            source, kernel = "chunk_mma.cu", "chunk_linear_scan"
            defines |= {"VB": plan.vb, "WM": plan.wm, "Q_SINGLE": int(plan.q_tiles == 1)}
    col_blocks = math.ceil(Dv / plan.columns)
    P, L = _time_split(n_lead * col_blocks, T, plan, call.device)
    o, oo = call.output(lead, T, Dv)
    run = call.launcher()

    def scan(write_o: bool, s_in: int, s_in_strides: list[int], segments: int) -> tuple[Any, int]:
        s_out, s_out_ptr = call.empty((n_lead, segments, Dk, Dv), "float32")
        args = [qo.ptr, ko.ptr, vo.ptr, (go or qo).ptr, s_in or s_out_ptr, oo.ptr, s_out_ptr,
                T, Dk, Dv, lead3[1], lead3[2], L if segments > 1 else T, col_blocks,
                *qo.strides, *ko.strides, *vo.strides, *oo.strides, *cs._strides(go), *s_in_strides]
        run(source, kernel, {**defines, "HAS_SIN": int(s_in != 0), "WRITE_O": int(write_o)},
            (n_lead * col_blocks, segments, 1), plan.threads, args, plan.shared_bytes)
        return s_out, s_out_ptr

    if P == 1:
        s_out, _ = scan(True, *cs.state_in(sr), 1)
    else:
        _local, local_ptr = scan(False, 0, [0] * 6, P)  # each segment's own state, from zero (held till queued)
        _entering, s_out, entering_ptr = cs.join_segments(call, run, local_ptr, [(go, 1), (None, 0)], lead3, T, Dk,
                                                          Dv, P, L)
        scan(True, entering_ptr, cs.segment_state_strides(lead3, P, Dk, Dv), P)
    state_lead = cs.broadcast_lead(tuple(r.shape for r in (kr, vr, gr, sr) if r is not None))
    return o, cs.final_state(s_out, lead3, state_lead, Dk, Dv)
