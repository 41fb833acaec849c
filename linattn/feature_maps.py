r"""Feature maps φ of kernelised (linear) attention, their VJPs, and FAVOR+ projections.

Linear attention replaces the softmax weight exp(q·k) by an inner product of features,
φ(q)·φ(k), so that sums over keys can be carried as a (m × Dv) state. This module holds
the maps:

- parameter-free: :func:`elu_plus_one`, :func:`relu`, :func:`identity`,
  :func:`taylor_features` (listed in :data:`FEATURE_MAPS`, see :func:`get_feature_map`);
- random (Performer / FAVOR+): :func:`favor_positive`, :func:`favor_trig`, with the
  projection drawn by :func:`random_projection` / :func:`redraw_projection` (defined in
  :mod:`linattn.favor`, re-exported here);
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

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import array_api_compat

from linattn import _checks
from linattn._feature_checks import ROLES, SCALINGS, _check_cotangent, _check_x
from linattn.favor import (
    favor_positive,
    favor_positive_vjp,
    favor_trig,
    favor_trig_vjp,
    random_projection,
    redraw_projection,
)

__all__ = [
    "FEATURE_MAPS",
    "ROLES",
    "SCALINGS",
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
    return xp.maximum(x, 0.0) + xp.exp(xp.minimum(x, 0.0))  # exp is never fed a large x


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
    return dphi * xp.exp(xp.minimum(x, 0.0))


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
