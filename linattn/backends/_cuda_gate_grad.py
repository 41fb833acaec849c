"""Launcher of the gated scans' gate gradient (``cuda/gate_grad.cu``).

The gradient of a log-gate is a suffix sum over time of products that the scans' other
gradients give (:func:`linattn.scan.causal_scan_vjp`): for the key gates

    dG_t = e + Σ_{t' ≥ t} (q_{t'} ⊙ dq_{t'} − k_{t'} ⊙ dk_{t'}),

summed over the row for a gate of one value per step. Written as array operations this is
a product, a reduction and a cumulative sum, each a pass over memory (the cumulative sum
over a long time axis an especially slow one: 0.68 of the 1.30 ms that simple GLA's gate
gradient took at (B, T, H, D) = (2, 16384, 16, 128), bfloat16, H100); the kernels read each
operand once and sum in float64 over time.
"""

from __future__ import annotations

import math
from typing import Any

from linattn.backends import _cuda_launch as cl
from linattn.backends import _cuda_scan as cs

_ROW_THREADS, _BLOCK_ROWS, _SUFFIX_THREADS, _VEC = 256, 32, 1024, 4  # as in gate_grad.cu


def _vector_width(refs: list[cl.Ref], itemsizes: list[int], D: int) -> int:
    """4 where every row of every operand starts on 4 elements (the kernel's vector loads), else 1."""
    aligned = all(r.ptr % (_VEC * size) == 0 and all(s % _VEC == 0 for s in r.strides[:-1])
                  for r, size in zip(refs, itemsizes, strict=True))
    return _VEC if aligned and D % _VEC == 0 else 1


def _call(a: Any, b: Any, c: Any, d: Any, end: Any) -> cs.Call | None:
    """The call's operands: a, c in their dtype, b, d (and dG) in its accumulation dtype where given so.

    Gradients b, d in float32 beside 16-bit a, c (the scans' unrounded outputs,
    ``wide``) are read as they are, as a ``wide`` call; any other mix is promoted to one
    dtype, as the scans' operands are.
    """
    given = [x for x in (a, b, c, d, end) if x is not None]
    lib = cl.library_of(given)
    if lib is None:
        return None
    data, grad = lib.dtype(a), lib.dtype(b)
    if data in ("float16", "bfloat16") and lib.dtype(c) == data and lib.dtype(d) == grad == cl.accumulation(data):
        arrays = [lib.convert(x, dtype) for x, dtype in ((a, data), (b, grad), (c, data), (d, grad))]
        return cs.Call(lib, data, lib.device(a), [*arrays, None if end is None else lib.convert(end, grad)],
                       wide=True)
    return cs.Call.of(a, b, c, d, state=end)


def gate_gradient(a: Any, b: Any, c: Any, d: Any, end: Any, summed: bool, *, round_b: bool = False,
                  round_d: bool = False) -> Any:
    """dG_t = e + Σ_{t' ≥ t} (a ⊙ b − c ⊙ d)_{t'}, summed over the last axis when ``summed``.

    Parameters
    ----------
    a, b, c, d : arrays, shape (..., T, D), one shape
        CuPy arrays or PyTorch CUDA tensors on one device, with at most three leading axes.
    end : array of shape (..., W) or None
        e, the value at the last step before its products (W = 1 when ``summed``, else D).
    summed : bool
        Sum each step's products over D (a gate of one value per step).
    round_b, round_d : bool
        Also return b (d) rounded to the dtype that a and c are read in, written as the
        kernel reads it: float32 gradients rounded once to the 16-bit data's dtype,
        without a pass of their own.

    Returns
    -------
    array of shape (..., T, W), or (dG, b rounded or None, d rounded or None) with
    ``round_b`` or ``round_d``; or None
        In the data's dtype (the operands' common one, else float32 or float64; float32
        where b and d are float32 beside 16-bit a and c, which are then read as they
        are), rounded once from float64 sums; None where the kernels do not cover the call
        (shapes that differ, more than three leading axes, an empty axis, dtypes they do
        not read).
    """
    shape = tuple(a.shape)
    if not (len(shape) >= 2 and shape == tuple(b.shape) == tuple(c.shape) == tuple(d.shape)) or len(shape) > 5:
        return None
    *lead, T, D = shape
    W = 1 if summed else D
    if end is not None and tuple(end.shape) != (*lead, W):
        return None
    n_lead = math.prod(lead)
    row_blocks = math.ceil(T / _BLOCK_ROWS)
    if n_lead == 0 or T == 0 or D == 0 or n_lead * row_blocks >= 2**31:  # the grid's x extent
        return None
    call = _call(a, b, c, d, end)
    if call is None:
        return None
    refs = call.refs[:4]
    operands = [cs.operand(r) for r in refs]
    lead3 = (1,) * (3 - len(lead)) + tuple(lead)
    acc = call.accumulation
    sizes = [cl.itemsize(dtype) for dtype in (call.dtype, call.out_dtype)] * 2
    defines = {"ELEM": cs.C_TYPES[call.dtype], "GRAD": cs.C_TYPES[call.out_dtype],
               "ACC": "double" if acc == "float64" else "float", "ROW_SUM": int(summed), "END": int(end is not None),
               "ROUND_B": int(round_b), "ROUND_D": int(round_d), "VEC": _vector_width(refs, sizes, D)}
    _rows, rows_ptr = call.empty((n_lead, T, W), acc)  # scratch: r, held until both launches are queued
    out, out_ptr = call.empty((*lead, T, W), call.out_dtype)
    rounded = [call.empty(shape, call.dtype) if wanted else (None, 0) for wanted in (round_b, round_d)]
    run = call.launcher()
    strides = [s for op in operands for s in op.strides]
    run("gate_grad.cu", "gate_grad_rows", defines, (n_lead * row_blocks, 1, 1), _ROW_THREADS,
        [*(op.ptr for op in operands), rows_ptr, *(ptr for _, ptr in rounded), T, D, lead3[1], lead3[2], row_blocks,
         *strides])
    end_ref = call.refs[-1]
    end_ptr, end_lead = (0, (0, 0, 0)) if end_ref is None else (
        end_ref.ptr, cs.operand(cl.Ref(end_ref.ptr, (*end_ref.shape[:-1], 1, W), (*end_ref.strides[:-1], 0, 1))).lead)
    cols = min(W, 32)
    run("gate_grad.cu", "gate_grad_suffix", defines, (n_lead, math.ceil(W / cols), 1), _SUFFIX_THREADS,
        [rows_ptr, end_ptr, out_ptr, T, W, lead3[1], lead3[2], *end_lead])
    return (out, *(x for x, _ in rounded)) if round_b or round_d else out
