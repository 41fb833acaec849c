"""Both backward formulas equal central finite differences of the forward (float64)."""

import numpy as np
import pytest

import linattn
from linattn.testing import assert_close, numerical_vjp

CASES = {
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "causal_window_alibi": dict(causal=True, window=(3, None), alibi_slopes=linattn.alibi_slopes(4)),
    "mask": dict(mask=np.array([[True, False, True, True, False]] * 4)),
    "bottom_right": dict(causal=True, cross=True),
}
# Central differences with h = 1e-6 on O(1) inputs: truncation O(h²) ~ 1e-12 and rounding
# O(ε/h) ~ 2e-10 per element, summed over the cotangent's ~40 terms; 1e-7 relative leaves
# a margin of ~50 over that without hiding a wrong term (a missing term is O(1)).
FD_RTOL = 1e-7


def problem(case, gqa):
    rng = np.random.default_rng(7)
    kwargs = dict(CASES[case])
    cross = kwargs.pop("cross", False)
    T, S = (4, 5) if cross or "mask" in kwargs else (5, 5)
    Hq, Hkv = (4, 2) if gqa else (4, 4)
    q = rng.standard_normal((1, T, Hq, 3))
    k = rng.standard_normal((1, S, Hkv, 3))
    v = rng.standard_normal((1, S, Hkv, 2))
    do = rng.standard_normal((1, T, Hq, 2))
    return q, k, v, do, kwargs


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_vjp_equals_finite_differences(case, gqa):
    q, k, v, do, kwargs = problem(case, gqa)
    expected = numerical_vjp(lambda q, k, v: linattn.softmax_attention(q, k, v, **kwargs), [q, k, v], do)
    grads = linattn.softmax_attention_vjp(q, k, v, do, **kwargs)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        assert_close(g, e, rtol=FD_RTOL, atol=FD_RTOL * np.max(np.abs(e)), err_msg=name)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_backward_equals_finite_differences(case, gqa):
    q, k, v, do, kwargs = problem(case, gqa)
    expected = numerical_vjp(lambda q, k, v: linattn.flash_attention(q, k, v, **kwargs)[0], [q, k, v], do)
    o, lse = linattn.flash_attention(q, k, v, block_q=2, block_k=3, **kwargs)
    grads = linattn.flash_attention_backward(q, k, v, o, lse, do, block_q=2, block_k=3, **kwargs)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        assert_close(g, e, rtol=FD_RTOL, atol=FD_RTOL * np.max(np.abs(e)), err_msg=name)


def test_gradients_with_cu_seqlens_equal_finite_differences():
    rng = np.random.default_rng(3)
    q, k, v, do = (rng.standard_normal((1, 6, 2, 3)) for _ in range(4))
    kwargs = dict(causal=True, cu_seqlens=[0, 0, 1, 4, 6])
    expected = numerical_vjp(lambda q, k, v: linattn.softmax_attention(q, k, v, **kwargs), [q, k, v], do)
    o, lse = linattn.flash_attention(q, k, v, **kwargs)
    for grads in (linattn.softmax_attention_vjp(q, k, v, do, **kwargs),
                  linattn.flash_attention_backward(q, k, v, o, lse, do, block_q=2, block_k=2, **kwargs)):
        for g, e in zip(grads, expected, strict=True):
            assert_close(g, e, rtol=FD_RTOL, atol=FD_RTOL * np.max(np.abs(e)))
