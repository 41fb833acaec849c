"""The FAVOR estimators obey the mean and variance the Performer paper derives.

The closed forms of linattn.bounds.performer are checked twice: exactly, against
Gauss–Hermite quadrature of the same expectations, and statistically, against the
estimates the feature maps of linattn.feature_maps produce over many independent draws
of the projection W. Every statistical test has a fixed seed, so it is deterministic;
the false-failure rate written next to each check is what a fresh seed would risk.
Under the normal approximation a two-sided |z| < 4 check fails with probability 6.3e-5.
"""

import math

import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss

from linattn import feature_maps as fm
from linattn.bounds.performer import favor_positive_moments, favor_trig_moments
from linattn.testing import assert_close

Z_LIMIT = 4.0  # two-sided: P(|Z| > 4) = 6.3e-5 per check for a standard normal Z


def pairs(dim, norms, rng):
    """Query/key pairs (q, k) whose scaled vectors x = q/Dk^{1/4}, y = k/Dk^{1/4} have the
    squared norms and angle of each (|x|², |y|², angle in degrees) in ``norms``, each pair
    rotated at random."""
    qs, ks = [], []
    for x2, y2, degrees in norms:
        theta = math.radians(degrees)
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        x = math.sqrt(x2) * rotation[:, 0]
        y = math.sqrt(y2) * (math.cos(theta) * rotation[:, 0] + math.sin(theta) * rotation[:, 1])
        qs.append(x * dim**0.25)
        ks.append(y * dim**0.25)
    return np.array(qs), np.array(ks)


def estimates(q, k, num_rows, draws, rng, *, kind="positive", orthogonal=False):
    """phi(q_p)·phi(k_p) for each pair p, under ``draws`` independent projections: (draws, P)."""
    out = np.empty((draws, q.shape[0]))
    for r in range(draws):
        w = fm.random_projection(num_rows, q.shape[-1], orthogonal=orthogonal, rng=rng)
        if kind == "positive":
            phi_q = fm.favor_positive(q, w, role="query", stabilize=False)
            phi_k = fm.favor_positive(k, w, role="key", stabilize=False)
        else:
            phi_q, phi_k = fm.favor_trig(q, w), fm.favor_trig(k, w)
        out[r] = np.sum(phi_q * phi_k, axis=-1)
    return out


def positive_term_moment(x, y, n):
    """E Yⁿ for one positive-feature term Y = exp(w·(x+y) − (|x|²+|y|²)/2), w ~ N(0, I)."""
    z2 = np.sum((x + y) ** 2, -1)
    return np.exp(n * n * z2 / 2 - n * (np.sum(x * x, -1) + np.sum(y * y, -1)) / 2)


def sample_variance_standard_error(x, y, m, draws):
    """Standard deviation of the sample variance (ddof=1) of ``draws`` estimates, each the
    mean of m iid positive terms, from the terms' exact moments:
    Var s² = μ₄/R − σ⁴(R − 3)/(R(R − 1)), with μ₄, σ² those of the mean of m terms."""
    mu = positive_term_moment(x, y, 1)
    central2 = positive_term_moment(x, y, 2) - mu**2
    central4 = (positive_term_moment(x, y, 4) - 4 * mu * positive_term_moment(x, y, 3)
                + 6 * mu**2 * positive_term_moment(x, y, 2) - 3 * mu**4)
    mean_central4 = (central4 + 3 * (m - 1) * central2**2) / m**3
    mean_variance = central2 / m
    R = draws
    return np.sqrt(mean_central4 / R - mean_variance**2 * (R - 3) / (R * (R - 1)))


# |x+y|² from 0.1 to 1.8: the positive terms are log-normal with log-variance |x+y|², so
# this keeps the skewness of a mean of 16·4000 terms below ~0.1 (the normal approximation
# of the z-tests holds) and the standard error of the sample variance below ~10%.
MODERATE = [(0.5, 0.5, 60), (0.5, 0.5, 120), (0.3, 0.8, 90), (0.6, 0.2, 150), (0.2, 0.2, 30), (0.8, 0.4, 100)]


def test_moment_formulas_equal_quadrature():
    # E f(w·z) for w ~ N(0, I) is E f(|z| g), g ~ N(0, 1): a 1-D Gauss–Hermite integral,
    # exact to rounding for these entire integrands with 120 nodes.
    nodes, weights = hermegauss(120)
    weights = weights / math.sqrt(2 * math.pi)
    rng = np.random.default_rng(0)
    q, k = pairs(5, [*MODERATE, (1.0, 1.0, 0), (1.0, 1.0, 180), (1.5, 0.1, 45)], rng)
    x, y = q / 5**0.25, k / 5**0.25
    half = (np.sum(x * x, -1) + np.sum(y * y, -1)) / 2
    for m in (1, 7):
        z = np.linalg.norm(x + y, axis=-1)[:, None]
        term = np.exp(z * nodes - half[:, None])
        mean, variance = favor_positive_moments(q, k, m)
        first, second = term @ weights, term**2 @ weights
        assert_close(mean, first, rtol=1e-12, atol=0)  # 120-node quadrature: ~1e-14
        assert_close(variance, (second - first**2) / m, rtol=1e-10, atol=1e-12 * np.max(second))
        u = np.linalg.norm(x - y, axis=-1)[:, None]
        term = np.exp(half[:, None]) * np.cos(u * nodes)
        mean, variance = favor_trig_moments(q, k, m)
        first, second = term @ weights, term**2 @ weights
        assert_close(mean, first, rtol=1e-12, atol=0)
        assert_close(variance, (second - first**2) / m, rtol=1e-10, atol=1e-12 * np.max(second))


def test_positive_estimate_is_unbiased():
    rng = np.random.default_rng(1)
    q, k = pairs(8, MODERATE, rng)
    m, draws = 16, 4000
    mean, variance = favor_positive_moments(q, k, m)
    z = (estimates(q, k, m, draws, rng).mean(axis=0) - mean) / np.sqrt(variance / draws)
    # 6 checks at 6.3e-5 each: false-failure rate ~4e-4 (normal approximation of the mean).
    assert np.all(np.abs(z) < Z_LIMIT), z


def test_orthogonal_estimate_is_unbiased_even_along_the_diagonal():
    # Orthogonal rows must be marginally N(0, I). Householder QR without the sign fix
    # leaves row i's coordinate i mostly negative (always, for i = 0), which biases the
    # estimate by about −20% when x + y points along (1, ..., 1) (Dk = 8, |x+y|² = 1).
    rng = np.random.default_rng(9)
    x = np.full((1, 8), 0.5 / math.sqrt(8))  # x = y, x + y = (1, ..., 1)/sqrt(8)
    q = x * 8**0.25
    sample = estimates(q, q, 8, 4000, rng, orthogonal=True)[:, 0]
    mean, _ = favor_positive_moments(q, q, 8)
    z = (sample.mean() - mean[0]) / (sample.std(ddof=1) / math.sqrt(sample.size))
    # The variance is estimated from the draws (no closed form for orthogonal rows):
    # a t-statistic with 3999 degrees of freedom, |z| < 4 fails with probability ~6e-5.
    assert abs(z) < Z_LIMIT, z


def test_positive_variance_formula_matches_sample_variance():
    rng = np.random.default_rng(2)
    q, k = pairs(8, MODERATE, rng)
    m, draws = 16, 4000
    _, variance = favor_positive_moments(q, k, m)
    sample = estimates(q, k, m, draws, rng).var(axis=0, ddof=1)
    se = sample_variance_standard_error(q / 8**0.25, k / 8**0.25, m, draws)
    assert np.all(se < 0.15 * variance)  # the check has teeth: the variance is pinned to ±60%
    z = (sample - variance) / se
    # 6 checks at 6.3e-5 each under the normal approximation of s² (its skewness is
    # larger than the mean's, so read this as ~1e-3 overall rather than 4e-4).
    assert np.all(np.abs(z) < Z_LIMIT), z


def test_trig_estimate_is_unbiased_with_the_stated_variance():
    rng = np.random.default_rng(3)
    q, k = pairs(8, MODERATE, rng)
    frequencies, draws = 8, 3000  # 16 features, as the positive test
    mean, variance = favor_trig_moments(q, k, frequencies)
    sample = estimates(q, k, frequencies, draws, rng, kind="trig")
    z_mean = (sample.mean(axis=0) - mean) / np.sqrt(variance / draws)
    # Each term is bounded (|cos| ≤ 1), so the normal approximation is good: 6.3e-5 per check.
    assert np.all(np.abs(z_mean) < Z_LIMIT), z_mean
    # s²/σ² of bounded terms: relative standard error ≤ sqrt((kurtosis − 1)/R) ≈ 0.03 here;
    # ±25% is > 8 standard errors (false-failure rate < 1e-15 under the normal approximation).
    np.testing.assert_allclose(sample.var(axis=0, ddof=1) / variance, 1.0, atol=0.25)


def test_kernel_rms_error_falls_as_one_over_sqrt_features():
    # For iid features the mean squared error is exactly Var/m, so 16× the features divides
    # the RMS error by exactly 4: the population ratio is 0.25. Each empirical RMS is
    # averaged over 8 pairs and 1500 draws with a relative standard error of ~2%
    # (heavier for the log-normal terms at small m), so the ratio is 0.25 ± 0.01; the
    # window (0.18, 0.35) is > 7 standard errors wide on each side (false failure < 1e-12).
    rng = np.random.default_rng(4)
    q, k = pairs(8, [*MODERATE, (0.4, 0.4, 80), (0.7, 0.3, 110)], rng)
    mean, _ = favor_positive_moments(q, k, 1)
    rms = {}
    for m in (8, 128):
        relative = (estimates(q, k, m, 1500, rng) - mean) / mean
        rms[m] = math.sqrt(np.mean(relative**2))
    ratio = rms[128] / rms[8]
    assert 0.18 < ratio < 0.35, ratio


def performer_attention(q, k, v, w):
    phi_q, phi_k = fm.favor_positive(q, w, role="query"), fm.favor_positive(k, w, role="key")
    a = phi_q @ phi_k.T
    return (a @ v) / a.sum(-1, keepdims=True)


def test_attention_output_error_falls_with_more_features():
    # The normalised output is a ratio of two estimates; its error is ~1/sqrt(m) only
    # asymptotically: at small m the normaliser's fluctuations damp the error, and the
    # measured ratio for 16× features from m = 64 is ~0.30 (0.25 in the limit), with a
    # draw-to-draw coefficient of variation ~0.25, i.e. ±0.01 over 60 draws. 0.4 is
    # > 8 standard errors above (false failure < 1e-15 under the normal approximation).
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 32, 16))
    q, k = q / 2, k / 2
    s = q @ k.T / 4
    p = np.exp(s - s.max(-1, keepdims=True))
    exact = (p / p.sum(-1, keepdims=True)) @ v
    rms = {}
    for m in (64, 1024):
        errors = [performer_attention(q, k, v, fm.random_projection(m, 16, orthogonal=False, rng=rng)) - exact
                  for _ in range(60)]
        rms[m] = math.sqrt(np.mean(np.square(errors)))
    assert rms[1024] / rms[64] < 0.4, rms


def test_orthogonal_rows_have_lower_mean_squared_error_than_iid():
    # Performer's orthogonal-features theorem: orthogonal rows do no worse than iid ones.
    # The exact iid MSE (the formula, checked above) against the empirical MSE of one
    # orthogonal block (m = Dk = 8), averaged over 32 pairs with |x+y|² = 1 and 2000 draws.
    # The gain is ~17% (0.215 → 0.178, the value a Monte Carlo integral of the covariance
    # of two orthogonal terms predicts), ~9 standard errors; requiring 4 standard errors
    # fails with probability ~1e-6 under the normal approximation.
    rng = np.random.default_rng(6)
    angles = np.linspace(20, 120, 32)
    norms = [(1 / (2 + 2 * math.cos(math.radians(a))),) * 2 + (a,) for a in angles]  # |x+y|² = 1
    q, k = pairs(8, norms, rng)
    mean, variance = favor_positive_moments(q, k, 8)
    iid_relative_mse = np.mean(variance / mean**2)
    relative = ((estimates(q, k, 8, 2000, rng, orthogonal=True) - mean) / mean) ** 2
    per_draw = relative.mean(axis=1)
    orthogonal_relative_mse = per_draw.mean()
    standard_error = per_draw.std(ddof=1) / math.sqrt(per_draw.size)
    assert iid_relative_mse - orthogonal_relative_mse > Z_LIMIT * standard_error, (
        iid_relative_mse, orthogonal_relative_mse, standard_error)


def test_trig_variance_is_larger_where_the_kernel_is_small():
    # Performer, Lemma 2: at y ≈ −x (kernel small) trigonometric features have a
    # far larger variance than positive ones; at y ≈ x (kernel large) it is the reverse.
    rng = np.random.default_rng(7)
    q, k = pairs(8, [(0.5, 0.5, 170), (0.5, 0.5, 10)], rng)  # nearly opposite, nearly aligned
    m = 16  # features: 16 positive rows against 8 frequencies
    _, positive = favor_positive_moments(q, k, m)
    _, trig = favor_trig_moments(q, k, m // 2)
    assert trig[0] > 100 * positive[0] and positive[1] > 100 * trig[1], (positive, trig)
    # Empirically, from 1000 draws: the sample variances have relative standard errors of
    # a few % (trig: bounded terms) to ~30% (positive terms at |x+y|² = 2·0.5·(1 + cos 10°)),
    # far inside the factor of 10 checked (false failure < 1e-9).
    sample_positive = estimates(q, k, m, 1000, rng).var(axis=0, ddof=1)
    sample_trig = estimates(q, k, m // 2, 1000, rng, kind="trig").var(axis=0, ddof=1)
    assert sample_trig[0] > 10 * sample_positive[0], (sample_positive, sample_trig)
    assert sample_positive[1] > 10 * sample_trig[1], (sample_positive, sample_trig)


def test_moments_broadcast_and_check_arguments():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((3, 1, 4))
    k = rng.standard_normal((5, 4))
    for moments in (favor_positive_moments, favor_trig_moments):
        mean, variance = moments(q, k, 4)
        assert mean.shape == variance.shape == (3, 5)
        np.testing.assert_allclose(mean, np.exp(q @ k.T / 2)[:, 0], rtol=1e-14)
        with pytest.raises(ValueError, match="num_"):
            moments(q, k, 0)
        with pytest.raises(ValueError, match=r"Dk.*\(3, 1, 4\).*\(5, 3\)"):
            moments(q, k[:, :3], 4)
        with pytest.raises(ValueError, match="broadcast"):
            moments(q[:, 0], k, 4)
        with pytest.raises(ValueError, match=r"scale.*positive"):
            moments(q, k, 4, scale=-1.0)
    # scale: exp(scale·q·k) instead of exp(q·k/sqrt(Dk)).
    np.testing.assert_allclose(favor_positive_moments(q, k, 4, scale=0.3)[0], np.exp(0.3 * q @ k.T)[:, 0],
                               rtol=1e-14)
