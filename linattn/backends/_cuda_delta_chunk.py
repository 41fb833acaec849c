"""Launcher for the delta rule on tensor cores in ``cuda/delta_chunk.cu``.

It covers what the delta rule's kernels see most: float16 or bfloat16 data, one β per
step, no gate or one log-gate per step (DeltaNet, Gated DeltaNet), Dk ≤ 128 (≤ 256 on
Hopper) and Dv multiples of 8, and operands whose rows start on 16 bytes. Anything else is declined
(None) and :func:`linattn.backends._cuda_scan.delta_scan` runs its CUDA-core kernel.

Two launches. ``delta_chunk_prepare`` runs every chunk of 64 steps at once: the WY/UT
factor A = (I + L)⁻¹ diag(β) of the chunk (64 × 64, in two parts of the storage type),
which does not depend on the state. The scan then walks each (leading index, tile of
value columns) through its chunks in order with the state in registers: the corrections
U = A (V − e^G ⊙ K S), the outputs, the update. A costs 4·64 bytes per step and leading
index of k, written once and read once per tile of value columns. On Hopper GPUs
(compute capability 9.0) the scan runs on warpgroup products (``cuda/delta_wgmma.cu``,
tiles of 64 or 128 value columns; past 128 keys two warpgroups split the keys of 64);
elsewhere ``delta_chunk_scan`` on mma.sync, whose tiles narrow to 16 columns where the
leading indices are few.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from linattn.backends import _cuda_chunk
from linattn.backends import _cuda_launch as cl
from linattn.backends import _cuda_scan as cs
from linattn.backends._cuda_chunk import _GROUP_WARPS, _ChunkPlan, _shared_limit, choose_plan, narrowing_plans

# Tests and benchmarks switch the kernel off to compare with the CUDA-core one, and
# Hopper's warpgroup scan off to compare with the mma.sync one.
ENABLED = True
WGMMA = True

_CHUNK = 64
_MAX_DK = 128  # the mma.sync scan's
_MAX_DK_WARPGROUP = 256
_PREPARE_THREADS = 128


class _ScanPlan(_ChunkPlan):
    """The scan's tiling (as the linear kernel's), with the delta scan's shared memory."""

    @property
    def shared_bytes(self) -> int:
        return _scan_shared_bytes(self.dkp, self.columns, self.groups)


def _scan_shared_bytes(dkp: int, columns: int, groups: int) -> int:
    """The scan's shared memory: q and k tiles twice, v, A (two parts), R/U (two parts), the state (two parts), gates.

    The gates: the gate tables (``gate_table_bytes``) and three per-warp maxima.
    """
    qk, vs, a = dkp + 8, columns + 8, _CHUNK + 8
    elements = 4 * _CHUNK * qk + _CHUNK * vs + 2 * _CHUNK * a + 2 * _CHUNK * vs + 2 * dkp * vs
    warps = _GROUP_WARPS * groups
    return 2 * elements + _cuda_chunk.gate_table_bytes(warps) + 4 * 3 * warps


def _prepare_shared_bytes(dkp: int) -> int:
    """The preparation's shared memory: the k tile, L (float32), β, g and two unused factor rows, G (float64)."""
    return 2 * _CHUNK * (dkp + 8) + 4 * _CHUNK * (_CHUNK + 4) + 4 * 4 * _CHUNK + 4 * 4 + 8 * _CHUNK


@functools.cache
def _scan_plans(dtype: str, Dk: int, Dv: int, shared_limit: int) -> tuple[_ScanPlan, ...]:
    """The scan's tilings for these sizes, widest first (empty when the kernels do not cover them)."""
    return narrowing_plans(_ScanPlan, dtype, Dk, Dv, _MAX_DK, shared_limit)


# The widest tiling that gives at least this share of the multiprocessors a block (see
# ``choose_plan``); tests set 0 to run the widest.
_FILL = 0.7


def _choose(plans: tuple[_ScanPlan, ...], n_lead: int, Dv: int, sms: int) -> _ScanPlan:
    return choose_plan(plans, n_lead, Dv, sms, _FILL)


@dataclass(frozen=True)
class _WarpgroupPlan(_cuda_chunk._WarpgroupPlan):
    """The warpgroup scan's tiling as the linear one's, with its own shared memory.

    Keys padded to 64, warpgroups of 64 value columns; past 128 keys (padded to 256) two
    warpgroups that split the keys of 64 columns (``key_split``).
    """

    @property
    def shared_bytes(self) -> int:
        """Swizzled 64 × 64 tiles (8 KB each, from 1 KB slack for their alignment), output staging, gates.

        Tiles: two chunks of k (``dkp / 64`` tiles each) and of q, v (one per 64 value
        columns) and A (hi, lo); per warpgroup four work tiles (the state's two parts, or
        R, U and the decayed U). At ``key_split`` one chunk of q and of A, and the staging
        holds the second warpgroup's partial products (float32). The gate tables
        (``gate_table_bytes``), and three per-warp maxima.
        """
        blocks, warps, value_tiles = self.dkp // 64, 4 * self.groups, self.columns // 64
        chunks = 1 if self.key_split else 2
        tiles = (chunks + 2) * blocks + 2 * value_tiles + 2 * chunks + 4 * self.groups
        staging = 4 * 16 * 64 * 4 if self.key_split else warps * 16 * (64 + 8) * 2
        return 1024 + 8192 * tiles + staging + _cuda_chunk.gate_table_bytes(warps) + 4 * 3 * warps


# The warpgroup scan's blocks, widest first: two warpgroups share a block's q, k and A
# tiles; one gives twice the blocks. Tests set (1,) to run one.
WG_GROUPS = (2, 1)


def _warpgroup_plans(Dk: int, Dv: int, gated: bool, shared_limit: int) -> tuple[_WarpgroupPlan, ...]:
    """The warpgroup scan's tilings for 16-bit data with these sizes, widest first.

    Two warpgroups where Dv > 64, or past 128 keys (padded to 256) always two, which split
    the keys.
    """
    if Dk > _MAX_DK_WARPGROUP or Dk % 8 or Dv % 8:
        return ()
    if Dk > 128:
        plans = [_WarpgroupPlan(_MAX_DK_WARPGROUP, 2, gated)]
    else:
        plans = [_WarpgroupPlan(64 * math.ceil(Dk / 64), groups, gated) for groups in WG_GROUPS
                 if groups == 1 or Dv > 64]
    return tuple(plan for plan in plans if plan.shared_bytes <= shared_limit)


def choose_warpgroup(plans: tuple[_WarpgroupPlan, ...], n_lead: int, Dv: int, sms: int) -> _WarpgroupPlan | None:
    """The widest of ``plans`` whose blocks give ``_FILL`` of the ``sms`` multiprocessors one, else the narrowest.

    The narrowest (one warpgroup, 64 columns) runs even where the mma.sync scan's narrower
    tiles would give more blocks: H100, bf16, (B, T, H, D) = (2, 16384, 16, 128), 64 blocks
    of one warpgroup took 0.948 ms (gated 1.519) against 1.169 (1.569) for 128 mma.sync
    blocks of 32 columns; (8, 1024, 8, 64) 0.068 (0.098) against 0.074 (0.105) GPU time
    (``docs/gpu.rst``, stop 22). None: ``plans`` is empty.
    """
    return choose_plan(plans, n_lead, Dv, sms, _FILL) if plans else None


def warpgroup_plan(Dk: int, Dv: int, gated: bool, n_lead: int, device: int) -> _WarpgroupPlan | None:
    """The warpgroup scan's tiling for a call on ``device`` (``choose_warpgroup``), or None: off, or not Hopper."""
    if not WGMMA or cl.compute_capability(device) != "90":
        return None
    return choose_warpgroup(_warpgroup_plans(Dk, Dv, gated, _shared_limit(device)), n_lead, Dv, cs._sm_count(device))


def _lead_index_strides(own: tuple[int, int, int], full: tuple[int, int, int]) -> list[int]:
    """Strides that turn an index of ``full`` into one of ``own`` (C order; 0 where ``own`` broadcasts)."""
    strides, step = [], 1
    for n_own, n_full in zip(reversed(own), reversed(full), strict=True):
        strides.insert(0, step if n_own == n_full else 0)
        step *= n_own
    return strides


def chunked_delta_scan(call: cs.Call) -> tuple[Any, Any] | None:
    """The scan of ``delta_scan`` on tensor cores, with one β and at most one log-gate per step.

    ``call`` holds the operands q, k, v, beta, g, state; returns ``(o, final_state)`` in
    the caller's library, or None when the kernels do not cover the call.
    """
    qr, kr, vr, br, gr, sr = call.refs
    if not ENABLED or br.shape[-1] != 1 or (gr is not None and gr.shape[-1] != 1):
        return None
    T, Dk, Dv = qr.shape[-2], qr.shape[-1], vr.shape[-1]
    present = [r for r in call.refs if r is not None]
    lead = cs.broadcast_lead(tuple(r.shape for r in present)) if all(len(r.shape) >= 2 for r in present) else None
    if call.dtype not in ("float16", "bfloat16") or T == 0 or lead is None or len(lead) > 3:
        return None
    qo, ko, vo, bo, go = (cs.operand(r) for r in (qr, kr, vr, br, gr))
    # Rows on 16 bytes (8 elements) for cp.async; β and g are read a value at a time.
    if cs._vector_width([qo, ko, vo], 2, 8, 8) != 8:
        return None
    pad = lambda shape: (1,) * (3 - len(shape)) + shape  # noqa: E731
    lead3 = pad(lead)
    kv3 = pad(cs.broadcast_lead(tuple(r.shape for r in (kr, br, gr) if r is not None)))
    n_lead, n_kv = math.prod(lead3), math.prod(kv3)
    half, gated = int(call.dtype == "float16"), int(go is not None)
    wg = warpgroup_plan(Dk, Dv, bool(gated), n_lead, call.device)
    plans = _scan_plans(call.dtype, Dk, Dv, _shared_limit(call.device))
    if wg is None and not plans:
        return None
    n_chunks = math.ceil(T / _CHUNK)
    prepare_dkp = 16 * math.ceil(Dk / 16)
    run = call.launcher()

    # A and its scales, held (by these names) until both launches are queued.
    _a_hi, a_hi_ptr = call.empty((n_kv, n_chunks, _CHUNK, _CHUNK))
    _a_lo, a_lo_ptr = call.empty((n_kv, n_chunks, _CHUNK, _CHUNK))
    _a_scale, a_scale_ptr = call.empty((n_kv, n_chunks), "float32")
    run("delta_chunk.cu", "delta_chunk_prepare", {"ELEM_HALF": half, "GATED": gated, "DKP": prepare_dkp, "PREPARE": 1},
        (n_chunks, n_kv, 1), _PREPARE_THREADS,
        [ko.ptr, bo.ptr, (go or ko).ptr, a_hi_ptr, a_lo_ptr, a_scale_ptr, T, Dk, kv3[1], kv3[2], *ko.strides,
         *bo.strides, *cs._strides(go)],
        _prepare_shared_bytes(prepare_dkp))

    o, oo = call.output(lead, T, Dv)
    s_out, s_out_ptr = call.empty((n_lead, Dk, Dv), "float32")
    s_in, s_in_strides = cs.state_in(sr)
    scan_plan: _ScanPlan | _WarpgroupPlan = wg or _choose(plans, n_lead, Dv, cs._sm_count(call.device))
    col_blocks = math.ceil(Dv / scan_plan.columns)
    defines = {"ELEM_HALF": half, "GATED": gated, "DKP": scan_plan.dkp, "GROUPS": scan_plan.groups,
               "HAS_SIN": int(s_in != 0)}
    source, kernel = "delta_wgmma.cu", "delta_chunk_scan_wg"
    if isinstance(scan_plan, _ScanPlan):
        source, kernel = "delta_chunk.cu", "delta_chunk_scan"
        defines |= {"VB": scan_plan.vb, "WM": scan_plan.wm}
    run(source, kernel, defines, (n_lead * col_blocks, 1, 1), scan_plan.threads,
        [qo.ptr, ko.ptr, vo.ptr, a_hi_ptr, a_lo_ptr, a_scale_ptr, (go or qo).ptr, s_in or s_out_ptr, oo.ptr,
         s_out_ptr, T, Dk, Dv, lead3[1], lead3[2], col_blocks, *qo.strides, *ko.strides, *vo.strides, *oo.strides,
         *cs._strides(go), *_lead_index_strides(kv3, lead3), *s_in_strides],
        scan_plan.shared_bytes)
    state_lead = cs.broadcast_lead(tuple(r.shape for r in (kr, vr, br, gr, sr) if r is not None))
    return o, cs.final_state(s_out, lead3, state_lead, Dk, Dv)
