"""Launchers for the CUDA scan kernels in ``cuda/scan.cu`` (CuPy ``RawModule``).

Each launcher takes the arrays of a primitive's chunked form — (..., T, D) with up to
three leading axes that broadcast — and returns ``(o, final_state)``, or None when the
kernel does not cover the call (the caller then runs the reference). No operand is
copied when its last axis is contiguous: the kernels read any strides, including the
negative time strides of a reversed view and the zero strides of a broadcast axis.

Work split (see the .cu file): a block per (leading index, tile of value columns, time
segment); each value column's state lives in the registers of ``KSPLIT`` lanes holding
``KPT`` rows each. When the leading indices and column tiles alone would leave the GPU
under-filled and the sequence is long, the linear scan runs in three passes: each
segment's own state from zero (in parallel), a short prefix over the segments, then
each segment's outputs from its entering state.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

# Shared memory the staged tiles may use per block (the static limit is 48 KiB).
_SHARED_BUDGET = 46 * 1024
# 32-bit registers of state one lane holds (KPT rows × NC columns): 128, or 64 for the
# updates that keep more values live (per-key and per-value decay together, the delta
# rule); and at most 64 rows, so that the compiler never spills the state.
_STATE_REGISTERS = {False: 128, True: 64}
_MAX_ROWS = 64
# Value columns per lane: each q, k value read from shared memory feeds 2·NC multiply-adds.
_COLUMNS = 4
# Lanes per column group: a power of two, at most a warp (so Dk ≤ 1024 in float32).
_MAX_KSPLIT = 32
# Threads per block, at least (a whole warp, so that every shuffle has all its lanes).
_MIN_THREADS, _TARGET_THREADS = 32, 64
# Segments are at least this long, so the extra pass stays a small share of the work.
_MIN_SEGMENT = 256

_C_TYPES = {"float16": ("__half", "float"), "bfloat16": ("__nv_bfloat16", "float"), "float32": ("float", "float"),
            "float64": ("double", "double")}


def _acc_dtype(dtype: str) -> np.dtype:
    """The accumulation dtype: float64 for float64 data, float32 for everything narrower."""
    return np.dtype("float64") if dtype == "float64" else np.dtype("float32")


def _cupy() -> Any:
    import cupy

    return cupy


@functools.cache
def _source(name: str) -> str:
    return resources.files("linattn.backends").joinpath("cuda", name).read_text()


@functools.cache
def _module(source: str, defines: tuple[tuple[str, Any], ...]) -> Any:
    """The compiled ``cuda/<source>`` with these ``-D`` defines."""
    options = ("-std=c++17", *(f"-D{name}={value}" for name, value in defines))
    return _cupy().RawModule(code=_source(source), options=options)


@functools.cache
def _sm_count(device_id: int) -> int:
    return int(_cupy().cuda.Device(device_id).attributes["MultiProcessorCount"])


@dataclass(frozen=True)
class _Operand:
    """An array and its element strides: three leading axes and time (the last axis is contiguous)."""

    array: Any
    lead: tuple[int, int, int]
    time: int


def _broadcast_lead(arrays: list[Any]) -> tuple[int, ...] | None:
    shapes = [tuple(x.shape[:-2]) for x in arrays]
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None


def _lead_strides(x: Any) -> tuple[int, int, int]:
    """Element strides of x's leading axes padded to three, 0 where an axis broadcasts (extent 1)."""
    pad = 3 - (x.ndim - 2)
    shape = (1,) * pad + tuple(x.shape[:-2])
    strides = (0,) * pad + tuple(s // x.itemsize for s in x.strides[:-2])
    return tuple(0 if n == 1 else s for n, s in zip(shape, strides, strict=True))


def _operand(cp: Any, x: Any) -> _Operand:
    """Return x (with a contiguous last axis) and its strides for the kernels."""
    if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
        x = cp.ascontiguousarray(x)
    return _Operand(x, _lead_strides(x), x.strides[-2] // x.itemsize)


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


def _plan(Dk: int, Dv: int, dtype: str, tiles: tuple[int, int], heavy: bool) -> _Plan | None:
    """The kernel's shape for these sizes, or None when the kernel does not cover them.

    ``tiles`` counts the tiles staged per step: (rows, columns) — q, k and a per-key
    decay are (TC, Dk) rows; v, the output and per-value operands (TC, VB) columns.
    ``heavy``: an update that keeps more values live (see ``_STATE_REGISTERS``).
    """
    acc = _acc_dtype(dtype).itemsize
    nc = _COLUMNS if Dv >= _COLUMNS else 1
    budget = min(_STATE_REGISTERS[heavy] * 4 // acc // nc, _MAX_ROWS * 4 // acc)  # rows per lane
    ksplit = 1
    while 4 * math.ceil(math.ceil(Dk / ksplit) / 4) > budget:
        ksplit *= 2
    if ksplit > _MAX_KSPLIT:
        return None
    kpt = 4 * math.ceil(math.ceil(Dk / ksplit) / 4)
    groups = max(_TARGET_THREADS // ksplit, 1)  # column groups per block
    groups = min(groups, math.ceil(Dv / nc))  # no more than the columns need ...
    groups = max(groups, _MIN_THREADS // ksplit, 1)  # ... but at least a warp of threads
    vb = groups * nc
    rows, cols = tiles
    for tc in (32, 16, 8, 4, 2, 1):
        if acc * tc * (rows * ksplit * (kpt + 4) + cols * vb + 2) <= _SHARED_BUDGET:
            return _Plan(ksplit, kpt, nc, vb, tc)
    return None


def _segments(n_blocks: int, T: int, device_id: int) -> int:
    """How many time segments to run in parallel: enough blocks for two waves, if T allows."""
    target = 2 * _sm_count(device_id)
    if n_blocks >= _sm_count(device_id) or T < 2 * _MIN_SEGMENT:
        return 1
    return max(1, min(math.ceil(target / n_blocks), T // _MIN_SEGMENT))


def _geometry(T, Dk, Dv, lead, seg_len, q, k, v, o, s_in) -> list[Any]:
    i64 = np.int64
    args = [i64(T), np.int32(Dk), np.int32(Dv), i64(lead[1]), i64(lead[2]), i64(seg_len)]
    for op in (q, k, v, o):
        args += [i64(s) for s in (*op.lead, op.time)]
    return args + [i64(s) for s in s_in]


def _state_in(x: Any) -> tuple[Any, tuple]:
    """The initial state (in the accumulation dtype) and its six strides: lead ×3, segment, row, col."""
    return x, (*_lead_strides(x), 0, x.strides[-2] // x.itemsize, x.strides[-1] // x.itemsize)


def _final_state(s_out: Any, lead3: tuple[int, ...], state_lead: tuple[int, ...], Dk: int, Dv: int) -> Any:
    """The last segment's state, with only the leading axes of the state's own operands."""
    full = s_out[:, -1].reshape(*lead3, Dk, Dv)
    padded = (1,) * (3 - len(state_lead)) + state_lead
    index = tuple(slice(None) if n != 1 else slice(0, 1) for n in padded)
    return full[index].reshape(*state_lead, Dk, Dv)


def _segment_decay(cp: Any, g: Any | None, lead: tuple[int, ...], P: int, L: int, acc: Any) -> Any | None:
    """e^{Σ g} over each segment: (n_lead, P, D) from a (..., T, D) log-gate in the accumulation dtype."""
    if g is None:
        return None
    T, D = g.shape[-2], g.shape[-1]
    g = cp.broadcast_to(g, (*lead, T, D))
    pad = P * L - T
    if pad:
        g = cp.concatenate([g, cp.zeros((*lead, pad, D), dtype=acc)], axis=-2)
    return cp.exp(g.reshape(-1, P, L, D).sum(axis=2))


def _launch(name: str, defines: dict[str, Any], grid: tuple[int, int, int], block: int, args: list[Any]) -> None:
    _module("scan.cu", tuple(sorted(defines.items()))).get_function(name)(grid, (block,), tuple(args))


class _Arrays:
    """The call's arrays as CuPy arrays of one dtype, and the way back to the caller's kind.

    CuPy arrays pass through. PyTorch CUDA tensors cross by DLPack without a copy;
    bfloat16 ones (CuPy has no bfloat16) cross as their int16 bit patterns, which the
    kernel reads as ``__nv_bfloat16``, and the output comes back the same way — so bf16
    data is never copied through float32. Anything else (host arrays, mixed dtypes that
    include bfloat16) is not covered: ``of`` returns None and the reference runs.
    """

    def __init__(self, arrays: list[Any], dtype: str, torch: Any):
        self.arrays, self.dtype, self.torch = arrays, dtype, torch

    @classmethod
    def of(cls, *arrays: Any, state: Any) -> _Arrays | None:
        """Convert the data ``arrays`` (one dtype: their promotion) and the ``state`` (the accumulation dtype)."""
        cp = _cupy()
        given = [x for x in (*arrays, state) if x is not None]
        if all(isinstance(x, cp.ndarray) for x in given):
            dtype = np.result_type(*(x.dtype for x in arrays if x is not None)).name
            if dtype not in _C_TYPES:
                return None
            converted = [None if x is None else x.astype(dtype, copy=False) for x in arrays]
            return cls([*converted, None if state is None else state.astype(_acc_dtype(dtype), copy=False)],
                       dtype, None)
        torch = _torch_of(given[0])
        if torch is None or not all(isinstance(x, torch.Tensor) and x.is_cuda for x in given):
            return None
        dtype = str(functools.reduce(torch.promote_types, (x.dtype for x in arrays if x is not None)))
        dtype = dtype.removeprefix("torch.")
        if dtype not in _C_TYPES:
            return None
        wanted = getattr(torch, dtype)
        converted = []
        for x in arrays:
            if x is not None:
                x = x.to(wanted)
                x = cp.from_dlpack(x.view(torch.int16) if dtype == "bfloat16" else x)
            converted.append(x)
        if state is not None:
            state = cp.from_dlpack(state.to(getattr(torch, _acc_dtype(dtype).name)))
        return cls([*converted, state], dtype, torch)

    def values(self, x: Any) -> Any:
        """A data array's values in the accumulation dtype (bfloat16 bits decoded)."""
        acc = _acc_dtype(self.dtype)
        if self.dtype == "bfloat16":
            return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return x.astype(acc, copy=False)

    def empty(self, shape: tuple[int, ...]) -> Any:
        """A CuPy array for the output, in the data's dtype (int16 bits for bfloat16)."""
        return _cupy().empty(shape, dtype=np.int16 if self.dtype == "bfloat16" else self.dtype)

    def back(self, x: Any, *, data: bool) -> Any:
        """A result in the caller's kind: a bfloat16 output (``data``) is viewed back as bfloat16."""
        if self.torch is None:
            return x
        t = self.torch.from_dlpack(x)
        return t.view(self.torch.bfloat16) if data and self.dtype == "bfloat16" else t


def _torch_of(x: Any) -> Any:
    module = type(x).__module__
    if not module.startswith("torch"):
        return None
    import torch

    return torch


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

    @property
    def block(self) -> int:
        return self.plan.threads


def _layout(data: _Arrays, state_operands: list[Any], tiles: tuple[int, int], heavy: bool) -> _Layout | None:
    q, v = data.arrays[0], data.arrays[2]
    operands = [x for x in data.arrays if x is not None]
    lead = _broadcast_lead(operands)
    if lead is None or len(lead) > 3 or any(x.ndim < 2 for x in operands):
        return None
    T, Dk, Dv = int(q.shape[-2]), int(q.shape[-1]), int(v.shape[-1])
    plan = _plan(Dk, Dv, data.dtype, tiles, heavy)
    if plan is None or T == 0:
        return None
    elem, acc = _C_TYPES[data.dtype]
    defines = {"ELEM": elem, "ACC": acc, "ACC_DOUBLE": int(acc == "double"), "KPT": plan.kpt, "KSPLIT": plan.ksplit,
               "NC": plan.nc, "VB": plan.vb, "TC": plan.tc}
    state_lead = _broadcast_lead([x for x in state_operands if x is not None])
    return _Layout(lead, (1,) * (3 - len(lead)) + lead, state_lead, T, Dk, Dv, plan, defines)


def _vector_width(operands: list[_Operand | None], extent: int, group: int) -> int:
    """Elements per 16-byte staging load, if every row of every operand allows it, else 1.

    Rows must start on 16 bytes (the pointer and every stride a multiple of the width),
    and ``extent`` (the row length loaded) and ``group`` (a run that one load must not
    cross) must be multiples of it.
    """
    present = [op for op in operands if op is not None]
    width = 16 // present[0].array.itemsize
    aligned = all(op.array.data.ptr % 16 == 0 and all(s % width == 0 for s in (*op.lead, op.time))
                  for op in present)
    return width if aligned and extent % width == 0 and group % width == 0 else 1


def _strides(op: _Operand | None) -> list[Any]:
    return [np.int64(s) for s in ((0, 0, 0, 0) if op is None else (*op.lead, op.time))]


def linear_scan(q: Any, k: Any, v: Any, gk: Any, gv: Any, state0: Any) -> tuple[Any, Any] | None:
    """The causal linear scan on the GPU (see :func:`linattn.scan.causal_scan`), or None."""
    cp = _cupy()
    data = _Arrays.of(q, k, v, gk, gv, state=state0)
    if data is None:
        return None
    q, k, v, gk, gv, state0 = data.arrays
    gk_mode = 0 if gk is None else (1 if gk.shape[-1] == 1 else 2)
    if gk_mode < 2 and gv is None:
        from linattn.backends._cuda_chunk import chunked_linear_scan

        result = chunked_linear_scan(data, q, k, v, gk, state0)
        if result is not None:
            return result
    lay = _layout(data, [k, v, gk, gv, state0], (3 if gk_mode == 2 else 2, 3 if gv is not None else 2),
                  heavy=gk_mode == 2 and gv is not None)
    if lay is None:
        return None
    acc = _acc_dtype(data.dtype)
    T, Dk, Dv, lead3, n_lead = lay.T, lay.Dk, lay.Dv, lay.lead3, lay.n_lead
    P = _segments(n_lead * lay.col_blocks, T, cp.cuda.Device().id)
    L = math.ceil(T / P)
    P = math.ceil(T / L)

    qo, ko, vo = (_operand(cp, x) for x in (q, k, v))
    gko, gvo = (None if g is None else _operand(cp, g) for g in (gk, gv))
    o = data.empty((*lay.lead, T, Dv))
    oo = _operand(cp, o)
    defines = {**lay.defines, "GK_MODE": gk_mode, "HAS_GV": int(gv is not None),
               "VW": _vector_width([qo, ko, gko if gk_mode == 2 else None], Dk, lay.plan.kpt),
               "VWC": _vector_width([vo, gvo], Dv, lay.plan.vb)}

    def run(write_o: bool, s_in: Any, s_in_strides: tuple, segments: int) -> Any:
        s_out = cp.empty((n_lead, segments, Dk, Dv), dtype=acc)
        args = [qo.array, ko.array, vo.array, (gko or qo).array, (gvo or qo).array,
                s_out if s_in is None else s_in, o, s_out,
                *_geometry(T, Dk, Dv, lead3, L if segments > 1 else T, qo, ko, vo, oo, s_in_strides),
                *_strides(gko), *_strides(gvo)]
        _launch("linear_scan", {**defines, "HAS_SIN": int(s_in is not None), "WRITE_O": int(write_o)},
                (n_lead, lay.col_blocks, segments), lay.block, args)
        return s_out

    if P == 1:
        s_in, strides = (None, (0,) * 6) if state0 is None else _state_in(state0)
        s_out = run(True, s_in, strides, 1)
    else:
        local = run(False, None, (0,) * 6, P)  # each segment's own state, from zero
        gates = [None if x is None else data.values(x) for x in (gk, gv)]
        entering, last = _prefix(cp, local, state0, *gates, lay.lead, Dk, Dv, P, L, acc)
        per_lead = Dk * Dv * P
        run(True, entering, (per_lead * lead3[1] * lead3[2], per_lead * lead3[2], per_lead, Dk * Dv, Dv, 1), P)
        s_out = last[:, None]
    return data.back(o, data=True), data.back(_final_state(s_out, lead3, lay.state_lead, Dk, Dv), data=False)


def _prefix(cp: Any, local: Any, state0: Any, gk: Any, gv: Any, lead: tuple[int, ...], Dk: int, Dv: int, P: int,
            L: int, acc: Any) -> tuple[Any, Any]:
    """The state entering each segment, S_in[p+1] = decay_p ⊙ S_in[p] + local_p, and the last state.

    ``local`` (n_lead, P, Dk, Dv) holds each segment's own final state (from zero);
    segments are L steps long; gk, gv are the log-gates in the accumulation dtype.
    """
    n_lead = math.prod(lead)
    dk = _segment_decay(cp, gk, lead, P, L, acc)
    dv = _segment_decay(cp, gv, lead, P, L, acc)
    shape = (n_lead, Dk, Dv)
    state = cp.zeros(shape, dtype=acc) if state0 is None else cp.ascontiguousarray(
        cp.broadcast_to(state0, (*lead, Dk, Dv))).reshape(shape)
    entering = cp.empty((n_lead, P, Dk, Dv), dtype=acc)
    for p in range(P):
        entering[:, p] = state
        if dk is not None:
            state = state * dk[:, p, :, None]
        if dv is not None:
            state = state * dv[:, p, None, :]
        state = state + local[:, p]
    return entering, state


def delta_scan(q: Any, k: Any, v: Any, beta: Any, g: Any, state0: Any) -> tuple[Any, Any] | None:
    """The delta rule scan on the GPU (see :func:`linattn.delta_scan.delta_scan`), or None."""
    cp = _cupy()
    data = _Arrays.of(q, k, v, beta, g, state=state0)
    if data is None:
        return None
    q, k, v, beta, g, state0 = data.arrays
    beta_mode = 1 if beta.shape[-1] == 1 else 2
    lay = _layout(data, [k, v, beta, g, state0], (2, 3 if beta_mode == 2 else 2), heavy=True)
    if lay is None:
        return None
    acc = _acc_dtype(data.dtype)
    qo, ko, vo, bo = (_operand(cp, x) for x in (q, k, v, beta))
    go = None if g is None else _operand(cp, g)
    o = data.empty((*lay.lead, lay.T, lay.Dv))
    oo = _operand(cp, o)
    s_in, strides = (None, (0,) * 6) if state0 is None else _state_in(state0)
    s_out = cp.empty((lay.n_lead, 1, lay.Dk, lay.Dv), dtype=acc)
    args = [qo.array, ko.array, vo.array, bo.array, (go or qo).array, s_out if s_in is None else s_in, o, s_out,
            *_geometry(lay.T, lay.Dk, lay.Dv, lay.lead3, lay.T, qo, ko, vo, oo, strides), *_strides(bo), *_strides(go)]
    defines = {**lay.defines, "DELTA": 1, "BETA_MODE": beta_mode, "HAS_G": int(g is not None),
               "HAS_SIN": int(s_in is not None), "WRITE_O": 1,
               "VW": _vector_width([qo, ko], lay.Dk, lay.plan.kpt),
               "VWC": _vector_width([vo, bo if beta_mode == 2 else None], lay.Dv, lay.plan.vb)}
    _launch("delta_scan", defines, (lay.n_lead, lay.col_blocks, 1), lay.block, args)
    final = _final_state(s_out, lay.lead3, lay.state_lead, lay.Dk, lay.Dv)
    return data.back(o, data=True), data.back(final, data=False)
