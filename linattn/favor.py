r"""FAVOR+ (Performer): random projections and the random features built on them.

The positive features :func:`favor_positive` and the trigonometric ones :func:`favor_trig`
estimate the softmax kernel exp(scale·q·k) without bias, from a projection W drawn by
:func:`random_projection` (orthogonal blocks or iid rows) and redrawn by
:func:`redraw_projection`. Every map takes x of shape (..., T, Dk) and returns (..., T, m)
with array-API functions only; every map ``f`` has ``f_vjp(x, dphi, ...) -> dx``, the exact
derivative of what it computes (through the stabiliser's max too). The draws come from a
NumPy generator and are NumPy float64; convert W to x's library before calling a map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._feature_checks import (
    SCALINGS,
    _check_cotangent,
    _check_eps,
    _check_projection,
    _check_role,
    _check_x,
    _input_scale,
    _segments,
)
from linattn._random import as_generator

__all__ = [
    "favor_positive",
    "favor_positive_vjp",
    "favor_trig",
    "favor_trig_vjp",
    "random_projection",
    "redraw_projection",
]


# --------------------------------------------------------------------------- random projections


def random_projection(
    num_features: int, dim: int, *, orthogonal: bool = True, scaling: str = "chi", rng: Any
) -> np.ndarray:
    r"""Draw the FAVOR+ projection W of shape (m, Dk): rows w_i = r_i·u_i, directions u_i, norms r_i.

    - ``orthogonal=True``: ceil(m/Dk) independent blocks; each is Qᵀ from the QR
      decomposition G = QR of a Dk×Dk standard Gaussian G, with the column signs fixed by
      sign(diag R) so that Q is Haar-distributed; the first m rows of the stacked blocks
      are kept. Rows within a block are orthonormal directions; blocks are independent.
    - ``orthogonal=False``: iid directions, uniform on the sphere.
    - ``scaling="chi"``: r_i are the norms of independent Dk-dimensional standard
      Gaussians (χ with Dk degrees of freedom), so each row is marginally N(0, I_Dk);
      ``scaling="sqrt"``: r_i = √Dk for every row.

    With ``orthogonal=False, scaling="chi"`` the rows are plain iid N(0, I) vectors.

    Parameters
    ----------
    num_features : int
        m >= 1, the number of random vectors (rows). :func:`favor_positive` makes one
        feature per row, :func:`favor_trig` two (a sine and a cosine).
    dim : int
        Dk >= 1, the head dim of the queries and keys.
    orthogonal : bool, default True
        Orthogonal rows within each Dk-row block (FAVOR+'s "O") or iid rows.
    scaling : {"chi", "sqrt"}, default "chi"
        Row norms: χ(Dk)-distributed (rows marginally Gaussian; the estimators of
        :func:`favor_positive` and :func:`favor_trig` are then unbiased) or exactly √Dk.
    rng : numpy.random.Generator or int
        Where the randomness comes from (a generator is advanced; an int seeds a new one).

    Returns
    -------
    numpy.ndarray, shape (num_features, dim), float64
        Convert it to x's array library (e.g. ``cupy.asarray``) before use.

    Raises
    ------
    TypeError
        If ``rng`` is None or not a generator or integer, or ``orthogonal`` not a bool.
    ValueError
        If ``num_features`` or ``dim`` is not a positive integer, or ``scaling`` unknown.

    Notes
    -----
    ``scaling="sqrt"`` (the official code's ``scaling=1``) makes every row norm √Dk, so a
    row is uniform on a sphere rather than Gaussian: E[exp(w·z)] is then no longer
    exp(|z|²/2) and the positive and trigonometric estimators become slightly biased (the
    bias shrinks as Dk grows). Use "chi" (the default, the official ``scaling=0``) for the
    unbiased estimator the Performer paper analyses. Unlike the official code, the QR
    signs are fixed, so the blocks are exactly Haar; without that, the distribution of Q
    depends on the LAPACK implementation's sign convention.

    References
    ----------
    K. Choromanski et al. "Rethinking Attention with Performers." ICLR 2021
    (arXiv:2009.14794). F. Mezzadri. "How to generate random matrices from the classical
    compact groups." Notices of the AMS, 2007 (the sign fix).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import random_projection
    >>> w = random_projection(6, 4, rng=0)
    >>> w.shape
    (6, 4)
    >>> block = w[:4] / np.linalg.norm(w[:4], axis=1, keepdims=True)
    >>> bool(np.allclose(block @ block.T, np.eye(4)))
    True
    >>> bool(np.array_equal(w, random_projection(6, 4, rng=0)))
    True
    """
    m = _checks.check_positive_int("num_features", num_features)
    d = _checks.check_positive_int("dim", dim)
    _checks.check_bool("orthogonal", orthogonal)
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    generator = as_generator(rng)
    if orthogonal:
        blocks = []
        for _ in range(-(-m // d)):
            q, r = np.linalg.qr(generator.standard_normal((d, d)))
            # Q·diag(sign(diag R)) is Haar-distributed; Q alone inherits LAPACK's sign choice.
            q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
            blocks.append(q.T)
        directions = np.concatenate(blocks, axis=0)[:m]
        if scaling == "sqrt":
            return directions * math.sqrt(d)
        norms = np.linalg.norm(generator.standard_normal((m, d)), axis=1, keepdims=True)
        return directions * norms
    gaussian = generator.standard_normal((m, d))
    if scaling == "chi":
        return gaussian
    return gaussian * (math.sqrt(d) / np.linalg.norm(gaussian, axis=1, keepdims=True))


def redraw_projection(projection: Any, *, rng: Any, orthogonal: bool = True, scaling: str = "chi") -> np.ndarray:
    r"""Draw a fresh projection of the same shape (m, Dk) as ``projection``: Performer's feature redraw.

    Equal to ``random_projection(m, Dk, orthogonal=orthogonal, scaling=scaling, rng=rng)``
    with (m, Dk) read from ``projection`` (an array of any library; only its shape is used).
    Performer redraws W periodically during training so that the model does not fit one
    draw; pass the same options the first draw used.

    Parameters
    ----------
    projection : array, shape (m, Dk)
        The current projection.
    rng : numpy.random.Generator or int
        Where the new draw comes from.
    orthogonal : bool, default True
    scaling : {"chi", "sqrt"}, default "chi"
        As in :func:`random_projection`.

    Returns
    -------
    numpy.ndarray, shape (m, Dk), float64

    Raises
    ------
    ValueError
        If ``projection`` is not 2-D with positive sizes; as :func:`random_projection`.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import random_projection, redraw_projection
    >>> rng = np.random.default_rng(0)
    >>> w = random_projection(8, 4, rng=rng)
    >>> w2 = redraw_projection(w, rng=rng)
    >>> w2.shape, bool(np.array_equal(w, w2))
    ((8, 4), False)
    """
    shape = tuple(int(n) for n in getattr(projection, "shape", ()))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"projection must be a 2-D array (m, Dk) with m, Dk >= 1, got shape {shape}")
    return random_projection(shape[0], shape[1], orthogonal=orthogonal, scaling=scaling, rng=rng)


# --------------------------------------------------------------------------- FAVOR+ features


@dataclass(frozen=True)
class _PositiveParts:
    """Intermediates of :func:`favor_positive`: a = u − |x'|²/2 − c, φ = (exp(a) + eps)/√m."""

    xp: Any
    W: Any
    input_scale: float
    x_scaled: Any
    u: Any
    a: Any
    segments: tuple[tuple[int, int], ...]


def _key_stabiliser(xp: Any, u: Any, segments: tuple[tuple[int, int], ...]) -> Any:
    """The key stabiliser, shape (..., T, 1): per sequence, the max of u over its keys and all m features."""
    parts = []
    for start, stop in segments:
        if stop > start:
            block = u[..., start:stop, :]
            c = xp.max(block, axis=(-2, -1), keepdims=True)
            parts.append(xp.broadcast_to(c, (*block.shape[:-1], 1)))
    if not parts:  # T = 0
        return u[..., :1]
    return xp.concat(parts, axis=-2)


def _positive_parts(
    x: Any, projection: Any, role: str, stabilize: bool, scale: float | None, cu_seqlens: Any
) -> _PositiveParts:
    xp = _check_x(x)
    W = _check_projection(projection, x)
    _check_role(role)
    _checks.check_bool("stabilize", stabilize)
    segments = _segments(cu_seqlens, int(x.shape[-2]))
    input_scale = _input_scale(scale, int(x.shape[-1]))
    x_scaled = x * input_scale
    u = xp.matmul(x_scaled, xp.matrix_transpose(W))  # w_i·x', (..., T, m)
    a = u - xp.sum(x_scaled * x_scaled, axis=-1, keepdims=True) / 2
    if stabilize:
        if role == "query":
            a = a - xp.max(u, axis=-1, keepdims=True)
        else:
            a = a - _key_stabiliser(xp, u, segments)
    return _PositiveParts(xp, W, input_scale, x_scaled, u, a, segments)


def favor_positive(
    x: Any,
    projection: Any,
    *,
    role: str,
    stabilize: bool = True,
    eps: float = 0.0,
    scale: float | None = None,
    cu_seqlens: Any = None,
) -> Any:
    r"""φ(x)_i = (exp(w_i·x' − |x'|²/2 − c) + eps) / √m with x' = x·scale^{1/2}: FAVOR+ positive features.

    With W the (m, Dk) projection (rows w_i ~ N(0, I), see :func:`random_projection`),
    c = 0 and eps = 0, E_W[φ(q)·φ(k)] = exp(q'·k') = exp(scale·q·k), the softmax kernel:
    the estimator is unbiased (Performer, Lemma 1). The default scale 1/√Dk gives the
    paper's x' = x / Dk^{1/4}.

    The stabiliser c (``stabilize=True``, as in the official implementation's
    ``softmax_kernel_transformation``) is

    - ``role="query"``: c = max_i w_i·x', one constant per query (row);
    - ``role="key"``: c = max over all keys t of a sequence and all features i of
      w_i·x'_t, one constant per leading index (batch × head) and per sequence of
      ``cu_seqlens``.

    It bounds every exp(·) by exp(−|x'|²/2) ≤ 1, so no feature overflows, whatever the
    size of x or of the rows of W.

    Parameters
    ----------
    x : array, shape (..., T, Dk)
        Queries or keys of one head (any leading dims).
    projection : array, shape (m, Dk)
        W, in x's library (cast to x's dtype).
    role : {"query", "key"}
        Which stabiliser to use (no default: the two differ).
    stabilize : bool, default True
        Subtract c; False computes the plain estimator (c = 0), whose exponent
        w_i·x' − |x'|²/2 = |w_i|²/2 − |x' − w_i|²/2 is at most |w_i|²/2: it overflows
        only for rows with |w_i|²/2 beyond the exp range (709 in float64, 88.7 in
        float32; |w_i|² ≈ Dk with χ norms).
    eps : float, default 0.0
        Added to every exp(·) before the 1/√m factor, as the official code's
        ``numerical_stabilizer`` (1e-6 in its TensorFlow and PyTorch ports and in
        ``make_fast_softmax_attention``; 1e-4 as the default of the JAX feature creator).
        Pass that value to reproduce it exactly.
    scale : float, optional
        The softmax scale the kernel estimates, exp(scale·q·k); default 1/√Dk. Must be > 0.
    cu_seqlens : array or sequence of int, shape (N+1,), optional
        Offsets of N sequences packed along T; with ``role="key"`` each sequence gets its
        own c. (For queries c is per row already, so it changes nothing there.)

    Returns
    -------
    array, shape (..., T, m)
        Positive (non-negative where exp underflows) features, in x's library and dtype.

    Raises
    ------
    TypeError
        Non-array or non-floating x or projection, arrays of different libraries,
        a non-bool ``stabilize``, a non-real ``eps``, malformed ``cu_seqlens``.
    ValueError
        projection not of shape (m, Dk) for x's Dk, an unknown role, eps < 0, scale ≤ 0,
        ``cu_seqlens`` not running from 0 to T.

    Notes
    -----
    **Default eps = 0.** linattn is an oracle: with eps = 0 and either stabiliser the
    features give exactly (to rounding) the normalised attention of the unbiased
    estimator the paper analyses, while eps > 0 changes the function (below). 0 is the
    default so that the estimator is the paper's; the official value is an argument away.

    **Where the stabiliser cancels.** φ(q)·φ(k) is multiplied by exp(−c_q − c_k).

    - A per-query constant c_q cancels exactly between numerator Σ_j φ(q)·φ(k_j) v_j and
      denominator Σ_j φ(q)·φ(k_j) of normalised attention.
    - A constant c_k shared by all keys of a sequence cancels too, for non-causal and
      causal attention alike: every prefix sum over keys carries the same factor.
    - A per-key constant would not cancel (it reweights the keys); that is why keys take
      the max over the whole sequence and not row by row.

    **Where it does not.**

    - In unnormalised attention (or when reading the kernel estimate itself) the factor
      exp(−c_q − c_k) remains: use ``stabilize=False`` there.
    - eps is added after the shift, so it stands for eps·exp(c + |x'|²/2) in the
      unshifted scale: its effect depends on c and on x and cancels nowhere. It biases
      the estimate and makes the output of a sequence depend on the stabiliser.
    - Under ``cu_seqlens``, a key maximum taken over the whole packed batch would still
      cancel in exact arithmetic with eps = 0, but with eps > 0 (and through underflow)
      one sequence's output would depend on the others' keys; this function therefore
      takes c per sequence when given ``cu_seqlens``, so that the packed result equals
      each sequence run on its own. Without ``cu_seqlens`` the maximum spans all of T.
    - Rounding: c_k is the maximum over all keys, including keys after a query in causal
      attention; keys far below that maximum underflow to 0 in exp, and a query whose
      visible keys all underflow gets a zero denominator. The official eps exists to
      keep that denominator positive (at the price of the bias above).
    - The shift prevents overflow, not underflow: both stabilisers leave the factor
      exp(−|x'|²/2), so a query or key with |x'|²/2 beyond ~745 (float64; ~103 in
      float32) has all-zero features, stabilised or not. (Shifting queries by
      max_i w_i·x' − |x'|²/2 instead would avoid that for queries; this function keeps
      the official constant.)

    References
    ----------
    K. Choromanski, V. Likhosherstov, D. Dohan, X. Song, A. Gane, T. Sarlos, P. Hawkins,
    J. Davis, A. Mohiuddin, L. Kaiser, D. Belanger, L. Colwell, A. Weller. "Rethinking
    Attention with Performers." ICLR 2021 (arXiv:2009.14794), Lemma 1;
    google-research/performer ``fast_attention``, ``softmax_kernel_transformation``.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import favor_positive, random_projection
    >>> rng = np.random.default_rng(0)
    >>> w = random_projection(4096, 8, rng=rng)
    >>> q, k = rng.standard_normal((2, 1, 8)) * 0.5
    >>> estimate = favor_positive(q, w, role="query", stabilize=False) @ favor_positive(
    ...     k, w, role="key", stabilize=False).T
    >>> exact = np.exp(q @ k.T / np.sqrt(8))
    >>> bool(abs(estimate - exact) < 0.05 * exact)
    True
    """
    eps = _check_eps(eps)
    parts = _positive_parts(x, projection, role, stabilize, scale, cu_seqlens)
    m = int(parts.W.shape[0])
    return (parts.xp.exp(parts.a) + eps) * (1.0 / math.sqrt(m))


def favor_positive_vjp(
    x: Any,
    dphi: Any,
    projection: Any,
    *,
    role: str,
    stabilize: bool = True,
    eps: float = 0.0,
    scale: float | None = None,
    cu_seqlens: Any = None,
) -> Any:
    r"""The VJP of :func:`favor_positive`: dx = scale^{1/2}·(du W − (Σ_i G_ti) x'_t).

    With u_ti = w_i·x'_t, a_ti = u_ti − |x'_t|²/2 − c the exponent of the forward pass
    and G = dφ ⊙ exp(a)/√m the cotangent of a,

    .. math::

        du = G - \mathbb{1}_{\arg\max}\!\sum G, \qquad
        dx' = du\, W - \big(\textstyle\sum_i G_{ti}\big)\, x'_t, \qquad
        dx = \text{scale}^{1/2}\, dx',

    where c's cotangent, −Σ G over the entries c was taken over (a query's row; all keys
    and features of a sequence), goes to the one entry of u that attained the max (the
    first one on ties); without the stabiliser du = G. W is a fixed draw and gets no
    gradient.

    Parameters
    ----------
    x : array, shape (..., T, Dk)
    dphi : array, shape (..., T, m)
        Cotangent of φ(x).
    projection, role, stabilize, eps, scale, cu_seqlens
        As in :func:`favor_positive` (eps is a constant and does not enter dx).

    Returns
    -------
    array, shape (..., T, Dk)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import favor_positive_vjp, random_projection
    >>> w = random_projection(6, 3, rng=0)
    >>> x = np.linspace(-1, 1, 12).reshape(4, 3)
    >>> favor_positive_vjp(x, np.ones((4, 6)), w, role="key").shape
    (4, 3)
    """
    _check_eps(eps)
    parts = _positive_parts(x, projection, role, stabilize, scale, cu_seqlens)
    xp, u = parts.xp, parts.u
    m = int(parts.W.shape[0])
    _check_cotangent(dphi, x, tuple(u.shape))
    G = dphi * xp.exp(parts.a) * (1.0 / math.sqrt(m))
    row_sum = xp.sum(G, axis=-1, keepdims=True)
    du = G
    if stabilize and role == "query":
        du = G - _argmax_indicator(xp, u) * row_sum
    elif stabilize:
        pieces = []
        for start, stop in parts.segments:
            if stop > start:
                block, g = u[..., start:stop, :], G[..., start:stop, :]
                flat = xp.reshape(block, (*block.shape[:-2], (stop - start) * m))
                indicator = xp.reshape(_argmax_indicator(xp, flat), block.shape)
                pieces.append(g - indicator * xp.sum(g, axis=(-2, -1), keepdims=True))
        du = xp.concat(pieces, axis=-2) if pieces else G
    dx_scaled = xp.matmul(du, parts.W) - row_sum * parts.x_scaled
    return dx_scaled * parts.input_scale


def _argmax_indicator(xp: Any, values: Any) -> Any:
    """1 at the first maximum along the last axis, 0 elsewhere, in values' dtype."""
    index = xp.argmax(values, axis=-1, keepdims=True)
    positions = xp.arange(int(values.shape[-1]), device=array_api_compat.device(values))
    return xp.astype(positions == index, values.dtype)


def favor_trig(x: Any, projection: Any, *, scale: float | None = None) -> Any:
    r"""φ(x) = exp(|x'|²/2)/√r · [sin(W x'), cos(W x')] with x' = x·scale^{1/2}: trigonometric features.

    With r = the number of rows of W (random frequencies, rows ~ N(0, I)), the output has
    m = 2r features and E_W[φ(q)·φ(k)] = exp(q'·k') = exp(scale·q·k): since
    sin a sin b + cos a cos b = cos(a − b), φ(q)·φ(k) = exp((|q'|² + |k'|²)/2)·mean_i
    cos(w_i·(q' − k')), and E cos(w·z) = exp(−|z|²/2) (random Fourier features of the
    Gaussian kernel, rescaled).

    Parameters
    ----------
    x : array, shape (..., T, Dk)
    projection : array, shape (r, Dk)
        W, r random frequencies (see :func:`random_projection`).
    scale : float, optional
        The softmax scale; default 1/√Dk (x' = x / Dk^{1/4}). Must be > 0.

    Returns
    -------
    array, shape (..., T, 2r)
        The r sines, then the r cosines.

    Notes
    -----
    The normalisation is 1/√r, r the number of frequencies, not 1/√(2r): with 1/√(2r)
    the estimate would be exp(q'·k')/2 (a factor that cancels in normalised attention
    but not in the kernel estimate); the paper's h(x)/√m with m random vectors and the
    official ``sincos_softmax_kernel_feature_creator`` agree with 1/√r. The features take
    either sign, so the normaliser Σ_j φ(q)·φ(k_j) can be near zero or negative, and their
    variance is largest where the kernel is small (see
    :func:`linattn.bounds.performer.favor_trig_moments`): the reason FAVOR+ uses positive
    features. No stabiliser is applied; exp(|x'|²/2) overflows for |x'|² > ~1419
    (float64).

    References
    ----------
    A. Rahimi, B. Recht. "Random Features for Large-Scale Kernel Machines." NIPS 2007.
    K. Choromanski et al. "Rethinking Attention with Performers." ICLR 2021, Lemma 2.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import favor_trig, random_projection
    >>> rng = np.random.default_rng(0)
    >>> w = random_projection(4096, 8, rng=rng)
    >>> q, k = rng.standard_normal((2, 1, 8)) * 0.5
    >>> favor_trig(q, w).shape
    (1, 8192)
    >>> bool(abs(favor_trig(q, w) @ favor_trig(k, w).T - np.exp(q @ k.T / np.sqrt(8))) < 0.05)
    True
    """
    xp = _check_x(x)
    W = _check_projection(projection, x)
    x_scaled = x * _input_scale(scale, int(x.shape[-1]))
    u = xp.matmul(x_scaled, xp.matrix_transpose(W))
    amplitude = xp.exp(xp.sum(x_scaled * x_scaled, axis=-1, keepdims=True) / 2) * (1.0 / math.sqrt(int(W.shape[0])))
    return xp.concat([amplitude * xp.sin(u), amplitude * xp.cos(u)], axis=-1)


def favor_trig_vjp(x: Any, dphi: Any, projection: Any, *, scale: float | None = None) -> Any:
    r"""The VJP of :func:`favor_trig`: dx = scale^{1/2}·(du W + ⟨dφ, φ⟩ x').

    With φ = A[sin u, cos u], A = exp(|x'|²/2)/√r and dφ = [dS, dC],

    .. math::

        du = A\,(dS \odot \cos u - dC \odot \sin u), \qquad
        dx' = du\, W + \langle d\varphi, \varphi\rangle\, x', \qquad
        dx = \text{scale}^{1/2}\, dx'.

    Parameters
    ----------
    x : array, shape (..., T, Dk)
    dphi : array, shape (..., T, 2r)
    projection : array, shape (r, Dk)
    scale : float, optional
        As in :func:`favor_trig`.

    Returns
    -------
    array, shape (..., T, Dk)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import favor_trig_vjp, random_projection
    >>> w = random_projection(5, 3, rng=0)
    >>> favor_trig_vjp(np.zeros((2, 3)), np.ones((2, 10)), w).shape
    (2, 3)
    """
    xp = _check_x(x)
    W = _check_projection(projection, x)
    r = int(W.shape[0])
    _check_cotangent(dphi, x, (*x.shape[:-1], 2 * r))
    input_scale = _input_scale(scale, int(x.shape[-1]))
    x_scaled = x * input_scale
    u = xp.matmul(x_scaled, xp.matrix_transpose(W))
    amplitude = xp.exp(xp.sum(x_scaled * x_scaled, axis=-1, keepdims=True) / 2) * (1.0 / math.sqrt(r))
    sin_u, cos_u = xp.sin(u), xp.cos(u)
    d_sin, d_cos = dphi[..., :r], dphi[..., r:]
    du = amplitude * (d_sin * cos_u - d_cos * sin_u)
    d_half_norm = xp.sum(amplitude * (d_sin * sin_u + d_cos * cos_u), axis=-1, keepdims=True)  # <dφ, φ>
    return (xp.matmul(du, W) + d_half_norm * x_scaled) * input_scale


