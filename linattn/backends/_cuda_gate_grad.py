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


def _vector_width(refs: list[cl.Ref], itemsize: int, D: int) -> int:
    """4 where every row of every operand starts on 4 elements (the kernel's vector loads), else 1."""
    aligned = all(r.ptr % (_VEC * itemsize) == 0 and all(s % _VEC == 0 for s in r.strides[:-1]) for r in refs)
    return _VEC if aligned and D % _VEC == 0 else 1


def gate_gradient(a: Any, b: Any, c: Any, d: Any, end: Any, summed: bool) -> Any:
    """dG_t = e + Σ_{t' ≥ t} (a ⊙ b − c ⊙ d)_{t'}, summed over the last axis when ``summed``.

    Parameters
    ----------
    a, b, c, d : arrays, shape (..., T, D), one shape
        CuPy arrays or PyTorch CUDA tensors on one device, with at most three leading axes.
    end : array of shape (..., W) or None
        e, the value at the last step before its products (W = 1 when ``summed``, else D).
    summed : bool
        Sum each step's products over D (a gate of one value per step).

    Returns
    -------
    array of shape (..., T, W) or None
        In the data's dtype (the operands' common one, else float32 or float64), rounded
        once from float64 sums; None where the kernels do not cover the call (shapes that
        differ, more than three leading axes, an empty axis, dtypes they do not read).
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
    call = cs.Call.of(a, b, c, d, state=end)
    if call is None:
        return None
    refs = call.refs[:4]
    operands = [cs.operand(r) for r in refs]
    lead3 = (1,) * (3 - len(lead)) + tuple(lead)
    acc = call.accumulation
    defines = {"ELEM": cs.C_TYPES[call.dtype], "ACC": "double" if acc == "float64" else "float",
               "ROW_SUM": int(summed), "END": int(end is not None),
               "VEC": _vector_width(refs, cl.itemsize(call.dtype), D)}
    _rows, rows_ptr = call.empty((n_lead, T, W), acc)  # scratch: r, held until both launches are queued
    out, out_ptr = call.empty((*lead, T, W))
    run = call.launcher()
    strides = [s for op in operands for s in op.strides]
    run("gate_grad.cu", "gate_grad_rows", defines, (n_lead * row_blocks, 1, 1), _ROW_THREADS,
        [*(op.ptr for op in operands), rows_ptr, T, D, lead3[1], lead3[2], row_blocks, *strides])
    end_ref = call.refs[-1]
    end_ptr, end_lead = (0, (0, 0, 0)) if end_ref is None else (
        end_ref.ptr, cs.operand(cl.Ref(end_ref.ptr, (*end_ref.shape[:-1], 1, W), (*end_ref.strides[:-1], 0, 1))).lead)
    cols = min(W, 32)
    run("gate_grad.cu", "gate_grad_suffix", defines, (n_lead, math.ceil(W / cols), 1), _SUFFIX_THREADS,
        [rows_ptr, end_ptr, out_ptr, T, W, lead3[1], lead3[2], *end_lead])
    return out
