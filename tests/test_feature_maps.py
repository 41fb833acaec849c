"""Feature maps: their defining identities, exact VJPs, the FAVOR+ stabiliser, projections, errors.

Random draws here are fixed by seeds (hypothesis draws the seed), so every test is
deterministic; the statistical properties of the FAVOR+ estimators live in
tests/test_performer_bounds.py.
"""

import itertools
import math

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from linattn import feature_maps as fm
from linattn.testing import assert_close, numerical_vjp, to_numpy, tolerance

# Central differences with h = 1e-6 on inputs of size ~1: truncation ~1e-12·|f'''| and
# rounding ~2e-10·|f| per element, summed over ≤ ~100 cotangent terms; 1e-6 relative to
# the largest gradient entry leaves a margin of ~100 without hiding a wrong term (O(1)).
FD_RTOL = 1e-6
# Keep u = w·x' at least this far from a tie at the max (or x from the kink at 0), so that
# the ±h steps of the finite differences (which move u by ~1e-5) stay on one branch.
KINK_GAP = 1e-3


def assert_vjp_matches_finite_differences(forward, vjp, x, dphi):
    [expected] = numerical_vjp(forward, [x], dphi)
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert_close(vjp(x, dphi), expected, rtol=FD_RTOL, atol=FD_RTOL * scale)


@st.composite
def inputs(draw, max_dim=4):
    """(x, rng): x of shape (*lead, T, D) with 0-2 leading dims, T in 1..5, D in 1..max_dim."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lead = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    shape = (*lead, draw(st.integers(1, 5)), draw(st.integers(1, max_dim)))
    return rng.standard_normal(shape), rng


# ---------------------------------------------------------------- parameter-free maps


@pytest.mark.parametrize("name", ["elu+1", "relu", "identity", "taylor"])
@settings(max_examples=30)
@given(data=inputs())
def test_parameter_free_vjps_equal_finite_differences(name, data):
    x, rng = data
    assume(np.min(np.abs(x)) > KINK_GAP)  # relu and elu+1 have a kink at 0
    fmap = fm.get_feature_map(name)
    dphi = rng.standard_normal((*x.shape[:-1], fmap.output_dim(x.shape[-1])))
    assert_vjp_matches_finite_differences(fmap.forward, fmap.vjp, x, dphi)


def test_elu_plus_one_and_relu_values():
    x = np.array([[-2.0, -0.0, 0.0, 0.5, 3.0]])
    np.testing.assert_array_equal(fm.elu_plus_one(x), [[math.exp(-2.0), 1.0, 1.0, 1.5, 4.0]])
    np.testing.assert_array_equal(fm.relu(x), [[0.0, 0.0, 0.0, 0.5, 3.0]])
    big = np.array([[800.0, -800.0]])  # exp(800) would overflow; elu+1 never evaluates it
    with np.errstate(over="raise"):
        np.testing.assert_array_equal(fm.elu_plus_one(big), [[801.0, 0.0]])


@given(data=inputs(max_dim=9))
def test_taylor_inner_product_is_second_order_exponential(data):
    x, rng = data
    y = rng.standard_normal(x.shape)
    d = x.shape[-1]
    t = np.sum(x * y, axis=-1) / math.sqrt(d)
    got = np.sum(fm.taylor_features(x) * fm.taylor_features(y), axis=-1)
    # A sum of 1 + D + D² products of O(1) terms: rounding ~ε·sqrt(D²) relative to the largest.
    assert_close(got, 1 + t + t**2 / 2, reduction_length=d * d, atol=tolerance(np.float64, d * d) * (1 + t**2).max())


def test_taylor_layout_is_one_linear_quadratic_row_major():
    x = np.array([[1.0, 2.0, 3.0]])
    phi = fm.taylor_features(x)
    assert phi.shape == (1, 13)
    assert phi[0, 0] == 1.0
    np.testing.assert_allclose(phi[0, 1:4], x[0] / 3**0.25, rtol=1e-15)
    np.testing.assert_allclose(phi[0, 4:].reshape(3, 3), np.outer(x[0], x[0]) / math.sqrt(6), rtol=1e-15)


def test_registry_lists_the_parameter_free_maps_with_consistent_output_dims():
    assert list(fm.FEATURE_MAPS) == ["elu+1", "relu", "identity", "taylor"]
    x = np.ones((2, 3, 5))
    for name, fmap in fm.FEATURE_MAPS.items():
        assert fmap.name == name
        assert fmap(x).shape == (2, 3, fmap.output_dim(5))
    assert fm.get_feature_map(fm.FEATURE_MAPS["relu"]) is fm.FEATURE_MAPS["relu"]
    with pytest.raises(TypeError):
        fm.FEATURE_MAPS["softplus"] = fm.FEATURE_MAPS["relu"]  # read-only


def test_unknown_feature_map_lists_the_known_names():
    with pytest.raises(ValueError, match=r"unknown feature map 'softmax'.*'elu\+1'.*'relu'.*'identity'.*'taylor'"):
        fm.get_feature_map("softmax")
    with pytest.raises(TypeError, match="feature map"):
        fm.get_feature_map(3)


# ---------------------------------------------------------------- cosFormer


@given(data=inputs(max_dim=6), offset=st.integers(0, 3), extra=st.integers(0, 4))
def test_cosformer_inner_products_are_cosine_reweighted(data, offset, extra):
    x, rng = data
    y = rng.standard_normal(x.shape)
    T = x.shape[-2]
    positions = np.arange(offset, offset + T)
    M = offset + T + extra - 1 if offset + T + extra > 1 else 1
    got = fm.cosformer_features(x, positions, M) @ np.swapaxes(fm.cosformer_features(y, positions, M), -1, -2)
    weight = np.cos(np.pi / 2 * (positions[:, None] - positions[None, :]) / M)
    want = (x @ np.swapaxes(y, -1, -2)) * weight
    # Sums of 2D products; cos θ_i cos θ_j + sin θ_i sin θ_j = cos(θ_i − θ_j) to a few ε.
    scale = np.max(np.abs(x), initial=1) * np.max(np.abs(y), initial=1) * x.shape[-1]
    assert_close(got, want, atol=tolerance(np.float64, 2 * x.shape[-1]) * scale)


@settings(max_examples=30)
@given(data=inputs())
def test_cosformer_vjp_equals_finite_differences(data):
    x, rng = data
    T, D = x.shape[-2:]
    positions = rng.integers(0, 2 * T, size=T)
    dphi = rng.standard_normal((*x.shape[:-1], 2 * D))
    assert_vjp_matches_finite_differences(
        lambda x: fm.cosformer_features(x, positions, 2 * T),
        lambda x, d: fm.cosformer_features_vjp(x, d, positions, 2 * T), x, dphi)


def test_cosformer_does_not_apply_relu():
    x = -np.ones((1, 2))
    np.testing.assert_allclose(fm.cosformer_features(x, [0], 4), [[-1.0, -1.0, -0.0, -0.0]])


# ---------------------------------------------------------------- FAVOR+ features


@st.composite
def favor_cases(draw):
    """x (*lead, T, D), a projection (m, D), a cotangent, role, stabilize, cu_seqlens."""
    x, rng = draw(inputs())
    T, D = x.shape[-2:]
    m = draw(st.integers(1, 6))
    w = fm.random_projection(m, D, orthogonal=draw(st.booleans()), rng=rng)
    role = draw(st.sampled_from(fm.ROLES))
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=3)))
    cu_seqlens = [0, *cuts, T] if draw(st.booleans()) else None
    scale = draw(st.sampled_from([None, 0.3, 2.0]))
    return x, w, rng.standard_normal((*x.shape[:-1], m)), role, draw(st.booleans()), cu_seqlens, scale


def max_gaps(u, role, cu_seqlens):
    """The gap between the two largest entries of each group a stabiliser maxes over."""
    if role == "query":
        groups = [u]
    else:
        T = u.shape[-2]
        bounds = list(itertools.pairwise(cu_seqlens)) if cu_seqlens else [(0, T)]
        groups = [u[..., a:b, :].reshape(*u.shape[:-2], 1, -1) for a, b in bounds if b > a]
    gaps = [np.diff(np.sort(g, axis=-1)[..., -2:], axis=-1) for g in groups if g.shape[-1] > 1]
    return min((float(np.min(g)) for g in gaps), default=math.inf)


@settings(max_examples=60)
@given(case=favor_cases())
def test_favor_positive_vjp_equals_finite_differences(case):
    x, w, dphi, role, stabilize, cu_seqlens, scale = case
    u = x * math.sqrt(scale or 1 / math.sqrt(x.shape[-1])) @ w.T
    assume(not stabilize or max_gaps(u, role, cu_seqlens) > KINK_GAP)  # the max is not differentiable at ties
    kw = dict(role=role, stabilize=stabilize, cu_seqlens=cu_seqlens, scale=scale, eps=1e-6)
    assert_vjp_matches_finite_differences(
        lambda x: fm.favor_positive(x, w, **kw), lambda x, d: fm.favor_positive_vjp(x, d, w, **kw), x, dphi)


@settings(max_examples=30)
@given(case=favor_cases())
def test_favor_trig_vjp_equals_finite_differences(case):
    x, w, _, _, _, _, scale = case
    dphi = np.cos(np.arange(2 * w.shape[0] * x.size // x.shape[-1])).reshape(*x.shape[:-1], 2 * w.shape[0])
    assert_vjp_matches_finite_differences(
        lambda x: fm.favor_trig(x, w, scale=scale), lambda x, d: fm.favor_trig_vjp(x, d, w, scale=scale), x, dphi)


def test_favor_vjp_sends_the_max_derivative_to_its_argmax():
    # With one feature per row the query stabiliser cancels everything but -|x'|²/2:
    # phi = exp(-|x'|²/2), so dx = -phi·x'·sqrt(scale), with no contribution of W.
    x = np.array([[0.3, -1.2], [2.0, 0.5]])
    w = np.array([[5.0, -7.0]])
    phi = fm.favor_positive(x, w, role="query")
    np.testing.assert_allclose(phi[:, 0], np.exp(-np.sum(x**2, -1) / 2 / math.sqrt(2)), rtol=1e-15)
    dx = fm.favor_positive_vjp(x, np.ones_like(phi), w, role="query")
    np.testing.assert_allclose(dx, -phi * x / math.sqrt(2), rtol=1e-14)


def attention_weights(phi_q, phi_k, causal):
    """A_ij = φ(q_i)·φ(k_j) / Σ_l φ(q_i)·φ(k_l), over l ≤ i when causal."""
    a = phi_q @ np.swapaxes(phi_k, -1, -2)
    if causal:
        a = np.tril(a)
    return a / a.sum(-1, keepdims=True)


def favor_pair(q, k, w, **kw):
    return fm.favor_positive(q, w, role="query", **kw), fm.favor_positive(k, w, role="key", **kw)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_stabiliser_cancels_in_normalised_attention(causal):
    rng = np.random.default_rng(0)
    q, k = 2.0 * rng.standard_normal((2, 3, 7, 8))  # (batch, T, D): logits of size ~5
    w = fm.random_projection(16, 8, rng=rng)
    plain = attention_weights(*favor_pair(q, k, w, stabilize=False), causal)
    stable = attention_weights(*favor_pair(q, k, w, stabilize=True), causal)
    # The two differ only by rounding in exp(u − h − c) with |u|, |h|, |c| ≲ 30: ~30·ε each.
    assert_close(stable, plain, condition=30.0, reduction_length=16 * 7)


def test_stabilised_kernel_estimate_is_scaled_by_exp_minus_both_constants():
    # In unnormalised attention the stabiliser does not cancel: φ(q)·φ(k) carries exp(−c_q − c_k).
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 5, 4))
    w = fm.random_projection(6, 4, rng=rng)
    u_q, u_k = q / 4**0.25 @ w.T, k / 4**0.25 @ w.T
    c_q, c_k = u_q.max(-1), u_k.max()
    phi_q, phi_k = favor_pair(q, k, w, stabilize=False)
    plain = phi_q @ phi_k.T
    phi_q, phi_k = favor_pair(q, k, w)
    stable = phi_q @ phi_k.T
    assert_close(stable * np.exp(c_q[:, None] + c_k), plain, condition=10.0, reduction_length=6)
    assert not np.allclose(stable, plain)


def test_a_per_key_constant_would_not_cancel():
    # Why the key stabiliser is shared by all keys: a per-key max reweights the keys.
    rng = np.random.default_rng(2)
    q, k = 1.5 * rng.standard_normal((2, 6, 4))
    w = fm.random_projection(8, 4, rng=rng)
    phi_q, phi_k = favor_pair(q, k, w, stabilize=False)
    per_key = phi_k * np.exp(-(k / 4**0.25 @ w.T).max(-1, keepdims=True))
    assert not np.allclose(attention_weights(phi_q, per_key, False), attention_weights(phi_q, phi_k, False), rtol=1e-3)


def test_official_eps_does_not_cancel():
    # eps is added after the shift, so it stands for eps·exp(c + |x'|²/2) and depends on c.
    rng = np.random.default_rng(3)
    q, k = 3.0 * rng.standard_normal((2, 6, 4))
    w = fm.random_projection(8, 4, rng=rng)
    exact = attention_weights(*favor_pair(q, k, w, stabilize=False), False)
    with_eps = attention_weights(*favor_pair(q, k, w, eps=1e-6), False)
    unstabilised_eps = attention_weights(*favor_pair(q, k, w, eps=1e-6, stabilize=False), False)
    # The stabiliser alone changes the weights by rounding (~1e-16 here); eps moves them by O(1)
    # (measured 0.8): where exp(u − h − c) ~ 1e-6, the added 1e-6 is as large as the feature.
    assert np.max(np.abs(with_eps - exact)) > 1e-2
    assert np.max(np.abs(with_eps - unstabilised_eps)) > 1e-2


def test_key_stabiliser_is_per_sequence_under_cu_seqlens():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((2, 9, 4))
    k[:, 5:] *= 4.0  # the third sequence has much larger keys, so a shared max would be set by it
    w = fm.random_projection(8, 4, rng=rng)
    cu = [0, 2, 2, 5, 9]
    packed = fm.favor_positive(k, w, role="key", eps=1e-6, cu_seqlens=cu)
    alone = np.concatenate([fm.favor_positive(k[:, a:b], w, role="key", eps=1e-6)
                            for a, b in itertools.pairwise(cu) if b > a], axis=1)
    np.testing.assert_array_equal(packed, alone)
    # Without cu_seqlens the max spans all sequences and, through eps, changes the first one.
    shared = fm.favor_positive(k, w, role="key", eps=1e-6)
    assert not np.allclose(shared[:, :2] / shared[:, :2].sum(-1, keepdims=True),
                           alone[:, :2] / alone[:, :2].sum(-1, keepdims=True), rtol=1e-6)
    # Queries use a per-row max: cu_seqlens changes nothing.
    np.testing.assert_array_equal(fm.favor_positive(k, w, role="query", cu_seqlens=cu),
                                  fm.favor_positive(k, w, role="query"))


def test_stabiliser_bounds_features_by_exp_minus_half_norm():
    # With the shift, every exp(·) ≤ exp(−|x'|²/2) ≤ 1: nothing can overflow.
    rng = np.random.default_rng(5)
    x = 3.0 * rng.standard_normal((4, 8))
    w = fm.random_projection(16, 8, rng=rng)
    bound = np.exp(-np.sum((x / 8**0.25) ** 2, -1, keepdims=True) / 2) / 4  # 1/sqrt(16)
    for role in fm.ROLES:
        assert np.all(fm.favor_positive(x, w, role=role) <= bound * (1 + 1e-13))  # exp of (u − h) − c, rounded


def test_stabiliser_prevents_overflow_where_rows_are_long():
    # Unshifted, exp(w·x' − |x'|²/2) = exp(|w|²/2 − |x' − w|²/2) ≤ exp(|w|²/2): it overflows only
    # when |w|²/2 exceeds the exp range, 88.7 in float32 (|w|² ≈ Dk, so Dk ≳ 170 with the tails).
    w = np.array([[10.0, 10.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=np.float32)  # |w_0|²/2 = 100
    x = w[:1] * np.float32(4**0.25)  # x' = w_0
    with np.errstate(over="ignore"):
        assert np.isinf(fm.favor_positive(x, w, role="key", stabilize=False)).any()
    phi = fm.favor_positive(x, w, role="key")
    assert phi.dtype == np.float32 and np.all(np.isfinite(phi))


def test_official_query_stabiliser_does_not_prevent_underflow():
    # c = max_i w_i·x' leaves the factor exp(−|x'|²/2): a query with |x'|²/2 > ~745 gets
    # all-zero features in float64 (the official eps then makes its weights uniform).
    w = fm.random_projection(8, 4, rng=0)
    q = np.full((1, 4), 30.0)  # |x'|²/2 = 4·900/2/2 = 900
    assert not np.any(fm.favor_positive(q, w, role="query"))
    assert np.all(fm.favor_positive(q, w, role="query", eps=1e-6) == 1e-6 / math.sqrt(8))


def test_favor_trig_is_sines_then_cosines_with_one_over_sqrt_frequencies():
    x = np.array([[0.0, 0.0]])
    w = np.ones((3, 2))
    np.testing.assert_array_equal(fm.favor_trig(x, w), [[0.0] * 3 + [1 / math.sqrt(3)] * 3])


def test_favor_features_with_scale_estimate_exp_scale_q_k():
    # scale enters as x' = sqrt(scale)·x: with one row w, φ(q)·φ(k) is exactly computable.
    q, k, w = np.array([[1.0, 2.0]]), np.array([[0.5, -1.0]]), np.array([[0.3, 0.7]])
    s = 0.4
    x, y = q * math.sqrt(s), k * math.sqrt(s)
    want = np.exp(w @ (x + y).T - (x @ x.T + y @ y.T) / 2)
    got = fm.favor_positive(q, w, role="query", stabilize=False, scale=s) @ fm.favor_positive(
        k, w, role="key", stabilize=False, scale=s).T
    np.testing.assert_allclose(got, want, rtol=1e-15)


# ---------------------------------------------------------------- random projections


@pytest.mark.parametrize("m, d", [(3, 5), (5, 5), (11, 4), (1, 1)])
def test_orthogonal_projection_shape_and_block_orthogonality(m, d):
    w = fm.random_projection(m, d, rng=0)
    assert w.shape == (m, d) and w.dtype == np.float64
    for start in range(0, m, d):
        block = w[start:start + d]
        gram = block @ block.T
        off_diagonal = gram - np.diag(np.diag(gram))
        # Householder QR: orthogonal to a few ε, times the row norms² (~d).
        assert np.max(np.abs(off_diagonal)) < 1e-13 * d
    if m > d:  # different blocks are independent, not orthogonal
        assert np.max(np.abs(w[:d] @ w[d:].T)) > 1e-3


def test_projection_is_reproducible_from_a_seed_and_differs_between_seeds():
    for orthogonal in (True, False):
        a = fm.random_projection(6, 3, orthogonal=orthogonal, rng=7)
        np.testing.assert_array_equal(a, fm.random_projection(6, 3, orthogonal=orthogonal, rng=7))
        assert not np.allclose(a, fm.random_projection(6, 3, orthogonal=orthogonal, rng=8))
    generator = np.random.default_rng(7)
    first = fm.random_projection(6, 3, rng=generator)
    np.testing.assert_array_equal(first, fm.random_projection(6, 3, rng=7))  # an int seeds a new generator
    assert not np.allclose(first, fm.random_projection(6, 3, rng=generator))  # a generator's stream advances


@pytest.mark.parametrize("orthogonal", [True, False])
def test_chi_and_sqrt_row_norms(orthogonal):
    d, m = 6, 3000
    sqrt_rows = fm.random_projection(m, d, orthogonal=orthogonal, scaling="sqrt", rng=1)
    np.testing.assert_allclose(np.linalg.norm(sqrt_rows, axis=1), math.sqrt(d), rtol=1e-14)
    chi_rows = fm.random_projection(m, d, orthogonal=orthogonal, scaling="chi", rng=1)
    squared = np.sum(chi_rows**2, axis=1)  # χ²(d): mean d, variance 2d
    assert np.std(squared) > 1.0  # the norms vary
    z = (squared.mean() - d) / math.sqrt(2 * d / m)
    assert abs(z) < 4, z  # false-failure rate ~6e-5 under the normal approximation; fixed seed


def test_orthogonal_blocks_are_haar_distributed():
    # LAPACK's Householder QR makes Q[0, 0] = -|g_00|/|g_0| < 0 always (and Q[i, i] < 0
    # mostly); the sign fix with diag(R) makes every entry symmetric. Over 400 draws each
    # count of positive diagonal entries is Binomial(400, 1/2) = 200 ± 10; |count − 200|
    # < 60 fails with probability ~2e-9 per entry.
    generator = np.random.default_rng(11)
    diagonals = np.array([np.diag(fm.random_projection(4, 4, rng=generator)) for _ in range(400)])
    assert np.all(np.abs(np.sum(diagonals > 0, axis=0) - 200) < 60)
    # Rows are marginally N(0, I): E w_ii² = 1 (sd of the mean of 400 χ²(1) draws: 0.07).
    assert np.all(np.abs(np.mean(diagonals**2, axis=0) - 1) < 0.28)


def test_redraw_projection_keeps_shape_and_options():
    w = fm.random_projection(10, 4, rng=0)
    fresh = fm.redraw_projection(w, rng=1)
    assert fresh.shape == (10, 4) and not np.allclose(fresh, w)
    np.testing.assert_array_equal(fresh, fm.random_projection(10, 4, rng=1))
    fixed = fm.redraw_projection(xs.asarray(w), rng=1, orthogonal=False, scaling="sqrt")
    np.testing.assert_allclose(np.linalg.norm(fixed, axis=1), 2.0, rtol=1e-14)
    with pytest.raises(ValueError, match=r"projection.*2-D.*got shape \(10,\)"):
        fm.redraw_projection(np.ones(10), rng=1)


def test_every_map_accepts_an_empty_sequence():
    x = np.ones((2, 0, 3))
    w = fm.random_projection(4, 3, rng=0)
    for fmap in fm.FEATURE_MAPS.values():
        assert fmap.vjp(x, fmap(x)).shape == x.shape
    for role in fm.ROLES:
        phi = fm.favor_positive(x, w, role=role, cu_seqlens=[0, 0])
        assert phi.shape == (2, 0, 4)
        assert fm.favor_positive_vjp(x, phi, w, role=role).shape == x.shape
    assert fm.favor_trig_vjp(x, fm.favor_trig(x, w), w).shape == x.shape
    assert fm.cosformer_features_vjp(x, fm.cosformer_features(x, [], 1), [], 1).shape == x.shape


# ---------------------------------------------------------------- array-api-strict


def strict_and_numpy_results(fn, *arrays, **kwargs):
    strict = fn(*(xs.asarray(a) for a in arrays), **kwargs)
    assert isinstance(strict, xs._array_object.Array)
    return to_numpy(strict), fn(*arrays, **kwargs)


def test_every_map_and_vjp_runs_on_array_api_strict():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3))
    w = fm.random_projection(4, 3, rng=rng)
    positions = np.arange(5)
    cases = [(f.forward, (x,), {}) for f in fm.FEATURE_MAPS.values()]
    cases += [(f.vjp, (x, rng.standard_normal((2, 5, f.output_dim(3)))), {}) for f in fm.FEATURE_MAPS.values()]
    for role in fm.ROLES:
        kw = dict(role=role, eps=1e-6)
        cases.append((lambda x, w, **kw: fm.favor_positive(x, w, **kw), (x, w), kw))
        cases.append((fm.favor_positive_vjp, (x, rng.standard_normal((2, 5, 4)), w), kw))
    cases += [
        (fm.favor_positive, (x, w), dict(role="key", cu_seqlens=[0, 2, 5])),
        (fm.favor_positive_vjp, (x, rng.standard_normal((2, 5, 4)), w), dict(role="key", cu_seqlens=[0, 0, 5])),
        (fm.favor_trig, (x, w), {}),
        (fm.favor_trig_vjp, (x, rng.standard_normal((2, 5, 8)), w), {}),
        (fm.cosformer_features, (x, positions), dict(max_len=6)),
        (fm.cosformer_features_vjp, (x, rng.standard_normal((2, 5, 6)), positions), dict(max_len=6)),
    ]
    for fn, arrays, kwargs in cases:
        strict, numpy_result = strict_and_numpy_results(fn, *arrays, **kwargs)
        # The same operations on the same float64 values: equal to the last bit.
        np.testing.assert_array_equal(strict, numpy_result, err_msg=getattr(fn, "__name__", ""))


@pytest.mark.parametrize("dtype", [xs.float32, xs.float64])
def test_maps_keep_the_dtype_on_array_api_strict(dtype):
    x = xs.ones((3, 2), dtype=dtype)
    w = xs.asarray(fm.random_projection(4, 2, rng=0))  # float64: cast to x's dtype
    for phi in (fm.elu_plus_one(x), fm.taylor_features(x), fm.favor_positive(x, w, role="key"),
                fm.favor_trig(x, w), fm.cosformer_features(x, xs.asarray([0, 1, 2]), 3)):
        assert phi.dtype == dtype


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(num_features=0), ValueError, r"num_features.*positive integer.*got 0"),
    (dict(num_features=2.5), ValueError, r"num_features.*got 2\.5"),
    (dict(dim=0), ValueError, r"dim.*got 0"),
    (dict(scaling="gaussian"), ValueError, r"scaling.*'chi', 'sqrt'.*'gaussian'"),
    (dict(rng=None), TypeError, r"rng.*Generator or an integer seed.*None"),
    (dict(rng=np.random.RandomState(0)), TypeError, r"rng"),
    (dict(orthogonal=1), TypeError, r"orthogonal.*bool"),
])
def test_random_projection_bad_arguments(kwargs, error, pattern):
    full = dict(num_features=4, dim=3, rng=0) | kwargs
    with pytest.raises(error, match=pattern):
        fm.random_projection(**full)


def test_random_projection_requires_rng():
    with pytest.raises(TypeError, match="rng"):
        fm.random_projection(4, 3)


X = np.ones((2, 5, 3))
W = np.ones((4, 3))


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: fm.favor_positive(X, np.ones((4, 2)), role="query"), ValueError,
     r"projection.*\(m, 3\).*x of shape \(2, 5, 3\).*got shape \(4, 2\)"),
    (lambda: fm.favor_trig(X, np.ones(3)), ValueError, r"projection.*got shape \(3,\)"),
    (lambda: fm.favor_positive(X, np.ones((0, 3)), role="key"), ValueError, r"projection.*m >= 1"),
    (lambda: fm.favor_positive(X, xs.asarray(W), role="key"), TypeError, r"one array library"),
    (lambda: fm.favor_positive(X, W, role="value"), ValueError, r"role.*'query', 'key'.*'value'"),
    (lambda: fm.favor_positive(X, W), TypeError, r"role"),
    (lambda: fm.favor_positive(X, W, role="key", eps=-1e-6), ValueError, r"eps.*>= 0"),
    (lambda: fm.favor_positive(X, W, role="key", eps="1e-6"), TypeError, r"eps.*real"),
    (lambda: fm.favor_positive(X, W, role="key", stabilize=1), TypeError, r"stabilize.*bool"),
    (lambda: fm.favor_positive(X, W, role="key", scale=-1.0), ValueError, r"scale.*positive"),
    (lambda: fm.favor_positive(X, W, role="key", cu_seqlens=[0, 2, 4]), ValueError, r"cu_seqlens.*T=5.*\(0, 2, 4\)"),
    (lambda: fm.favor_positive(X, W, role="key", cu_seqlens=[0, 3, 2, 5]), ValueError, r"cu_seqlens.*non-decreasing"),
    (lambda: fm.favor_positive(X, W, role="key", cu_seqlens="0,5"), TypeError, r"cu_seqlens"),
    (lambda: fm.favor_positive_vjp(X, np.ones((2, 5, 3)), W, role="key"), ValueError,
     r"dphi.*\(2, 5, 4\).*got shape \(2, 5, 3\)"),
    (lambda: fm.elu_plus_one(np.ones((2, 3), dtype=np.int64)), TypeError, r"x.*floating.*int64"),
    (lambda: fm.relu(np.ones(3)), ValueError, r"x.*\(\.\.\., T, D\).*got shape \(3,\)"),
    (lambda: fm.identity([[1.0]]), TypeError, r"x must be an array.*list"),
    (lambda: fm.taylor_features_vjp(X, np.ones((2, 5, 12))), ValueError, r"dphi.*\(2, 5, 13\)"),
    (lambda: fm.relu_vjp(X, np.ones((2, 5, 3), dtype=np.int32)), TypeError, r"dphi.*floating"),
    (lambda: fm.cosformer_features(X, [0, 1, 2], 5), ValueError, r"positions.*\(5,\).*got shape \(3,\)"),
    (lambda: fm.cosformer_features(X, np.arange(5.0), 5), TypeError, r"positions.*integers.*float64"),
    (lambda: fm.cosformer_features(X, [0, 1, 2, 3, 6], 5), ValueError, r"positions.*\[0, 5\]"),
    (lambda: fm.cosformer_features(X, [0, 1, 2, 3, -1], 5), ValueError, r"positions.*\[0, 5\]"),
    (lambda: fm.cosformer_features(X, range(5), 0), ValueError, r"max_len.*positive integer"),
    (lambda: fm.cosformer_features(X, "01234", 5), TypeError, r"positions"),
])
def test_bad_feature_map_arguments(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()
