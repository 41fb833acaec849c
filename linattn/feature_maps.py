r"""Feature maps φ of kernelised (linear) attention, their VJPs, and FAVOR+ projections.

Linear attention replaces the softmax weight exp(q·k) by an inner product of features,
φ(q)·φ(k), so that sums over keys can be carried as a (m × Dv) state. This module holds
the maps:

- parameter-free: :func:`elu_plus_one`, :func:`relu`, :func:`identity`,
  :func:`taylor_features` (listed in :data:`FEATURE_MAPS`, see :func:`get_feature_map`);
- random (Performer / FAVOR+): :func:`favor_positive`, :func:`favor_trig`, with the
  projection drawn by :func:`random_projection` / :func:`redraw_projection`;
- positional (cosFormer): :func:`cosformer_features`.

Every map takes x of shape (..., T, D) (any leading dims) and returns φ(x) of shape
(..., T, m), computed in x's dtype with array-API functions only, so it runs on NumPy,
CuPy and any array-API library. Every map ``f`` has ``f_vjp(x, dphi, ...) -> dx``: the
exact derivative of what ``f`` computes, including through a max taken for numerical
stability (whose derivative goes to its argmax). Random draws are the exception to
"array API only": they come from a NumPy generator and are returned as NumPy float64;
convert the projection to x's library before calling a map.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import array_api_compat
import numpy as np

from linattn import _checks
from linattn._random import as_generator

__all__ = [
    "FEATURE_MAPS",
    "FeatureMap",
    "cosformer_features",
    "cosformer_features_vjp",
    "elu_plus_one",
    "elu_plus_one_vjp",
    "favor_positive",
    "favor_positive_vjp",
    "favor_trig",
    "favor_trig_vjp",
    "get_feature_map",
    "identity",
    "identity_vjp",
    "random_projection",
    "redraw_projection",
    "relu",
    "relu_vjp",
    "taylor_features",
    "taylor_features_vjp",
]

SCALINGS = ("chi", "sqrt")
ROLES = ("query", "key")


# --------------------------------------------------------------------------- checks


def _check_x(x: Any) -> Any:
    """Return x's namespace; x must be a floating array of shape (..., T, D)."""
    _checks.require_array("x", x)
    xp = array_api_compat.array_namespace(x)
    _checks.require_floating("x", x, xp)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., T, D) (at least 2-D), got shape {tuple(x.shape)}")
    return xp


def _check_cotangent(dphi: Any, x: Any, shape: tuple[int, ...]) -> None:
    xp = _checks.namespace_of(x=x, dphi=dphi)
    _checks.require_floating("dphi", dphi, xp)
    if tuple(dphi.shape) != shape:
        raise ValueError(
            f"dphi must have the shape of the map's output {shape} (x has shape {tuple(x.shape)}), "
            f"got shape {tuple(dphi.shape)}"
        )


def _check_projection(projection: Any, x: Any) -> Any:
    """Validate W of shape (m, Dk) against x (..., T, Dk) and return it in x's dtype."""
    xp = _checks.namespace_of(x=x, projection=projection)
    _checks.require_floating("projection", projection, xp)
    dim = int(x.shape[-1])
    if projection.ndim != 2 or int(projection.shape[1]) != dim or int(projection.shape[0]) < 1:
        raise ValueError(
            f"projection must have shape (m, Dk) = (m, {dim}) with m >= 1 to match x of shape "
            f"{tuple(x.shape)}, got shape {tuple(projection.shape)}"
        )
    return xp.astype(projection, x.dtype, copy=False)


def _input_scale(scale: float | None, dim: int) -> float:
    """sqrt(scale): x' = sqrt(scale)·x makes x'·y' = scale·x·y; default scale 1/sqrt(Dk)."""
    scale = _checks.check_scale(scale, dim)
    if scale <= 0:
        raise ValueError(f"scale must be positive (the features use sqrt(scale)), got {scale!r}")
    return math.sqrt(scale)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return float(eps)


def _check_role(role: Any) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


def _segments(cu_seqlens: Any, length: int) -> tuple[tuple[int, int], ...]:
    """The (start, stop) of each packed sequence along T; one segment when cu_seqlens is None."""
    if cu_seqlens is None:
        return ((0, length),)
    if array_api_compat.is_array_api_obj(cu_seqlens):
        xp = array_api_compat.array_namespace(cu_seqlens)
        if not xp.isdtype(cu_seqlens.dtype, "integral"):
            raise TypeError(f"cu_seqlens must hold integers, got dtype {cu_seqlens.dtype}")
        if cu_seqlens.ndim != 1:
            raise ValueError(f"cu_seqlens must be 1-D (N+1,), got shape {tuple(cu_seqlens.shape)}")
        offsets = tuple(int(cu_seqlens[i]) for i in range(int(cu_seqlens.shape[0])))
    elif isinstance(cu_seqlens, Sequence) and all(
        isinstance(o, numbers.Integral) and not isinstance(o, bool) for o in cu_seqlens
    ):
        offsets = tuple(int(o) for o in cu_seqlens)
    else:
        raise TypeError(f"cu_seqlens must be a 1-D integer array or a sequence of ints, got {cu_seqlens!r}")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != length or any(
        b < a for a, b in itertools.pairwise(offsets)
    ):
        raise ValueError(
            f"cu_seqlens must be non-decreasing offsets from 0 to T={length} (N+1 for N sequences), got {offsets}"
        )
    return tuple(itertools.pairwise(offsets))


# --------------------------------------------------------------------------- parameter-free maps


def elu_plus_one(x: Any) -> Any:
    r"""φ(x) = elu(x) + 1 = max(x, 0) + exp(min(x, 0)), element by element.

    That is x + 1 for x > 0 and exp(x) for x ≤ 0: a positive map, so the normaliser
    Σ_j φ(q)·φ(k_j) of linear attention stays positive.

    Parameters
    ----------
    x : array, shape (..., T, D)

    Returns
    -------
    array, shape (..., T, D)
        In x's library and dtype.

    Raises
    ------
    TypeError
        If x is not a floating array.
    ValueError
        If x has fewer than 2 dims.

    References
    ----------
    A. Katharopoulos, A. Vyas, N. Pappas, F. Fleuret. "Transformers are RNNs: Fast
    Autoregressive Transformers with Linear Attention." ICML 2020.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import elu_plus_one
    >>> elu_plus_one(np.array([[-1.0, 0.0, 2.0]])).round(4).tolist()
    [[0.3679, 1.0, 3.0]]
    """
    xp = _check_x(x)
    negative = xp.where(x > 0, xp.zeros_like(x), x)  # min(x, 0), with exp never fed a large x
    return (x - negative) + xp.exp(negative)


def elu_plus_one_vjp(x: Any, dphi: Any) -> Any:
    r"""The VJP of :func:`elu_plus_one`: dx = dφ ⊙ exp(min(x, 0)) (slope 1 for x > 0, e^x for x ≤ 0).

    Parameters
    ----------
    x : array, shape (..., T, D)
    dphi : array, shape (..., T, D)
        Cotangent of φ(x).

    Returns
    -------
    array, shape (..., T, D)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import elu_plus_one_vjp
    >>> x = np.array([[-1.0, 2.0]])
    >>> elu_plus_one_vjp(x, np.ones_like(x)).round(4).tolist()
    [[0.3679, 1.0]]
    """
    xp = _check_x(x)
    _check_cotangent(dphi, x, tuple(x.shape))
    return dphi * xp.exp(xp.where(x > 0, xp.zeros_like(x), x))


def relu(x: Any) -> Any:
    r"""φ(x) = max(x, 0), element by element.

    Parameters
    ----------
    x : array, shape (..., T, D)

    Returns
    -------
    array, shape (..., T, D)

    Notes
    -----
    A query whose features are all zero gets a zero normaliser; the method using this map
    decides what such a row returns (its ``eps``).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import relu
    >>> relu(np.array([[-1.0, 0.5]])).tolist()
    [[0.0, 0.5]]
    """
    xp = _check_x(x)
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_vjp(x: Any, dphi: Any) -> Any:
    r"""The VJP of :func:`relu`: dx = dφ ⊙ 1[x > 0] (slope 0 taken at x = 0).

    Parameters
    ----------
    x : array, shape (..., T, D)
    dphi : array, shape (..., T, D)

    Returns
    -------
    array, shape (..., T, D)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import relu_vjp
    >>> relu_vjp(np.array([[-1.0, 0.5]]), np.array([[3.0, 3.0]])).tolist()
    [[0.0, 3.0]]
    """
    xp = _check_x(x)
    _check_cotangent(dphi, x, tuple(x.shape))
    return xp.where(x > 0, dphi, xp.zeros_like(dphi))


def identity(x: Any) -> Any:
    r"""φ(x) = x: plain (unnormalised-kernel) linear attention, φ(q)·φ(k) = q·k.

    Parameters
    ----------
    x : array, shape (..., T, D)

    Returns
    -------
    array, shape (..., T, D)
        A copy of x, so that the features never alias the input (a caller that
        updates x in place, as finite differences do, would otherwise change φ(x)).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import identity
    >>> x = np.ones((2, 3))
    >>> phi = identity(x)
    >>> bool(np.array_equal(phi, x)), phi is x
    (True, False)
    """
    xp = _check_x(x)
    return xp.asarray(x, copy=True)


def identity_vjp(x: Any, dphi: Any) -> Any:
    r"""The VJP of :func:`identity`: dx = dφ.

    Parameters
    ----------
    x, dphi : array, shape (..., T, D)

    Returns
    -------
    array, shape (..., T, D)
        A copy of dphi.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import identity_vjp
    >>> identity_vjp(np.zeros((1, 2)), np.array([[1.0, 2.0]])).tolist()
    [[1.0, 2.0]]
    """
    xp = _check_x(x)
    _check_cotangent(dphi, x, tuple(x.shape))
    return xp.asarray(dphi, copy=True)


def taylor_features(x: Any) -> Any:
    r"""φ(x) = [1, x / D^{1/4}, vec(x xᵀ) / sqrt(2D)], so φ(q)·φ(k) = 1 + q·k/√D + (q·k)²/(2D).

    The second-order Taylor expansion of exp(q·k/√D) as an exact inner product (Based).
    vec is row-major: entry a·D + b of the last block is x_a x_b / sqrt(2D). The output
    has m = 1 + D + D² features (the symmetric block is kept whole, not its D(D+1)/2
    distinct entries, so the inner product is a plain dot product).

    Parameters
    ----------
    x : array, shape (..., T, D)

    Returns
    -------
    array, shape (..., T, 1 + D + D²)

    Notes
    -----
    The scales 1/√D and 1/(2D) are the softmax scale 1/√D folded into the features; a
    method applies no further scale to φ(q)·φ(k). 1 + t + t²/2 ≥ 1/2 > 0 for every t,
    so the normaliser of linear attention with these features is positive.

    References
    ----------
    S. Arora, S. Eyuboglu, M. Zhang, A. Timalsina, S. Alberti, D. Zinsley, J. Zou,
    A. Rudra, C. Ré. "Simple linear attention language models balance the
    recall-throughput tradeoff." ICML 2024 (Based).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import taylor_features
    >>> q, k = np.array([[1.0, 2.0]]), np.array([[0.5, -1.0]])
    >>> taylor_features(q).shape
    (1, 7)
    >>> t = float(q[0] @ k[0]) / np.sqrt(2)
    >>> bool(np.isclose(taylor_features(q)[0] @ taylor_features(k)[0], 1 + t + t**2 / 2))
    True
    """
    xp = _check_x(x)
    dim = int(x.shape[-1])
    outer = xp.expand_dims(x, axis=-1) * xp.expand_dims(x, axis=-2)  # (..., T, D, D)
    quadratic = xp.reshape(outer, (*x.shape[:-1], dim * dim))
    return xp.concat(
        [xp.ones_like(x[..., :1]), x * dim**-0.25, quadratic * (1.0 / math.sqrt(2.0 * dim))], axis=-1
    )


def taylor_features_vjp(x: Any, dphi: Any) -> Any:
    r"""The VJP of :func:`taylor_features`: dx = dφ_lin / D^{1/4} + (dΦ + dΦᵀ) x / sqrt(2D).

    dφ_lin is the cotangent of the linear block and dΦ that of the quadratic block read
    as a D×D matrix (the constant block has no derivative).

    Parameters
    ----------
    x : array, shape (..., T, D)
    dphi : array, shape (..., T, 1 + D + D²)

    Returns
    -------
    array, shape (..., T, D)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import taylor_features_vjp
    >>> x = np.array([[1.0, 2.0]])
    >>> taylor_features_vjp(x, np.ones((1, 7))).round(4).tolist()
    [[3.8409, 3.8409]]
    """
    xp = _check_x(x)
    dim = int(x.shape[-1])
    _check_cotangent(dphi, x, (*x.shape[:-1], 1 + dim + dim * dim))
    d_linear = dphi[..., 1 : 1 + dim]
    d_outer = xp.reshape(dphi[..., 1 + dim :], (*x.shape[:-1], dim, dim))
    d_outer = d_outer + xp.matrix_transpose(d_outer)
    quadratic = xp.sum(d_outer * xp.expand_dims(x, axis=-2), axis=-1)  # (dΦ + dΦᵀ) x, row by row
    return d_linear * dim**-0.25 + quadratic * (1.0 / math.sqrt(2.0 * dim))


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


# --------------------------------------------------------------------------- cosFormer


def _cosformer_angles(x: Any, xp: Any, positions: Any, max_len: int) -> Any:
    """θ_t = π·p_t / (2M) as a (T, 1) array in x's dtype."""
    M = _checks.check_positive_int("max_len", max_len)
    if not array_api_compat.is_array_api_obj(positions):
        if not (isinstance(positions, Sequence) and all(
            isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in positions
        )):
            raise TypeError(f"positions must be an integer array or a sequence of ints, got {positions!r}")
        positions = xp.asarray([int(p) for p in positions], dtype=xp.int64,
                               device=array_api_compat.device(x))
    else:
        xp = _checks.namespace_of(x=x, positions=positions)
        if not xp.isdtype(positions.dtype, "integral"):
            raise TypeError(f"positions must hold integers, got dtype {positions.dtype}")
    length = int(x.shape[-2])
    if tuple(positions.shape) != (length,):
        raise ValueError(f"positions must have shape (T,) = ({length},) for x of shape {tuple(x.shape)}, "
                         f"got shape {tuple(positions.shape)}")
    if length and bool(xp.any((positions < 0) | (positions > M))):
        raise ValueError(f"positions must lie in [0, max_len] = [0, {M}] so that |i - j| <= max_len")
    theta = xp.astype(positions, x.dtype) * (math.pi / (2 * M))
    return xp.reshape(theta, (length, 1))


def cosformer_features(x: Any, positions: Any, max_len: int) -> Any:
    r"""φ(x_t) = [x_t cos θ_t, x_t sin θ_t] with θ_t = π p_t / (2M): cosFormer's reweighting as features.

    With p the positions and M = ``max_len``, cos θ_i cos θ_j + sin θ_i sin θ_j =
    cos(θ_i − θ_j), so

    .. math::

        \varphi(q_i)\cdot\varphi(k_j) = (q_i\cdot k_j)\,\cos\!\Big(\frac{\pi}{2}\,\frac{p_i - p_j}{M}\Big),

    cosFormer's locality reweighting, decomposed so that linear attention can carry it.

    Parameters
    ----------
    x : array, shape (..., T, D)
        Queries or keys, already passed through the method's ReLU (cosFormer applies
        ReLU first; this map does not, so that it can be reused with other maps).
    positions : array or sequence of int, shape (T,)
        Integer position p_t of each token (e.g. 0..T−1, or 1..T as in the paper), in
        [0, max_len]; shared by every leading index.
    max_len : int
        M >= 1; the paper uses the sequence length. With 0 ≤ p ≤ M, |p_i − p_j| ≤ M and
        the weight cos(π/2·(p_i − p_j)/M) lies in [0, 1].

    Returns
    -------
    array, shape (..., T, 2D)
        The cosine block, then the sine block.

    Raises
    ------
    TypeError
        Non-floating x, non-integer positions, positions from another array library.
    ValueError
        positions not of shape (T,) or outside [0, max_len]; max_len not a positive int.

    References
    ----------
    Z. Qin, W. Sun, H. Deng, D. Li, Y. Wei, B. Lv, J. Yan, L. Kong, Y. Zhong.
    "cosFormer: Rethinking Softmax in Attention." ICLR 2022.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import cosformer_features
    >>> x = np.ones((3, 2))
    >>> phi = cosformer_features(x, [0, 1, 2], max_len=2)
    >>> (phi @ phi.T).round(4).tolist()  # (x·x) cos(π/2·(i−j)/2), x·x = 2
    [[2.0, 1.4142, 0.0], [1.4142, 2.0, 1.4142], [0.0, 1.4142, 2.0]]
    """
    xp = _check_x(x)
    theta = _cosformer_angles(x, xp, positions, max_len)
    return xp.concat([x * xp.cos(theta), x * xp.sin(theta)], axis=-1)


def cosformer_features_vjp(x: Any, dphi: Any, positions: Any, max_len: int) -> Any:
    r"""The VJP of :func:`cosformer_features`: dx = dφ_cos cos θ + dφ_sin sin θ.

    Parameters
    ----------
    x : array, shape (..., T, D)
    dphi : array, shape (..., T, 2D)
    positions, max_len
        As in :func:`cosformer_features`.

    Returns
    -------
    array, shape (..., T, D)

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import cosformer_features_vjp
    >>> cosformer_features_vjp(np.ones((1, 2)), np.ones((1, 4)), [1], max_len=2).round(4).tolist()
    [[1.4142, 1.4142]]
    """
    xp = _check_x(x)
    dim = int(x.shape[-1])
    _check_cotangent(dphi, x, (*x.shape[:-1], 2 * dim))
    theta = _cosformer_angles(x, xp, positions, max_len)
    return dphi[..., :dim] * xp.cos(theta) + dphi[..., dim:] * xp.sin(theta)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FeatureMap:
    """A parameter-free feature map with its VJP.

    Attributes
    ----------
    name : str
        The registry key.
    forward : callable
        ``forward(x) -> phi``, x of shape (..., T, D), phi of shape (..., T, m).
    vjp : callable
        ``vjp(x, dphi) -> dx``.
    output_dim : callable
        ``output_dim(D) -> m``.
    """

    name: str
    forward: Callable[[Any], Any]
    vjp: Callable[[Any, Any], Any]
    output_dim: Callable[[int], int]

    def __call__(self, x: Any) -> Any:
        """φ(x), i.e. ``self.forward(x)``."""
        return self.forward(x)


def _same_dim(d: int) -> int:
    return d


def _taylor_dim(d: int) -> int:
    return 1 + d + d * d


FEATURE_MAPS: MappingProxyType[str, FeatureMap] = MappingProxyType({
    "elu+1": FeatureMap("elu+1", elu_plus_one, elu_plus_one_vjp, _same_dim),
    "relu": FeatureMap("relu", relu, relu_vjp, _same_dim),
    "identity": FeatureMap("identity", identity, identity_vjp, _same_dim),
    "taylor": FeatureMap("taylor", taylor_features, taylor_features_vjp, _taylor_dim),
})
"""The parameter-free feature maps by name (read-only)."""


def get_feature_map(name: str | FeatureMap) -> FeatureMap:
    """Return the registered parameter-free :class:`FeatureMap` called ``name``.

    Parameters
    ----------
    name : str or FeatureMap
        A key of :data:`FEATURE_MAPS` ("elu+1", "relu", "identity", "taylor"); a
        FeatureMap is returned as is.

    Returns
    -------
    FeatureMap

    Raises
    ------
    TypeError
        If ``name`` is neither a string nor a FeatureMap.
    ValueError
        If no map has that name; the message lists the known names.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.feature_maps import get_feature_map
    >>> fmap = get_feature_map("taylor")
    >>> fmap.output_dim(4), fmap(np.ones((2, 4))).shape
    (21, (2, 21))
    >>> get_feature_map("softplus")
    Traceback (most recent call last):
    ...
    ValueError: unknown feature map 'softplus'; known: 'elu+1', 'relu', 'identity', 'taylor'
    """
    if isinstance(name, FeatureMap):
        return name
    if not isinstance(name, str):
        raise TypeError(f"feature map must be a name (str) or a FeatureMap, got {name!r}")
    if name not in FEATURE_MAPS:
        known = ", ".join(repr(n) for n in FEATURE_MAPS)
        raise ValueError(f"unknown feature map {name!r}; known: {known}")
    return FEATURE_MAPS[name]
