r"""What Linformer promises: Theorem 1 of Wang et al. (2020), a Johnson–Lindenstrauss argument.

Theorem 1 ("self-attention is low rank"). Let P = softmax(A) be the (n, n) context
matrix, w a column of V, and R a (k, n) matrix with i.i.d. N(0, 1/k) entries. Then
P̃ = P Rᵀ R has rank <= k and, with

.. math::

    k = \frac{5 \ln n}{\varepsilon^2 - \varepsilon^3},

P̃ w is close to P w with probability 1 − o(1) (paper, eq. 5 and Appendix A, eq. 20).

The proof is a union bound over the n rows u of P of the JL inner-product lemma
(Arriaga & Vempala 2006): for fixed u, w,

.. math::

    \Pr\big(|u R^\top R w - u \cdot w| > \varepsilon \|u\| \|w\|\big)
    \le 4\, e^{-(\varepsilon^2 - \varepsilon^3) k / 4}.

So, for a fixed w, with probability at least 1 − 4 n e^{−(ε²−ε³)k/4} every entry obeys
|(P̃w − Pw)_i| <= ε ‖P_i‖ ‖w‖, hence ‖P̃w − Pw‖ <= ε ‖P‖_F ‖w‖; at the k above that
failure probability is at most 4 n^{−1/4}, which is the theorem's o(1).

What we state differently from the paper, and why:

- The paper writes the event as ‖P̃w − Pw‖ <= ε‖Pw‖ and the lemma (its eq. 12) with
  ε‖x yᵀ‖ on the right. Read as ε|x·y| that is false: for x ⊥ y the right side is 0
  while x Rᵀ R yᵀ ≠ 0 almost surely. The lemma holds with ε‖x‖‖y‖, which is what the
  union bound then delivers, so the functions here state the event in that form. The
  difference matters: ‖Pw‖ is small when the rows of P average w away, and for P the
  softmax of random logits with n = 256, ε = 0.6 and the theorem's k = 193, the literal
  event fails in every draw (‖P̃w − Pw‖ ≈ 1.3‖Pw‖) while the per-row event holds
  (tests/test_linformer.py).
- The paper's lemma has the constant 2; deriving the inner-product bound from the norm
  bound by polarization (u·w from ‖u ± w‖², each two-sided) gives 4, which we use.
- Theorem 2 (projections E = δR, F = e^{−δ}R with δ → 0 and k = Θ(d log d / ε²)) is an
  existence argument about that degenerate construction, not about the N(0, 1/k)
  projections :func:`linattn.linformer.linformer_projections` draws; it is not implemented.

:func:`linformer_sketch_variance` gives the exact mean and variance of one entry of P̃w
for Gaussian R, which the statistical tests use to check the draws themselves.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from linattn import _checks

__all__ = [
    "jl_inner_product_failure_bound",
    "linformer_failure_bound",
    "linformer_projection_dim",
    "linformer_sketch_variance",
]


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be a real number in (0, 1), got {eps!r}")
    return float(eps)


def linformer_projection_dim(n: int, eps: float, *, value_dim: int = 1) -> int:
    r"""The projection size of Linformer's Theorem 1: k = ceil(5 ln(n·d) / (ε² − ε³)).

    With d = ``value_dim`` = 1 this is the paper's k = 5 log(n)/(ε² − ε³) (Theorem 1);
    with d = Dv it covers every column of V at once (the union over n·d pairs used in
    the proof of Theorem 2, k = 5 log(nd)/(ε² − ε³)). The log is natural, as in the
    JL tail bounds it comes from. At least 1.

    Parameters
    ----------
    n : int
        Sequence length, >= 1.
    eps : float
        ε in (0, 1). ε² − ε³ peaks at ε = 2/3, so larger ε gives no smaller k.
    value_dim : int, default 1
        Number of value columns d the guarantee must cover simultaneously.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        n or value_dim < 1, eps outside (0, 1).

    Notes
    -----
    k often exceeds n at useful accuracy: n = 512 needs k = 250 for ε = 0.5 and
    k = 975 (> n, so no saving) for ε = 0.2. At this k,
    :func:`linformer_failure_bound` is at most 4 (n·d)^{−1/4}.

    References
    ----------
    S. Wang et al. "Linformer: Self-Attention with Linear Complexity." arXiv:2006.04768,
    2020, Theorem 1 and Appendix A.

    Examples
    --------
    >>> from linattn.bounds.linformer import linformer_projection_dim
    >>> linformer_projection_dim(512, 0.5)
    250
    """
    n = _checks.check_positive_int("n", n)
    d = _checks.check_positive_int("value_dim", value_dim)
    eps = _check_eps(eps)
    return max(1, math.ceil(5.0 * math.log(n * d) / (eps**2 - eps**3)))


def jl_inner_product_failure_bound(k: int, eps: float) -> float:
    r"""Bound on Pr(|u Rᵀ R w − u·w| > ε ‖u‖ ‖w‖) for fixed u, w: min(1, 4 e^{−(ε²−ε³)k/4}).

    R is (k, n) with i.i.d. N(0, 1/k) entries. The norm version of the JL lemma bounds
    each tail of ‖Rx‖² / ‖x‖² − 1 beyond ε by e^{−(ε²−ε³)k/4}; applying it to x = u/‖u‖ ±
    w/‖w‖ and using 4 u·w = ‖u + w‖² − ‖u − w‖² gives the bound with the factor 4.

    Parameters
    ----------
    k : int
        Projection size, >= 1.
    eps : float
        ε in (0, 1).

    Returns
    -------
    float

    References
    ----------
    R. I. Arriaga, S. Vempala. "An algorithmic theory of learning: Robust concepts and
    random projection." Machine Learning 63(2), 2006.

    Examples
    --------
    >>> from linattn.bounds.linformer import jl_inner_product_failure_bound
    >>> round(jl_inner_product_failure_bound(200, 0.5), 5)
    0.00772
    """
    k = _checks.check_positive_int("k", k)
    eps = _check_eps(eps)
    return min(1.0, 4.0 * math.exp(-(eps**2 - eps**3) * k / 4.0))


def linformer_failure_bound(n: int, k: int, eps: float, *, value_dim: int = 1) -> float:
    r"""Bound on the probability that Theorem 1's event fails: min(1, 4 n d e^{−(ε²−ε³)k/4}).

    The event: for all n rows i (and all d value columns w), |(P Rᵀ R w − P w)_i| <=
    ε ‖P_i‖ ‖w‖, which implies ‖P Rᵀ R w − P w‖ <= ε ‖P‖_F ‖w‖. The bound is the union
    bound over the n·d (row, column) pairs of :func:`jl_inner_product_failure_bound`.

    Parameters
    ----------
    n : int
        Sequence length (rows of P), >= 1.
    k : int
        Projection size, >= 1.
    eps : float
        ε in (0, 1).
    value_dim : int, default 1
        Number of value columns d covered at once.

    Returns
    -------
    float

    Examples
    --------
    >>> from linattn.bounds.linformer import linformer_failure_bound, linformer_projection_dim
    >>> k = linformer_projection_dim(4096, 0.6)
    >>> linformer_failure_bound(4096, k, 0.6) <= 4 * 4096 ** -0.25
    True
    """
    n = _checks.check_positive_int("n", n)
    d = _checks.check_positive_int("value_dim", value_dim)
    return min(1.0, n * d * jl_inner_product_failure_bound(k, eps))


def linformer_sketch_variance(p: Any, w: Any, k: int) -> Any:
    r"""Exact variance of each entry of P Rᵀ R w for R with i.i.d. N(0, 1/k) entries.

    Row i of the sketch is the sum over the k rows r of R of (r·p_i)(r·w), products of
    jointly Gaussian variables with covariance p_i·w / k, so

    .. math::

        \mathbb{E}[(P R^\top R w)_i] = p_i \cdot w, \qquad
        \operatorname{Var}[(P R^\top R w)_i] = \frac{\|p_i\|^2 \|w\|^2 + (p_i \cdot w)^2}{k}.

    The mean shows the sketch is unbiased; the variance falls as 1/k.

    Parameters
    ----------
    p : array, shape (..., n)
        Rows p_i of P (any real array-API array).
    w : array, shape (n,)
        A column of V.
    k : int
        Projection size, >= 1.

    Returns
    -------
    array, shape (...)
        The variance of each row's entry, in p's namespace.

    Examples
    --------
    >>> import numpy as np
    >>> from linattn.bounds.linformer import linformer_sketch_variance
    >>> linformer_sketch_variance(np.array([[1.0, 0.0]]), np.array([1.0, 0.0]), 4).tolist()
    [0.5]
    """
    k = _checks.check_positive_int("k", k)
    xp = _checks.namespace_of(p=p, w=w)
    if w.ndim != 1 or p.ndim < 1 or int(p.shape[-1]) != int(w.shape[0]):
        raise ValueError(f"p must be (..., n) and w (n,), got p {tuple(p.shape)} and w {tuple(w.shape)}")
    dot = xp.sum(p * w, axis=-1)
    return (xp.sum(p * p, axis=-1) * xp.sum(w * w) + dot * dot) / k

