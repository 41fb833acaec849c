"""Launcher for the tensor-core chunked linear scan in ``cuda/chunk_mma.cu``.

It covers what the causal linear scan's kernels see most: float16 or bfloat16 data, no
gate or one log-gate per step (linear attention, simple GLA, RetNet, Mamba-2), Dk and Dv
multiples of 8 up to 256 for Dk, and operands whose rows start on 16 bytes. Anything else
is declined (None) and :func:`linattn.backends._cuda_scan.linear_scan` runs its CUDA-core
kernel instead.

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

import numpy as np

from linattn.backends import _cuda_scan as cs

# Tests and benchmarks switch these: the tensor-core kernel at all, and the two-part
# (hi + lo) intermediates that make its products float32-accurate.
ENABLED = True
SPLIT = True

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
        return _shared_bytes(self.dkp, self.columns, self.groups)


def _shared_bytes(dkp: int, columns: int, groups: int) -> int:
    """The kernel's shared memory: q, k, v tiles twice, the state (hi, lo), the output tile, gates."""
    qk, vs = dkp + 8, columns + 8
    elements = 4 * _CHUNK * qk + 2 * _CHUNK * vs + 2 * dkp * vs + _CHUNK * vs
    warps = _GROUP_WARPS * groups
    return 2 * elements + 4 * 2 * _CHUNK + 8 * warps * _CHUNK + 4 * warps


def _chunk_plan(dtype: str, Dk: int, Dv: int, shared_limit: int) -> _ChunkPlan | None:
    """The kernel's tiling for these sizes, or None when it does not cover them.

    Two groups of warps share a block's q and k tiles when Dv has the columns for both
    and the tiles fit in ``shared_limit`` bytes.
    """
    if dtype not in ("float16", "bfloat16") or Dk % 8 or Dv % 8 or Dk > _MAX_DK:
        return None
    dkp = 16 * math.ceil(Dk / 16)
    vb = min(64 if dkp <= 128 else 32, 16 * math.ceil(Dv / 16))
    groups = 2 if Dv > vb and _shared_bytes(dkp, 2 * vb, 2) <= shared_limit else 1
    for wm in (4, 2, 1):  # state tiles of ≥ 2 column tiles (one ldmatrix.x4 of v each)
        wn = _GROUP_WARPS // wm
        if (dkp // 16) % wm == 0 and (vb // 8) % wn == 0 and (vb // 8 // wn) % 2 == 0:
            plan = _ChunkPlan(dkp, vb, groups, wm)
            return plan if plan.shared_bytes <= shared_limit else None
    return None


@functools.cache
def _shared_limit(device_id: int) -> int:
    """Shared memory one block may opt into on this device."""
    return int(cs._cupy().cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])


# Segments are at least this long: the extra pass and the prefix between them cost a few
# launches (tens of microseconds of host time), worth it only when each segment has many
# chunks to walk.
_MIN_SEGMENT = 1024


def _segments(n_blocks: int, T: int, plan: _ChunkPlan, device_id: int) -> int:
    """Time segments: as many as fill the resident blocks once, if T allows."""
    sms = cs._sm_count(device_id)
    if n_blocks >= sms or T < 2 * _MIN_SEGMENT:
        return 1
    resident = sms * max(1, _SHARED_PER_SM // (plan.shared_bytes + 1024))
    return max(1, min(resident // n_blocks, T // _MIN_SEGMENT))


@functools.cache
def _kernel(defines: tuple[tuple[str, Any], ...], shared_bytes: int) -> Any:
    kernel = cs._module("chunk_mma.cu", defines).get_function("chunk_linear_scan")
    kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


def chunked_linear_scan(data: cs._Arrays, q: Any, k: Any, v: Any, g: Any, state0: Any) -> tuple[Any, Any] | None:
    """The scan of ``causal_scan`` on tensor cores, with no gate or a per-step log-gate ``g`` (..., T, 1).

    ``data`` holds the call's converted arrays; returns ``(o, final_state)`` in the
    caller's kind, or None when the kernel does not cover the call.
    """
    cp = cs._cupy()
    T, Dk, Dv = int(q.shape[-2]), int(q.shape[-1]), int(v.shape[-1])
    device_id = cp.cuda.Device().id
    plan = _chunk_plan(data.dtype, Dk, Dv, _shared_limit(device_id))
    operands = [x for x in (q, k, v, g) if x is not None]
    lead = cs._broadcast_lead(operands)
    if not ENABLED or plan is None or T == 0 or lead is None or len(lead) > 3:
        return None
    if g is not None and g.shape[-1] != 1:
        return None
    ops = [cs._operand(cp, x) for x in operands]
    o = data.empty((*lead, T, Dv))
    oo = cs._operand(cp, o)
    # Rows on 16 bytes (8 elements) for cp.async; the gate is read a value at a time.
    if cs._vector_width([*ops[:3], oo], 8, 8) != 8:
        return None
    qo, ko, vo = ops[:3]
    go = ops[3] if g is not None else None
    lead3 = (1,) * (3 - len(lead)) + lead
    n_lead = math.prod(lead3)
    col_blocks = math.ceil(Dv / plan.columns)
    P = _segments(n_lead * col_blocks, T, plan, device_id)
    L = _CHUNK * math.ceil(math.ceil(T / P) / _CHUNK)
    P = math.ceil(T / L)
    defines = {"DKP": plan.dkp, "VB": plan.vb, "GROUPS": plan.groups, "WM": plan.wm,
               "ELEM_HALF": int(data.dtype == "float16"), "GATED": int(g is not None), "SPLIT": int(SPLIT)}

    def run(write_o: bool, s_in: Any, s_in_strides: tuple, segments: int) -> Any:
        s_out = cp.empty((n_lead, segments, Dk, Dv), dtype=np.float32)
        kernel = _kernel(tuple(sorted({**defines, "HAS_SIN": int(s_in is not None), "WRITE_O": int(write_o)}.items())),
                         plan.shared_bytes)
        i64 = np.int64
        args = [qo.array, ko.array, vo.array, (go or qo).array, s_out if s_in is None else s_in, o, s_out,
                i64(T), np.int32(Dk), np.int32(Dv), i64(lead3[1]), i64(lead3[2]), i64(L if segments > 1 else T),
                np.int32(col_blocks), *cs._strides(qo), *cs._strides(ko), *cs._strides(vo), *cs._strides(oo),
                *cs._strides(go), *(i64(s) for s in s_in_strides)]
        kernel((n_lead * col_blocks, segments, 1), (plan.threads,), tuple(args), shared_mem=plan.shared_bytes)
        return s_out

    if P == 1:
        s_in, strides = (None, (0,) * 6) if state0 is None else cs._state_in(state0)
        s_out = run(True, s_in, strides, 1)
    else:
        local = run(False, None, (0,) * 6, P)  # each segment's own state, from zero
        gate = None if g is None else data.values(g)
        entering, last = cs._prefix(cp, local, state0, gate, None, lead, Dk, Dv, P, L, np.float32)
        per_lead = Dk * Dv * P
        run(True, entering, (per_lead * lead3[1] * lead3[2], per_lead * lead3[2], per_lead, Dk * Dv, Dv, 1), P)
        s_out = last[:, None]
    state_lead = cs._broadcast_lead([x for x in (k, v, g, state0) if x is not None])
    return data.back(o, data=True), data.back(cs._final_state(s_out, lead3, state_lead, Dk, Dv), data=False)
