"""Properties of the exact softmax reference (linattn.softmax)."""

import itertools
import math

import numpy as np
import pytest
from helpers import logit_magnitude
from hypothesis import given
from hypothesis import strategies as st

import linattn
from linattn.testing import assert_close, reference, tolerance
from linattn.testing.strategies import attention_problems

RNG = np.random.default_rng(1234)


def randn(*shape):
    return RNG.standard_normal(shape)


def naive_attention(q, k, v, bias):
    """The definition, one query and one head at a time, (B, T, H, D) layout; bias (B, H, T, S)."""
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    out = np.zeros((B, T, Hq, v.shape[-1]))
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(T):
                s = q[b, i, h] @ k[b, :, g].T / math.sqrt(q.shape[-1]) + bias[b, h, i]
                if np.all(np.isneginf(s)):
                    continue
                p = np.exp(s - s.max())
                out[b, i, h] = p @ v[b, :, g] / p.sum()
    return out


def test_matches_the_naive_definition_with_every_option():
    B, T, S, Hq, Hkv, Dk, Dv = 2, 5, 7, 4, 2, 3, 6
    q, k, v = randn(B, T, Hq, Dk), randn(B, S, Hkv, Dk), randn(B, S, Hkv, Dv)
    slopes = linattn.alibi_slopes(Hq)
    mask = randn(B, 1, T, S)
    window = (3, 1)
    position = np.arange(T)[:, None] + (S - T)
    j = np.arange(S)[None, :]
    visible = (j <= position) & (j >= position - window[0]) & (j <= position + window[1])
    bias = np.where(visible, -slopes[None, :, None, None] * np.abs(position - j) + mask, -np.inf)
    o = linattn.softmax_attention(q, k, v, causal=True, window=window, alibi_slopes=slopes, mask=mask)
    # float64 both ways; reductions over S=7 keys
    assert_close(o, naive_attention(q, k, v, bias), reduction_length=S)


def test_causal_aligns_bottom_right_when_s_exceeds_t():
    q, k, v = randn(1, 6, 2, 4), randn(1, 6, 2, 4), randn(1, 6, 2, 4)
    full = linattn.softmax_attention(q, k, v, causal=True)
    last_two = linattn.softmax_attention(q[:, 4:], k, v, causal=True)
    # the same rows computed from the same dot products; only rounding of the row sums differs
    assert_close(last_two, full[:, 4:], reduction_length=6)


def test_query_with_no_visible_key_gives_zeros_and_minus_inf_lse():
    # T > S with causal: queries 0..T-S-1 sit before every key.
    q, k, v = randn(1, 5, 2, 3), randn(1, 2, 2, 3), randn(1, 2, 2, 3)
    o, lse = linattn.softmax_attention(q, k, v, causal=True, return_lse=True)
    assert np.all(o[:, :3] == 0) and np.all(np.isneginf(lse[:, :, :3]))
    assert np.all(np.isfinite(o)) and np.all(np.isfinite(lse[:, :, 3:]))
    dq, dk, dv = linattn.softmax_attention_vjp(q, k, v, randn(1, 5, 2, 3), causal=True)
    assert np.all(dq[:, :3] == 0) and all(np.all(np.isfinite(g)) for g in (dq, dk, dv))


def test_fully_masked_rows_from_a_mask_give_zeros_not_nan():
    q = randn(1, 4, 1, 3)
    mask = np.ones((4, 4), dtype=bool)
    mask[2] = False
    o, lse = linattn.softmax_attention(q, q, q, mask=mask, return_lse=True)
    assert np.all(o[:, 2] == 0) and np.isneginf(lse[0, 0, 2]) and not np.isnan(o).any()


def test_no_keys_at_all_gives_zeros():
    o, lse = linattn.softmax_attention(randn(1, 3, 1, 2), randn(1, 0, 1, 2), randn(1, 0, 1, 5), return_lse=True)
    assert o.shape == (1, 3, 1, 5) and np.all(o == 0) and np.all(np.isneginf(lse))


@given(attention_problems(windows=False, causal=False, varlen=False, layouts=("bthd",)), st.data())
def test_window_covering_everything_equals_no_window(problem, data):
    T, S = problem.q.shape[1], problem.k.shape[1]
    reach = data.draw(st.integers(T + S, T + S + 3))
    kwargs = dict(problem.kwargs)
    wide = linattn.softmax_attention(problem.q, problem.k, problem.v, window=(reach, None), **kwargs)
    none = linattn.softmax_attention(problem.q, problem.k, problem.v, **kwargs)
    # the window hides nothing, so both compute the same floating-point operations
    np.testing.assert_array_equal(wide, none)


@given(attention_problems(varlen=False, layouts=("bthd",)))
def test_gqa_equals_mha_with_repeated_kv_heads(problem):
    q, k, v = problem.q, problem.k, problem.v
    group = q.shape[2] // k.shape[2]
    repeated = linattn.softmax_attention(q, np.repeat(k, group, axis=2), np.repeat(v, group, axis=2), **problem.kwargs)
    grouped = linattn.softmax_attention(q, k, v, **problem.kwargs)
    # float64; both reduce over S keys; the logits' size scales rounding in exp
    assert_close(grouped, repeated, reduction_length=k.shape[1], condition=logit_magnitude(problem))


@given(attention_problems(causal=False, masks=False, windows=False, alibi=False, varlen=False, layouts=("bthd",)),
       st.randoms(use_true_random=False))
def test_non_causal_permuting_keys_and_values_together_leaves_output_unchanged(problem, random):
    perm = list(range(problem.k.shape[1]))
    random.shuffle(perm)
    o = linattn.softmax_attention(problem.q, problem.k, problem.v, **problem.kwargs)
    permuted = linattn.softmax_attention(problem.q, problem.k[:, perm], problem.v[:, perm], **problem.kwargs)
    # the same terms summed in another order: rounding of an S-term sum, scaled by the logits
    assert_close(permuted, o, reduction_length=problem.k.shape[1], condition=logit_magnitude(problem))


@given(attention_problems(causal=False, masks=False, windows=False, alibi=False, varlen=False, layouts=("bthd",)),
       st.randoms(use_true_random=False))
def test_non_causal_permuting_queries_permutes_the_output(problem, random):
    perm = list(range(problem.q.shape[1]))
    random.shuffle(perm)
    o = linattn.softmax_attention(problem.q, problem.k, problem.v, **problem.kwargs)
    permuted = linattn.softmax_attention(problem.q[:, perm], problem.k, problem.v, **problem.kwargs)
    # each row is computed from the same numbers, only in another place
    assert_close(permuted, o[:, perm], reduction_length=problem.k.shape[1])


@given(attention_problems(causal=True, cross=False, varlen=False, layouts=("bthd",)), st.data())
def test_causal_prefix_is_unchanged_by_later_inputs(problem, data):
    T = problem.q.shape[1]
    P = data.draw(st.integers(0, T - 1))
    q, k, v = (x.copy() for x in (problem.q, problem.k, problem.v))
    for x in (q, k, v):
        x[:, P + 1:] = RNG.standard_normal(x[:, P + 1:].shape) * 10
    kwargs = {**problem.kwargs, "mask": None}  # a mask may hold future-dependent entries by design
    before = linattn.softmax_attention(problem.q, problem.k, problem.v, **kwargs)
    after = linattn.softmax_attention(q, k, v, **kwargs)
    # rows <= P read only entries <= P; later entries are hidden by exp(-inf) = 0 exactly
    np.testing.assert_array_equal(after[:, : P + 1], before[:, : P + 1])


@given(attention_problems(varlen=True, layouts=("bthd",)).filter(lambda p: "cu_seqlens" in p.kwargs))
def test_cu_seqlens_equals_running_each_segment_alone(problem):
    kwargs = dict(problem.kwargs)
    cu = kwargs.pop("cu_seqlens")
    mask = kwargs.pop("mask", None)
    o, lse = linattn.softmax_attention(problem.q, problem.k, problem.v, cu_seqlens=cu, mask=mask,
                                       return_lse=True, **kwargs)
    for lo, hi in itertools.pairwise(cu):
        seg_mask = None
        if mask is not None:
            seg_mask = mask
            if mask.ndim >= 2 and mask.shape[-1] != 1:
                seg_mask = seg_mask[..., lo:hi]
            if mask.ndim >= 2 and mask.shape[-2] != 1:
                seg_mask = seg_mask[..., lo:hi, :]
        alone, alone_lse = linattn.softmax_attention(
            problem.q[:, lo:hi], problem.k[:, lo:hi], problem.v[:, lo:hi], mask=seg_mask, return_lse=True, **kwargs
        )
        # the same segment computed the same way
        np.testing.assert_array_equal(o[:, lo:hi], alone)
        np.testing.assert_array_equal(lse[:, :, lo:hi], alone_lse)


@given(attention_problems(varlen=False))
def test_bhtd_layout_equals_bthd_transposed(problem):
    o = linattn.softmax_attention(problem.q, problem.k, problem.v, **problem.kwargs)
    other = "bthd" if problem.layout == "bhtd" else "bhtd"
    t = (0, 2, 1, 3)
    kwargs = {**problem.kwargs, "layout": other}
    o_other = linattn.softmax_attention(problem.q.transpose(t), problem.k.transpose(t), problem.v.transpose(t),
                                        **kwargs)
    # The same sums on transposed views, but BLAS may order them differently for another
    # stride (seen: 1 ulp at T = 1, S = 4): 8ε·sqrt(S)·κ of max|v|, κ the logits' size.
    keys = problem.k.shape[1 if problem.layout == "bthd" else 2]
    atol = tolerance(np.float64, keys, logit_magnitude(problem)) * float(np.max(np.abs(problem.v), initial=0.0))
    np.testing.assert_allclose(o_other.transpose(t), o, rtol=0, atol=atol)


def test_boolean_mask_equals_additive_minus_inf_mask():
    q, k, v = randn(2, 4, 2, 3), randn(2, 6, 2, 3), randn(2, 6, 2, 3)
    allowed = RNG.random((2, 2, 4, 6)) < 0.7
    additive = np.where(allowed, 0.0, -np.inf)
    a = linattn.softmax_attention(q, k, v, mask=allowed)
    b = linattn.softmax_attention(q, k, v, mask=additive)
    # hiding by where(-inf) and by adding -inf give identical exponentials (0) and adding 0.0 is exact
    np.testing.assert_array_equal(a, b)


def test_alibi_equals_its_additive_bias():
    T, S, H = 4, 6, 3
    q, k, v = randn(1, T, H, 5), randn(1, S, H, 5), randn(1, S, H, 5)
    slopes = linattn.alibi_slopes(H)
    distance = np.abs(np.arange(T)[:, None] + (S - T) - np.arange(S)[None, :])
    bias = -slopes[:, None, None] * distance
    a = linattn.softmax_attention(q, k, v, alibi_slopes=slopes)
    b = linattn.softmax_attention(q, k, v, mask=bias)
    # the same bias, added in the same order
    assert_close(a, b, reduction_length=S)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 12, 16, 24, 31])
def test_alibi_slopes_follow_the_papers_rule(n):
    slopes = linattn.alibi_slopes(n)
    power = 2 ** math.floor(math.log2(n))
    first = [2 ** (-8 * (h + 1) / power) for h in range(power)]
    rest = [2 ** (-8 * (h + 1) / (2 * power)) for h in range(0, 2 * (n - power), 2)]
    # powers of two are computed exactly; the rest to the last bit of pow()
    np.testing.assert_allclose(slopes, first + rest, rtol=1e-15)
    assert slopes.shape == (n,) and len(set(slopes.tolist())) == n


def test_alibi_slopes_of_eight_heads_are_powers_of_one_half():
    np.testing.assert_array_equal(linattn.alibi_slopes(8), 0.5 ** np.arange(1, 9))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@given(problem=attention_problems(varlen=False, masks=False, large_magnitude=True))
def test_low_precision_inputs_return_their_dtype_and_match_float64(dtype, problem):
    q, k, v = (x.astype(dtype) for x in (problem.q, problem.k, problem.v))
    kwargs = dict(problem.kwargs)
    o, lse = linattn.softmax_attention(q, k, v, return_lse=True, **kwargs)
    assert o.dtype == dtype and lse.dtype == np.float32
    assert np.all(np.isfinite(o))
    desired = reference(linattn.softmax_attention, q, k, v, **kwargs)
    # computed in float32 from the same rounded inputs, then rounded to dtype: float32
    # rounding of logits of this size (κ) plus the final rounding to dtype
    mag = logit_magnitude(problem)
    tol32 = 8 * 2.0**-23 * math.sqrt(k.shape[1]) * mag
    eps_out = float(np.finfo(dtype).eps)
    scale = float(np.max(np.abs(desired), initial=0.0))
    err = np.abs(o.astype(np.float64) - desired)
    assert np.all(err <= (tol32 + eps_out) * (np.abs(desired) + scale)), float(err.max())


@given(attention_problems(varlen=False, masks=False, large_magnitude=False))
def test_logits_of_magnitude_1e4_give_finite_outputs(problem):
    dk = problem.q.shape[-1]
    factor = math.sqrt(1e4 * math.sqrt(dk))  # |scale · q·k| ~ 1e4 for unit-normal entries
    for dtype in (np.float32, np.float64):
        q = (problem.q * factor).astype(dtype)
        k = (problem.k * factor).astype(dtype)
        o, lse = linattn.softmax_attention(q, k, problem.v.astype(dtype), return_lse=True,
                                           **{**problem.kwargs, "scale": None})
        assert np.all(np.isfinite(o)) and not np.any(np.isnan(lse)) and not np.any(np.isposinf(lse))


def test_cu_seqlens_slices_a_full_mask_to_each_segments_diagonal_block():
    cu = [0, 2, 2, 3, 7]
    q, k, v = randn(1, 7, 2, 3), randn(1, 7, 2, 3), randn(1, 7, 2, 4)
    mask = randn(1, 2, 7, 7)
    mask[RNG.random(mask.shape) < 0.2] = -np.inf
    o = linattn.softmax_attention(q, k, v, causal=True, mask=mask, cu_seqlens=cu)
    for lo, hi in itertools.pairwise(cu):
        alone = linattn.softmax_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], causal=True,
                                          mask=mask[..., lo:hi, lo:hi])
        # the same segment computed the same way
        np.testing.assert_array_equal(o[:, lo:hi], alone)
