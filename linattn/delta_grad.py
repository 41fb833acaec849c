r"""Gradients of the delta rule scan (:func:`linattn.delta_scan.delta_scan`): the reverse-mode loop.

For the loop S̃_t = e^{g_t} S_{t−1}, u_t = β_t (v_t − S̃_tᵀ k_t), S_t = S̃_t + k_t u_tᵀ,
o_t = S_tᵀ q_t, walking t backwards with the cotangent of S_t gives every input's
gradient in O(T·Dk·Dv) time (see :func:`delta_scan_vjp`). It is the reference: short,
one line per forward line, and checked against central differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat

from linattn import _checks
from linattn.backends import Backend, resolve_backend
from linattn.delta_scan import _check, _columns, _delta_step, _expand, _initial_state, _lead, _uncolumns
from linattn.scan import _sum_to_shape

__all__ = ["DeltaScanGradients", "delta_scan_vjp"]


@dataclass(frozen=True)
class DeltaScanGradients:
    """Cotangents of the inputs of :func:`delta_scan` (None where the input was None)."""

    dq: Any
    dk: Any
    dv: Any
    dbeta: Any
    dg: Any
    dinitial_state: Any


def _checkpoints(xp: Any, k: Any, v: Any, beta: Any, g: Any, S: Any, every: int) -> list[Any]:
    """S_{cE−1} for c = 0, 1, ...: the states entering each stretch of E steps, by the loop."""
    saved = []
    for t in range(k.shape[-2]):
        if t % every == 0:
            saved.append(S)
        step = slice(t, t + 1)
        _, _, S = _delta_step(xp, S, k[..., step, :], v[..., step, :], beta[..., step, :],
                              None if g is None else g[..., step, :])
    return saved


def _vjp(xp, q, k, v, beta, g, S0, do, dS, every):
    """Reverse-mode through the loop, one step at a time from the last (see delta_scan_vjp)."""
    S0 = _initial_state(xp, q, k, v, beta, g, S0)
    T = int(q.shape[-2])
    dS = xp.zeros_like(S0) if dS is None else dS + xp.zeros_like(S0)  # at least the state's shape
    grads: dict[str, list[Any]] = {"q": [], "k": [], "v": [], "beta": [], "g": []}
    checkpoints = _checkpoints(xp, k, v, beta, g, S0, every)
    for c in reversed(range(len(checkpoints))):
        steps = range(c * every, min((c + 1) * every, T))
        before = [checkpoints[c]]  # S_{t−1} for each t of the stretch, recomputed from its checkpoint
        for t in steps[:-1]:
            before.append(_delta_step(xp, before[-1], k[..., t:t + 1, :], v[..., t:t + 1, :], beta[..., t:t + 1, :],
                                      None if g is None else g[..., t:t + 1, :])[2])
        for t, S_prev in zip(reversed(steps), reversed(before), strict=True):
            q_t, k_t, v_t, beta_t = (x[..., t:t + 1, :] for x in (q, k, v, beta))
            g_t = None if g is None else g[..., t:t + 1, :]
            do_t = do[..., t:t + 1, :]
            decayed, residual, S_t = _delta_step(xp, S_prev, k_t, v_t, beta_t, g_t)
            dS = dS + xp.matrix_transpose(q_t) * do_t  # o_tᵀ = q_tᵀ S_t
            grads["q"].append(xp.matmul(do_t, xp.matrix_transpose(S_t)))
            du = xp.matmul(k_t, dS)  # S_t = S̃_t + k_t u_tᵀ: du_t = dS_tᵀ k_t, dk_t = dS_t u_t
            dk = xp.matmul(beta_t * residual, xp.matrix_transpose(dS))
            grads["beta"].append(xp.sum(du * residual, axis=-1, keepdims=True))  # u_t = β_t (v_t − p_t)
            grads["v"].append(beta_t * du)
            dp = -beta_t * du  # p_t = S̃_tᵀ k_t
            d_decayed = dS + xp.matrix_transpose(k_t) * dp
            grads["k"].append(dk + xp.matmul(dp, xp.matrix_transpose(decayed)))
            if g is not None:  # S̃_t = e^{g_t} S_{t−1}
                grads["g"].append(xp.sum(xp.sum(d_decayed * decayed, axis=-1, keepdims=True), axis=-2, keepdims=True))
                d_decayed = xp.exp(g_t) * d_decayed
            dS = d_decayed

    def collect(name: Any, like: Any) -> Any:
        if like is None:
            return None
        if T == 0:
            return xp.zeros_like(like)
        return _sum_to_shape(xp, xp.concat(grads[name][::-1], axis=-2), tuple(like.shape))
    return (collect("q", q), collect("k", k), collect("v", v), collect("beta", beta), collect("g", g), dS)


def _cotangent_once(xp: Any, q: Any, k: Any, v: Any, beta: Any, g: Any, state0: Any, do: Any, dS: Any) -> Any:
    """dS_T over the leading dims of q and do too, zero but at the first index of the axes only they have.

    The reverse loop runs once per index of those axes (GQA's query groups), each on its
    own copy of the state; the state's cotangent enters one copy only, or the sum over
    the copies would count it once per group.
    """
    if dS is None:
        return None
    own, full = _lead(xp, k, v, beta, g, state0, dS), _lead(xp, q, do, k, v, beta, g, state0, dS)
    if own == full:
        return dS
    own = (1,) * (len(full) - len(own)) + own
    dims = (int(k.shape[-1]), int(v.shape[-1]))
    once = xp.zeros((*full, *dims), dtype=dS.dtype, device=array_api_compat.device(dS))
    first = tuple(slice(None) if n == m else slice(0, 1) for n, m in zip(own, full, strict=True))
    once[first] = xp.broadcast_to(dS, (*own, *dims))
    return once


def delta_scan_vjp(q: Any, k: Any, v: Any, beta: Any, do: Any, *, g: Any = None, initial_state: Any = None,
                   dfinal_state: Any = None, chunk_size: int = 64,
                   backend: str | Backend | None = None) -> DeltaScanGradients:
    r"""Gradients of :func:`delta_scan`, by the reverse-mode recurrence (the reference).

    Walking t from T − 1 down to 0 with the cotangent dS of S_t (dS_T = ``dfinal_state``),
    and the forward quantities of step t recomputed (S̃_t = e^{g_t} S_{t−1},
    r_t = v_t − S̃_tᵀ k_t, u_t = β_t r_t):

    .. math::

        dS \mathrel{+}= q_t\, do_t^\top, \quad dq_t = S_t\, do_t, \quad du_t = dS^\top k_t, \quad
        d\beta_t = du_t \cdot r_t, \quad dv_t = \beta_t\, du_t,

    .. math::

        dp_t = -\beta_t\, du_t, \quad d\tilde S = dS + k_t\, dp_t^\top, \quad
        dk_t = dS\, u_t + \tilde S_t\, dp_t, \quad dg_t = \langle d\tilde S, \tilde S_t \rangle, \quad
        dS \leftarrow e^{g_t} d\tilde S,

    and dS_0 is the last dS. The states S_{t−1} are recomputed by the forward loop from
    checkpoints saved every ``chunk_size`` steps, so memory is O((T/C + C)·Dk·Dv), time
    about three forward loops. A β per value channel is the same per value column.

    Parameters
    ----------
    q, k, v, beta, g, initial_state
        As in :func:`delta_scan`.
    do : array, shape (..., T, Dv)
        Cotangent of o.
    dfinal_state : array, shape (..., Dk, Dv), optional
        Cotangent of the final state; None is zero.
    chunk_size : int, default 64
        Steps between the saved states.
    backend : str, optional
        ``"numpy"``, ``"cupy"`` or ``"reference"``; None follows the inputs. On the
        ``"cupy"`` backend the gradients run CUDA kernels (``cuda/delta_grad.cu``: the
        same recurrence, walked backwards once and forwards twice, in float32 for
        half and float32 data), and dinitial_state comes back in float32 for half data.

    Returns
    -------
    DeltaScanGradients
        dq, dk, dv, dbeta, dg, dinitial_state, each shaped like its input (dg and
        dinitial_state None when g, initial_state were None).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.delta_scan import delta_scan
    >>> from linattn.delta_grad import delta_scan_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = rng.standard_normal((4, 6, 3)) / 2
    >>> beta = rng.random((6, 1))
    >>> grads = delta_scan_vjp(q, k, v, beta, do)
    >>> h = 1e-6; e = np.zeros_like(beta); e[2] = h
    >>> fd = ((delta_scan(q, k, v, beta + e)[0] - delta_scan(q, k, v, beta - e)[0]) * do).sum() / (2 * h)
    >>> bool(np.isclose(fd, grads.dbeta[2, 0]))
    True
    """
    xp = _checks.namespace_of(q=q, k=k, v=v, beta=beta, do=do, g=g, initial_state=initial_state,
                              dfinal_state=dfinal_state)
    chunk_size = _check(xp, q, k, v, beta, g, "recurrent", chunk_size)
    dfinal_state = _cotangent_once(xp, q, k, v, beta, g, initial_state, do, dfinal_state)
    kernel = resolve_backend(backend, xp).kernel("delta_scan_vjp")
    result = None if kernel is None else kernel(q, k, v, beta, g, initial_state, do, dfinal_state)
    if result is not None:
        shaped = [None if x is None or like is None else _sum_to_shape(xp, x, tuple(like.shape))
                  for x, like in zip(result, (q, k, v, beta, g, initial_state), strict=True)]
        return DeltaScanGradients(*shaped)
    if beta.shape[-1] == 1:
        dq, dk, dv, dbeta, dg, dS = _vjp(xp, q, k, v, beta, g, initial_state, do, dfinal_state, chunk_size)
    else:
        cols = _columns(xp, q, k, v, beta, g, initial_state)
        do_cols, dS_cols = (None if x is None else _expand(xp, xp.matrix_transpose(x), -1)
                            for x in (do, dfinal_state))
        dq, dk, dv, dbeta, dg, dS = _vjp(xp, *cols, do_cols, dS_cols, chunk_size)
        dq, dk, dg = (None if x is None else x[..., 0, :, :] for x in (dq, dk, dg))
        dv, dbeta, dS = (_uncolumns(xp, x) for x in (dv, dbeta, dS))
    dinitial = None if initial_state is None else _sum_to_shape(xp, dS, tuple(initial_state.shape))
    return DeltaScanGradients(dq=dq, dk=dk, dv=dv, dbeta=dbeta, dg=dg, dinitial_state=dinitial)
