"""Linformer (linattn.linformer) and its Theorem 1 bound (linattn.bounds.linformer)."""

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import linattn
from linattn.bounds.linformer import (
    jl_inner_product_failure_bound,
    linformer_failure_bound,
    linformer_projection_dim,
    linformer_sketch_variance,
)
from linattn.compare import compared_methods
from linattn.linformer import SHARINGS, linformer_attention, linformer_attention_vjp, linformer_projections
from linattn.testing import assert_close, numerical_vjp, to_numpy, tolerance

# Central differences with h = 1e-6 on O(1) inputs: truncation ~1e-12, rounding ~2e-10 per
# element; 1e-7 relative leaves a wide margin without hiding a wrong term (which is O(1)).
FD_RTOL = 1e-7


@dataclass
class Problem:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    E: np.ndarray
    F: np.ndarray
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def layout(self):
        return self.kwargs.get("layout", "bthd")

    def time_axis(self):
        return 1 if self.layout == "bthd" else 2


def make(rng, batch, length, heads, dim, layout):
    x = rng.standard_normal((batch, length, heads, dim))
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)) if layout == "bhtd" else x


@st.composite
def problems(draw, *, cross=True, layouts=("bthd", "bhtd"), sharings=SHARINGS, full_rank=False):
    """q, k, v and projections E, F (n >= S, 1 <= k <= n) for every sharing, GQA ratio and layout."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, S = draw(st.integers(1, 2)), draw(st.integers(1, 10))
    T = draw(st.integers(1, 10)) if cross and draw(st.booleans()) else S
    hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dk = draw(st.integers(1, 6))
    dv = draw(st.integers(1, 6)) if draw(st.booleans()) else dk
    layout, sharing = draw(st.sampled_from(layouts)), draw(st.sampled_from(sharings))
    n = S if full_rank else S + draw(st.integers(0, 4))
    proj = n if full_rank else draw(st.integers(1, n))
    E, F = linformer_projections(proj, n, sharing=sharing, kv_heads=hkv, rng=rng)
    kwargs = {"layout": layout, "sharing": sharing}
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    return Problem(make(rng, batch, T, hkv * group, dk, layout), make(rng, batch, S, hkv, dk, layout),
                   make(rng, batch, S, hkv, dv, layout), E, F, kwargs)


def logit_size(p: Problem) -> float:
    """max |scale · q·(E k)|: the logits' size, the softmax's condition number for absolute logit errors."""
    t = (0, 2, 1, 3) if p.layout == "bhtd" else (0, 1, 2, 3)
    q, k = p.q.transpose(t), p.k.transpose(t)
    S, hkv = k.shape[1], k.shape[2]
    E = p.E if p.E.ndim == 3 else np.broadcast_to(p.E, (hkv, *p.E.shape))
    kp = np.einsum("hrs,bshd->brhd", E[..., :S], k)
    kp = np.repeat(kp, q.shape[2] // hkv, axis=2)
    scale = p.kwargs.get("scale", 1 / math.sqrt(q.shape[-1]))
    return max(1.0, float(np.max(np.abs(np.einsum("bthd,brhd->bhtr", q, kp) * scale), initial=0.0)))


def assert_matches(actual, desired, p, n):
    """Equal up to rounding of n-term sums scaled by the logits' size; the absolute part is
    relative to the terms summed (|F_rs v_s| over n positions), not to a result that may cancel."""
    tol = tolerance(np.float64, n, logit_size(p))
    term = n * float(np.max(np.abs(p.F))) * float(np.max(np.abs(p.v), initial=0.0))
    assert_close(actual, desired, rtol=tol, atol=tol * max(term, float(np.max(np.abs(desired), initial=0.0))))


# ---- exactness with identity projections ----


@given(problems(full_rank=True))
def test_identity_projections_of_full_rank_equal_softmax_exactly(p):
    S, hkv = p.k.shape[p.time_axis()], p.k.shape[2 if p.layout == "bthd" else 1]
    eye = np.eye(S) if p.kwargs["sharing"] != "none" else np.broadcast_to(np.eye(S), (hkv, S, S)).copy()
    p.E, p.F = eye, eye
    o = linformer_attention(p.q, p.k, p.v, E=eye, F=None if p.kwargs["sharing"] == "kv" else eye, **p.kwargs)
    kwargs = {name: value for name, value in p.kwargs.items() if name != "sharing"}
    # I K = K bit for bit (products with 1 and 0 are exact); the same softmax then runs on copies laid
    # out differently in memory, which BLAS may sum in another order: rounding of S-term sums
    assert_matches(o, linattn.softmax_attention(p.q, p.k, p.v, **kwargs), p, S)


# ---- shorter sequences, sharing, heads, layouts, segments ----


@given(problems(cross=False, layouts=("bthd",)), st.data())
def test_shorter_sequence_equals_zero_padding_to_max_len(p, data):
    n = p.E.shape[-1]
    S = p.k.shape[1]
    pad = ((0, 0), (0, n - S), (0, 0), (0, 0))
    o = linformer_attention(p.q, p.k, p.v, E=p.E, F=p.F, **p.kwargs)
    padded = linformer_attention(p.q, np.pad(p.k, pad), np.pad(p.v, pad), E=p.E, F=p.F, **p.kwargs)
    # E[:, :S] K and E [K; 0] sum the same nonzero products, possibly grouped differently (n-term sums)
    assert_matches(o, padded, p, n)


@given(problems(sharings=("headwise",)))
def test_kv_sharing_equals_headwise_with_f_equal_to_e(p):
    kwargs = {**p.kwargs, "sharing": "kv"}
    shared = linformer_attention(p.q, p.k, p.v, E=p.E, **kwargs)
    same = linformer_attention(p.q, p.k, p.v, E=p.E, F=p.E, **p.kwargs)
    # the same products in the same order
    np.testing.assert_array_equal(shared, same)


@given(problems(sharings=("headwise",)))
def test_no_sharing_with_equal_per_head_projections_equals_headwise(p):
    hkv = p.k.shape[2 if p.layout == "bthd" else 1]
    per_head = {name: np.broadcast_to(x, (hkv, *x.shape)).copy() for name, x in (("E", p.E), ("F", p.F))}
    o = linformer_attention(p.q, p.k, p.v, **per_head, **{**p.kwargs, "sharing": "none"})
    # the same (k, S) @ (S, D) products per head, batched differently
    assert_matches(o, linformer_attention(p.q, p.k, p.v, E=p.E, F=p.F, **p.kwargs), p, p.E.shape[-1])


@given(problems(layouts=("bthd",)))
def test_gqa_equals_mha_with_repeated_kv_heads_and_projections(p):
    group = p.q.shape[2] // p.k.shape[2]
    k, v = np.repeat(p.k, group, axis=2), np.repeat(p.v, group, axis=2)
    E, F = (np.repeat(x, group, axis=0) if p.kwargs["sharing"] == "none" else x for x in (p.E, p.F))
    grouped = linformer_attention(p.q, p.k, p.v, E=p.E, F=p.F, **p.kwargs)
    # query head h reads kv head h // group: the same numbers, batched differently
    assert_matches(grouped, linformer_attention(p.q, k, v, E=E, F=F, **p.kwargs), p, p.E.shape[-1])


@given(problems(layouts=("bthd",)))
def test_bhtd_layout_equals_bthd_transposed(p):
    t = (0, 2, 1, 3)
    o = linformer_attention(p.q, p.k, p.v, E=p.E, F=p.F, **p.kwargs)
    other = linformer_attention(p.q.transpose(t), p.k.transpose(t), p.v.transpose(t), E=p.E, F=p.F,
                                **{**p.kwargs, "layout": "bhtd"})
    # identical arithmetic on transposed arrays; BLAS may block the products differently
    assert_matches(other.transpose(t), o, p, p.E.shape[-1])


@given(st.lists(st.one_of(st.just(0), st.just(1), st.integers(0, 8)), min_size=1, max_size=4),
       st.sampled_from(SHARINGS), st.integers(0, 2**32 - 1), st.integers(0, 3))
def test_cu_seqlens_equals_running_each_segment_alone(lengths, sharing, seed, extra):
    rng = np.random.default_rng(seed)
    cu = [0, *np.cumsum(lengths).tolist()]
    T, n = cu[-1], max(max(lengths), 1) + extra
    q, k, v = rng.standard_normal((1, T, 4, 3)), rng.standard_normal((1, T, 2, 3)), rng.standard_normal((1, T, 2, 5))
    E, F = linformer_projections(int(rng.integers(1, n + 1)), n, sharing=sharing, kv_heads=2, rng=rng)
    o = linformer_attention(q, k, v, E=E, F=F, sharing=sharing, cu_seqlens=cu)
    for lo, hi in itertools.pairwise(cu):
        alone = linformer_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], E=E, F=F, sharing=sharing)
        # the same segment computed by the same operations (on differently strided copies)
        segment = Problem(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], E, F, {"sharing": sharing})
        assert_matches(o[:, lo:hi], alone, segment, n)


# ---- projections drawn from rng ----


def test_projections_are_standard_normal_over_sqrt_k_e_before_f():
    E, F = linformer_projections(3, 7, sharing="none", kv_heads=2, rng=5)
    rng = np.random.default_rng(5)
    expected_E = rng.standard_normal((2, 3, 7)) / math.sqrt(3)
    expected_F = rng.standard_normal((2, 3, 7)) / math.sqrt(3)
    np.testing.assert_array_equal(E, expected_E)  # the documented draw, bit for bit
    np.testing.assert_array_equal(F, expected_F)
    E, F = linformer_projections(3, 7, sharing="kv", rng=5)
    assert F is E and E.shape == (3, 7)


def test_drawn_projections_equal_the_public_draws_of_the_same_seed():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((2, 9, 2, 3)), rng.standard_normal((2, 9, 2, 3))
    for sharing in SHARINGS:
        drawn = linformer_attention(q, k, v, proj_dim=4, max_len=12, sharing=sharing, rng=11)
        E, F = linformer_projections(4, 12, sharing=sharing, kv_heads=2, rng=11)
        given_ = linformer_attention(q, k, v, E=E, F=F, sharing=sharing)
        np.testing.assert_array_equal(drawn, given_)  # the same draws feed the same computation


def test_default_sizes_are_min_256_n_and_the_sequence_length():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 300, 1, 2)) for _ in range(3))
    drawn = linformer_attention(q, k, v, rng=3)
    E, F = linformer_projections(256, 300, rng=3)
    np.testing.assert_array_equal(drawn, linformer_attention(q, k, v, E=E, F=F))  # same draws, same operations


# ---- gradients ----


def grad_problem(sharing, gqa, seed=0):
    rng = np.random.default_rng(seed)
    hq, hkv = (4, 2) if gqa else (2, 2)
    q, do = rng.standard_normal((1, 4, hq, 3)), rng.standard_normal((1, 4, hq, 2))
    k, v = rng.standard_normal((1, 5, hkv, 3)), rng.standard_normal((1, 5, hkv, 2))
    E, F = linformer_projections(3, 6, sharing=sharing, kv_heads=hkv, rng=rng)
    return q, k, v, do, E, F


def assert_fd_close(grads, expected):
    for name, g, e in zip(("dq", "dk", "dv", "dE", "dF"), grads, expected, strict=False):
        assert_close(g, e, rtol=FD_RTOL, atol=FD_RTOL * np.max(np.abs(e)), err_msg=name)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("sharing", SHARINGS)
def test_vjp_equals_finite_differences(sharing, gqa):
    q, k, v, do, E, F = grad_problem(sharing, gqa)
    F = None if sharing == "kv" else F
    kw = dict(E=E, F=F, sharing=sharing)
    expected = numerical_vjp(lambda q, k, v: linformer_attention(q, k, v, **kw), [q, k, v], do)
    assert_fd_close(linformer_attention_vjp(q, k, v, do, **kw), expected)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_projection_gradients_equal_finite_differences(sharing):
    q, k, v, do, E, F = grad_problem(sharing, gqa=True, seed=1)
    if sharing == "kv":  # one matrix used twice: its gradient has both contributions
        expected = numerical_vjp(lambda E: linformer_attention(q, k, v, E=E, sharing="kv"), [E], do)
        *_, dE, dF = linformer_attention_vjp(q, k, v, do, E=E, sharing="kv", projection_grads=True)
        assert dF is None
        assert_fd_close([dE], expected)
        return
    expected = numerical_vjp(lambda E, F: linformer_attention(q, k, v, E=E, F=F, sharing=sharing), [E, F], do)
    *_, dE, dF = linformer_attention_vjp(q, k, v, do, E=E, F=F, sharing=sharing, projection_grads=True)
    assert_fd_close([dE, dF], expected)
    assert np.all(dE[..., 5:] == 0) and np.all(dF[..., 5:] == 0)  # columns past S = 5 are unused


def test_gradients_with_cu_seqlens_equal_finite_differences():
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.standard_normal((1, 6, 2, 3)) for _ in range(4))
    E, F = linformer_projections(2, 4, sharing="none", kv_heads=2, rng=rng)
    kw = dict(E=E, F=F, sharing="none", cu_seqlens=[0, 0, 1, 4, 6])
    expected = numerical_vjp(lambda q, k, v, E, F: linformer_attention(q, k, v, **{**kw, "E": E, "F": F}),
                             [q, k, v, E, F], do)
    assert_fd_close(linformer_attention_vjp(q, k, v, do, projection_grads=True, **kw), expected)


# ---- dtypes and other array libraries ----


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_return_their_dtype(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 8, 2, 4)).astype(dtype) for _ in range(3))
    o = linformer_attention(q, k, v, proj_dim=4, rng=0)
    assert o.dtype == dtype and np.all(np.isfinite(o))
    exact = linformer_attention(*(x.astype(np.float64) for x in (q, k, v)), proj_dim=4, rng=0)
    # computed in float32 from the same rounded inputs, then rounded to dtype
    np.testing.assert_allclose(o.astype(np.float64), exact, rtol=0, atol=8 * float(np.finfo(dtype).eps) * 4)


@given(problems())
def test_runs_on_array_api_strict_with_the_numpy_result(p):
    o = linformer_attention(*(xs.asarray(x) for x in (p.q, p.k, p.v)), E=xs.asarray(p.E), F=xs.asarray(p.F),
                            **p.kwargs)
    assert isinstance(o, xs._array_object.Array)
    # the same operations on the same float64 values in the same order
    np.testing.assert_array_equal(to_numpy(o), linformer_attention(p.q, p.k, p.v, E=p.E, F=p.F, **p.kwargs))
    do = np.cos(np.arange(p.q.shape[0] * p.q.shape[1] * p.q.shape[2] * p.v.shape[-1], dtype=float))
    do = do.reshape(*p.q.shape[:3], p.v.shape[-1])
    strict = linformer_attention_vjp(*(xs.asarray(x) for x in (p.q, p.k, p.v, do)), E=xs.asarray(p.E),
                                     F=xs.asarray(p.F), **p.kwargs)
    for got, want in zip(strict, linformer_attention_vjp(p.q, p.k, p.v, do, E=p.E, F=p.F, **p.kwargs), strict=True):
        np.testing.assert_array_equal(to_numpy(got), want)  # same operations, same order


def test_registered_in_compare_without_a_causal_form():
    method = compared_methods()["linformer"]
    assert not method.supports_causal
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 20, 2, 4)).astype(np.float32) for _ in range(3))
    assert method.run(q, k, v, causal=False).shape == (1, 20, 2, 4)


# ---- bad arguments ----


def qkv(T=6, S=6, hq=4, hkv=2):
    rng = np.random.default_rng(0)
    return rng.standard_normal((1, T, hq, 3)), rng.standard_normal((1, S, hkv, 3)), rng.standard_normal((1, S, hkv, 3))


def test_causal_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"(?s)(?=.*causal)(?=.*future)(?=.*E)"):
        linformer_attention(*qkv(), proj_dim=2, rng=0, causal=True)
    with pytest.raises(ValueError, match="causal"):
        linformer_attention_vjp(*qkv(), qkv()[0], proj_dim=2, rng=0, causal=True)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(proj_dim=9, max_len=8, rng=0), r"(?=.*proj_dim)(?=.*9)(?=.*max_len)"),
    (dict(proj_dim=0, max_len=8, rng=0), r"(?=.*proj_dim)(?=.*0)"),
    (dict(proj_dim=-2, max_len=8, rng=0), r"(?=.*proj_dim)(?=.*-2)"),
    (dict(proj_dim=2, max_len=5, rng=0), r"(?=.*T=6)(?=.*max_len=5)"),
    (dict(max_len=0, rng=0), r"(?=.*max_len)(?=.*0)"),
    (dict(proj_dim=2, rng=0, sharing="layerwise"), r"(?=.*sharing)(?=.*layerwise)(?=.*caller)"),
    (dict(E=np.ones((2, 6))), r"(?=.*F)(?=.*E)"),
    (dict(F=np.ones((2, 6))), r"(?=.*F)(?=.*E)"),
    (dict(E=np.ones((2, 6)), F=np.ones((3, 6))), r"(?=.*E)(?=.*F)(?=.*\(2, 6\))(?=.*\(3, 6\))"),
    (dict(E=np.ones((1, 2, 6)), F=np.ones((1, 2, 6))), r"(?=.*E)(?=.*\(k, n\))(?=.*\(1, 2, 6\))"),
    (dict(E=np.ones((3, 2, 6)), F=np.ones((3, 2, 6)), sharing="none"), r"(?=.*E)(?=.*\(2, k, n\))(?=.*\(3, 2, 6\))"),
    (dict(E=np.ones((2, 5)), F=np.ones((2, 5))), r"(?=.*T=6)(?=.*max_len=5)"),
    (dict(E=np.ones((7, 6)), F=np.ones((7, 6))), r"(?=.*proj_dim)(?=.*7)"),
    (dict(E=np.ones((2, 6)), F=np.ones((2, 6)), proj_dim=3), r"(?=.*proj_dim=3)(?=.*\(2, 6\))"),
    (dict(E=np.ones((2, 6)), F=np.zeros((2, 6)), sharing="kv"), r"(?=.*kv)(?=.*F)"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, pattern):
    with pytest.raises(ValueError, match="(?s)" + pattern):
        linformer_attention(*qkv(), **kwargs)


def test_missing_rng_names_rng_and_says_when_it_is_needed():
    with pytest.raises(TypeError, match=r"(?s)(?=.*rng)(?=.*E and F)"):
        linformer_attention(*qkv(), proj_dim=2)
    with pytest.raises(TypeError, match="rng"):
        linformer_projections(2, 4, rng=None)


def test_projections_of_another_library_or_dtype_are_type_errors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="E"):
        linformer_attention(q, k, v, E=np.ones((2, 6), dtype=int), F=np.ones((2, 6), dtype=int))
    with pytest.raises(TypeError, match="one array library"):
        linformer_attention(q, k, v, E=xs.ones((2, 6)), F=xs.ones((2, 6)))


# ---- Theorem 1 (linattn.bounds.linformer) ----


def test_projection_dim_is_theorem_1s_formula():
    assert linformer_projection_dim(512, 0.5) == math.ceil(5 * math.log(512) / 0.125) == 250
    assert linformer_projection_dim(512, 0.5, value_dim=64) == math.ceil(5 * math.log(512 * 64) / 0.125)
    assert linformer_projection_dim(1, 0.5) == 1
    for n, eps in itertools.product([2, 100, 4096, 10**6], [0.1, 0.3, 0.5, 0.6, 2 / 3, 0.9]):
        k = linformer_projection_dim(n, eps)
        # at that k, e^{-(eps^2 - eps^3) k / 4} <= n^{-5/4}, so the union bound is at most 4 n^{-1/4}
        assert linformer_failure_bound(n, k, eps) <= 4 * n**-0.25 * (1 + 1e-12)


@pytest.mark.parametrize("bad", [dict(n=0, eps=0.5), dict(n=4, eps=0.0), dict(n=4, eps=1.0), dict(n=4, eps=-0.1)])
def test_projection_dim_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match=r"^(n|eps) "):
        linformer_projection_dim(**bad)


def test_jl_bound_dominates_the_exact_chi_square_tail():
    # For w = u, u Rᵀ R u / |u|² = χ²_k / k exactly, so the failure probability is known.
    for k, eps in itertools.product([1, 2, 5, 10, 37, 100, 300, 1000], np.linspace(0.02, 0.98, 25)):
        exact = stats.chi2.sf(k * (1 + eps), k) + stats.chi2.cdf(k * (1 - eps), k)
        assert exact <= jl_inner_product_failure_bound(k, float(eps)), (k, eps, exact)


def sketches(P, w, proj_dim, draws, seed):
    """(P Rᵀ R w) for `draws` projections R drawn by linformer_projections, in chunks."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, draws, 500):
        R, _ = linformer_projections(proj_dim, P.shape[1], sharing="none", kv_heads=min(500, draws - start), rng=rng)
        out.append(np.einsum("mkn,mk->mn", R, R @ w) @ P.T)  # P (Rᵀ (R w)), never P Rᵀ
    return np.concatenate(out)


def context_matrix(n, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, n, 1, 8)), rng.standard_normal((1, n, 1, 8))
    return linattn.softmax_attention(q, k, np.eye(n)[None, :, None, :])[0, :, 0, :], rng.standard_normal(n)


def test_sketch_is_unbiased_with_the_stated_variance():
    n, proj_dim, draws = 48, 12, 4000
    P, w = context_matrix(n, seed=1)
    x = sketches(P, w, proj_dim, draws, seed=2)
    var = linformer_sketch_variance(P, w, proj_dim)
    z = (x.mean(axis=0) - P @ w) / np.sqrt(var / draws)
    # z ~ N(0, 1) per row (CLT over 4000 draws): P(|z| > 5) = 5.7e-7, so over 48 rows
    # this fails by chance with probability < 3e-5
    assert np.max(np.abs(z)) < 5, np.max(np.abs(z))
    # the sample variance's relative standard error is ~sqrt(3/4000) = 0.027 (excess kurtosis <= 1
    # for a sum of 12 Gaussian products); [0.8, 1.25] is > 7 of them: false failure < 1e-6
    ratio = x.var(axis=0, ddof=1) / var
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


def test_draws_follow_the_exact_chi_square_law_in_the_tail():
    n, proj_dim, eps, draws = 32, 16, 0.5, 20000
    u = np.random.default_rng(4).standard_normal(n)
    x = sketches(u[None, :], u, proj_dim, draws, seed=5)[:, 0] / (u @ u)  # = χ²_k / k
    failures = int(np.sum(np.abs(x - 1) > eps))
    p = stats.chi2.sf(proj_dim * (1 + eps), proj_dim) + stats.chi2.cdf(proj_dim * (1 - eps), proj_dim)
    # two-sided exact binomial test at level 1e-6: the false-failure rate
    assert stats.binomtest(failures, draws, p).pvalue > 1e-6, (failures / draws, p)
    assert p <= jl_inner_product_failure_bound(proj_dim, eps)


def test_theorem_1_event_fails_no_more_often_than_its_bound():
    n, eps, draws = 256, 0.6, 300
    k = linformer_projection_dim(n, eps)  # 193 <= n
    P, w = context_matrix(n, seed=6)
    x = sketches(P, w, k, draws, seed=7)
    allowed = eps * np.linalg.norm(P, axis=1) * np.linalg.norm(w)
    failures = int(np.sum(np.any(np.abs(x - P @ w) > allowed, axis=1)))
    bound = linformer_failure_bound(n, k, eps)
    # if P(fail) <= bound, seeing this many failures or more has probability >= 1e-6 (one-sided
    # binomial): the false-failure rate. The bound (~0.98 here) is loose; the variance test is the sharp one.
    assert stats.binom.sf(failures - 1, draws, bound) > 1e-6, (failures, bound)


def test_papers_literal_event_relative_to_pw_fails_where_the_proved_one_holds():
    # The paper states ||P̃w - Pw|| <= eps ||Pw||; averaging rows of P cancels w, so ||Pw|| is
    # small and that event fails at Theorem 1's k, while the proved per-row event holds.
    n, eps = 256, 0.6
    P, w = context_matrix(n, seed=6)
    x = sketches(P, w, linformer_projection_dim(n, eps), 50, seed=8)
    literal = np.linalg.norm(x - P @ w, axis=1) <= eps * np.linalg.norm(P @ w)
    proved = np.all(np.abs(x - P @ w) <= eps * np.linalg.norm(P, axis=1) * np.linalg.norm(w), axis=1)
    # fixed seeds; measured: the literal event holds in 0 of 50 draws, the proved one in 50 of 50
    assert literal.mean() < 0.5 and proved.all()


def test_sketch_variance_names_mismatched_shapes():
    with pytest.raises(ValueError, match=re.escape("(3,)")):
        linformer_sketch_variance(np.ones((2, 4)), np.ones(3), 2)
