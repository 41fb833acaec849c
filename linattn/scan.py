r"""The causal linear scan: the one primitive behind every linear-attention method.

For each leading index (batch, head, ...) and time t,

.. math::

    S_t = \big(e^{g^k_t} (e^{g^v_t})^\top\big) \odot S_{t-1} + k_t v_t^\top, \qquad
    o_t = S_t^\top q_t, \qquad S_{-1} = S_0 \ (\text{the initial state}),

with S_t ∈ R^{Dk×Dv}, the log-decays g^k_t (over Dk, or one scalar per step) and g^v_t
(over Dv) both ≤ 0 in the models that use them, and absent (= 0, no decay) for the
Linear Transformer, Performer and cosFormer. The readout is *inclusive*: o_t sees k_t.
Writing G_t = Σ_{r≤t} g_r for the cumulative log-decays, the same outputs are

.. math::

    o_{t,e} = \sum_{s \le t} \sum_d q_{t,d}\, e^{G^k_{t,d} - G^k_{s,d}} k_{s,d}\;
              e^{G^v_{t,e} - G^v_{s,e}} v_{s,e}
            + \sum_d q_{t,d}\, e^{G^k_{t,d}} S_{0,de}\, e^{G^v_{t,e}} .

Three forms compute them and agree to rounding:

- ``parallel``: the double sum above, masked to s ≤ t — the definition; O(T²) memory.
- ``recurrent``: the loop over t — the RNN form used for decoding; O(T·Dk·Dv) time.
- ``chunked``: the parallel form inside chunks of ``chunk_size`` steps, plus the state
  entering each chunk carried from chunk to chunk — O(T·C·D + T·D²) time, O(C·C·D)
  working memory beyond the inputs and outputs.

Every exponent above is a difference G_t − G_s with s ≤ t (or G_t itself), so it is ≤ 0
when the gates are: no form ever computes e^{+G}, and a log-decay of −1e3 underflows to
0 instead of overflowing. Arrays here are (..., T, D) with the time axis second to last
and any leading dims, which broadcast: grouped-query heads are a size-1 axis on k and v.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn.backends import Backend, resolve_backend

__all__ = ["FORMS", "ScanGradients", "causal_scan", "causal_scan_vjp", "noncausal_scan"]

FORMS = ("parallel", "recurrent", "chunked")

def _expand(xp: Any, x: Any, axis: int) -> Any:
    return xp.expand_dims(x, axis=axis)


def _wide(xp: Any, g: Any | None) -> Any | None:
    """A log-gate in at least float32: its sums over time lose a mild gate's digits in half precision."""
    return g if g is None or g.dtype in (xp.float32, xp.float64) else xp.astype(g, xp.float32)


def _cumulative(xp: Any, g: Any | None) -> Any | None:
    return None if g is None else xp.cumulative_sum(_wide(xp, g), axis=-2)


def _causal_mask(xp: Any, T: int, device: Any) -> Any:
    t = xp.arange(T, device=device)
    return _expand(xp, t, -1) >= _expand(xp, t, 0)  # (T, T): s <= t


def _pairwise_decay(xp: Any, G: Any, mask: Any) -> Any:
    """exp(G_t − G_s) for s <= t and 0 above the diagonal: (..., T, T, D)."""
    diff = _expand(xp, G, -2) - _expand(xp, G, -3)  # [t, s, d] = G_t − G_s
    return xp.exp(xp.where(_expand(xp, mask, -1), diff, -math.inf))


def _state_readout(xp: Any, q: Any, Gk: Any | None, Gv: Any | None, state: Any) -> Any:
    """Σ_d q_td e^{Gk_td} S_de e^{Gv_te}: what an incoming state adds to each output."""
    if Gk is not None:
        q = q * xp.exp(Gk)
    o = xp.matmul(q, state)
    return o if Gv is None else o * xp.exp(Gv)


def _parallel(xp: Any, q: Any, k: Any, v: Any, Gk: Any | None, Gv: Any | None) -> tuple[Any, Any]:
    """Outputs from a zero initial state and the final state, by the double sum.

    Gk, Gv are the *cumulative* log-decays (or None). Returns o (..., T, Dv) and the final
    state Σ_s (k_s e^{Gk_T − Gk_s})(v_s e^{Gv_T − Gv_s})ᵀ (..., Dk, Dv).
    """
    T = q.shape[-2]
    mask = _causal_mask(xp, T, array_api_compat.device(q))
    if Gk is None:
        scores = xp.where(mask, xp.matmul(q, xp.matrix_transpose(k)), 0.0)
    elif Gk.shape[-1] == 1:  # one decay per step: a (T, T) factor on q·k, still a matmul
        scores = xp.matmul(q, xp.matrix_transpose(k)) * _pairwise_decay(xp, Gk, mask)[..., 0]
    else:
        scores = xp.sum(_expand(xp, q, -2) * _expand(xp, k, -3) * _pairwise_decay(xp, Gk, mask), axis=-1)
    if Gv is None:
        o = xp.matmul(scores, v)
    else:
        o = xp.sum(_expand(xp, scores, -1) * _expand(xp, v, -3) * _pairwise_decay(xp, Gv, mask), axis=-2)
    if T == 0:
        state = xp.matmul(xp.matrix_transpose(k), v)  # zeros of the right shape
        return o, state
    k_to_end = k if Gk is None else k * xp.exp(Gk[..., -1:, :] - Gk)
    v_to_end = v if Gv is None else v * xp.exp(Gv[..., -1:, :] - Gv)
    return o, xp.matmul(xp.matrix_transpose(k_to_end), v_to_end)


def _decay_state(xp: Any, state: Any, Gk_last: Any | None, Gv_last: Any | None) -> Any:
    """(e^{Gk} e^{Gv}ᵀ) ⊙ S for the total log-decays Gk_last (..., Dk|1), Gv_last (..., Dv)."""
    if Gk_last is not None:
        state = state * _expand(xp, xp.exp(Gk_last), -1)
    if Gv_last is not None:
        state = state * _expand(xp, xp.exp(Gv_last), -2)
    return state


def _form_parallel(xp, q, k, v, gk, gv, state0, chunk_size):
    Gk, Gv = _cumulative(xp, gk), _cumulative(xp, gv)
    o, state = _parallel(xp, q, k, v, Gk, Gv)
    if state0 is not None:
        o = o + _state_readout(xp, q, Gk, Gv, state0)
        last_k = None if Gk is None or q.shape[-2] == 0 else Gk[..., -1, :]
        last_v = None if Gv is None or q.shape[-2] == 0 else Gv[..., -1, :]
        state = state + _decay_state(xp, state0, last_k, last_v)
    return o, state


def _form_recurrent(xp, q, k, v, gk, gv, state0, chunk_size):
    state = state0
    outputs = []
    for t in range(q.shape[-2]):
        update = _expand(xp, k[..., t, :], -1) * _expand(xp, v[..., t, :], -2)  # k_t v_tᵀ
        if state is None:
            state = update
        else:
            decay_k = None if gk is None else gk[..., t, :]
            decay_v = None if gv is None else gv[..., t, :]
            state = _decay_state(xp, state, decay_k, decay_v) + update
        outputs.append(xp.matmul(_expand(xp, q[..., t, :], -2), state))  # (q_tᵀ S_t)
    if not outputs:
        o, zero_state = _parallel(xp, q, k, v, None, None)
        return o, zero_state if state0 is None else state0
    return xp.concat(outputs, axis=-2), state


def _span_limit(xp: Any, dtype: Any) -> float:
    """The largest log-decay a factor e^{+x} of the vector-gated chunked form may carry: ln(max) / 2.

    That is ≈ 44 in float32 and ≈ 354 in float64: a factor, and every product of factors
    above the diagonal (masked afterwards), stays below √(largest finite), which leaves
    that much room for the size of q·k before anything could overflow.
    """
    return math.log(float(xp.finfo(dtype).max)) / 2


def _sub_block(xp: Any, dtype: Any) -> int:
    """Rows per sub-block of the vector-gated chunked form (a speed choice, not a result one).

    A sub-block factors safely while its gates sum to at most the span limit over its
    rows: an average log-decay above −44/16 ≈ −2.8 per step in float32, −354/64 ≈ −5.5 in
    float64. Stronger gates send the rows that need it to the exact path.
    """
    return 64 if dtype == xp.float64 else 16


def _pad_rows(xp: Any, x: Any | None, rows: int) -> Any | None:
    """Append zero rows to x (..., C, D) up to ``rows`` (zero k, v and gates change nothing)."""
    if x is None or x.shape[-2] == rows:
        return x
    zeros = xp.zeros((*x.shape[:-2], rows - x.shape[-2], x.shape[-1]), dtype=x.dtype, device=array_api_compat.device(x))
    return xp.concat([x, zeros], axis=-2)


def _blocks(xp: Any, x: Any | None, m: int, c: int) -> Any | None:
    """(..., m·c, D) -> (..., m, c, D)."""
    return None if x is None else xp.reshape(x, (*x.shape[:-2], m, c, x.shape[-1]))


def _product(xp: Any, a: Any, b: Any) -> Any:
    """The matrix product a @ b; with an inner dim of 1 (HGRN's one key dim) by broadcasting.

    An outer product has one product per entry either way; NumPy's matmul of such shapes
    takes a slow path, ~10x the broadcast multiply.
    """
    return a * b if a.shape[-1] == 1 else xp.matmul(a, b)


def _exact_block_diagonal(xp, q, k, v, Gk, Gv, tril):
    """The double sum inside each sub-block, elementwise: (..., m, c, Dv) (the rows that cannot factor)."""
    def decay(G):  # e^{G_t − G_s} for s <= t, 0 above: (..., m, c, c, D)
        diff = _expand(xp, G, -2) - _expand(xp, G, -3)
        return xp.exp(xp.where(_expand(xp, tril, -1) > 0, diff, -math.inf))

    pairs = _expand(xp, q, -2) * _expand(xp, k, -3)
    if Gk is not None:
        pairs = pairs * decay(Gk)
    scores = xp.sum(pairs, axis=-1) * tril
    if Gv is None:
        return xp.matmul(scores, v)
    return xp.sum(_expand(xp, scores, -1) * _expand(xp, v, -3) * decay(Gv), axis=-2)


def _triangle(xp: Any, C: int, dtype: Any, device: Any) -> Any:
    """The 0/1 lower triangle of one sub-block of a chunk of C steps: (c, c), c = min(sub-block, C)."""
    return xp.astype(_causal_mask(xp, min(_sub_block(xp, dtype), C), device), dtype)


def _add_to_block(xp: Any, o: Any, i: int, x: Any) -> Any:
    """o[..., i, :, :] += x in place (o is a temporary of the chunk), first giving o any leading dims x adds."""
    if x.shape != o.shape[:-3] + o.shape[-2:]:  # a state with leading dims the inputs lack
        lead = xp.broadcast_arrays(o[..., i, :, :], x)[0].shape[:-2]
        o = o + xp.zeros((*lead, *o.shape[-3:]), dtype=o.dtype, device=array_api_compat.device(o))
    o[..., i, :, :] += x
    return o


def _factors(xp: Any, G: Any, limit: float) -> tuple[Any, Any, Any, Any]:
    """Gates G summed inside each sub-block -> e^{G} (≤ 1), e^{−G} clipped at e^{limit}, e^{G_end − G}, unsafe rows.

    A row is unsafe where some G_t < −limit: its factor e^{−G} was clipped (None when no
    row of the chunk is; a min is cheaper than the comparison of every entry).
    """
    inside = xp.exp(G)
    inverse = 1.0 / xp.maximum(inside, math.exp(-limit))
    to_end = xp.exp(G[..., -1:, :] - G)
    unsafe = xp.any(G < -limit, axis=-1, keepdims=True) if bool(xp.min(G) < -limit) else None
    return inside, inverse, to_end, unsafe


def _factored_chunk(xp, q, k, v, gk, gv, state0, tril):
    r"""One chunk of the chunked form with vector gates, by matrix products.

    The chunk is cut into m sub-blocks of c steps (:func:`_sub_block`; ``tril`` is their
    (c, c) lower triangle), and the chunked algorithm runs again inside it. With a the
    first step of a sub-block and G_t = Σ_{a≤r≤t} g_r its gates summed from a, every
    decay factors about the step before a:

    - inside the sub-block, Σ_d q_td e^{G_td − G_sd} k_sd = q̃_t · k̃_s with
      q̃ = q e^{G} (≤ 1) and k̃ = k e^{−G} (≥ 1, at most e^{−G_t} for the keys a row t
      sees): tril(Q̃ K̃ᵀ), a matrix product;
    - the chunk's entering state and the earlier sub-blocks reach row t through F, the
      state at the end of the previous sub-block, as q̃_t F; F advances by the sub-block's
      decay e^{G_end} and its own state K̂ᵀV̂, with the factors e^{G_end − G} ≤ 1.

    The value gate factors the same way. Only the in-block factor k̃ can be large: a row
    whose −G_t exceeds :func:`_span_limit` takes its in-block sum elementwise instead
    (its keys' exponents are clipped at the limit and its factored value discarded), so
    nothing overflows whatever the gates. Every shape is fixed by the chunk's length and
    a row's value depends only on steps up to it, so later inputs leave earlier outputs
    bitwise unchanged, as in the other forms.
    """
    C, c = q.shape[-2], tril.shape[-1]
    m = -(-C // c)
    limit = _span_limit(xp, q.dtype)
    qb, kb, vb = (_blocks(xp, _pad_rows(xp, x, m * c), m, c) for x in (q, k, v))
    # Gates summed inside each sub-block, as a product with the 0/1 lower triangle (3x
    # faster than NumPy's cumsum along the time axis); the triangle gets the gates'
    # leading dims: NumPy's matmul of a 2-D array with a stack of them can miss BLAS.
    Gk, Gv = (xp.matmul(xp.reshape(tril, (1,) * (g.ndim - 1) + tril.shape), _blocks(xp, _pad_rows(xp, g, m * c), m, c))
              if g is not None else None for g in (gk, gv))
    q_tilde, k_tilde, k_hat, v_tilde, v_hat, unsafe = qb, kb, kb, vb, vb, None
    if Gk is not None:
        inside, inverse, to_end, unsafe = _factors(xp, Gk, limit)
        q_tilde, k_tilde, k_hat = qb * inside, kb * inverse, kb * to_end
    if Gv is not None:
        inside_v, inverse_v, to_end_v, unsafe_v = _factors(xp, Gv, limit)
        v_tilde, v_hat = vb * inverse_v, vb * to_end_v
        unsafe = unsafe_v if unsafe is None else (unsafe if unsafe_v is None else unsafe | unsafe_v)
    o = xp.matmul(_product(xp, q_tilde, xp.matrix_transpose(k_tilde)) * tril, v_tilde)
    if Gv is not None:
        o = o * inside_v
    if unsafe is not None:
        o = xp.where(unsafe, _exact_block_diagonal(xp, qb, kb, vb, Gk, Gv, tril), o)
    # F_{−1} = S_in, F_i = (e^{Gk_end} e^{Gv_end}ᵀ) ⊙ F_{i−1} + K̂_iᵀ V̂_i; sub-block i reads F_{i−1}
    # into its rows as soon as it is known (a stack of the m states would cost more than
    # the products). The first sub-block from a zero state reads nothing.
    own = xp.matmul(xp.matrix_transpose(k_hat), v_hat)  # (..., m, Dk, Dv)
    decay_k = None if Gk is None else _expand(xp, inside[..., -1, :], -1)  # (..., m, Dk, 1)
    decay_v = None if Gv is None else _expand(xp, inside_v[..., -1, :], -2)  # (..., m, 1, Dv)
    F = state0
    for i in range(m):
        if F is not None:
            read = _product(xp, q_tilde[..., i, :, :], F)
            o = _add_to_block(xp, o, i, read if Gv is None else read * inside_v[..., i, :, :])
            F = F if decay_k is None else F * decay_k[..., i, :, :]
            F = (F if decay_v is None else F * decay_v[..., i, :, :]) + own[..., i, :, :]
        else:
            F = own[..., i, :, :]
    o = xp.reshape(o, (*o.shape[:-3], m * c, o.shape[-1]))[..., :C, :]
    return o, F


def _form_chunked(xp, q, k, v, gk, gv, state0, chunk_size):
    """The parallel form on each chunk in turn, carrying the state from chunk to chunk.

    Chunk c's outputs are its own double sum (from a zero state) plus what the state
    entering it adds; the state leaving it is the entering state decayed over the chunk
    plus the chunk's own. A last chunk shorter than ``chunk_size`` needs no padding. One
    chunk at a time keeps every temporary at O(C·C·D) and in cache, which on a CPU is
    faster than batching all chunks into O(T·C) arrays.
    """
    T = q.shape[-2]
    if T == 0:
        return _form_parallel(xp, q, k, v, gk, gv, state0, chunk_size)
    vector_gates = (gk is not None and gk.shape[-1] > 1) or gv is not None
    state = state0
    outputs = []
    triangles = {}  # by chunk length: the full chunks' and the last one's
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)  # the array API leaves slices past the end unspecified
        chunk = [None if x is None else x[..., a:b, :] for x in (q, k, v, gk, gv)]
        if vector_gates:  # the elementwise double sum would cost O(C²·D) per chunk
            if b - a not in triangles:
                triangles[b - a] = _triangle(xp, b - a, q.dtype, array_api_compat.device(q))
            o, state = _factored_chunk(xp, *chunk, state, triangles[b - a])
        else:
            o, state = _form_parallel(xp, *chunk, state, chunk_size)
        outputs.append(o)
    return xp.concat(outputs, axis=-2), state


_FORMS = {"parallel": _form_parallel, "recurrent": _form_recurrent, "chunked": _form_chunked}


def _runner(xp: Any, form: str, backend: str | Backend | None, *, reversed_: bool = False,
            wide: bool = False) -> Any:
    """The function computing ``form``: the backend's kernel for the chunked form, where it has one.

    A kernel returns None for a call it does not cover, and the reference runs instead;
    ``parallel`` and ``recurrent`` are definitions and always run the reference. With
    ``reversed_`` the function scans from the last step to the first (see
    :func:`_reverse_scan`): the backend's ``causal_scan_reversed`` kernel, or the reference
    on time-reversed views.

    The function returns ``(o, final_state, dtype)``: ``dtype`` is the one o is to be
    rounded to, o's own except where ``wide`` asked the kernel for its outputs unrounded
    (in its accumulation dtype, float32 for 16-bit data, for gradients that sum them
    further), where it is the dtype the kernel's rounded outputs have.
    """
    reference = _FORMS[form]
    if reversed_:
        reference = functools.partial(_flipped, reference)
    name = "causal_scan_reversed" if reversed_ else "causal_scan"
    kernel = resolve_backend(backend, xp).kernel(name) if form == "chunked" else None

    def run(xp, q, k, v, gk, gv, state0, chunk_size):
        result = None
        if kernel is not None:
            result = kernel(q, k, v, gk, gv, state0, wide=True) if wide else kernel(q, k, v, gk, gv, state0)
        if result is None:
            o, final = reference(xp, q, k, v, gk, gv, state0, chunk_size)
            return o, final, o.dtype
        rounded = xp.result_type(*(x for x in (q, k, v, gk, gv) if x is not None)) if wide else result[0].dtype
        return (*result, rounded)
    return run


def _flipped(form: Any, xp: Any, *args: Any) -> tuple[Any, Any]:
    """``form`` on the time-reversed inputs, its output flipped back: the scan from the last step."""
    *arrays, state0, chunk_size = args
    flip = lambda x: None if x is None else xp.flip(x, axis=-2)  # noqa: E731
    o, last = form(xp, *(flip(x) for x in arrays), state0, chunk_size)
    return flip(o), last


def _check_form(form: str, chunk_size: int) -> int:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return _checks.check_positive_int("chunk_size", chunk_size)


def _check_gates(xp: Any, q: Any, k: Any, v: Any, gk: Any, gv: Any) -> None:
    T, Dk, Dv = k.shape[-2], k.shape[-1], v.shape[-1]
    for name, g, width in (("gk", gk, (1, Dk)), ("gv", gv, (Dv,))):
        if g is None:
            continue
        _checks.require_floating(name, g, xp)
        if g.ndim < 2 or g.shape[-2] != T or g.shape[-1] not in width:
            allowed = " or ".join(f"(..., {T}, {w})" for w in width)
            raise ValueError(f"{name} must have shape {allowed} to match k {tuple(k.shape)} and v "
                             f"{tuple(v.shape)}, got {tuple(g.shape)}")


def causal_scan(
    q: Any,
    k: Any,
    v: Any,
    *,
    gk: Any = None,
    gv: Any = None,
    initial_state: Any = None,
    form: str = "chunked",
    chunk_size: int = 64,
    backend: str | Backend | None = None,
) -> tuple[Any, Any]:
    r"""Run the causal linear scan (see the module docstring for the recurrence).

    .. math::

        S_t = \big(e^{g^k_t} (e^{g^v_t})^\top\big) \odot S_{t-1} + k_t v_t^\top, \qquad
        o_t = S_t^\top q_t .

    Parameters
    ----------
    q, k : array, shape (..., T, Dk)
        Queries and keys (after any feature map and scale); leading dims broadcast.
    v : array, shape (..., T, Dv)
        Values.
    gk : array, shape (..., T, Dk) or (..., T, 1), optional
        Log-decay over the key dim, or one per step (last dim 1). None: no decay.
    gv : array, shape (..., T, Dv), optional
        Log-decay over the value dim. None: no decay.
    initial_state : array, shape (..., Dk, Dv), optional
        S_0; None is zeros.
    form : {"chunked", "parallel", "recurrent"}, default "chunked"
        Which algorithm computes the outputs (they agree to rounding).
    chunk_size : int, default 64
        Steps per chunk of the chunked form (any T, not only multiples).
    backend : str, optional
        ``"numpy"``, ``"cupy"`` or ``"reference"``; None follows the inputs. On the
        ``"cupy"`` backend the chunked form runs a CUDA kernel (which accumulates in
        float32 for float16 inputs and returns the final state in float32).

    Returns
    -------
    o : array, shape (..., T, Dv)
    final_state : array, shape (..., Dk, Dv)
        S_{T−1} (S_0 when T = 0).

    Raises
    ------
    ValueError
        For an unknown form, a chunk size < 1, or gates that do not match k and v.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.scan import causal_scan
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 10, 4))
    >>> g = -rng.random((2, 10, 1))
    >>> o1, s1 = causal_scan(q, k, v, gk=g, form="recurrent")
    >>> o2, s2 = causal_scan(q, k, v, gk=g, form="chunked", chunk_size=3)
    >>> bool(np.allclose(o1, o2) and np.allclose(s1, s2))
    True
    """
    xp = _checks.namespace_of(q=q, k=k, v=v, gk=gk, gv=gv, initial_state=initial_state)
    chunk_size = _check_form(form, chunk_size)
    _check_gates(xp, q, k, v, gk, gv)
    o, final, _ = _runner(xp, form, backend)(xp, q, k, v, gk, gv, initial_state, chunk_size)
    return o, _as_state_shape(xp, final, k, v, gk, gv, initial_state)


def _as_state_shape(xp: Any, state: Any, k: Any, v: Any, gk: Any, gv: Any, initial_state: Any) -> Any:
    """Give the final state the leading dims of k, v, the gates and S_0 (never q's), in every form.

    A form may return it with fewer leading dims where they broadcast (no step, or a first
    step from a zero state has not met the gates yet); the values are the same.
    """
    lead = np.broadcast_shapes(*(tuple(x.shape[:-2]) for x in (k, v, gk, gv, initial_state) if x is not None))
    shape = (*lead, int(k.shape[-1]), int(v.shape[-1]))
    return state if tuple(state.shape) == shape else state + xp.zeros(shape, dtype=state.dtype,
                                                                            device=array_api_compat.device(state))


def noncausal_scan(q: Any, k: Any, v: Any, *, form: str = "chunked") -> Any:
    r"""Non-causal linear attention: every query sees every key.

    .. math::

        o_t = \Big(\sum_s k_s v_s^\top\Big)^\top q_t ,

    computed as (Q Kᵀ) V by the ``parallel`` form (the definition, O(T²)) and as
    Q (Kᵀ V) by the others (O(T·Dk·Dv)).

    Parameters
    ----------
    q, k : array, shape (..., T, Dk) and (..., S, Dk)
    v : array, shape (..., S, Dv)
    form : {"chunked", "parallel", "recurrent"}, default "chunked"

    Returns
    -------
    array, shape (..., T, Dv)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.scan import noncausal_scan
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 5, 2))
    >>> bool(np.allclose(noncausal_scan(q, k, v), (q @ k.T) @ v))
    True
    """
    xp = _checks.namespace_of(q=q, k=k, v=v)
    _check_form(form, 1)
    kt = xp.matrix_transpose(k)
    if form == "parallel":
        return xp.matmul(xp.matmul(q, kt), v)
    return xp.matmul(q, xp.matmul(kt, v))


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanGradients:
    """Cotangents of the inputs of :func:`causal_scan` (None where the input was None)."""

    dq: Any
    dk: Any
    dv: Any
    dgk: Any
    dgv: Any
    dinitial_state: Any


def _next_gate(xp: Any, g: Any | None) -> Any | None:
    """The gate of the step after each position, g'_t = g_{t+1}, and g'_{T−1} = 0.

    The backward scans accumulate from the end: a later "key" t reaches an earlier
    "query" s decayed by e^{G_t − G_s} = Π_{r=s+1..t} e^{g_r}, so stepping from s + 1
    back to s applies the gate of step s + 1.
    """
    if g is None:
        return None
    zero = xp.zeros_like(g[..., :1, :])
    return xp.concat([g[..., 1:, :], zero], axis=-2)


def _reverse_scan(xp, a, b, c, ga, gc, state, run_reversed, chunk_size):
    """r_s = Σ_{t≥s} Σ_i a_si e^{Γ_ti − Γ_si} b_ti · c_tj e^{Λ_tj − Λ_sj} (+ the state X decayed to s).

    ``run_reversed`` scans from the last step to the first (``_runner(..., reversed_=True)``).
    Returns r, the "final" state of the reversed scan (the sum at s = 0) and the dtype r
    is to be rounded to (as ``_runner``'s functions return them).
    """
    return run_reversed(xp, a, b, c, _next_gate(xp, ga), _next_gate(xp, gc), state, chunk_size)


def _total(xp: Any, g: Any | None, start: int) -> Any | None:
    """Σ_{r ≥ start} g_r over the time axis (None stays None)."""
    return None if g is None else xp.sum(_wide(xp, g)[..., start:, :], axis=-2)


def _reverse_state_readout(xp: Any, a: Any, ga: Any | None, gc: Any | None, X: Any) -> Any:
    """Σ_i a_si e^{Γ_{T−1,i} − Γ_si} X_ij e^{Λ_{T−1,j} − Λ_sj}: a state X at the end, read at each s."""
    def to_end(g: Any | None) -> Any | None:  # Σ_{r > s} g_r = G_{T−1} − G_s
        if g is None:
            return None
        G = _cumulative(xp, g)
        return G[..., -1:, :] - G
    return _state_readout(xp, a, to_end(ga), to_end(gc), X)


def _sum_to_shape(xp: Any, x: Any, shape: tuple[int, ...]) -> Any:
    """Sum the axes that broadcasting added or stretched, so a gradient matches its input."""
    extra = x.ndim - len(shape)
    if extra:
        x = xp.sum(x, axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return xp.sum(x, axis=axes, keepdims=True) if axes else x


def _rounded(xp: Any, x: Any, dtype: Any) -> Any:
    """Return x in ``dtype`` (x itself when it has it)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _fused_gate_gradient(xp: Any, kernel: Any, g: Any, x: Any, dx: Any, y: Any, dy: Any, last: Any,
                         round_dx: bool = False, round_dy: bool = False) -> tuple[Any, Any, Any] | None:
    """A gate's gradient Σ_{t' ≥ t} (x ⊙ dx − y ⊙ dy)_{t'} + last by the backend's kernel, or None.

    The kernel covers operands of one shape (no GQA broadcast between the read and
    written terms); the result is then summed to g's shape, as the reference's terms are.
    Returns (the gradient, dx rounded, dy rounded): the kernel's copies, rounded to the
    dtype it reads x and y in, where ``round_dx`` (``round_dy``) asked for them, else None.
    """
    if kernel is None or not (x.shape == dx.shape == y.shape == dy.shape) or g.shape[-1] not in (1, x.shape[-1]):
        return None
    summed = g.shape[-1] == 1
    end = None
    if last is not None:
        end = xp.sum(last, axis=-1, keepdims=True) if summed else last
        target = (*x.shape[:-2], end.shape[-1])
        pairs = zip(end.shape[::-1], target[::-1], strict=False)  # aligned from the last axis
        if len(end.shape) > len(target) or any(n not in (1, m) for n, m in pairs):
            return None  # a final-state term with axes that x lacks: the reference sums them
        end = xp.broadcast_to(end, target)
    copies: tuple[Any, ...] = (None, None)
    if round_dx or round_dy:
        result = kernel(x, dx, y, dy, end, summed, round_b=round_dx, round_d=round_dy)
        if result is not None:
            result, *copies = result
    else:
        result = kernel(x, dx, y, dy, end, summed)
    if result is None:
        return None
    dtype = xp.result_type(x, dx, y, dy, *(() if last is None else (last,)))
    return _sum_to_shape(xp, _rounded(xp, result, dtype), tuple(g.shape)), *copies


def causal_scan_vjp(
    q: Any,
    k: Any,
    v: Any,
    do: Any,
    *,
    gk: Any = None,
    gv: Any = None,
    initial_state: Any = None,
    dfinal_state: Any = None,
    form: str = "chunked",
    chunk_size: int = 64,
    backend: str | Backend | None = None,
) -> ScanGradients:
    r"""Gradients of :func:`causal_scan`, by three more scans of the same form.

    With cotangents dO of the outputs and dS_T of the final state,

    .. math::

        dq_t = S_t\, do_t, \qquad
        dk_s = \bar S_s\, v_s, \qquad dv_s = \bar S_s^\top k_s, \qquad
        \bar S_s = \sum_{t \ge s} \Gamma_{ts} \odot q_t do_t^\top
                   + \Gamma_{Ts} \odot dS_T,

    where Γ_ts = e^{G^k_t − G^k_s}(e^{G^v_t − G^v_s})ᵀ. dq is the scan of (do, v, k) with
    the gates' roles swapped; dk and dv are scans run backwards in time; dS_0 is the
    backward state at the start, decayed by the first step's gates. For the gates, with
    G the cumulative log-decays,

    .. math::

        \frac{\partial L}{\partial G^k_{t,d}} = q_{t,d}\, dq_{t,d} - k_{t,d}\, dk_{t,d}
            + [t = T-1] \sum_e (dS_T \odot S_T)_{de}, \qquad
        \frac{\partial L}{\partial G^v_{t,e}} = o_{t,e}\, do_{t,e} - v_{t,e}\, dv_{t,e}
            + [t = T-1] \sum_d (dS_T \odot S_T)_{de},

    and dg_t = Σ_{t' ≥ t} ∂L/∂G_{t'} (a reverse cumulative sum; summed over d for a
    per-step gate). In the chunked form, a backend with a ``"gate_gradient"`` kernel (the
    CuPy backend's ``cuda/gate_grad.cu``) forms these sums where q and k (o and v) share a
    shape; elsewhere they are array operations.

    Parameters
    ----------
    q, k, v, gk, gv, initial_state, form, chunk_size, backend
        As in :func:`causal_scan`.
    do : array, shape (..., T, Dv)
        Cotangent of o (broadcast like o).
    dfinal_state : array, shape (..., Dk, Dv), optional
        Cotangent of the final state; None is zero.

    Returns
    -------
    ScanGradients
        dq, dk, dv, dgk, dgv, dinitial_state, each shaped like its input (None for an
        input that was None).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.scan import causal_scan, causal_scan_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = rng.standard_normal((4, 6, 3))
    >>> g = causal_scan_vjp(q, k, v, do)
    >>> h = 1e-6; e = np.zeros_like(k); e[2, 1] = h
    >>> fd = ((causal_scan(q, k + e, v)[0] - causal_scan(q, k - e, v)[0]) * do).sum() / (2 * h)
    >>> bool(np.isclose(fd, g.dk[2, 1]))
    True
    """
    xp = _checks.namespace_of(q=q, k=k, v=v, do=do, gk=gk, gv=gv, initial_state=initial_state,
                              dfinal_state=dfinal_state)
    chunk_size = _check_form(form, chunk_size)
    _check_gates(xp, q, k, v, gk, gv)
    T = q.shape[-2]
    # A gate's gradient sums its steps' products q ⊙ dq − k ⊙ dk (o ⊙ do − v ⊙ dv) over all
    # later steps, terms that cancel to a much smaller total: rounding dq and dk to 16 bits
    # first would dominate its error. So the scans that give them are asked for their
    # outputs unrounded (``wide``), and the gradients are rounded once, at the end.
    need_forward = gv is not None or ((gk is not None or gv is not None) and dfinal_state is not None)
    run = _runner(xp, form, backend, wide=gv is not None)
    o, final, o_dtype = run(xp, q, k, v, gk, gv, initial_state, chunk_size) if need_forward else (None, None, None)

    # Scans with the key and value roles swapped take the gates swapped too; a per-step
    # gate scales the whole state, so it stays a (fast) per-step key gate.
    per_step = gv is None and gk is not None and gk.shape[-1] == 1
    swapped = (gk, None) if per_step else (gv, gk)
    swap = None if initial_state is None else xp.matrix_transpose(initial_state)
    dq, _, dq_dtype = _runner(xp, form, backend, wide=gk is not None)(xp, do, v, k, *swapped, swap, chunk_size)
    # The backward scans run per query head when q and do carry a group axis that k and v
    # do not (GQA); the final-state cotangent belongs to the shared state, so it is added
    # once, outside them, rather than once per head.
    dk, _, dk_dtype = _reverse_scan(xp, v, do, q, *swapped, None,
                                    _runner(xp, form, backend, reversed_=True, wide=gk is not None), chunk_size)
    dv, start, dv_dtype = _reverse_scan(xp, k, q, do, gk, gv, None,
                                        _runner(xp, form, backend, reversed_=True, wide=gv is not None), chunk_size)
    # dk, dv here are per query head when q, do carry a group axis; the final-state terms
    # below have the state's leading dims. Each is summed to its input's shape on its own
    # (and kept apart for the gate gradients, which need each head's own part).
    dk_parts, dv_parts = [dk], [dv]
    if dfinal_state is not None and T > 0:
        dk_parts.append(_reverse_state_readout(xp, v, *swapped, xp.matrix_transpose(dfinal_state)))
        dv_parts.append(_reverse_state_readout(xp, k, gk, gv, dfinal_state))
        start = _sum_to_shape(xp, start, tuple(dfinal_state.shape))
        start = start + _decay_state(xp, dfinal_state, _total(xp, gk, 1), _total(xp, gv, 1))
        # the rounded gradients' dtype: as that of the sums, with the unrounded scan outputs rounded first
        dk_dtype = xp.result_type(dk_dtype, *(part.dtype for part in dk_parts[1:]))
        dv_dtype = xp.result_type(dv_dtype, *(part.dtype for part in dv_parts[1:]))
    dk = functools.reduce(operator.add, (_sum_to_shape(xp, part, tuple(k.shape)) for part in dk_parts))
    dv = functools.reduce(operator.add, (_sum_to_shape(xp, part, tuple(v.shape)) for part in dv_parts))

    dinitial = None
    if initial_state is not None:
        dinitial = start if T > 0 else (dfinal_state if dfinal_state is not None else xp.zeros_like(initial_state))
        if T > 0:
            dinitial = _decay_state(xp, dinitial, None if gk is None else gk[..., 0, :],
                                    None if gv is None else gv[..., 0, :])
        dinitial = _sum_to_shape(xp, dinitial, tuple(initial_state.shape))

    gate_kernel = resolve_backend(backend, xp).kernel("gate_gradient") if form == "chunked" else None

    returned: dict[str, Any] = {}  # gradients that the gate kernel rounded on its way

    def gate_gradient(g: Any, read: tuple[Any, Any], written: tuple[Any, Any], written_parts: list[Any],
                      final_term_axis: int, dtype: Any, targets: tuple[Any, Any]) -> Any:
        # ∂L/∂G_t = x_t ⊙ dx_t − y_t ⊙ dy_t for read = (x, dx), written = (y, dy), with dy the
        # sum of its parts; each term is summed to g's shape on its own, since under GQA the
        # read term has a group axis that the written ones may lack. ``dtype``: the result's,
        # that of these terms with dx and dy rounded. ``targets``: for dx and dy, None or the
        # (name, dtype) of the gradient returned, which the kernel may round as it reads it
        # (to the dtype of x, y: asked only where that is the target, so it rounds once).
        last = None
        if dfinal_state is not None and T > 0:
            last = xp.sum(dfinal_state * final, axis=final_term_axis)  # (..., D), the term at T − 1
            dtype = xp.result_type(dtype, last)
        wanted = [t is not None and dx.dtype != t[1] and x.dtype == t[1]
                  for x, dx, t in zip((read[0], written[0]), (read[1], written[1]), targets, strict=True)]
        fused = _fused_gate_gradient(xp, gate_kernel, g, *read, *written, last, *wanted)
        if fused is not None:
            result, *copies = fused
            for copy, target in zip(copies, targets, strict=True):
                if copy is not None:
                    returned[target[0]] = _rounded(xp, copy, target[1])
            return _rounded(xp, result, dtype)

        def to_gate(x: Any) -> Any:
            return _sum_to_shape(xp, xp.sum(x, axis=-1, keepdims=True) if g.shape[-1] == 1 else x, tuple(g.shape))
        local = to_gate(read[0] * read[1])
        for part in written_parts:
            local = local - to_gate(written[0] * part)
        if last is not None:
            is_last = xp.astype(xp.arange(T, device=array_api_compat.device(local)) == T - 1, local.dtype)
            local = local + to_gate(_expand(xp, is_last, -1) * _expand(xp, last, -2))  # nonzero at T − 1
        return _rounded(xp, xp.flip(xp.cumulative_sum(xp.flip(local, axis=-2), axis=-2), axis=-2), dtype)

    dgk = None if gk is None else gate_gradient(gk, (q, dq), (k, dk), dk_parts, -1,
                                                xp.result_type(q, dq_dtype, k, dk_dtype),
                                                (("dq", dq_dtype), ("dk", dk_dtype)))
    # (do, o) for the value gate: the kernel reads the second of each pair, the scans' outputs, unrounded
    dgv = None if gv is None else gate_gradient(gv, (do, o), (v, dv), dv_parts, -2,
                                                xp.result_type(o_dtype, do, v, dv_dtype), (None, ("dv", dv_dtype)))
    return ScanGradients(
        dq=returned["dq"] if "dq" in returned else _rounded(xp, _sum_to_shape(xp, dq, tuple(q.shape)), dq_dtype),
        dk=returned["dk"] if "dk" in returned else _rounded(xp, dk, dk_dtype),
        dv=returned["dv"] if "dv" in returned else _rounded(xp, dv, dv_dtype),
        dgk=dgk,
        dgv=dgv,
        dinitial_state=dinitial,
    )
