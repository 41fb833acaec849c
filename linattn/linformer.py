"""Linformer: softmax attention over keys and values projected along the sequence axis.

Wang et al. (2020) project the n keys and values of a sequence to k ≪ n rows with fixed
(k, n) matrices E and F, then attend exactly over those k rows:

    o = softmax(scale · Q (E K)ᵀ) (F V)

so the score matrix is (T, k) instead of (T, n). The projections mix every position of
the sequence into every projected row, which is why the method has no causal form.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._problem import SoftmaxProblem, prepare
from linattn._random import as_generator
from linattn.compare import register_method
from linattn.softmax import _forward as _softmax_forward
from linattn.softmax import _vjp as _softmax_vjp

__all__ = ["SHARINGS", "linformer_attention", "linformer_attention_vjp", "linformer_projections"]

SHARINGS = ("none", "headwise", "kv")

# The paper's largest projection (k = 256 for n = 512 and 1024) is the default size.
DEFAULT_PROJ_DIM = 256

_WHY_NOT_CAUSAL = (
    "linformer_attention has no causal form: each projected key (E K)_r = sum_j E[r, j] k_j "
    "mixes all n positions, future ones included, so no mask over the original positions can "
    "be applied after the projection (Wang et al. 2020 define the method for bidirectional "
    "attention only); got causal=True. Use a causal method such as softmax_attention instead"
)


def _check_sharing(sharing: Any) -> str:
    if sharing not in SHARINGS:
        raise ValueError(
            f"sharing must be one of {SHARINGS} ('layerwise' sharing across layers is the caller's: "
            f"pass the same E and F to every layer), got {sharing!r}"
        )
    return sharing


def _check_sizes(proj_dim: Any, max_len: Any) -> tuple[int, int]:
    n = _checks.check_positive_int("max_len", max_len)
    k = _checks.check_positive_int("proj_dim", proj_dim)
    if k > n:
        raise ValueError(f"proj_dim must be <= max_len (a projection cannot add rows), got proj_dim={k}, max_len={n}")
    return k, n


def linformer_projections(
    proj_dim: int, max_len: int, *, sharing: str = "headwise", kv_heads: int = 1, rng: Any
) -> tuple[np.ndarray, np.ndarray]:
    r"""Draw Linformer projections E, F with i.i.d. entries N(0, 1/k), as in the paper's analysis.

    Each matrix is ``rng.standard_normal(shape) / math.sqrt(proj_dim)``, E drawn before F,
    so another implementation can reproduce the draws from the same seed.

    Parameters
    ----------
    proj_dim : int
        k, the number of projected rows, 1 <= k <= max_len.
    max_len : int
        n, the fixed sequence length the projections are drawn for.
    sharing : {"headwise", "none", "kv"}, default "headwise"
        "headwise": one E and one F of shape (k, n) for all heads; "none": one pair per
        key/value head, shape (kv_heads, k, n); "kv": one matrix for keys and values
        (E = F, the paper's key-value sharing), returned twice (the same array).
    kv_heads : int, default 1
        Hkv; used by ``sharing="none"`` only.
    rng : numpy.random.Generator or int
        Where the draws come from (required: linattn never draws from global state).

    Returns
    -------
    E, F : numpy.ndarray, float64
        Shape (k, n), or (kv_heads, k, n) with ``sharing="none"``; ``F is E`` with "kv".

    Raises
    ------
    TypeError
        If ``rng`` is not a Generator or an integer seed.
    ValueError
        If ``proj_dim`` < 1, ``proj_dim`` > ``max_len``, ``kv_heads`` < 1 or ``sharing``
        is unknown.

    Examples
    --------
    >>> from linattn.linformer import linformer_projections
    >>> E, F = linformer_projections(4, 10, sharing="none", kv_heads=2, rng=0)
    >>> E.shape, F.shape
    ((2, 4, 10), (2, 4, 10))
    >>> E, F = linformer_projections(4, 10, sharing="kv", rng=0)
    >>> F is E
    True
    """
    k, n = _check_sizes(proj_dim, max_len)
    sharing = _check_sharing(sharing)
    heads = _checks.check_positive_int("kv_heads", kv_heads)
    generator = as_generator(rng)
    shape = (heads, k, n) if sharing == "none" else (k, n)
    E = generator.standard_normal(shape) / math.sqrt(k)
    if sharing == "kv":
        return E, E
    F = generator.standard_normal(shape) / math.sqrt(k)
    return E, F


@dataclass(frozen=True)
class _Projections:
    """E and F as (1, Hkv|1, 1, k, n) arrays in the compute dtype, and how to return their gradients."""

    E: Any
    F: Any
    sharing: str
    user_shape: tuple[int, ...]
    user_dtype: Any

    @property
    def max_len(self) -> int:
        return int(self.E.shape[-1])


def _segments(problem: SoftmaxProblem) -> list[SoftmaxProblem]:
    if problem.cu_seqlens is None:
        return [problem]
    return [problem.segment(lo, hi) for lo, hi in itertools.pairwise(problem.cu_seqlens)]


def _resolve_projections(
    problem: SoftmaxProblem, q: Any, E: Any, F: Any, proj_dim: Any, max_len: Any, sharing: Any, rng: Any
) -> _Projections:
    """Check E and F (or draw them) and return them ready to multiply the grouped keys."""
    xp = problem.xp
    sharing = _check_sharing(sharing)
    hkv = problem.shapes.kv_heads
    longest = max((seg.kv_len for seg in _segments(problem)), default=0)
    if E is None:
        if F is not None:
            raise ValueError("F was given without E; give both projections, or neither to draw them from rng")
        if rng is None:
            raise TypeError(
                "rng must be a numpy.random.Generator or an integer seed when E and F are not given "
                "(linattn never draws from global state), got rng=None"
            )
        n = max(longest, 1) if max_len is None else max_len
        k = min(DEFAULT_PROJ_DIM, n) if proj_dim is None and isinstance(n, int) else proj_dim
        E_np, F_np = linformer_projections(k, n, sharing=sharing, kv_heads=hkv, rng=rng)
        device = array_api_compat.device(q)
        E, F = (xp.asarray(x, device=device) for x in (E_np, F_np))
        user_dtype = problem.dtype
    else:
        _checks.namespace_of(q=q, E=E, F=F)
        if sharing == "kv":
            if F is not None and not (tuple(F.shape) == tuple(E.shape) and bool(xp.all(F == E))):
                raise ValueError(
                    "sharing='kv' projects keys and values with the one matrix E; F must be None (or E itself), "
                    f"got E of shape {tuple(E.shape)} and a different F of shape {tuple(F.shape)}"
                )
            F = E
        elif F is None:
            raise ValueError(
                f"E was given without F (sharing={sharing!r}); give both, use sharing='kv' to project keys and "
                "values with E, or give neither to draw them from rng"
            )
        expected = f"(Hkv, k, n) = ({hkv}, k, n)" if sharing == "none" else "(k, n)"
        for name, x in (("E", E), ("F", F)):
            _checks.require_floating(name, x, xp)
            ok = (x.ndim == 3 and int(x.shape[0]) == hkv) if sharing == "none" else x.ndim == 2
            if not ok:
                raise ValueError(
                    f"{name} must have shape {expected} for sharing={sharing!r} with Hkv={hkv} key/value heads, "
                    f"got {tuple(x.shape)}"
                )
        if tuple(F.shape) != tuple(E.shape):
            raise ValueError(f"E and F must have the same shape, got E {tuple(E.shape)} and F {tuple(F.shape)}")
        k_given, n_given = int(E.shape[-2]), int(E.shape[-1])
        for name, value, got in (("proj_dim", proj_dim, k_given), ("max_len", max_len, n_given)):
            if value is not None and value != got:
                raise ValueError(f"{name}={value!r} disagrees with E of shape {tuple(E.shape)} ({name} = {got})")
        _check_sizes(k_given, n_given)
        user_dtype = E.dtype
    user_shape = tuple(int(s) for s in E.shape)
    k, n = int(E.shape[-2]), int(E.shape[-1])
    if longest > n:
        raise ValueError(
            f"sequence length T={longest} of k and v is longer than max_len={n}, the fixed length of the "
            f"projections E and F ({k}, {n}); Linformer cannot attend past the length it was built for"
        )

    def five_d(x: Any) -> Any:
        heads = hkv if x.ndim == 3 else 1
        return xp.reshape(xp.astype(x, problem.dtype), (1, heads, 1, k, n))

    return _Projections(five_d(E), five_d(F), sharing, user_shape, user_dtype)


def _project(problem: SoftmaxProblem, proj: _Projections) -> tuple[SoftmaxProblem, Any, Any]:
    """The problem with K' = E[:, :S] K and V' = F[:, :S] V in place of K and V."""
    xp, S = problem.xp, problem.kv_len
    E, F = proj.E[..., :S], proj.F[..., :S]
    projected = replace(problem, k=xp.matmul(E, problem.k), v=xp.matmul(F, problem.v))
    return projected, E, F


def _prepare(
    q: Any, k: Any, v: Any, E: Any, F: Any, proj_dim: Any, max_len: Any, sharing: Any, rng: Any,
    scale: Any, causal: Any, layout: str, cu_seqlens: Any, backend: Any,
) -> tuple[SoftmaxProblem, _Projections]:
    _checks.check_bool("causal", causal)
    if causal:
        raise ValueError(_WHY_NOT_CAUSAL)
    problem = prepare(
        q, k, v, causal=False, scale=scale, mask=None, window=None, alibi_slopes=None, layout=layout,
        cu_seqlens=cu_seqlens, backend=backend,
    )
    return problem, _resolve_projections(problem, q, E, F, proj_dim, max_len, sharing, rng)


def linformer_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    E: Any = None,
    F: Any = None,
    proj_dim: int | None = None,
    max_len: int | None = None,
    sharing: str = "headwise",
    rng: Any = None,
    scale: float | None = None,
    causal: bool = False,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
) -> Any:
    r"""Linformer attention: exact softmax over keys and values projected to k rows.

    For each batch b and query head h (reading key/value head g = h // (Hq/Hkv)), with S
    the length of k and v and E_S, F_S the first S columns of E, F (of kv head g if
    ``sharing="none"``),

    .. math::

        K' = E_S K, \qquad V' = F_S V, \qquad
        o = \operatorname{softmax}\!\big(\text{scale}\; Q K'^\top\big)\, V',

    a (T, k) score matrix instead of (T, S) (Wang et al. 2020, eq. 7).

    Parameters
    ----------
    q : array, shape (B, T, Hq, Dk)
        Queries (``(B, Hq, T, Dk)`` with ``layout="bhtd"``).
    k : array, shape (B, S, Hkv, Dk)
        Keys; Hq must be a multiple of Hkv; S <= max_len.
    v : array, shape (B, S, Hkv, Dv)
        Values.
    E, F : array, optional
        The projections, shape (k, n) (``sharing="headwise"`` or ``"kv"``) or (Hkv, k, n)
        (``"none"``), with n = max_len. With ``"kv"`` give E only (F None or E itself).
        When both are None they are drawn by :func:`linformer_projections` from ``rng``.
    proj_dim : int, optional
        k, 1 <= k <= n; read from E when given. Default when drawing: min(256, n), the
        paper's largest projection.
    max_len : int, optional
        n, the fixed length; read from E when given. Default when drawing: S (with
        ``cu_seqlens`` the longest segment). Pass the model's length to reproduce it.
    sharing : {"headwise", "none", "kv"}, default "headwise"
        See :func:`linformer_projections`. The paper's fourth level, layerwise sharing,
        is sharing across layers and is the caller's business: pass the same E to every
        layer (with ``"kv"``).
    rng : numpy.random.Generator or int, optional
        Required when E and F are not given.
    scale : float, optional
        Logit scale; default 1/sqrt(Dk).
    causal : bool, default False
        Must be False: the method has no causal form (see Raises).
    layout : {"bthd", "bhtd"}, default "bthd"
        Axis order of q, k, v and the output.
    cu_seqlens : array or sequence of int, shape (N+1,), optional
        Packed sequences in a batch of one (T = S); each segment of length L attends only
        within itself, projected by the first L columns of E and F, as if run alone.
    backend : str, optional
        ``"numpy"`` or another registered backend; None follows the inputs.

    Returns
    -------
    o : array, shape (B, T, Hq, Dv)
        In the layout and dtype of q.

    Raises
    ------
    TypeError
        Non-array or non-floating inputs, arrays of different libraries, a missing ``rng``
        when E and F are not given.
    ValueError
        ``causal=True``; proj_dim < 1 or > max_len; a key length (or segment) longer than
        max_len; E or F of the wrong shape; one of E, F without the other; an unknown
        ``sharing``; and every shape error of :func:`linattn.softmax_attention`.

    Notes
    -----
    *Shorter sequences.* A sequence of length S < n uses the first S columns of E and F.
    This is exactly what zero-padding the sequence to n and using the whole of E gives,
    since :math:`E [K; 0] = E_{:, :S} K`; the official fairseq implementation slices
    ``compress_k.weight[:, 0:tgt_len]`` the same way.

    *Differences from the paper and fairseq.* The paper's analysis draws E, F with
    N(0, 1/k) entries (so do we, when drawing); fairseq trains them from a Xavier-uniform
    start, and applies them to the layer input before the key/value linear layers, which
    equals projecting K and V when those layers have no bias. Nothing here is ever causal.

    Memory is O(B·Hq·T·k): the (T, S) score matrix is never formed.

    References
    ----------
    S. Wang, B. Z. Li, M. Khabsa, H. Fang, H. Ma. "Linformer: Self-Attention with Linear
    Complexity." arXiv:2006.04768, 2020.

    Examples
    --------
    >>> import numpy as np
    >>> import linattn
    >>> from linattn.linformer import linformer_attention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 6, 2, 4)) for _ in range(3))
    >>> o = linformer_attention(q, k, v, proj_dim=3, max_len=8, rng=1)
    >>> o.shape
    (1, 6, 2, 4)
    >>> exact = linformer_attention(q, k, v, E=np.eye(6), F=np.eye(6))  # k = n, E = F = I
    >>> bool(np.allclose(exact, linattn.softmax_attention(q, k, v)))
    True
    """
    problem, proj = _prepare(q, k, v, E, F, proj_dim, max_len, sharing, rng, scale, causal, layout, cu_seqlens,
                             backend)
    outputs = [_softmax_forward(_project(segment, proj)[0])[0] for segment in _segments(problem)]
    return problem.output(outputs[0] if len(outputs) == 1 else problem.xp.concat(outputs, axis=3))


def _projection_gradient(xp: Any, dX: Any, x: Any, proj: _Projections) -> Any:
    """d(E_S) for K' = E_S x: sum over batch (and heads when shared) of dK' xᵀ, padded to n columns."""
    g = xp.matmul(dX, xp.matrix_transpose(x))  # (B, Hkv, 1, k, S)
    g = xp.sum(g, axis=(0, 2) if proj.sharing == "none" else (0, 1, 2))
    pad = proj.max_len - int(g.shape[-1])
    if pad:
        g = xp.concat([g, xp.zeros((*g.shape[:-1], pad), dtype=g.dtype, device=array_api_compat.device(g))], axis=-1)
    return g


def linformer_attention_vjp(
    q: Any,
    k: Any,
    v: Any,
    do: Any,
    *,
    E: Any = None,
    F: Any = None,
    proj_dim: int | None = None,
    max_len: int | None = None,
    sharing: str = "headwise",
    rng: Any = None,
    scale: float | None = None,
    causal: bool = False,
    layout: str = "bthd",
    cu_seqlens: Any = None,
    backend: str | None = None,
    projection_grads: bool = False,
) -> tuple[Any, ...]:
    r"""Compute the gradients of :func:`linformer_attention` w.r.t. q, k, v (and optionally E, F).

    With dQ, dK', dV' the gradients of softmax attention over the projected keys
    (:func:`linattn.softmax_attention_vjp`), summed over the query heads of each
    key/value head,

    .. math::

        dK = E_S^\top dK', \qquad dV = F_S^\top dV', \qquad
        dE_S = \textstyle\sum_b dK'\, K^\top, \qquad dF_S = \textstyle\sum_b dV'\, V^\top,

    with dE, dF also summed over heads when shared, and zero in columns S..n−1. With
    ``sharing="kv"`` (E = F) dK and dV keep their own formulas, since k and v enter
    through different products, and the one matrix gets both contributions:
    dE = dK' Kᵀ + dV' Vᵀ.

    Parameters
    ----------
    q, k, v : array
        As in :func:`linformer_attention`.
    do : array, shape (B, T, Hq, Dv)
        Cotangent of the output, in its layout.
    E, F, proj_dim, max_len, sharing, rng, scale, causal, layout, cu_seqlens, backend
        As in :func:`linformer_attention`; draws from the same ``rng`` seed reproduce its E, F.
    projection_grads : bool, default False
        Also return dE and dF, shaped like E and F (dF is None with ``sharing="kv"``,
        whose gradient is all in dE).

    Returns
    -------
    dq, dk, dv : array
        Shaped like q, k, v, in their dtype.
    dE, dF : array
        Only with ``projection_grads=True``; in the dtype of the given E (the compute
        dtype when drawn).

    Raises
    ------
    TypeError, ValueError
        As :func:`linformer_attention`, and when ``do`` has the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.linformer import linformer_attention_vjp
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, do = (rng.standard_normal((1, 5, 2, 3)) for _ in range(4))
    >>> dq, dk, dv = linformer_attention_vjp(q, k, v, do, proj_dim=2, rng=0)
    >>> dk.shape
    (1, 5, 2, 3)
    """
    _checks.check_bool("projection_grads", projection_grads)
    problem, proj = _prepare(q, k, v, E, F, proj_dim, max_len, sharing, rng, scale, causal, layout, cu_seqlens,
                             backend)
    xp = problem.xp
    do5 = problem.grouped_query_like("do", do, problem.shapes.value_dim)
    dqs, dks, dvs = [], [], []
    dE = dF = None
    offsets = problem.cu_seqlens or (0, problem.q_len)
    for segment, (lo, hi) in zip(_segments(problem), itertools.pairwise(offsets), strict=True):
        projected, E_S, F_S = _project(segment, proj)
        dq, dk_proj, dv_proj = _softmax_vjp(projected, do5[..., lo:hi, :])
        dk_proj = xp.sum(dk_proj, axis=2, keepdims=True)  # the G query heads of each kv head
        dv_proj = xp.sum(dv_proj, axis=2, keepdims=True)
        dqs.append(dq)
        dks.append(xp.matmul(xp.matrix_transpose(E_S), dk_proj))
        dvs.append(xp.matmul(xp.matrix_transpose(F_S), dv_proj))
        if projection_grads:
            gE = _projection_gradient(xp, dk_proj, segment.k, proj)
            gF = _projection_gradient(xp, dv_proj, segment.v, proj)
            dE = gE if dE is None else dE + gE
            dF = gF if dF is None else dF + gF

    def joined(parts: list[Any]) -> Any:
        return problem.output(parts[0] if len(parts) == 1 else xp.concat(parts, axis=3))

    grads = (joined(dqs), joined(dks), joined(dvs))
    if not projection_grads:
        return grads
    if proj.sharing == "kv":
        dE, dF = dE + dF, None
    dE = xp.astype(xp.reshape(dE, proj.user_shape), proj.user_dtype)
    dF = None if dF is None else xp.astype(xp.reshape(dF, proj.user_shape), proj.user_dtype)
    return (*grads, dE, dF)


def _compare_run(q: Any, k: Any, v: Any, **kwargs: Any) -> Any:
    # One (k, n) pair for all heads, k = min(256, n), n = the compared length, fixed seed.
    return linformer_attention(q, k, v, rng=0, **kwargs)


register_method(
    "linformer",
    _compare_run,
    description="Linformer, k = min(256, T) Gaussian projections N(0, 1/k), headwise shared, seed 0 (no causal form)",
    supports_causal=False,
)
