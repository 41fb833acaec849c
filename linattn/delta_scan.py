r"""The delta rule scan: the primitive behind DeltaNet and Gated DeltaNet.

For each leading index (batch, head, ...) and time t, with the state S_t ∈ R^{Dk×Dv}
(keys along the rows, values along the columns: the orientation of :mod:`linattn.scan`
and of flash-linear-attention's ``[K, V]`` states),

.. math::

    S_t = \alpha_t \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top, \qquad
    o_t = S_t^\top q_t, \qquad \alpha_t = e^{g_t}, \qquad S_{-1} = S_0,

which is the same as the error-correcting form of the loop below: the decayed state
:math:`\tilde S_t = \alpha_t S_{t-1}` predicts :math:`\tilde S_t^\top k_t` for v_t, and
the step writes β_t times the error along k_t,

.. math::

    u_t = \beta_t \odot (v_t - \tilde S_t^\top k_t), \qquad S_t = \tilde S_t + k_t u_t^\top .

g_t ≤ 0 is a log-decay (absent: α_t = 1, DeltaNet); β_t is one number per step
(shape (..., T, 1)) or one per value channel (shape (..., T, Dv), where each value
column is a delta rule of its own). The readout is inclusive. With |k_t| = 1 and
β_t ∈ [0, 2] the transition α_t(I − β_t k_t k_tᵀ) has eigenvalues α_t(1 − β_t) (along
k_t) and α_t (across), all in [−1, 1], so no form can grow the state.

Three forms compute the same outputs and final state:

- ``recurrent``: the loop over t above — the definition, and the decoding form.
- ``parallel``: the whole sequence as one (T, T) system. Unrolling the loop, the
  corrections u_t solve a unit lower-triangular system (the UT transform), and the
  outputs are masked attention over them:

  .. math::

      (I + L)\, U = \operatorname{diag}(\beta)\,\big(V - \operatorname{diag}(e^{G}) K S_0\big), \qquad
      L_{ts} = [s < t]\; \beta_t\, (k_t \cdot k_s)\, e^{G_t - G_s},

  .. math::

      O = \big(Q K^\top \odot M\big) U + \operatorname{diag}(e^{G}) Q S_0, \qquad
      M_{ts} = [s \le t]\, e^{G_t - G_s}, \qquad G_t = \textstyle\sum_{r \le t} g_r ;

  solved by forward substitution row by row. O(T²) memory.
- ``chunked``: the parallel form inside chunks of C steps (the WY/UT representation):
  per chunk, one triangular solve gives Ũ (the corrections from a zero state) and W
  (their response to the entering state), so that U = Ũ − W S_in; a loop over the
  chunks carries S_in. O(T·C·D + T·D²) time, O(T·C) memory.

Every exponential is of a difference G_t − G_s with s ≤ t, of G_t, or of a single g_t
(within a chunk for the chunked form), so with g ≤ 0 none exceeds 1: a log-decay of
−1e3 underflows to 0 and never overflows. Arrays are (..., T, D); leading dims broadcast
(grouped value heads are a size-1 axis on q and k). The gradients are in
:mod:`linattn.delta_grad`.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from linattn import _checks
from linattn.backends import Backend, resolve_backend

__all__ = ["FORMS", "delta_scan"]

FORMS = ("chunked", "parallel", "recurrent")

# Rows per block of the chunked form's blocked forward substitution: the diagonal blocks
# are inverted (they are small), the rest are matrix products.
_SOLVE_BLOCK = 16
# Elements of each (chunks, C, C) intermediate the chunked form builds at once (512 KiB in
# float32): it works through the chunks in runs of that size.
_CHUNK_BUDGET = 1 << 17


def _expand(xp: Any, x: Any, axis: int) -> Any:
    return xp.expand_dims(x, axis=axis)


def _lead(xp: Any, *arrays: Any) -> tuple[int, ...]:
    """The broadcast leading dims (all but the last two) of the given arrays."""
    parts = [x[..., :1, :1] for x in arrays if x is not None]
    return tuple(xp.broadcast_arrays(*parts)[0].shape[:-2]) if len(parts) > 1 else tuple(parts[0].shape[:-2])


def _initial_state(xp: Any, q: Any, k: Any, v: Any, beta: Any, g: Any, state0: Any) -> Any:
    """S_0 broadcast to the state's shape: the leading dims of k, v, beta, g and S_0 (never q's)."""
    shape = (*_lead(xp, k, v, beta, g, state0), int(k.shape[-1]), int(v.shape[-1]))
    if state0 is None:
        return xp.zeros(shape, dtype=v.dtype, device=array_api_compat.device(v))
    return xp.broadcast_to(state0, shape)


def _empty_output(xp: Any, q: Any, state: Any) -> Any:
    shape = (*_lead(xp, q, state), 0, int(state.shape[-1]))
    return xp.zeros(shape, dtype=state.dtype, device=array_api_compat.device(state))


# ---------------------------------------------------------------------------------------
# recurrent: the definition
# ---------------------------------------------------------------------------------------


def _delta_step(xp: Any, S: Any, k_t: Any, v_t: Any, beta_t: Any, g_t: Any | None) -> tuple[Any, Any, Any]:
    """One step from S_{t−1}; k_t (..., 1, Dk), v_t and beta_t rows. Returns (S̃_t, v_t − S̃_tᵀk_t, S_t)."""
    decayed = S if g_t is None else xp.exp(g_t) * S  # S̃_t = α_t S_{t−1}
    residual = v_t - xp.matmul(k_t, decayed)  # v_t − S̃_tᵀ k_t, as a row
    return decayed, residual, decayed + xp.matrix_transpose(k_t) * (beta_t * residual)  # + k_t u_tᵀ


def _form_recurrent(xp, q, k, v, beta, g, state0, chunk_size):
    S = _initial_state(xp, q, k, v, beta, g, state0)
    outputs = []
    for t in range(q.shape[-2]):
        step = slice(t, t + 1)
        _, _, S = _delta_step(xp, S, k[..., step, :], v[..., step, :], beta[..., step, :],
                              None if g is None else g[..., step, :])
        outputs.append(xp.matmul(q[..., step, :], S))  # o_tᵀ = q_tᵀ S_t
    return (xp.concat(outputs, axis=-2) if outputs else _empty_output(xp, q, S)), S


# ---------------------------------------------------------------------------------------
# parallel: the (T, T) system
# ---------------------------------------------------------------------------------------


def _decay_matrix(xp: Any, G: Any, mask: Any) -> Any:
    """e^{G_t − G_s} where mask[t, s] (a 0/1 float mask, s <= t) and 0 elsewhere: (..., T, T).

    The exponent is set to 0 outside the mask *before* exp (above the diagonal G_t − G_s
    >= 0 may be huge) and the result is zeroed after; every exponent taken is <= 0.
    """
    diff = G - xp.matrix_transpose(G)  # [t, s] = G_t − G_s, from G (..., T, 1)
    return xp.exp(diff * mask) * mask


def _masks(xp: Any, T: int, like: Any) -> tuple[Any, Any]:
    """The inclusive (s <= t) and strict (s < t) causal masks, (T, T), as 0/1 in like's dtype."""
    t = xp.arange(T, device=array_api_compat.device(like))
    inclusive = _expand(xp, t, -1) >= _expand(xp, t, 0)
    strict = _expand(xp, t, -1) > _expand(xp, t, 0)
    return xp.astype(inclusive, like.dtype), xp.astype(strict, like.dtype)


def _forward_substitution(xp: Any, L: Any, R: Any) -> Any:
    """X with (I + L) X = R, L strictly lower-triangular (..., T, T): x_t = r_t − Σ_{s<t} L_ts x_s."""
    shape = (*_lead(xp, L, R), int(R.shape[-2]), int(R.shape[-1]))
    X = xp.zeros(shape, dtype=R.dtype, device=array_api_compat.device(R))
    for t in range(R.shape[-2]):  # rows of X at and after t are still 0, so the full row of L is exact
        X[..., t:t + 1, :] = R[..., t:t + 1, :] - xp.matmul(L[..., t:t + 1, :], X)
    return X


def _form_parallel(xp, q, k, v, beta, g, state0, chunk_size):
    S0 = _initial_state(xp, q, k, v, beta, g, state0)
    T = q.shape[-2]
    if T == 0:
        return _empty_output(xp, q, S0), S0
    inclusive, strict = _masks(xp, T, q)
    G = None if g is None else xp.cumulative_sum(g, axis=-2)
    decay = inclusive if G is None else _decay_matrix(xp, G, inclusive)  # M, with the mask
    L = beta * xp.matmul(k, xp.matrix_transpose(k)) * (decay * strict)
    k_from_start = k if G is None else xp.exp(G) * k  # e^{G_t} k_t
    q_from_start = q if G is None else xp.exp(G) * q
    U = _forward_substitution(xp, L, beta * (v - xp.matmul(k_from_start, S0)))
    o = xp.matmul(xp.matmul(q, xp.matrix_transpose(k)) * decay, U) + xp.matmul(q_from_start, S0)
    k_to_end = k if G is None else xp.exp(G[..., -1:, :] - G) * k
    S = S0 if G is None else xp.exp(G[..., -1:, :]) * S0
    return o, S + xp.matmul(xp.matrix_transpose(k_to_end), U)


# ---------------------------------------------------------------------------------------
# chunked: the WY/UT representation per chunk
# ---------------------------------------------------------------------------------------


def _unit_lower_inverse(xp: Any, L: Any) -> Any:
    """(I + L)⁻¹ for strictly lower-triangular L (..., b, b), b a power of two, by halving.

    [[I + A, 0], [B, I + D]]⁻¹ = [[Ā, 0], [−D̄ B Ā, D̄]] with Ā = (I + A)⁻¹, D̄ = (I + D)⁻¹;
    both halves are inverted in one call (stacked), so the recursion is log2(b) calls deep.
    """
    b = int(L.shape[-1])
    if b == 1:
        return xp.ones_like(L)
    h = b // 2
    halves = _unit_lower_inverse(xp, xp.stack([L[..., :h, :h], L[..., h:, h:]], axis=-3))
    A, D = halves[..., 0, :, :], halves[..., 1, :, :]
    lower_left = -xp.matmul(D, xp.matmul(L[..., h:, :h], A))
    top = xp.concat([A, xp.zeros_like(lower_left)], axis=-1)
    return xp.concat([top, xp.concat([lower_left, D], axis=-1)], axis=-2)


def _pad_rows(xp: Any, x: Any, rows: int, cols: int = 0) -> Any:
    """Append zero rows (axis −2) and zero columns (axis −1)."""
    device = array_api_compat.device(x)
    if cols:
        x = xp.concat([x, xp.zeros((*x.shape[:-1], cols), dtype=x.dtype, device=device)], axis=-1)
    if rows:
        x = xp.concat([x, xp.zeros((*x.shape[:-2], rows, x.shape[-1]), dtype=x.dtype, device=device)], axis=-2)
    return x


def _solve_unit_lower(xp: Any, L: Any, R: Any) -> Any:
    """X with (I + L) X = R, L strictly lower-triangular (..., C, C): blocked forward substitution.

    Rows go in blocks of b: X_I = (I + L_II)⁻¹ (R_I − L_{I,<I} X_{<I}), so all but the
    small diagonal blocks (inverted at once by :func:`_unit_lower_inverse`) are matrix
    products, as in LAPACK's and the GPU libraries' blocked triangular solves. Padding to a
    multiple of b with zero rows of L extends I + L by an identity block, which changes
    nothing above it.
    """
    C = int(L.shape[-1])
    b = min(_SOLVE_BLOCK, 1 << max(C - 1, 0).bit_length())
    pad = -C % b
    L, R = _pad_rows(xp, L, pad, pad), _pad_rows(xp, R, pad)
    blocks = range(0, C + pad, b)
    inverses = _unit_lower_inverse(xp, xp.stack([L[..., lo:lo + b, lo:lo + b] for lo in blocks], axis=-3))
    shape = (*_lead(xp, L, R), C + pad, int(R.shape[-1]))
    X = xp.zeros(shape, dtype=R.dtype, device=array_api_compat.device(R))
    for i, lo in enumerate(blocks):
        rhs = R[..., lo:lo + b, :]
        if lo:
            rhs = rhs - xp.matmul(L[..., lo:lo + b, :lo], X[..., :lo, :])
        X[..., lo:lo + b, :] = xp.matmul(inverses[..., i, :, :], rhs)
    return X[..., :C, :]


def _to_chunks(xp: Any, x: Any | None, n_chunks: int, chunk_size: int) -> Any | None:
    """(..., T, D) -> (..., n, C, D), zero-padded: a zero k, β and g step changes nothing."""
    if x is None:
        return None
    x = _pad_rows(xp, x, n_chunks * chunk_size - int(x.shape[-2]))
    return xp.reshape(x, (*x.shape[:-2], n_chunks, chunk_size, int(x.shape[-1])))


def _chunks(xp, qc, kc, vc, bc, gc, S, masks):
    """A run of consecutive chunks (..., m, C, D) from the state S entering the first: (o, S after)."""
    inclusive, strict = masks
    C, Dk, Dv = int(qc.shape[-2]), int(kc.shape[-1]), int(vc.shape[-1])
    G = None if gc is None else xp.cumulative_sum(gc, axis=-2)  # Γ: restarts at every chunk
    decay = inclusive if G is None else _decay_matrix(xp, G, inclusive)  # e^{Γ_τ − Γ_σ}, σ <= τ
    L = bc * xp.matmul(kc, xp.matrix_transpose(kc)) * (decay * strict)  # (I + L) U = diag(β)(V − e^Γ K S_in)
    beta_from_start = bc if G is None else bc * xp.exp(G)  # β_τ e^{Γ_τ}
    lead = _lead(xp, vc, kc, bc, G)
    rhs = xp.concat([xp.broadcast_to(bc * vc, (*lead, C, Dv)),
                     xp.broadcast_to(beta_from_start * kc, (*lead, C, Dk))], axis=-1)
    X = _solve_unit_lower(xp, L, rhs)
    U_free, W = X[..., :Dv], X[..., Dv:]  # U = U_free − W S_in
    k_to_end = kc if G is None else xp.exp(G[..., -1:, :] - G) * kc
    chunk_decay = None if G is None else xp.exp(G[..., -1:, :])  # e^{Γ_{C−1}}, (..., m, 1, 1)
    entering, corrections = [], []
    for c in range(int(qc.shape[-3])):  # the only sequential part: the state entering each chunk
        entering.append(S)
        U = U_free[..., c, :, :] - xp.matmul(W[..., c, :, :], S)
        corrections.append(U)
        if chunk_decay is not None:
            S = chunk_decay[..., c, :, :] * S
        S = S + xp.matmul(xp.matrix_transpose(k_to_end[..., c, :, :]), U)
    q_from_start = qc if G is None else xp.exp(G) * qc
    scores = xp.matmul(qc, xp.matrix_transpose(kc)) * decay  # (Q Kᵀ ⊙ M) per chunk
    o = xp.matmul(scores, xp.stack(corrections, axis=-3)) + xp.matmul(q_from_start, xp.stack(entering, axis=-3))
    return o, S


def _form_chunked(xp, q, k, v, beta, g, state0, chunk_size):
    S = _initial_state(xp, q, k, v, beta, g, state0)
    T, Dv = int(q.shape[-2]), int(v.shape[-1])
    n = max(1, -(-T // chunk_size))
    qc, kc, vc, bc, gc = (_to_chunks(xp, x, n, chunk_size) for x in (q, k, v, beta, g))
    masks = _masks(xp, chunk_size, q)
    # Runs of chunks whose (m, C, C) intermediates hold at most _CHUNK_BUDGET elements per
    # array: memory stays bounded at any T, and the many elementwise passes stay in cache.
    width = math.prod(int(n) for n in S.shape[:-2]) * chunk_size * chunk_size
    step = max(1, _CHUNK_BUDGET // max(width, 1))
    outputs = []
    for a in range(0, n, step):
        run = slice(a, min(a + step, n))  # (the array API leaves slices past the end unspecified)
        o, S = _chunks(xp, qc[..., run, :, :], kc[..., run, :, :], vc[..., run, :, :], bc[..., run, :, :],
                       None if gc is None else gc[..., run, :, :], S, masks)
        outputs.append(o)
    o = xp.concat(outputs, axis=-3) if len(outputs) > 1 else outputs[0]
    return xp.reshape(o, (*o.shape[:-3], n * chunk_size, Dv))[..., :T, :], S


_FORMS = {"parallel": _form_parallel, "recurrent": _form_recurrent, "chunked": _form_chunked}


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def _columns(xp: Any, q: Any, k: Any, v: Any, beta: Any, g: Any, state: Any) -> tuple[Any, ...]:
    """Move the value columns to a leading axis: (..., T, Dv) -> (..., Dv, T, 1).

    A β per value channel makes each value column a delta rule of its own; q, k and g
    broadcast over the new axis.
    """
    def column_axis(x: Any) -> Any:
        return None if x is None else _expand(xp, xp.matrix_transpose(x), -1)

    lead = (lambda x: None if x is None else _expand(xp, x, -3))  # noqa: E731
    return lead(q), lead(k), column_axis(v), column_axis(beta), lead(g), column_axis(state)


def _uncolumns(xp: Any, x: Any) -> Any:
    """(..., Dv, T|Dk, 1) -> (..., T|Dk, Dv)."""
    return xp.matrix_transpose(x[..., 0])


def _check(xp: Any, q: Any, k: Any, v: Any, beta: Any, g: Any, form: str, chunk_size: Any) -> int:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    T, Dv = int(k.shape[-2]), int(v.shape[-1])
    for name, x, widths in (("beta", beta, (1, Dv)), ("g", g, (1,))):
        if x is None:
            continue
        _checks.require_floating(name, x, xp)
        if x.ndim < 2 or x.shape[-2] != T or x.shape[-1] not in widths:
            allowed = " or ".join(f"(..., {T}, {w})" for w in sorted(set(widths)))
            raise ValueError(f"{name} must have shape {allowed} to match k {tuple(k.shape)} and v "
                             f"{tuple(v.shape)}, got {tuple(x.shape)}")
    return chunk_size


def delta_scan(q: Any, k: Any, v: Any, beta: Any, *, g: Any = None, initial_state: Any = None,
               form: str = "chunked", chunk_size: int = 64, backend: str | Backend | None = None) -> tuple[Any, Any]:
    r"""Run the delta rule scan (see the module docstring for the three forms).

    .. math::

        S_t = e^{g_t} \big(I - \beta_t k_t k_t^\top\big) S_{t-1} + \beta_t k_t v_t^\top, \qquad
        o_t = S_t^\top q_t .

    Parameters
    ----------
    q, k : array, shape (..., T, Dk)
        Queries (already scaled) and keys; leading dims broadcast.
    v : array, shape (..., T, Dv)
        Values.
    beta : array, shape (..., T, 1) or (..., T, Dv)
        Write strength, one per step or one per value channel.
    g : array, shape (..., T, 1), optional
        Log-decay per step (≤ 0 for the no-overflow guarantee); None: no decay.
    initial_state : array, shape (..., Dk, Dv), optional
        S_0; None is zeros.
    form : {"chunked", "parallel", "recurrent"}, default "chunked"
    chunk_size : int, default 64
        Steps per chunk of the chunked form (any T).
    backend : str, optional
        ``"numpy"``, ``"cupy"`` or ``"reference"``; None follows the inputs. On the
        ``"cupy"`` backend the chunked form runs a CUDA kernel (float32 accumulation for
        float16 inputs, whose final state it returns in float32).

    Returns
    -------
    o : array, shape (..., T, Dv)
    final_state : array, shape (..., Dk, Dv)
        S_{T−1} (S_0 when T = 0), with the leading dims of k, v, beta, g and S_0.

    Raises
    ------
    ValueError
        For an unknown form, a chunk size < 1, or beta, g that do not match k and v.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.delta_scan import delta_scan
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 10, 4))
    >>> k /= np.linalg.norm(k, axis=-1, keepdims=True)
    >>> beta, g = rng.random((2, 10, 1)), -rng.random((2, 10, 1))
    >>> o1, s1 = delta_scan(q, k, v, beta, g=g, form="recurrent")
    >>> o2, s2 = delta_scan(q, k, v, beta, g=g, chunk_size=3)
    >>> bool(np.allclose(o1, o2) and np.allclose(s1, s2))
    True
    """
    xp = _checks.namespace_of(q=q, k=k, v=v, beta=beta, g=g, initial_state=initial_state)
    chunk_size = _check(xp, q, k, v, beta, g, form, chunk_size)
    kernel = resolve_backend(backend, xp).kernel("delta_scan") if form == "chunked" else None
    result = None if kernel is None else kernel(q, k, v, beta, g, initial_state)
    if result is not None:
        return result
    if beta.shape[-1] == 1:
        return _FORMS[form](xp, q, k, v, beta, g, initial_state, chunk_size)
    o, S = _FORMS[form](xp, *_columns(xp, q, k, v, beta, g, initial_state), chunk_size)
    return _uncolumns(xp, o), _uncolumns(xp, S)
