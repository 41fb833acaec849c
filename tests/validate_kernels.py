"""Small NumPy kernels for the validate tests and docs: correct ones, and each with one planted bug.

They follow linattn's (and flash-linear-attention's) calling convention: (B, T, H, D)
arrays, ``scale=None`` meaning Dk^-0.5, states (N, H, Dk, Dv), ``cu_seqlens`` offsets.
Each computes in float32 for float32 or half inputs (float64 for float64), as a kernel
would, and returns its output in the input dtype and its state in float32 (or float64).
"""

from __future__ import annotations

import itertools

import numpy as np


def _work_dtype(x: np.ndarray) -> type:
    return np.float64 if x.dtype == np.float64 else np.float32


def _sequences(batch: int, length: int, cu_seqlens) -> list[tuple[int, int, int, int]]:
    """(state row, batch row, first step, end) of every sequence."""
    if cu_seqlens is None:
        return [(b, b, 0, length) for b in range(batch)]
    return [(n, 0, int(lo), int(hi)) for n, (lo, hi) in enumerate(itertools.pairwise(np.asarray(cu_seqlens)))]


def gla_loop(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, bug=None):
    """GLA one step at a time: S_t = exp(gk_t) S_{t-1} + k_t v_tᵀ, o_t = scale · S_tᵀ q_t.

    ``bug`` plants one mistake: "tail" (a 64-step chunked kernel that never writes the
    outputs of a last, partial chunk), "future_gate" (the decay of step t also applies
    the gate of step t + 1, as an off-by-one cumulative sum would), "transposed_state"
    (reads the initial state as (Dv, Dk)).
    """
    work = _work_dtype(q)
    out_dtype = q.dtype
    q, k, v, gk = (np.asarray(x, dtype=work) for x in (q, k, v, gk))
    batch, length, q_heads, key_dim = q.shape
    kv_heads, value_dim = v.shape[2], v.shape[3]
    group = q_heads // kv_heads
    scale = key_dim**-0.5 if scale is None else scale
    o = np.zeros((batch, length, q_heads, value_dim), dtype=work)
    finals = []
    for n, b, lo, hi in _sequences(batch, length, cu_seqlens):
        S = np.zeros((kv_heads, key_dim, value_dim), dtype=work)
        if initial_state is not None:
            S = np.array(initial_state[n], dtype=work)
            if bug == "transposed_state":
                S = np.ascontiguousarray(S.swapaxes(-1, -2))
        written = lo + (hi - lo) // 64 * 64 if bug == "tail" else hi
        for t in range(lo, hi):
            decay = np.exp(gk[b, t])
            if bug == "future_gate" and t + 1 < hi:
                decay = decay * np.exp(gk[b, t + 1])
            S = decay[:, :, None] * S + k[b, t][:, :, None] * v[b, t][:, None, :]
            if t < written:
                reads = q[b, t].reshape(kv_heads, group, key_dim)
                o[b, t] = scale * np.einsum("hgk,hkv->hgv", reads, S).reshape(q_heads, value_dim)
        finals.append(S)
    o = o.astype(out_dtype)
    return (o, np.stack(finals).astype(np.promote_types(work, np.float32))) if output_final_state else o


def _softmax_probabilities(q, k, causal, scale, bug):
    work = _work_dtype(q)
    q, k = np.asarray(q, dtype=work), np.asarray(k, dtype=work)
    key_dim, length = q.shape[-1], q.shape[1]
    if scale is None:
        scale = 1.0 / key_dim if bug == "scale" else key_dim**-0.5
    group = q.shape[2] // k.shape[2]
    logits = np.einsum("bthd,bshd->bhts", q, np.repeat(k, group, axis=2)) * scale
    if causal:
        # key j is hidden from query i when j > i; "off_by_one" hides only j > i + 1
        hidden = np.triu(np.ones((length, length), dtype=bool), k=2 if bug == "off_by_one" else 1)
        logits = np.where(hidden, -np.inf, logits)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True), scale, group


def softmax_np(q, k, v, *, causal=False, scale=None, bug=None):
    """Softmax attention on (B, T, H, D): "off_by_one" lets query i see key i + 1; "scale" defaults to 1/Dk."""
    p, _, group = _softmax_probabilities(q, k, causal, scale, bug)
    o = np.einsum("bhts,bshd->bthd", p, np.repeat(np.asarray(v, dtype=p.dtype), group, axis=2))
    return o.astype(q.dtype)


class SoftmaxWithBackward:
    """Softmax attention with a hand-written backward (validate's ``.forward``/``.backward`` protocol).

    dS = P ⊙ (dP − rowsum(P ⊙ dP)); ``bug="missing_term"`` drops the rowsum, the classic
    mistake of a softmax backward.
    """

    def __init__(self, bug=None):
        self.bug = bug

    def forward(self, q, k, v, *, causal=False, scale=None):
        return softmax_np(q, k, v, causal=causal, scale=scale)

    def backward(self, q, k, v, do, *, causal=False, scale=None):
        p, scale, group = _softmax_probabilities(q, k, causal, scale, None)
        work = p.dtype
        q, k, v, do = (np.asarray(x, dtype=work) for x in (q, k, v, do))
        v_per_query = np.repeat(v, group, axis=2)
        dp = np.einsum("bthd,bshd->bhts", do, v_per_query)
        row = 0.0 if self.bug == "missing_term" else np.sum(p * dp, axis=-1, keepdims=True)
        ds = p * (dp - row)
        dq = scale * np.einsum("bhts,bshd->bthd", ds, np.repeat(k, group, axis=2))
        dk = scale * np.einsum("bhts,bthd->bshd", ds, q)
        dv = np.einsum("bhts,bthd->bshd", p, do)
        b, s, hq = dk.shape[:3]
        dk = dk.reshape(b, s, hq // group, group, -1).sum(axis=3)
        dv = dv.reshape(b, s, hq // group, group, -1).sum(axis=3)
        return {"q": dq.astype(q.dtype), "k": dk, "v": dv}


def linear_np(q, k, v, *, scale=None, normalize=False, initial_state=None, output_final_state=False, bug=None):
    """FLA's linear attention (identity features), optionally normalised by scale·q·z + 1e-10.

    ``bug="no_eps"`` divides by scale·q·z alone: 0/0 where every key so far is zero.
    """
    work = _work_dtype(q)
    out_dtype = q.dtype
    q, k, v = (np.asarray(x, dtype=work) for x in (q, k, v))
    batch, length, q_heads, key_dim = q.shape
    kv_heads, value_dim = v.shape[2], v.shape[3]
    group = q_heads // kv_heads
    scale = key_dim**-0.5 if scale is None else scale
    eps = 0.0 if bug == "no_eps" else 1e-10
    S = np.zeros((batch, kv_heads, key_dim, value_dim), dtype=work)
    if initial_state is not None:
        S = np.array(initial_state, dtype=work)
    z = np.zeros((batch, kv_heads, key_dim), dtype=work)
    o = np.zeros((batch, length, q_heads, value_dim), dtype=work)
    with np.errstate(invalid="ignore", divide="ignore"):
        for t in range(length):
            S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
            z = z + k[:, t]
            reads = q[:, t].reshape(batch, kv_heads, group, key_dim) * scale
            out = np.einsum("bhgk,bhkv->bhgv", reads, S)
            if normalize:
                out = out / (np.einsum("bhgk,bhk->bhg", reads, z)[..., None] + eps)
            o[:, t] = out.reshape(batch, q_heads, value_dim)
    o = o.astype(out_dtype)
    return (o, S.astype(np.promote_types(work, np.float32))) if output_final_state else o
