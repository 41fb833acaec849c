"""The reference code uses only the array API standard: it runs on array-api-strict arrays.

array-api-strict implements the standard and nothing more (no NumPy extras, no implicit
conversions), so every public function returning the NumPy answer on its arrays proves
the code path is portable to any conforming library (CuPy among them).
"""

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import linattn
from linattn.testing import to_numpy
from linattn.testing.strategies import attention_problems


def strict_kwargs(kwargs):
    out = dict(kwargs)
    for name in ("mask", "alibi_slopes"):
        if out.get(name) is not None:
            out[name] = xs.asarray(out[name])
    if "cu_seqlens" in out:
        out["cu_seqlens"] = xs.asarray(np.asarray(out["cu_seqlens"], dtype=np.int64))
    return out


def assert_same(strict_result, numpy_result):
    assert isinstance(strict_result, xs._array_object.Array)
    # the same operations on the same float64 values in the same order
    np.testing.assert_array_equal(to_numpy(strict_result), numpy_result)


@given(attention_problems(), st.integers(1, 8), st.integers(1, 8))
def test_forward_passes_run_on_array_api_strict(problem, block_q, block_k):
    q, k, v = (xs.asarray(x) for x in (problem.q, problem.k, problem.v))
    kw = strict_kwargs(problem.kwargs)
    o, lse = linattn.softmax_attention(q, k, v, return_lse=True, **kw)
    o_np, lse_np = linattn.softmax_attention(problem.q, problem.k, problem.v, return_lse=True, **problem.kwargs)
    assert_same(o, o_np)
    assert_same(lse, lse_np)
    of, lsef = linattn.flash_attention(q, k, v, block_q=block_q, block_k=block_k, **kw)
    of_np, lsef_np = linattn.flash_attention(problem.q, problem.k, problem.v, block_q=block_q, block_k=block_k,
                                             **problem.kwargs)
    assert_same(of, of_np)
    assert_same(lsef, lsef_np)


@given(attention_problems(), st.integers(1, 8), st.integers(1, 8))
def test_backward_passes_run_on_array_api_strict(problem, block_q, block_k):
    o_np, lse_np = linattn.flash_attention(problem.q, problem.k, problem.v, **problem.kwargs)
    do_np = np.cos(np.arange(o_np.size, dtype=np.float64)).reshape(o_np.shape)
    q, k, v, o, lse, do = (xs.asarray(x) for x in (problem.q, problem.k, problem.v, o_np, lse_np, do_np))
    kw = strict_kwargs(problem.kwargs)
    for got, want in zip(
        linattn.softmax_attention_vjp(q, k, v, do, **kw),
        linattn.softmax_attention_vjp(problem.q, problem.k, problem.v, do_np, **problem.kwargs),
        strict=True,
    ):
        assert_same(got, want)
    for got, want in zip(
        linattn.flash_attention_backward(q, k, v, o, lse, do, block_q=block_q, block_k=block_k, **kw),
        linattn.flash_attention_backward(problem.q, problem.k, problem.v, o_np, lse_np, do_np, block_q=block_q,
                                         block_k=block_k, **problem.kwargs),
        strict=True,
    ):
        assert_same(got, want)


@pytest.mark.parametrize("dtype", [xs.float32, xs.float64])
def test_dtype_is_preserved_on_array_api_strict(dtype):
    q = xs.ones((1, 3, 2, 4), dtype=dtype)
    assert linattn.softmax_attention(q, q, q, causal=True).dtype == dtype
    assert linattn.flash_attention(q, q, q, causal=True)[0].dtype == dtype


def test_strict_arrays_run_on_the_reference_backend_and_not_numpy():
    from linattn.backends import resolve_backend

    assert resolve_backend(None, xs).name == "reference"
    assert resolve_backend(None, np).name == "numpy"
