"""Block-sparse exact softmax (linattn.sparse): BigBird, Longformer and general block layouts."""

import math
import tracemalloc

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import linattn
from linattn.compare import compared_methods
from linattn.sparse import (
    BlockLayout,
    bigbird_attention,
    bigbird_attention_vjp,
    bigbird_layout,
    block_sparse_attention,
    block_sparse_attention_vjp,
    layout_to_mask,
    longformer_attention,
    longformer_attention_vjp,
    longformer_layout,
)
from linattn.testing import assert_close, to_numpy, tolerance


def make(rng, batch, length, heads, dim, layout):
    x = rng.standard_normal((batch, length, heads, dim))
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)) if layout == "bhtd" else x


@st.composite
def qkv(draw, *, max_len=40, cross=False):
    """q, k, v in a drawn layout with GQA; S = T unless ``cross``."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, T = draw(st.integers(1, 2)), draw(st.integers(1, max_len))
    S = draw(st.integers(1, max_len)) if cross else T
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dk = draw(st.integers(1, 6))
    dv = draw(st.integers(1, 6)) if draw(st.booleans()) else dk
    layout = draw(st.sampled_from(["bthd", "bhtd"]))
    return (make(rng, batch, T, hkv * group, dk, layout), make(rng, batch, S, hkv, dk, layout),
            make(rng, batch, S, hkv, dv, layout), layout)


def logit_size(q, k, layout):
    """max |q·k| / sqrt(Dk): the logits' size, the softmax's condition number for absolute errors."""
    if layout == "bhtd":
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return max(1.0, float(np.max(np.abs(np.einsum("bthd,bshd->bhts", q, k)), initial=0.0)) / math.sqrt(q.shape[-1]))


def allowances(q, k, v, layout, do=None):
    """rtol and atol for float64 results built from the same logits in another order.

    Sums run over at most T + S terms, and their rounding is scaled by the logits' size
    (the condition number). The absolute part is relative to the size of the terms summed
    (|v| for o; |do|·|q, k, v| for the gradients), not to the result, which may cancel.
    """
    axis = 1 if layout == "bthd" else 2
    tol = tolerance(np.float64, q.shape[axis] + k.shape[axis], logit_size(q, k, layout))
    term = max(1.0, *(float(np.max(np.abs(x))) for x in (q, k, v)))
    if do is not None:
        term *= float(np.max(np.abs(do)))
    return dict(rtol=tol, atol=tol * term)


def assert_equals_dense(q, k, v, layout, result, mask, causal):
    o, lse = result
    ref_o, ref_lse = linattn.softmax_attention(q, k, v, mask=mask, causal=causal, layout=layout, return_lse=True)
    # float64 both ways; the online softmax over tiles and the direct one sum in another order
    assert_close(o, ref_o, **allowances(q, k, v, layout))
    assert_close(lse, ref_lse, **allowances(q, k, v, layout))


def assert_vjp_equals_dense(q, k, v, layout, grads, mask, causal):
    do = np.cos(np.arange(q.size // q.shape[-1] * v.shape[-1], dtype=float)).reshape(*q.shape[:-1], v.shape[-1])
    dense = linattn.softmax_attention_vjp(q, k, v, do, mask=mask, causal=causal, layout=layout)
    for name, got, want in zip(("dq", "dk", "dv"), grads(do), dense, strict=True):
        # the same direct formula on the gathered keys; dk, dv summed over query blocks in another order
        assert_close(got, want, err_msg=name, **allowances(q, k, v, layout, do))


# ---- BigBird ----


@st.composite
def bigbird_options(draw, T):
    block_size = draw(st.integers(1, 9))
    nb = -(-T // block_size)
    if draw(st.booleans()):
        global_blocks = draw(st.integers(0, 3))
    else:
        global_blocks = draw(st.lists(st.integers(0, nb - 1), max_size=3, unique=True))
    return dict(block_size=block_size, window_blocks=draw(st.sampled_from([1, 3, 5])), global_blocks=global_blocks,
                random_blocks=draw(st.integers(0, 3)), rng=draw(st.integers(0, 2**32 - 1)),
                causal=draw(st.booleans()))


@given(qkv(), st.data())
def test_bigbird_equals_softmax_with_the_layouts_dense_mask(problem, data):
    q, k, v, layout = problem
    T = q.shape[1 if layout == "bthd" else 2]
    options = data.draw(bigbird_options(T))
    result = bigbird_attention(q, k, v, layout=layout, return_lse=True, **options)
    mask = layout_to_mask(bigbird_layout(T, **options), T, T)
    assert_equals_dense(q, k, v, layout, result, mask, options["causal"])


@given(qkv(max_len=20), st.data())
def test_bigbird_vjp_equals_the_dense_vjp(problem, data):
    q, k, v, layout = problem
    T = q.shape[1 if layout == "bthd" else 2]
    options = data.draw(bigbird_options(T))
    mask = layout_to_mask(bigbird_layout(T, **options), T, T)
    assert_vjp_equals_dense(q, k, v, layout, lambda do: bigbird_attention_vjp(q, k, v, do, layout=layout, **options),
                            mask, options["causal"])


@given(st.integers(1, 300), st.data())
def test_bigbird_layout_holds_window_global_and_random_blocks_only(T, data):
    options = data.draw(bigbird_options(T))
    layout = bigbird_layout(T, **options)
    b, w, r, causal = options["block_size"], options["window_blocks"], options["random_blocks"], options["causal"]
    nb = -(-T // b)
    g = options["global_blocks"]
    glob = set(range(min(g, nb))) if isinstance(g, int) else set(g)
    assert (layout.num_query_blocks, layout.num_key_blocks) == (nb, nb)
    for i in range(nb):
        row = set(layout.key_blocks(i).tolist())
        last = i if causal else nb - 1
        if i in glob:
            assert row == set(range(last + 1))
            continue
        base = {j for j in range(i - w // 2, i + w // 2 + 1) if 0 <= j <= last} | {j for j in glob if j <= last}
        assert base <= row and max(row) <= last
        assert len(row - base) == min(r, last + 1 - len(base))  # r random blocks among the rest, or all of them
    # compact: at most w + g + r blocks per row plus the full global rows, 8 bytes each
    assert layout.num_blocks <= nb * (w + len(glob) + r) + len(glob) * nb
    assert layout.nbytes == 8 * (nb + 1 + layout.num_blocks)


def test_bigbird_random_blocks_are_reproducible_from_the_seed():
    a = bigbird_layout(4096, block_size=64, rng=3)
    b = bigbird_layout(4096, block_size=64, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.indices, b.indices)  # the same documented draws
    assert not np.array_equal(a.indices, bigbird_layout(4096, block_size=64, rng=4).indices)


# ---- Longformer ----


def longformer_mask(T, window, global_tokens, causal):
    """The rule written out densely: window, or a global query, or a global key; and causal."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    left, right = window
    seen = np.ones((T, T), dtype=bool)
    if left is not None:
        seen &= j >= i - left
    if right is not None:
        seen &= j <= i + right
    is_global = np.isin(np.arange(T), list(global_tokens))
    seen |= is_global[:, None] | is_global[None, :]
    return seen & (j <= i) if causal else seen


@st.composite
def longformer_options(draw, T):
    side = st.one_of(st.none(), st.integers(0, T + 1))
    tokens = draw(st.lists(st.integers(0, T - 1), max_size=3))
    return dict(window=(draw(side), draw(side)), global_tokens=tokens, block_size=draw(st.integers(1, 9)),
                causal=draw(st.booleans()))


@given(qkv(), st.data())
def test_longformer_equals_softmax_with_its_dense_mask(problem, data):
    q, k, v, layout = problem
    T = q.shape[1 if layout == "bthd" else 2]
    options = data.draw(longformer_options(T))
    result = longformer_attention(q, k, v, layout=layout, return_lse=True, **options)
    mask = longformer_mask(T, options["window"], options["global_tokens"], causal=False)
    assert_equals_dense(q, k, v, layout, result, mask, options["causal"])


@given(qkv(max_len=20), st.data())
def test_longformer_vjp_equals_the_dense_vjp(problem, data):
    q, k, v, layout = problem
    T = q.shape[1 if layout == "bthd" else 2]
    options = data.draw(longformer_options(T))
    mask = longformer_mask(T, options["window"], options["global_tokens"], causal=False)
    assert_vjp_equals_dense(q, k, v, layout, lambda do: longformer_attention_vjp(q, k, v, do, layout=layout, **options),
                            mask, options["causal"])


@given(st.integers(1, 60), st.data())
def test_longformer_layout_holds_exactly_the_blocks_with_a_visible_pair(T, data):
    options = data.draw(longformer_options(T))
    layout = longformer_layout(T, **options)
    b, nb = options["block_size"], -(-T // options["block_size"])
    dense = np.zeros((nb * b, nb * b), dtype=bool)
    dense[:T, :T] = longformer_mask(T, options["window"], options["global_tokens"], options["causal"])
    needed = dense.reshape(nb, b, nb, b).any(axis=(1, 3))
    held = np.zeros((nb, nb), dtype=bool)
    for i in range(nb):
        held[i, layout.key_blocks(i)] = True
    np.testing.assert_array_equal(held, needed)  # tight: no block without a visible pair, none missing


# ---- any block layout ----


@given(qkv(cross=True), st.integers(1, 9), st.booleans(), st.integers(0, 2**32 - 1))
def test_block_sparse_attention_equals_softmax_with_the_dense_mask(problem, block_size, causal, seed):
    q, k, v, layout = problem
    axis = 1 if layout == "bthd" else 2
    T, S = q.shape[axis], k.shape[axis]
    rng = np.random.default_rng(seed)
    n_q, n_k = -(-T // block_size), -(-S // block_size)
    rows = [np.flatnonzero(rng.random(n_k) < 0.5) for _ in range(n_q)]  # empty rows included
    blocks = BlockLayout.from_rows(block_size, n_k, rows)
    result = block_sparse_attention(q, k, v, blocks, causal=causal, layout=layout, return_lse=True)
    assert_equals_dense(q, k, v, layout, result, layout_to_mask(blocks, T, S), causal)
    grads = lambda do: block_sparse_attention_vjp(q, k, v, do, blocks, causal=causal, layout=layout)  # noqa: E731
    assert_vjp_equals_dense(q, k, v, layout, grads, layout_to_mask(blocks, T, S), causal)


def test_layout_to_mask_expands_blocks_and_cuts_the_partial_last_block():
    blocks = BlockLayout.from_rows(3, 2, [[1], [0, 1]])
    expected = np.array([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(layout_to_mask(blocks, 4, 5), expected)


# ---- memory and other array libraries ----


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("method", ["bigbird", "longformer"])
def test_memory_stays_far_below_one_dense_t_by_s_array(method):
    T, D = 16384, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, T, 1, D)) for _ in range(3))
    if method == "bigbird":
        run = lambda: bigbird_attention(q, k, v, block_size=64, rng=0)  # noqa: E731
    else:
        run = lambda: longformer_attention(q, k, v, window=(128, 128), global_tokens=[0, 5000], block_size=64)  # noqa: E731
    # A (T, S) float64 array is 2 GiB. Measured ~1%: copies of q, k, v, o (O(T·D)) and, for a
    # global query block, its (64, S) tile of keys and mask; 2% (43 MB) admits no T×S array.
    assert peak_bytes(run) < 0.02 * T * T * 8
    layout = bigbird_layout(T, block_size=64, rng=0)
    assert layout.nbytes < 8 * (layout.num_query_blocks + 1) + 8 * 256 * (3 + 2 + 3 + 2)  # O(n_b · blocks per row)


@settings(max_examples=25)  # array-api-strict wraps every operation in Python: ~50× NumPy's cost per block
@given(qkv(max_len=20), st.data())
def test_runs_on_array_api_strict_with_the_numpy_result(problem, data):
    q, k, v, layout = problem
    T = q.shape[1 if layout == "bthd" else 2]
    strict = [xs.asarray(x) for x in (q, k, v)]
    options = data.draw(bigbird_options(T))
    got = bigbird_attention(*strict, layout=layout, **options)
    assert isinstance(got, xs._array_object.Array)
    # the same operations on the same float64 values in the same order
    np.testing.assert_array_equal(to_numpy(got), bigbird_attention(q, k, v, layout=layout, **options))
    options = data.draw(longformer_options(T))
    got = longformer_attention(*strict, layout=layout, **options)
    np.testing.assert_array_equal(to_numpy(got), longformer_attention(q, k, v, layout=layout, **options))
    do = np.ones((*q.shape[:3], v.shape[-1]))
    for a, b in zip(longformer_attention_vjp(*strict, xs.asarray(do), layout=layout, **options),
                    longformer_attention_vjp(q, k, v, do, layout=layout, **options), strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)  # same operations, same order


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_inputs_return_their_dtype(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 50, 2, 4)).astype(dtype) for _ in range(3))
    o = bigbird_attention(q, k, v, block_size=8, rng=0)
    exact = bigbird_attention(*(x.astype(np.float64) for x in (q, k, v)), block_size=8, rng=0)
    assert o.dtype == dtype
    # computed in float32 from the same rounded inputs, then rounded to dtype (outputs are O(1))
    np.testing.assert_allclose(o.astype(np.float64), exact, rtol=0, atol=4 * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("name", ["bigbird", "longformer"])
def test_registered_in_compare_with_a_causal_form(name):
    method = compared_methods()[name]
    assert method.supports_causal
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 70, 2, 4)).astype(np.float32) for _ in range(3))
    for causal in (False, True):
        assert method.run(q, k, v, causal=causal).shape == (1, 70, 2, 4)


# ---- bad arguments ----


def ones(T=10, S=10):
    return np.ones((1, T, 1, 2)), np.ones((1, S, 1, 2)), np.ones((1, S, 1, 2))


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(block_size=0), r"(?=.*block_size)(?=.*0)"),
    (dict(block_size=-3), r"(?=.*block_size)(?=.*-3)"),
    (dict(block_size=2.5), r"(?=.*block_size)(?=.*2\.5)"),
    (dict(window_blocks=2), r"(?=.*window_blocks)(?=.*odd)(?=.*2)"),
    (dict(window_blocks=0), r"(?=.*window_blocks)(?=.*0)"),
    (dict(random_blocks=-1), r"(?=.*random_blocks)(?=.*-1)"),
    (dict(global_blocks=-1), r"(?=.*global_blocks)(?=.*-1)"),
    (dict(global_blocks=[0, 5]), r"(?=.*global_blocks)(?=.*5)(?=.*\[0, 5\))"),
])
def test_bigbird_bad_arguments_raise_value_error_naming_them(kwargs, pattern):
    with pytest.raises(ValueError, match="(?s)" + pattern):
        bigbird_attention(*ones(), **{"block_size": 2, "rng": 0, **kwargs})


def test_bigbird_needs_rng_for_random_blocks_and_one_length():
    with pytest.raises(TypeError, match=r"(?s)(?=.*rng)(?=.*random_blocks)"):
        bigbird_attention(*ones(), block_size=2)
    bigbird_attention(*ones(), block_size=2, random_blocks=0)  # no randomness, no rng needed
    with pytest.raises(ValueError, match=r"(?s)(?=.*T=10)(?=.*S=12)"):
        bigbird_attention(*ones(10, 12), block_size=2, rng=0)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(global_tokens=[10]), r"(?=.*global_tokens)(?=.*10)(?=.*T = 10)"),
    (dict(global_tokens=[-1]), r"(?=.*global_tokens)(?=.*-1)"),
    (dict(window=None), r"(?=.*window)(?=.*None)"),
    (dict(window=(-1, 2)), r"(?=.*window)(?=.*-1)"),
    (dict(window=3), r"(?=.*window)(?=.*3)"),
    (dict(block_size=0), r"(?=.*block_size)(?=.*0)"),
])
def test_longformer_bad_arguments_raise_value_error_naming_them(kwargs, pattern):
    with pytest.raises(ValueError, match="(?s)" + pattern):
        longformer_attention(*ones(), **{"window": (1, 1), **kwargs})


def test_block_layout_must_fit_and_be_well_formed():
    with pytest.raises(ValueError, match=r"(?s)(?=.*block_layout)(?=.*T=10)"):
        block_sparse_attention(*ones(), BlockLayout.from_rows(2, 5, [[0]] * 4))
    with pytest.raises(TypeError, match="block_layout"):
        block_sparse_attention(*ones(), np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="sorted and distinct"):
        BlockLayout(2, 1, 3, np.array([0, 2]), np.array([2, 1]))
    with pytest.raises(ValueError, match="indices"):
        BlockLayout(2, 1, 3, np.array([0, 1]), np.array([3]))
    with pytest.raises(ValueError, match="indptr"):
        BlockLayout(2, 2, 3, np.array([0, 1]), np.array([0]))
