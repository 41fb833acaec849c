r"""Mean and variance of the Performer (FAVOR) estimators of the softmax kernel.

For queries and keys scaled as the features scale them, x = q·scale^{1/2} and
y = k·scale^{1/2} (scale = 1/√Dk by default, i.e. x = q / Dk^{1/4}), the kernel is
SM(x, y) = exp(x·y) = exp(scale·q·k). With rows w_i ~ N(0, I_Dk) drawn independently
(``random_projection(..., orthogonal=False)``):

- positive features (:func:`linattn.feature_maps.favor_positive`, unstabilised,
  eps = 0): the estimate (1/m) Σ_i exp(w_i·(x+y) − |x|²/2 − |y|²/2), m features;
- trigonometric features (:func:`linattn.feature_maps.favor_trig`): the estimate
  exp((|x|²+|y|²)/2)·(1/r) Σ_i cos(w_i·(x−y)), r frequencies and 2r features.

Both are unbiased; this module gives their variances in closed form (Performer,
Lemma 2), for tests that check an implementation against them statistically.

Derivation (both follow from E exp(w·z) = exp(|z|²/2) and E cos(w·z) = exp(−|z|²/2)
for w ~ N(0, I)). Positive: one term Y = exp(w·z − (|x|²+|y|²)/2), z = x + y, has
E Y = exp((|z|² − |x|² − |y|²)/2) = SM and E Y² = exp(2|z|² − |x|² − |y|²) =
exp(|z|²)·SM² (as |x|² + |y|² = |z|² − 2x·y), so Var Y = SM²(exp(|z|²) − 1).
Trigonometric: one term Y = exp((|x|²+|y|²)/2) cos(w·u), u = x − y, has
E Y = exp((|x|²+|y|²−|u|²)/2) = SM and, with cos² = (1 + cos 2·)/2,
Var cos(w·u) = (1 + exp(−2|u|²))/2 − exp(−|u|²) = (1 − exp(−|u|²))²/2, so
Var Y = exp(|x|²+|y|²)(1 − exp(−|u|²))²/2 = exp(|x+y|²) SM⁻² (1 − exp(−|u|²))²/2.
An average of m (resp. r) independent terms divides the variance by m (resp. r).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from linattn import _checks

__all__ = ["favor_positive_moments", "favor_trig_moments"]


def _scaled_pair(q: Any, k: Any, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if q.ndim < 1 or k.ndim < 1 or q.shape[-1] != k.shape[-1] or q.shape[-1] == 0:
        raise ValueError(f"q and k must have one positive last dim Dk, got shapes {q.shape} and {k.shape}")
    s = _checks.check_scale(scale, q.shape[-1])
    if s <= 0:
        raise ValueError(f"scale must be positive, got {s!r}")
    try:
        np.broadcast_shapes(q.shape[:-1], k.shape[:-1])
    except ValueError as err:
        raise ValueError(f"q and k must broadcast over their leading dims, got shapes {q.shape} and {k.shape}") from err
    return q * math.sqrt(s), k * math.sqrt(s)


def favor_positive_moments(
    q: Any, k: Any, num_features: int, *, scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and variance of the positive-feature estimate of exp(x·y) with m iid features.

    .. math::

        \mathbb{E}\,\widehat{SM}^{+}_m(x, y) = SM(x, y), \qquad
        \operatorname{Var}\widehat{SM}^{+}_m(x, y)
        = \frac{1}{m}\, e^{|x+y|^2}\, SM(x, y)^2 \big(1 - e^{-|x+y|^2}\big)
        = \frac{1}{m}\, SM(x, y)^2 \big(e^{|x+y|^2} - 1\big),

    with x = q·scale^{1/2}, y = k·scale^{1/2}, SM(x, y) = exp(x·y). The relative
    variance (e^{|x+y|²} − 1)/m vanishes when y = −x (the kernel is smallest there) and
    grows with |x + y|: positive features are most accurate where the kernel is small.

    Parameters
    ----------
    q, k : array_like, shape (..., Dk)
        Query and key vectors; their leading dims broadcast.
    num_features : int
        m >= 1, the number of rows of W = the number of positive features.
    scale : float, optional
        The softmax scale; default 1/√Dk.

    Returns
    -------
    mean, variance : numpy.ndarray, shape broadcast(q.shape[:-1], k.shape[:-1]), float64

    Raises
    ------
    ValueError
        If num_features is not a positive integer, or the shapes do not fit.

    Notes
    -----
    For the unstabilised features with eps = 0 and iid rows N(0, I)
    (``orthogonal=False``, ``scaling="chi"``). The stabilised features estimate
    exp(x·y − c_q − c_k) instead (the constants cancel only in normalised attention).
    Orthogonal rows have the same mean and a smaller variance (the paper's
    orthogonal-features theorem; not given here: two orthogonal terms are negatively
    correlated, by about −SM²e^{−|x+y|²}|x+y|⁴/(2(Dk+2)) for small |x+y|).
    ``scaling="sqrt"`` rows are not Gaussian and the mean is not exactly SM.

    References
    ----------
    K. Choromanski et al. "Rethinking Attention with Performers." ICLR 2021
    (arXiv:2009.14794), Lemma 2 (the MSE of :math:`\widehat{SM}^{+}_m`).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.bounds.performer import favor_positive_moments
    >>> q = np.array([1.0, 0.0, 0.0, 0.0])
    >>> mean, var = favor_positive_moments(q, q, num_features=16)
    >>> float(mean), float(var)  # x·y = 1/2, |x+y|² = 2
    (1.6487..., 1.0854...)
    >>> float(favor_positive_moments(q, -q, num_features=16)[1])  # exact where y = -x
    0.0
    """
    m = _checks.check_positive_int("num_features", num_features)
    x, y = _scaled_pair(q, k, scale)
    sm = np.exp(np.sum(x * y, axis=-1))
    z2 = np.sum((x + y) ** 2, axis=-1)
    return sm, sm**2 * np.expm1(z2) / m


def favor_trig_moments(
    q: Any, k: Any, num_frequencies: int, *, scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and variance of the trigonometric-feature estimate of exp(x·y) with r iid frequencies.

    .. math::

        \mathbb{E}\,\widehat{SM}^{\mathrm{trig}}_r(x, y) = SM(x, y), \qquad
        \operatorname{Var}\widehat{SM}^{\mathrm{trig}}_r(x, y)
        = \frac{1}{2r}\, e^{|x+y|^2}\, SM(x, y)^{-2} \big(1 - e^{-|x-y|^2}\big)^2
        = \frac{1}{2r}\, e^{|x|^2+|y|^2} \big(1 - e^{-|x-y|^2}\big)^2,

    with x = q·scale^{1/2}, y = k·scale^{1/2}, SM(x, y) = exp(x·y). The variance
    vanishes at y = x and is largest, relative to SM, where SM is small: at y = −x the
    relative variance Var/SM² is e^{4|x|²}(1 − e^{−4|x|²})²/(2r), while that of positive
    features (:func:`favor_positive_moments`) is zero there.

    Parameters
    ----------
    q, k : array_like, shape (..., Dk)
        Query and key vectors; their leading dims broadcast.
    num_frequencies : int
        r >= 1, the number of rows of W (random frequencies). The feature map
        :func:`linattn.feature_maps.favor_trig` makes 2r features (a sine and a cosine
        per frequency); at equal feature count m, pass r = m/2.
    scale : float, optional
        The softmax scale; default 1/√Dk.

    Returns
    -------
    mean, variance : numpy.ndarray, shape broadcast(q.shape[:-1], k.shape[:-1]), float64

    Raises
    ------
    ValueError
        If num_frequencies is not a positive integer, or the shapes do not fit.

    Notes
    -----
    The paper's m in Lemma 2 counts random vectors (frequencies), each giving two
    features, so its 1/(2m) is this function's 1/(2r). For iid rows marginally N(0, I).

    References
    ----------
    K. Choromanski et al. "Rethinking Attention with Performers." ICLR 2021
    (arXiv:2009.14794), Lemma 2 (the MSE of :math:`\widehat{SM}^{\mathrm{trig}}_m`).

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.bounds.performer import favor_trig_moments
    >>> q = np.array([1.0, 0.0, 0.0, 0.0])
    >>> float(favor_trig_moments(q, q, num_frequencies=8)[1])  # exact where y = x
    0.0
    >>> mean, var = favor_trig_moments(q, -q, num_frequencies=8)
    >>> float(mean), float(var)  # x·y = -1/2, |x-y|² = 2
    (0.6065..., 0.1270...)
    """
    r = _checks.check_positive_int("num_frequencies", num_frequencies)
    x, y = _scaled_pair(q, k, scale)
    sm = np.exp(np.sum(x * y, axis=-1))
    u2 = np.sum((x - y) ** 2, axis=-1)
    half_norms = (np.sum(x * x, axis=-1) + np.sum(y * y, axis=-1)) / 2
    # exp(|x|²+|y|²)(1 − e^{−|u|²})² / (2r), written as a square to stay finite longer.
    return sm, (np.exp(half_norms) * -np.expm1(-u2)) ** 2 / (2 * r)
