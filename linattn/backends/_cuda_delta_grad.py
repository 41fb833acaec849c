r"""Launcher for the delta rule's gradients on the GPU (``cuda/delta_grad.cu``).

Three passes over time, each O(T·Dk·Dv) on CUDA cores in float32 (float64 for float64
data): the forward again, keeping the residuals r_t = v_t − S̃_tᵀ k_t (``scan.cu``); the
reverse pass with the state's cotangent (du_t, the first part of dk_t, dS_0); the
forward once more for dq_t and the rest of dk_t. The elementwise remainder — dv = β du,
dβ = du·r, the gate's gradient from the identity

.. math::

    \frac{\partial L}{\partial g_t} = \langle dS_T, S_T \rangle
        + \sum_{s \ge t} (q_s \cdot dq_s - v_s \cdot dv_s)

(which follows from ⟨D_{t−1}, S_{t−1}⟩ = ∂L/∂g_t + o_{t−1}·do_{t−1} for the cotangent
D of the state, and o_t·do_t = q_t·dq_t) — and the sums over column blocks run in the
caller's array library.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from linattn.backends import _cuda_launch as cl
from linattn.backends import _cuda_scan as cs

# The kernels' shape targets (benchmarks may switch them). 64 threads, as the forward:
# blocks of 256 threads, which hold all 128 value columns and so need no sum of dk, dq
# over column blocks, took 1.15–1.4× longer on an H100 (docs/scripts/gpu_delta_budgets.py).
BUDGET = cs.HEAVY


def delta_scan_vjp(q: Any, k: Any, v: Any, beta: Any, g: Any, state0: Any, do: Any, dfinal_state: Any
                   ) -> tuple[Any, ...] | None:
    """Gradients of the delta rule scan (see :func:`linattn.delta_grad.delta_scan_vjp`), or None.

    Returns ``(dq, dk, dv, dbeta, dg, dS_0)`` over the broadcast leading axes of the
    inputs, (*lead, T, D) in the data dtype (dg None without g) and dS_0 (*lead, Dk, Dv)
    in the accumulation dtype; the caller sums them to the inputs' shapes. Each leading
    index runs its own copy of the state, so ``dfinal_state`` must already be given once
    per state (the caller's ``_cotangent_once``).
    """
    call = cs.Call.of(q, k, v, beta, g, do, state=state0)
    if call is None or (dfinal_state is not None and cl.library_of([q, dfinal_state]) is not call.lib):
        return None
    beta_mode = 1 if call.refs[3].shape[-1] == 1 else 2
    lay = _grad_layout(call, beta_mode)
    if lay is None:
        return None
    acc = call.accumulation
    T, Dk, Dv, n_lead, blocks = lay.T, lay.Dk, lay.Dv, lay.n_lead, lay.col_blocks
    _, final, res = cs.delta_forward(call, lay, write_o=False, write_r=True)

    dS_T = None if dfinal_state is None else call.lib.convert(dfinal_state, acc)
    s_T, s_T_strides = cs.state_in(None if dS_T is None else call.lib.ref(dS_T))
    du, du_ptr = call.empty((n_lead, T, Dv), acc)
    dk_parts, dk_ptr = call.empty((blocks, n_lead, T, Dk), acc)  # the forward pass adds to the reverse one's
    dq_parts, dq_ptr = call.empty((blocks, n_lead, T, Dk), acc)
    dS_0, dS_0_ptr = call.empty((n_lead, Dk, Dv), acc)

    size, data_size = cl.itemsize(acc), cl.itemsize(call.dtype)
    qr, kr, vr, br, gr, dor = call.refs[:6]
    reverse = [cs.operand(None if r is None else cs.reversed_in_time(r, data_size)) for r in (qr, kr, dor, br, gr)]
    forward = [cs.operand(r) for r in (kr, vr, dor, br, gr)]
    defines = {**lay.defines, "BETA_MODE": beta_mode, "HAS_G": int(gr is not None),
               "VW": cs._vector_width([reverse[0], reverse[1], forward[0]], data_size, Dk, lay.plan.kpt),
               "VWC": cs._vector_width([forward[1], forward[2], forward[3] if beta_mode == 2 else None,
                                        reverse[2], reverse[3] if beta_mode == 2 else None],
                                       data_size, Dv, lay.plan.vb)}
    run = call.launcher()
    grid = (n_lead, blocks, 1)
    lead_args = [T, Dk, Dv, lay.lead3[1], lay.lead3[2]]
    last_row = (T - 1) * size  # the reverse pass addresses the scratch arrays from their last step

    def strides(ops: list[cs.Operand | None]) -> list[int]:
        return [x for op in ops for x in cs._strides(op)]

    a, b, d, be, ga = reverse
    run("delta_grad.cu", "delta_grad_reverse", {**defines, "HAS_SIN": int(s_T != 0)}, grid, lay.plan.threads,
        [a.ptr, b.ptr, d.ptr, call.lib.ref(res).ptr + last_row * Dv, be.ptr, (ga or a).ptr, s_T or dS_0_ptr,
         du_ptr + last_row * Dv, dk_ptr + last_row * Dk, dS_0_ptr, *lead_args, *strides([a, b, d, be, ga]),
         *s_T_strides[:3], *s_T_strides[4:], T * Dv, -Dv, n_lead * T * Dk, T * Dk, -Dk])
    s_0, s_0_strides = cs.state_in(call.refs[-1])
    kf, vf, df, bf, gf = forward
    run("delta_grad.cu", "delta_grad_forward", {**defines, "HAS_SIN": int(s_0 != 0)}, grid, lay.plan.threads,
        [kf.ptr, vf.ptr, df.ptr, du_ptr, bf.ptr, (gf or kf).ptr, s_0 or dS_0_ptr,
         dk_ptr, dq_ptr, *lead_args, *strides([kf, vf, df, bf, gf]),
         *s_0_strides[:3], *s_0_strides[4:], T * Dv, Dv, n_lead * T * Dk, T * Dk, Dk])
    return _finish(call, lay, du, res, dk_parts, dq_parts, dS_0, final, dS_T)


def _grad_layout(call: cs.Call, beta_mode: int) -> Any:
    """The kernels' layout under ``BUDGET``.

    Staged per step: rows k, q (reverse pass) and per warp the row sums (two in the
    forward pass); columns v or r, do, du and a per-column beta. The threads do not
    depend on the tiles, so a first layout gives the warps.
    """
    first = cs._layout(call, (1, 1), BUDGET, whole_warps=True)
    if first is None:
        return None
    return cs._layout(call, (1 + 2 * first.plan.threads // 32, 3 + beta_mode), BUDGET, whole_warps=True)


def _finish(call: cs.Call, lay: Any, du: Any, res: Any, dk_parts: Any, dq_parts: Any, dS_0: Any, final: Any,
            dS_T: Any) -> tuple[Any, ...]:
    """The elementwise remainder, in the caller's library (see the module docstring)."""
    xp = array_api_compat.array_namespace(du)
    acc, n_lead, T = call.accumulation, lay.n_lead, lay.T

    def per_lead(x: Any) -> Any:  # an operand in the accumulation dtype, broadcast to (n_lead, T, D)
        x = xp.astype(x, getattr(xp, acc))
        return xp.reshape(xp.broadcast_to(x, (*lay.lead, T, x.shape[-1])), (n_lead, T, x.shape[-1]))

    q, _, v, beta, g = call.arrays[:5]
    beta_ = per_lead(beta)
    dq, dk = (parts[0] if parts.shape[0] == 1 else xp.sum(parts, axis=0) for parts in (dq_parts, dk_parts))
    dv = beta_ * du
    dbeta = du * res if beta.shape[-1] > 1 else xp.sum(du * res, axis=-1, keepdims=True)
    dg = None
    if g is not None:
        local = xp.sum(per_lead(q) * dq, axis=-1) - xp.sum(per_lead(v) * dv, axis=-1)  # (n_lead, T)
        dg = xp.flip(xp.cumulative_sum(xp.flip(local, axis=-1), axis=-1), axis=-1)
        if dS_T is not None:
            final_term = xp.reshape(xp.broadcast_to(dS_T, (*lay.lead3, lay.Dk, lay.Dv)), (n_lead, lay.Dk, lay.Dv))
            dg = dg + xp.sum(final_term * final[:, 0], axis=(-2, -1))[:, None]
        dg = dg[..., None]

    def out(x: Any) -> Any:
        return None if x is None else call.lib.convert(xp.reshape(x, (*lay.lead, T, x.shape[-1])), call.dtype)
    dS_0 = xp.reshape(dS_0, (*lay.lead, lay.Dk, lay.Dv))
    return out(dq), out(dk), out(dv), out(dbeta), out(dg), dS_0
