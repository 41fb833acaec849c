"""Launchers for the CUDA scan kernels in ``cuda/scan.cu`` (CuPy ``RawModule``).

Each launcher takes the arrays of a primitive's chunked form — (..., T, D) with up to
three leading axes that broadcast — and returns ``(o, final_state)``, or None when the
kernel does not cover the call (the caller then runs the reference). No operand is
copied when its last axis is contiguous and the arrays share a dtype: the kernels read
any strides, including the negative time strides of a reversed view and the zero
strides of a broadcast axis. Operands cross as pointers (:mod:`._cuda_launch`), so
PyTorch tensors — bfloat16 ones too, which CuPy cannot hold — need no conversion.

Work split (see the .cu file): a block per (leading index, tile of value columns, time
segment); each value column's state lives in the registers of ``KSPLIT`` lanes holding
``KPT`` rows each. When the leading indices and column tiles alone would leave the GPU
under-filled and the sequence is long, the linear scan runs in three passes: each
segment's own state from zero (in parallel), the states entering the segments
(``cuda/segments.cu``), then each segment's outputs from its entering state.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from linattn.backends import _cuda_launch as cl

# Shared memory the staged tiles may use per block (the static limit is 48 KiB).
_SHARED_BUDGET = 46 * 1024


@dataclass(frozen=True)
class Budget:
    """A kernel's shape targets: 32-bit registers of state one lane holds (KPT rows × NC columns), threads per block."""

    registers: int
    threads: int


# 128 registers of state, or 64 for the updates that keep more values live (per-key and
# per-value decay together, the delta rule); and at most 64 rows, so that the compiler
# never spills the state.
LIGHT, HEAVY = Budget(128, 64), Budget(64, 64)
# The delta rule's forward kernel (benchmarks may switch it).
DELTA_BUDGET = HEAVY
_MAX_ROWS = 64
# Value columns per lane: each q, k value read from shared memory feeds 2·NC multiply-adds.
_COLUMNS = 4
# Lanes per column group: a power of two, at most a warp (so Dk ≤ 1024 in float32).
_MAX_KSPLIT = 32
# Threads per block, at least (a whole warp, so that every shuffle has all its lanes).
_MIN_THREADS = 32
# Segments are at least this long, so the extra pass stays a small share of the work.
_MIN_SEGMENT = 256

C_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}


def _sm_count(device: int) -> int:
    return cl.device_attribute(device, "MultiProcessorCount")


@dataclass(frozen=True, slots=True)
class Operand:
    """An operand as the kernels index it: address, three leading strides (0 broadcasts) and the time stride."""

    ptr: int
    lead: tuple[int, int, int]
    time: int

    @property
    def strides(self) -> list[int]:
        return [*self.lead, self.time]


@functools.lru_cache(maxsize=4096)
def _lead_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int, int]:
    """Strides of the leading axes (all but the last two) padded to three, 0 where an axis has extent 1."""
    pad = 3 - (len(shape) - 2)
    padded = zip((1,) * pad + shape[:-2], (0,) * pad + strides[:-2], strict=True)
    return tuple(0 if n == 1 else s for n, s in padded)


def operand(ref: cl.Ref | None) -> Operand | None:
    if ref is None:
        return None
    return Operand(ref.ptr, _lead_strides(ref.shape, ref.strides), ref.strides[-2])


def _strides(op: Operand | None) -> list[int]:
    return [0, 0, 0, 0] if op is None else op.strides


@functools.lru_cache(maxsize=4096)
def broadcast_lead(shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    """The broadcast of the shapes' leading axes (all but the last two), or None if they do not broadcast."""
    try:
        return tuple(np.broadcast_shapes(*(s[:-2] for s in shapes)))
    except ValueError:
        return None


def reversed_in_time(ref: cl.Ref, itemsize: int) -> cl.Ref:
    """The same operand read from its last step to its first: step T−1's address, the time stride negated."""
    T, step = ref.shape[-2], ref.strides[-2]
    return cl.Ref(ref.ptr + max(T - 1, 0) * step * itemsize, ref.shape, (*ref.strides[:-2], -step, ref.strides[-1]))


class Call:
    """A call's operands as one dtype on one device, and where its results are allocated.

    The data arrays are read in their promoted dtype and the state in the accumulation
    dtype; an array already in that dtype with a contiguous last axis is used as it is
    (converting the rest happens in the caller's library). ``refs`` are the operands in
    the order given, the state last. With ``reverse`` the kernels walk time from the last
    step to the first: every operand but the state, and the outputs of :meth:`output`,
    are addressed from their last step with the time stride negated (no copy). With
    ``wide`` the outputs of :meth:`output` are in the accumulation dtype: unrounded.
    """

    def __init__(self, lib: Any, dtype: str, device: int, arrays: list[Any], reverse: bool = False,
                 wide: bool = False):
        self.lib, self.dtype, self.device, self.reverse = lib, dtype, device, reverse
        self.out_dtype = cl.accumulation(dtype) if wide else dtype
        self.arrays = arrays  # held until the launch is queued
        self.refs = [None if x is None else lib.ref(x) for x in arrays]
        if reverse:
            size = cl.itemsize(dtype)
            self.refs[:-1] = [None if r is None else reversed_in_time(r, size) for r in self.refs[:-1]]

    @classmethod
    def of(cls, *arrays: Any, state: Any, reverse: bool = False, wide: bool = False) -> Call | None:
        given = [x for x in (*arrays, state) if x is not None]
        lib = cl.library_of(given)
        if lib is None:
            return None
        dtypes = [lib.dtype(x) for x in given]
        if None in dtypes:
            return None
        dtype = cl.promote(dtypes[: len(dtypes) - (state is not None)])
        converted = [None if x is None else lib.convert(x, dtype) for x in arrays]
        converted.append(None if state is None else lib.convert(state, cl.accumulation(dtype)))
        return cls(lib, dtype, lib.device(given[0]), converted, reverse, wide)

    @property
    def accumulation(self) -> str:
        return cl.accumulation(self.dtype)

    @property
    def wide(self) -> bool:
        """Whether the outputs are in a wider dtype than the data (the kernels' ``WIDE_O``)."""
        return self.out_dtype != self.dtype

    def empty(self, shape: tuple[int, ...], dtype: str | None = None) -> tuple[Any, int]:
        """A new array (the data dtype unless given) and its address."""
        x = self.lib.empty(shape, dtype or self.dtype, self.device)
        return x, self.lib.ref(x).ptr

    def output(self, lead: tuple[int, ...], T: int, D: int) -> tuple[Any, Operand]:
        """A new C-contiguous (*lead, T, D) output, and its operand (reversed with the call).

        In the data dtype, or with ``wide`` the accumulation dtype.
        """
        x, ptr = self.empty((*lead, T, D), self.out_dtype)
        strides = [D, 1]
        for n in reversed((*lead, T)[1:]):
            strides.insert(0, strides[0] * n)
        ref = cl.Ref(ptr, (*lead, T, D), tuple(strides))
        return x, operand(reversed_in_time(ref, cl.itemsize(self.out_dtype)) if self.reverse else ref)

    def launcher(self) -> Callable[..., None]:
        """``run(source, name, defines, grid, block, args, shared=0)`` on this call's device and stream."""
        device, stream = self.device, self.lib.stream(self.device)

        def run(source: str, name: str, defines: dict[str, Any], grid: tuple[int, int, int], block: int,
                args: list[int], shared: int = 0) -> None:
            kernel = cl.function(source, name, tuple(sorted(defines.items())), shared, device)
            cl.launch(kernel, grid, block, shared, stream, args)
        return run


@dataclass(frozen=True)
class _Plan:
    """A kernel's shape: lanes per column group, rows and columns per lane, columns and steps per tile."""

    ksplit: int
    kpt: int
    nc: int
    vb: int
    tc: int

    @property
    def threads(self) -> int:
        return (self.vb // self.nc) * self.ksplit


@functools.cache
def _plan(Dk: int, Dv: int, dtype: str, tiles: tuple[int, int], budget: Budget, whole_warps: bool = False
          ) -> _Plan | None:
    """The kernel's shape for these sizes, or None when the kernel does not cover them.

    ``tiles`` counts the tiles staged per step: (rows, columns) — q, k and a per-key
    decay are (TC, Dk) rows; v, the output and per-value operands (TC, VB) columns.
    ``budget``: the state registers per lane and the threads per block aimed at.
    ``whole_warps``: threads in whole warps (for kernels that shuffle across column groups).
    """
    acc = cl.itemsize(cl.accumulation(dtype))
    nc = _COLUMNS if Dv >= _COLUMNS else 1
    rows = min(budget.registers * 4 // acc // nc, _MAX_ROWS * 4 // acc)  # rows per lane
    ksplit = 1
    while 4 * math.ceil(math.ceil(Dk / ksplit) / 4) > rows:
        ksplit *= 2
    if ksplit > _MAX_KSPLIT:
        return None
    kpt = 4 * math.ceil(math.ceil(Dk / ksplit) / 4)
    groups = max(budget.threads // ksplit, 1)  # column groups per block
    groups = min(groups, math.ceil(Dv / nc))  # no more than the columns need ...
    groups = max(groups, _MIN_THREADS // ksplit, 1)  # ... but at least a warp of threads
    if whole_warps:
        per_warp = max(32 // ksplit, 1)
        groups = per_warp * math.ceil(groups / per_warp)
    vb = groups * nc
    rows, cols = tiles
    for tc in (32, 16, 8, 4, 2, 1):
        if acc * tc * (rows * ksplit * (kpt + 4) + cols * vb + 2) <= _SHARED_BUDGET:
            return _Plan(ksplit, kpt, nc, vb, tc)
    return None


def _segments(n_blocks: int, T: int, sms: int, resident: int) -> int:
    """How many time segments to run in parallel, where the blocks alone leave multiprocessors idle.

    None (1) where the blocks cover the ``sms`` multiprocessors or T is short; else as
    many as the device holds blocks for at once (``resident``: multiprocessors times the
    blocks each holds, by the occupancy calculator). These kernels' blocks are small (a
    few warps, the state in registers), so a multiprocessor holds several, yet one busy
    with a block or two already runs near its rate: in float32 at (B, T, H, D) =
    (1, 8192, 96, 128), whose 192 blocks cover the 132 multiprocessors, 2, 4 or 6 segments
    took 4.99–5.04 ms against 4.63 for one pass. Where blocks are fewer than
    multiprocessors, filling the resident slots pays: at (2, 16384, 16, 128), 64 blocks,
    8 segments took 2.54 ms (4: 3.90, 6: 3.26, 1: 8.88), and at (4, 2048, 16, 128), 128
    blocks, 4 took 0.67 ms (3: 0.83, 1: 1.13) (H100; ``docs/gpu.rst``, stop 17).
    """
    if n_blocks >= sms or T < 2 * _MIN_SEGMENT:
        return 1
    return max(1, min(resident // n_blocks, T // _MIN_SEGMENT))


def _geometry(T: int, Dk: int, Dv: int, lead: tuple[int, ...], seg_len: int, ops: list[Operand],
              s_in: list[int]) -> list[int]:
    args = [T, Dk, Dv, lead[1], lead[2], seg_len]
    for op in ops:
        args += op.strides
    return args + s_in


def state_in(ref: cl.Ref | None) -> tuple[int, list[int]]:
    """The initial state's address and its six strides: lead ×3, segment (0), row, col; (0, zeros) for none."""
    if ref is None:
        return 0, [0] * 6
    return ref.ptr, [*_lead_strides(ref.shape, ref.strides), 0, ref.strides[-2], ref.strides[-1]]


def segment_state_strides(lead3: tuple[int, int, int], P: int, Dk: int, Dv: int) -> list[int]:
    """The six strides, as ``state_in`` gives them, of states laid out (n_lead, P, Dk, Dv): one per segment.

    The entering states that ``join_segments`` forms, read by the time-segmented scans' last pass.
    """
    per_lead = Dk * Dv * P
    return [per_lead * lead3[1] * lead3[2], per_lead * lead3[2], per_lead, Dk * Dv, Dv, 1]


def final_state(s_out: Any, lead3: tuple[int, ...], state_lead: tuple[int, ...], Dk: int, Dv: int) -> Any:
    """The state (n_lead, Dk, Dv) with only the leading axes of the state's own operands."""
    if math.prod(state_lead) == math.prod(lead3):
        return s_out.reshape(*state_lead, Dk, Dv)
    full = s_out.reshape(*lead3, Dk, Dv)
    padded = (1,) * (3 - len(state_lead)) + state_lead
    index = tuple(slice(None) if n != 1 else slice(0, 1) for n in padded)
    return full[index].reshape(*state_lead, Dk, Dv)


def join_segments(call: Call, run: Callable[..., None], local: int, gates: list[tuple[Operand | None, int]],
                  lead3: tuple[int, int, int], T: int, Dk: int, Dv: int, P: int, L: int,
                  formed: list[int] | None = None, initial: tuple[int, list[int]] | None = None
                  ) -> tuple[Any, Any, int]:
    """The states entering P segments of L steps, and the state after the last (``cuda/segments.cu``).

    ``local`` addresses each segment's own final state (n_lead, P, Dk, Dv) in the
    accumulation dtype; ``gates`` are (operand, width) of the per-key and per-value
    log-gates (width 1: one per step; operand None: no gate). ``formed``, where given,
    addresses each gate's sums over the segments (n_lead, P, width) in the accumulation
    dtype where the first pass formed them (0: they are formed here). ``initial``: the
    initial state's address and strides (``state_in``) where not the call's own. Returns
    ``(entering, last, entering's address)``.
    """
    acc, n_lead = call.accumulation, math.prod(lead3)
    (gk, gk_width), (gv, _) = gates
    gk_mode = 0 if gk is None else (1 if gk_width == 1 else 2)
    s0, s0_strides = initial or state_in(call.refs[-1])
    defines = {"ELEM": C_TYPES[call.dtype], "ACC": "double" if acc == "float64" else "float", "GK_MODE": gk_mode,
               "HAS_GV": int(gv is not None), "HAS_SIN": int(s0 != 0)}
    sums = []
    keep = []
    for (g, width), ready in zip(gates, formed or [0] * len(gates), strict=True):
        if g is None or ready:
            sums.append(ready)
            continue
        out, ptr = call.empty((n_lead, P, width), acc)
        keep.append(out)
        cols = min(width, 32)
        run("segments.cu", "segment_log_decay", defines, (n_lead, P, math.ceil(width / cols)), 256,
            [g.ptr, ptr, T, width, lead3[1], lead3[2], L, *g.strides])
        sums.append(ptr)
    entering, entering_ptr = call.empty((n_lead, P, Dk, Dv), acc)
    last, last_ptr = call.empty((n_lead, Dk, Dv), acc)
    run("segments.cu", "segment_prefix", defines, (n_lead, math.ceil(Dk * Dv / 256), 1), 256,
        [local, *sums, s0, entering_ptr, last_ptr, P, Dk, Dv, lead3[1], lead3[2], *s0_strides[:3],
         *s0_strides[4:]])
    return entering, last, entering_ptr


def _vector_width(operands: list[Operand | None], itemsize: int, extent: int, group: int) -> int:
    """Elements per 16-byte staging load, if every row of every operand allows it, else 1.

    Rows must start on 16 bytes (the pointer and every stride a multiple of the width),
    and ``extent`` (the row length loaded) and ``group`` (a run that one load must not
    cross) must be multiples of it.
    """
    width = 16 // itemsize
    aligned = all(op.ptr % 16 == 0 and all(s % width == 0 for s in op.strides) for op in operands if op is not None)
    return width if aligned and extent % width == 0 and group % width == 0 else 1


@dataclass(frozen=True)
class _Layout:
    """What every launch needs: the leading shape, sizes, the kernel plan and its defines."""

    lead: tuple[int, ...]
    lead3: tuple[int, int, int]
    state_lead: tuple[int, ...]
    T: int
    Dk: int
    Dv: int
    plan: _Plan
    defines: dict[str, Any]

    @property
    def n_lead(self) -> int:
        return math.prod(self.lead3)

    @property
    def col_blocks(self) -> int:
        return math.ceil(self.Dv / self.plan.vb)


def _layout(call: Call, tiles: tuple[int, int], budget: Budget, whole_warps: bool = False) -> _Layout | None:
    """The layout of a call whose refs are (q, k, v, *per-step operands, state)."""
    refs = call.refs
    present = [r for r in refs if r is not None]
    if any(len(r.shape) < 2 for r in present):
        return None
    lead = broadcast_lead(tuple(r.shape for r in present))
    if lead is None or len(lead) > 3:
        return None
    T, Dk, Dv = refs[0].shape[-2], refs[0].shape[-1], refs[2].shape[-1]
    plan = _plan(Dk, Dv, call.dtype, tiles, budget, whole_warps)
    if plan is None or T == 0:
        return None
    acc = C_TYPES[call.accumulation]
    defines = {"ELEM": C_TYPES[call.dtype], "ACC": acc, "ACC_DOUBLE": int(acc == "double"), "KPT": plan.kpt,
               "KSPLIT": plan.ksplit, "NC": plan.nc, "VB": plan.vb, "TC": plan.tc}
    state_lead = broadcast_lead(tuple(r.shape for r in refs[1:] if r is not None))
    return _Layout(lead, (1,) * (3 - len(lead)) + lead, state_lead, T, Dk, Dv, plan, defines)


def linear_scan(q: Any, k: Any, v: Any, gk: Any, gv: Any, state0: Any, *, reverse: bool = False,
                wide: bool = False) -> tuple[Any, Any] | None:
    """The causal linear scan on the GPU (see :func:`linattn.scan.causal_scan`), or None.

    With ``reverse`` the scan runs from the last step to the first (the backend's
    ``causal_scan_reversed``), reading the operands in place. With ``wide`` the outputs
    are in the accumulation dtype (float32 for 16-bit data): the float32 sums unrounded.
    """
    call = Call.of(q, k, v, gk, gv, state=state0, reverse=reverse, wide=wide)
    if call is None:
        return None
    gkr, gvr = call.refs[3:5]
    gk_mode = 0 if gkr is None else (1 if gkr.shape[-1] == 1 else 2)
    if gk_mode < 2 and gvr is None:
        from linattn.backends import _cuda_chunk

        result = _cuda_chunk.chunked_linear_scan(call)
        if result is not None:
            return result
    if gk_mode == 2 and gvr is None:
        from linattn.backends import _cuda_gla_chunk

        result = _cuda_gla_chunk.chunked_gla_scan(call)
        if result is not None:
            return result
    lay = _layout(call, (3 if gk_mode == 2 else 2, 3 if gvr is not None else 2),
                  HEAVY if gk_mode == 2 and gvr is not None else LIGHT)
    if lay is None:
        return None
    acc, itemsize = call.accumulation, cl.itemsize(call.dtype)
    T, Dk, Dv, lead3, n_lead = lay.T, lay.Dk, lay.Dv, lay.lead3, lay.n_lead
    qo, ko, vo, gko, gvo = (operand(r) for r in call.refs[:5])
    defines = {**lay.defines, "GK_MODE": gk_mode, "HAS_GV": int(gvr is not None), "WIDE_O": int(call.wide),
               "VW": _vector_width([qo, ko, gko if gk_mode == 2 else None], itemsize, Dk, lay.plan.kpt),
               "VWC": _vector_width([vo, gvo], itemsize, Dv, lay.plan.vb)}
    # The occupancy of the one-pass variant (the passes of a segmented scan hold the same state).
    one_pass = {**defines, "HAS_SIN": int(call.refs[-1] is not None), "WRITE_O": 1}
    sms = _sm_count(call.device)
    resident = sms * cl.blocks_per_multiprocessor("scan.cu", "linear_scan", tuple(sorted(one_pass.items())),
                                                  lay.plan.threads, 0, call.device)
    P = _segments(n_lead * lay.col_blocks, T, sms, resident)
    L = math.ceil(T / P)
    P = math.ceil(T / L)

    o, oo = call.output(lay.lead, T, Dv)
    run = call.launcher()

    def scan(write_o: bool, s_in: int, s_in_strides: list[int], segments: int) -> tuple[Any, int]:
        s_out, s_out_ptr = call.empty((n_lead, segments, Dk, Dv), acc)
        args = [qo.ptr, ko.ptr, vo.ptr, (gko or qo).ptr, (gvo or qo).ptr, s_in or s_out_ptr, oo.ptr, s_out_ptr,
                *_geometry(T, Dk, Dv, lead3, L if segments > 1 else T, [qo, ko, vo, oo], s_in_strides),
                *_strides(gko), *_strides(gvo)]
        run("scan.cu", "linear_scan", {**defines, "HAS_SIN": int(s_in != 0), "WRITE_O": int(write_o)},
            (n_lead, lay.col_blocks, segments), lay.plan.threads, args)
        return s_out, s_out_ptr

    if P == 1:
        s_out, _ = scan(True, *state_in(call.refs[-1]), 1)
    else:
        _local, local_ptr = scan(False, 0, [0] * 6, P)  # each segment's own state, from zero (held till queued)
        gates = [(gko, gkr.shape[-1] if gkr is not None else 0), (gvo, Dv)]
        _entering, s_out, entering_ptr = join_segments(call, run, local_ptr, gates, lead3, T, Dk, Dv, P, L)
        scan(True, entering_ptr, segment_state_strides(lead3, P, Dk, Dv), P)
    return o, final_state(s_out, lead3, lay.state_lead, Dk, Dv)


def delta_scan(q: Any, k: Any, v: Any, beta: Any, g: Any, state0: Any) -> tuple[Any, Any] | None:
    """The delta rule scan on the GPU (see :func:`linattn.delta_scan.delta_scan`), or None."""
    call = Call.of(q, k, v, beta, g, state=state0)
    if call is None:
        return None
    from linattn.backends import _cuda_delta_chunk

    result = _cuda_delta_chunk.chunked_delta_scan(call)
    if result is not None:
        return result
    lay = _layout(call, (2, 3 if call.refs[3].shape[-1] > 1 else 2), DELTA_BUDGET)
    if lay is None:
        return None
    o, s_out, _ = delta_forward(call, lay, write_o=True, write_r=False)
    return o, final_state(s_out, lay.lead3, lay.state_lead, lay.Dk, lay.Dv)


def delta_forward(call: Call, lay: _Layout, write_o: bool, write_r: bool) -> tuple[Any, Any, Any]:
    """Queue ``scan.cu``'s delta rule on ``call``'s first five operands (q, k, v, beta, g) and its state.

    Returns ``(o, s_out, r)``: the outputs (None unless ``write_o``), the final state
    (n_lead, 1, Dk, Dv), and the residuals r_t = v_t − S̃_tᵀ k_t as (n_lead, T, Dv) in the
    accumulation dtype (None unless ``write_r``).
    """
    itemsize = cl.itemsize(call.dtype)
    beta_mode = 1 if call.refs[3].shape[-1] == 1 else 2
    qo, ko, vo, bo, go = (operand(r) for r in call.refs[:5])
    o, oo = call.output(lay.lead, lay.T, lay.Dv) if write_o else (None, Operand(0, (0, 0, 0), 0))
    s_in, s_in_strides = state_in(call.refs[-1])
    s_out, s_out_ptr = call.empty((lay.n_lead, 1, lay.Dk, lay.Dv), call.accumulation)
    r, r_ptr = call.empty((lay.n_lead, lay.T, lay.Dv), call.accumulation) if write_r else (None, 0)
    args = [qo.ptr, ko.ptr, vo.ptr, bo.ptr, (go or qo).ptr, s_in or s_out_ptr, oo.ptr, s_out_ptr,
            *_geometry(lay.T, lay.Dk, lay.Dv, lay.lead3, lay.T, [qo, ko, vo, oo], s_in_strides),
            *_strides(bo), *_strides(go), r_ptr]
    defines = {**lay.defines, "DELTA": 1, "BETA_MODE": beta_mode, "HAS_G": int(go is not None),
               "HAS_SIN": int(s_in != 0), "WRITE_O": int(write_o), "WRITE_R": int(write_r),
               "VW": _vector_width([qo, ko], itemsize, lay.Dk, lay.plan.kpt),
               "VWC": _vector_width([vo, bo if beta_mode == 2 else None], itemsize, lay.Dv, lay.plan.vb)}
    call.launcher()("scan.cu", "delta_scan", defines, (lay.n_lead, lay.col_blocks, 1), lay.plan.threads, args)
    return o, s_out, r
