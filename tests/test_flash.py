"""The FlashAttention-2 algorithm (linattn.flash) computes exact softmax attention."""

import numpy as np
from helpers import logit_magnitude
from hypothesis import given
from hypothesis import strategies as st

import linattn
from linattn.testing import assert_close, tolerance
from linattn.testing.strategies import attention_problems


def time_len(x, layout):
    return x.shape[1] if layout == "bthd" else x.shape[2]


def block_sizes(problem):
    """Tile sizes from 1 up to beyond T and S."""
    longest = max(time_len(problem.q, problem.layout), time_len(problem.k, problem.layout))
    return st.integers(1, longest + 3)


@given(attention_problems(), st.data())
def test_forward_equals_softmax_for_every_block_size(problem, data):
    block_q, block_k = data.draw(block_sizes(problem)), data.draw(block_sizes(problem))
    o_ref, lse_ref = linattn.softmax_attention(problem.q, problem.k, problem.v, return_lse=True, **problem.kwargs)
    o, lse = linattn.flash_attention(problem.q, problem.k, problem.v, block_q=block_q, block_k=block_k,
                                     **problem.kwargs)
    # float64; the online softmax reorders an S-term sum and rescales by exp(m_old - m_new),
    # whose rounding grows with the logits' size
    S = time_len(problem.k, problem.layout)
    condition = logit_magnitude(problem)
    assert_close(o, o_ref, reduction_length=S, condition=condition)
    assert_close(lse, lse_ref, reduction_length=S, condition=condition)


@given(attention_problems(), st.data())
def test_backward_equals_the_direct_vjp_for_every_block_size(problem, data):
    block_q, block_k = data.draw(block_sizes(problem)), data.draw(block_sizes(problem))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    o, lse = linattn.flash_attention(problem.q, problem.k, problem.v, **problem.kwargs)
    do = rng.standard_normal(o.shape)
    direct = linattn.softmax_attention_vjp(problem.q, problem.k, problem.v, do, **problem.kwargs)
    tiled = linattn.flash_attention_backward(problem.q, problem.k, problem.v, o, lse, do, block_q=block_q,
                                             block_k=block_k, **problem.kwargs)
    # float64; D = rowsum(dO ⊙ O) replaces rowsum(P ⊙ dP) (equal in exact arithmetic) and dk, dv
    # sum over T queries in tiles; rounding scales with the logits' size. dS = P ⊙ (dP − D)
    # cancels (exactly to 0 for a single visible key), so the absolute tolerance is set by the
    # size of the cancelled terms, |dO|·|V|, times what multiplies dS (scale·|K| or scale·|Q|).
    T, S = time_len(problem.q, problem.layout), time_len(problem.k, problem.layout)
    tol = tolerance(np.float64, T + S, logit_magnitude(problem))
    scale = problem.kwargs.get("scale") or problem.q.shape[-1] ** -0.5
    dp_size = np.max(np.abs(do), initial=0.0) * np.max(np.abs(problem.v), initial=0.0)
    term_sizes = {
        "dq": scale * dp_size * np.max(np.abs(problem.k), initial=0.0),
        "dk": scale * dp_size * np.max(np.abs(problem.q), initial=0.0),
        "dv": np.max(np.abs(do), initial=0.0),
    }
    for (name, size), a, d in zip(term_sizes.items(), tiled, direct, strict=True):
        assert_close(a, d, rtol=tol, atol=tol * size, err_msg=name)


def test_tiles_hidden_by_geometry_are_skipped_without_changing_results():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 64, 2, 8)) for _ in range(3))
    for kwargs in ({"causal": True}, {"window": (5, 3)}, {"causal": True, "window": (7, None)}):
        o_ref = linattn.softmax_attention(q, k, v, **kwargs)
        o, _ = linattn.flash_attention(q, k, v, block_q=8, block_k=8, **kwargs)
        # float64 over at most 64 keys
        assert_close(o, o_ref, reduction_length=64)


def test_key_range_is_the_visible_geometry():
    from linattn._problem import prepare

    q = np.zeros((1, 4, 1, 2))
    k = np.zeros((1, 10, 1, 2))
    base = {"scale": None, "mask": None, "alibi_slopes": None, "layout": "bthd", "cu_seqlens": None,
            "backend": None}
    causal = prepare(q, k, k, causal=True, window=None, **base)
    assert causal.key_range(0, 2) == (0, 8)  # queries 0, 1 sit at positions 6, 7
    windowed = prepare(q, k, k, causal=False, window=(2, 1), **base)
    assert windowed.key_range(1, 3) == (5, 10)  # positions 7, 8: keys 5 .. 9
    assert windowed.key_range(0, 1) == (4, 8)  # position 6: keys 4 .. 7
    assert windowed.key_range(2, 2) == (0, 0)


def test_half_precision_returns_its_dtype_with_float32_lse():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 19, 2, 8)).astype(np.float16) for _ in range(3))
    o, lse = linattn.flash_attention(q, k, v, causal=True, block_q=4, block_k=8)
    assert o.dtype == np.float16 and lse.dtype == np.float32
    o_ref = linattn.softmax_attention(q, k, v, causal=True)
    # both compute in float32 from the same float16 inputs and round to float16 at the end;
    # the two float32 paths differ by ~1e-7, so the float16 results differ by at most one ulp
    assert_close(o, o_ref, dtype=np.float16)
    grads = linattn.flash_attention_backward(q, k, v, o, lse, np.ones_like(o), causal=True)
    assert all(g.dtype == np.float16 and np.all(np.isfinite(g)) for g in grads)
