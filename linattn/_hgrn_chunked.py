r"""HGRN's chunked form: every sub-block of every chunk at once, then the (B, D) state carried.

For one sequence, with G_t the log-decays summed from the first step of t's sub-block
and F the state entering that sub-block,

.. math::

    h_t = e^{G_t} \odot \Big(\sum_{s \le t} e^{-G_s} \odot x_s + F\Big) ,

the sum over the sub-block's steps s, a product with its (c, c) lower triangle. The
decays are factored as in the scan's chunked form (:mod:`linattn.scan`): e^{−G} is
bounded by the span limit, and the entries past it take the exact step-by-step sum. The
scan goes chunk by chunk because its state is (Dk, Dv) per head; HGRN's is one vector,
so every sub-block is computed at once, in place where the temporaries are this
module's own, and only that vector is carried (between sub-blocks, then chunks).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from linattn.scan import _causal_mask, _span_limit, _sub_block

__all__ = ["chunked"]


def _sub_blocks(xp: Any, a: Any, n: int, C: int, c: int) -> Any:
    """(B, T, D) -> (B, n·m, c, D): n chunks of C steps, each cut into m = ⌈C/c⌉ sub-blocks of c.

    Zero rows pad the last chunk to C steps and every chunk to m·c: a zero gate and a zero
    input leave the state as it was, so they change no output and no state.
    """
    B, T, D = (int(d) for d in a.shape)
    m, device = -(-C // c), array_api_compat.device(a)
    if n * C != T:
        a = xp.concat([a, xp.zeros((B, n * C - T, D), dtype=a.dtype, device=device)], axis=1)
    a = xp.reshape(a, (B, n, C, D))
    if m * c != C:
        a = xp.concat([a, xp.zeros((B, n, m * c - C, D), dtype=a.dtype, device=device)], axis=2)
    return xp.reshape(a, (B, n * m, c, D))


def _stepwise(xp: Any, x: Any, g: Any) -> Any:
    """h_t = e^{g_t} h_{t−1} + x_t inside every sub-block from h = 0, one step at a time: (..., c, D)."""
    decay = xp.exp(g)
    rows = [x[..., 0, :]]
    for t in range(1, int(x.shape[-2])):
        rows.append(decay[..., t, :] * rows[-1] + x[..., t, :])
    return xp.stack(rows, axis=-2)


def _in_sub_blocks(xp: Any, x: Any, g: Any) -> tuple[Any, Any]:
    r"""Every sub-block from a zero state, all at once: h (..., c, D) and e^{G} (..., c, D).

    .. math::

        h_t = \sum_{s \le t} e^{G_t - G_s} x_s = e^{G_t} \sum_{s \le t} e^{-G_s} x_s, \qquad
        G_t = \sum_{a \le r \le t} g_r ,

    a the sub-block's first step: two products with the (c, c) lower triangle. The factor
    e^{−G} is clipped at e^{limit} (:func:`linattn.scan._span_limit`); the entries where
    it is, e^{G} < e^{−limit}, take the exact step-by-step sum instead.
    """
    c = int(x.shape[-2])
    tril = xp.reshape(xp.astype(_causal_mask(xp, c, array_api_compat.device(x)), x.dtype), (1, 1, c, c))
    decay = xp.exp(xp.matmul(tril, g))
    smallest = math.exp(-_span_limit(xp, x.dtype))
    # g <= 0: e^{G} falls inside a sub-block, so its last row holds the least. Where none
    # is clipped, dividing by e^{G} itself gives the same values one pass sooner.
    clipped = bool(xp.min(decay[..., -1, :]) < smallest)
    h = xp.matmul(tril, x / (xp.maximum(decay, smallest) if clipped else decay))
    h *= decay  # in place: h is this function's own
    return xp.where(decay < smallest, _stepwise(xp, x, g), h) if clipped else h, decay


def _entering_states(xp: Any, own: Any, decay: Any, h0: Any) -> tuple[Any, Any]:
    r"""The state entering every sub-block (B, n, m, D), and the state after the last.

    own (B, n, m, D), each sub-block's output at its last step from a zero state, and its
    decay e^{G_end} carry the state through it: F_{i+1} = e^{G_end,i} ⊙ F_i + own_i.
    Inside each chunk (all chunks at once), F_i = P_i ⊙ S + R_i, with P_i the product of
    the decays before sub-block i and R_i the state from zero; S, the state entering each
    chunk, is carried from chunk to chunk: S ← P_m ⊙ S + R_m.
    """
    n, m = int(own.shape[1]), int(own.shape[2])
    R, P = [xp.zeros_like(own[:, :, 0, :])], [xp.ones_like(decay[:, :, 0, :])]
    for i in range(m):
        R.append(decay[:, :, i, :] * R[-1] + own[:, :, i, :])
        P.append(decay[:, :, i, :] * P[-1])
    S = xp.zeros_like(own[:, 0, 0, :]) if h0 is None else h0
    entering = []
    for chunk in range(n):
        entering.append(S)
        S = P[m][:, chunk, :] * S + R[m][:, chunk, :]
    entering = xp.stack(entering, axis=1)
    F = xp.empty_like(own)
    for i in range(m):
        F[:, :, i, :] = P[i] * entering + R[i]
    return F, S


def chunked(xp: Any, x: Any, g: Any, h0: Any, chunk_size: int) -> tuple[Any, Any]:
    r"""HGRN's chunked form on one sequence: x, g (B, T, D), h0 (B, D) or None -> o (B, T, D), h_{T−1} (B, D).

    .. math::

        o_t = h_t + e^{G_t} \odot F ,

    h the sub-block's own outputs (:func:`_in_sub_blocks`), G its gates summed from its
    first step and F the state entering it (:func:`_entering_states`); chunks of C steps
    are cut into sub-blocks of c = min(16, C) steps (64 in float64). The state is one
    vector per sequence, so every sub-block is computed at once (the scan's chunked form
    goes chunk by chunk for its (Dk, Dv) states) and only the state is carried.
    """
    B, T, D = (int(d) for d in x.shape)
    C = min(chunk_size, T)
    c = min(_sub_block(xp, x.dtype), C)
    n, m = -(-T // C), -(-C // c)
    h, decay = (xp.reshape(a, (B, n, m, c, D)) for a in _in_sub_blocks(xp, _sub_blocks(xp, x, n, C, c),
                                                                         _sub_blocks(xp, g, n, C, c)))
    F, final = _entering_states(xp, h[..., -1, :], decay[..., -1, :], h0)
    decay *= xp.expand_dims(F, axis=-2)  # in place, as below: both are temporaries of this call
    h += decay
    o = xp.reshape(h, (B, n, m * c, D))[:, :, :C, :]
    return xp.reshape(o, (B, n * C, D))[:, :T, :], final
