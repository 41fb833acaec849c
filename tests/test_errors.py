"""Every bad argument raises ValueError or TypeError naming the argument and what it got.

Each test builds a valid problem, spoils one argument, and checks the message names that
argument and the shape or value it received. The message patterns are lookaheads
(:func:`contains_all`), so they pin what a message must say, not its wording or order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import array_api_strict as xps
import numpy as np
import pytest

import linattn

# Every size distinct, so that a shape in a message identifies the array it came from.
B, T, S, HQ, HKV, DK, DV = 2, 5, 7, 4, 2, 3, 6

# For arguments of the wrong kind (a string scale, a float block size) the conventions
# allow either exception; the tests pin the message, not the class.
WRONG_KIND = (TypeError, ValueError)


# ---- helpers ----


def contains_all(*patterns: str) -> str:
    """A regex matching a message that contains every pattern, in any order."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in patterns)


def word(name: str) -> str:
    """A regex for ``name`` as a whole word (so "q" does not match inside "sequence")."""
    return rf"(?<![\w]){re.escape(name)}(?![\w])"


def shape_of(x: Any) -> str:
    """A regex for the tuple printed for ``x``'s shape."""
    return re.escape(str(tuple(x.shape)))


def literal(value: Any) -> str:
    return re.escape(repr(value))


def qkv(
    b: int = B, t: int = T, s: int = S, hq: int = HQ, hkv: int = HKV, dk: int = DK, dv: int = DV,
    dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, t, hq, dk)).astype(dtype)
    k = rng.standard_normal((b, s, hkv, dk)).astype(dtype)
    v = rng.standard_normal((b, s, hkv, dv)).astype(dtype)
    return q, k, v


def output_like(q: Any, v: Any) -> np.ndarray:
    """An array shaped like the output (for o and do), when q and v are arrays; else a dummy."""
    try:
        return np.zeros((*q.shape[:3], v.shape[-1]))
    except (AttributeError, IndexError, TypeError):
        return np.zeros(1)


def lse_like(q: Any, layout: str) -> np.ndarray:
    """An array shaped (B, Hq, T) like the forward's lse, when q is 4-D; else a dummy."""
    shape = tuple(getattr(q, "shape", ()))
    if len(shape) != 4:
        return np.zeros(1)
    b, a1, a2, _ = shape
    return np.zeros((b, a2, a1) if layout == "bthd" else (b, a1, a2))


def call_softmax(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    return linattn.softmax_attention(q, k, v, **kw)


def call_flash(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    return linattn.flash_attention(q, k, v, **kw)


def call_softmax_vjp(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    return linattn.softmax_attention_vjp(q, k, v, output_like(q, v), **kw)


def call_flash_backward(q: Any, k: Any, v: Any, **kw: Any) -> Any:
    o = output_like(q, v)
    return linattn.flash_attention_backward(q, k, v, o, lse_like(q, kw.get("layout", "bthd")), o, **kw)


Attend = Callable[..., Any]
every_function = pytest.mark.parametrize(
    "attend",
    [call_softmax, call_flash, call_softmax_vjp, call_flash_backward],
    ids=["softmax_attention", "flash_attention", "softmax_attention_vjp", "flash_attention_backward"],
)
tiled_functions = pytest.mark.parametrize(
    "attend", [call_flash, call_flash_backward], ids=["flash_attention", "flash_attention_backward"]
)


# ---- q, k, v: rank, sizes, dtypes, kinds ----


@every_function
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("ndim", [3, 5])
def test_input_that_is_not_4d_names_the_input_and_its_shape(attend: Attend, name: str, ndim: int) -> None:
    arrays = dict(zip("qkv", qkv(), strict=True))
    x = arrays[name]
    arrays[name] = x[0] if ndim == 3 else x[None]
    with pytest.raises(ValueError, match=contains_all(word(name), "4-D", shape_of(arrays[name]))):
        attend(**arrays)


@every_function
def test_key_dim_mismatch_names_q_k_and_their_shapes(attend: Attend) -> None:
    q, _, v = qkv()
    _, k, _ = qkv(dk=DK + 1)
    with pytest.raises(ValueError, match=contains_all(word("q"), word("k"), "Dk", shape_of(q), shape_of(k))):
        attend(q, k, v)


@every_function
def test_key_value_length_mismatch_names_k_v_and_their_shapes(attend: Attend) -> None:
    q, k, _ = qkv()
    _, _, v = qkv(s=S + 1)
    with pytest.raises(ValueError, match=contains_all(word("k"), word("v"), "length", shape_of(k), shape_of(v))):
        attend(q, k, v)


@every_function
def test_key_value_heads_mismatch_names_k_v_and_their_shapes(attend: Attend) -> None:
    q, k, _ = qkv()
    _, _, v = qkv(hkv=HKV + 1)
    with pytest.raises(ValueError, match=contains_all(word("k"), word("v"), "heads", shape_of(k), shape_of(v))):
        attend(q, k, v)


@every_function
def test_query_heads_not_a_multiple_of_kv_heads_names_the_shapes(attend: Attend) -> None:
    q, k, v = qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match=contains_all("query heads", "multiple", shape_of(q), shape_of(k))):
        attend(q, k, v)


@every_function
def test_batch_mismatch_names_batch_and_the_shapes(attend: Attend) -> None:
    q, _, v = qkv()
    _, k, _ = qkv(b=B + 1)
    with pytest.raises(ValueError, match=contains_all("batch", shape_of(q), shape_of(k))):
        attend(q, k, v)


@every_function
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [np.int64, np.complex128, np.bool_], ids=["int64", "complex128", "bool"])
def test_non_real_floating_dtype_is_a_type_error_naming_the_input_and_dtype(
    attend: Attend, name: str, dtype: Any
) -> None:
    arrays = dict(zip("qkv", qkv(), strict=True))
    arrays[name] = arrays[name].astype(dtype)
    with pytest.raises(TypeError, match=contains_all(word(name), "dtype", re.escape(np.dtype(dtype).name))):
        attend(**arrays)


@every_function
def test_mixed_dtypes_are_a_type_error_naming_both_dtypes(attend: Attend) -> None:
    q, _, _ = qkv(dtype=np.float32)
    _, k, v = qkv(dtype=np.float64)
    with pytest.raises(TypeError, match=contains_all("dtype", "float32", "float64")):
        attend(q, k, v)


@every_function
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_a_list_instead_of_an_array_is_a_type_error_naming_the_input(attend: Attend, name: str) -> None:
    arrays = dict(zip("qkv", qkv(), strict=True))
    arrays[name] = arrays[name].tolist()
    with pytest.raises(TypeError, match=contains_all(word(name), "array", "list")):
        attend(**arrays)


@every_function
def test_arrays_from_two_libraries_are_a_type_error_naming_both(attend: Attend) -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=contains_all(word("q"), word("k"), "numpy", "array_api_strict")):
        attend(q, xps.asarray(k), v)


# ---- options: window, layout, scale, causal ----


@every_function
@pytest.mark.parametrize(("window", "side"), [((-1, 2), "left"), ((2, -3), "right"), ((None, -1), "right")])
def test_negative_window_side_names_the_side_and_the_window(attend: Attend, window: tuple, side: str) -> None:
    with pytest.raises(ValueError, match=contains_all("window", side, re.escape(str(window)))):
        attend(*qkv(), window=window)


@every_function
@pytest.mark.parametrize("window", [(1,), (1, 2, 3), 3, "ab"], ids=["one", "three", "int", "str"])
def test_window_that_is_not_a_pair_names_window_and_its_value(attend: Attend, window: Any) -> None:
    with pytest.raises(ValueError, match=contains_all("window", "pair", literal(window))):
        attend(*qkv(), window=window)


@every_function
@pytest.mark.parametrize("window", [(1.5, 2), (0, 2.0), (True, 1)], ids=["left-float", "right-float", "bool"])
def test_window_side_that_is_not_an_integer_names_window_and_its_value(attend: Attend, window: Any) -> None:
    with pytest.raises(WRONG_KIND, match=contains_all("window", re.escape(str(window)))):
        attend(*qkv(), window=window)


@every_function
def test_unknown_layout_names_layout_and_the_value(attend: Attend) -> None:
    with pytest.raises(ValueError, match=contains_all("layout", literal("btdh"), "bthd", "bhtd")):
        attend(*qkv(), layout="btdh")


@every_function
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_names_scale_and_the_value(attend: Attend, scale: float) -> None:
    with pytest.raises(ValueError, match=contains_all("scale", literal(scale))):
        attend(*qkv(), scale=scale)


@every_function
def test_string_scale_names_scale_and_the_value(attend: Attend) -> None:
    with pytest.raises(WRONG_KIND, match=contains_all("scale", literal("0.5"))):
        attend(*qkv(), scale="0.5")


@every_function
@pytest.mark.parametrize("causal", [1, "yes", None, np.bool_(True)], ids=["int", "str", "None", "numpy-bool"])
def test_causal_that_is_not_a_bool_is_a_type_error_naming_causal(attend: Attend, causal: Any) -> None:
    with pytest.raises(TypeError, match=contains_all("causal", literal(causal))):
        attend(*qkv(), causal=causal)


# ---- cu_seqlens ----

CU_SEQLENS_ERRORS = {
    # id: (sizes of q, k, v; cu_seqlens; exception; what the message must contain)
    "decreasing": ({}, [0, 3, 2, 5], ValueError, ["non-decreasing", re.escape("0, 3, 2, 5")]),
    "wrong-end": ({}, [0, 2, 4], ValueError, [r"\bT=5\b", re.escape("0, 2, 4")]),
    "past-the-end": ({}, [0, 2, 6], ValueError, [r"\bT=5\b", re.escape("0, 2, 6")]),
    "not-from-zero": ({}, [1, 3, 5], ValueError, ["start at 0", re.escape("1, 3, 5")]),
    "one-offset": ({}, [0], ValueError, ["two offsets", r"[(\[]0,?[)\]]"]),
    "two-dimensional": ({}, np.array([[0, 5]]), ValueError, ["1-D", re.escape("(1, 2)")]),
    "float-array": ({}, np.array([0.0, 5.0]), TypeError, ["integer", "float64"]),
    "float-in-list": ({}, [0, 2.5, 5], TypeError, ["int", re.escape("2.5")]),
    "batch-of-two": ({"b": 2}, [0, 5], ValueError, ["batch", r"\b2\b"]),
    "queries-and-keys-differ": ({"s": 7}, [0, 5], ValueError, [r"\bT=5\b", r"\bS=7\b"]),
}


@every_function
@pytest.mark.parametrize("case", list(CU_SEQLENS_ERRORS), ids=list(CU_SEQLENS_ERRORS))
def test_malformed_cu_seqlens_names_cu_seqlens_and_what_it_got(attend: Attend, case: str) -> None:
    sizes, cu_seqlens, error, patterns = CU_SEQLENS_ERRORS[case]
    q, k, v = qkv(**{"b": 1, "t": 5, "s": 5, **sizes})
    with pytest.raises(error, match=contains_all("cu_seqlens", *patterns)):
        attend(q, k, v, causal=True, cu_seqlens=cu_seqlens)


# ---- mask and alibi_slopes ----


@every_function
@pytest.mark.parametrize(
    "shape",
    [(T, S + 1), (B + 1, 1, 1, 1), (1, 3, T, S), (1, HKV, 1, 1), (1, 1, HQ, T, S), (1, B, HQ, T, S)],
    ids=["key-dim", "batch", "heads-3", "kv-heads", "5-D-ones", "5-D"],
)
def test_mask_of_wrong_shape_names_mask_its_shape_and_the_full_shape(attend: Attend, shape: tuple) -> None:
    mask = np.ones(shape, dtype=bool)
    full = re.escape(str((B, HQ, T, S)))
    with pytest.raises(ValueError, match=contains_all("mask", re.escape(str(shape)), full)):
        attend(*qkv(), mask=mask)


@every_function
@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.complex128], ids=["int64", "uint8", "complex128"])
def test_mask_of_non_bool_non_float_dtype_is_a_type_error(attend: Attend, dtype: Any) -> None:
    mask = np.ones((T, S), dtype=dtype)
    with pytest.raises(TypeError, match=contains_all("mask", re.escape(np.dtype(dtype).name))):
        attend(*qkv(), mask=mask)


@every_function
@pytest.mark.parametrize(("bad", "pattern"), [(np.nan, "NaN"), (np.inf, r"\+inf")], ids=["nan", "+inf"])
def test_float_mask_with_nan_or_plus_inf_names_mask_and_the_value(attend: Attend, bad: float, pattern: str) -> None:
    mask = np.zeros((T, S))
    mask[1, 2] = bad
    with pytest.raises(ValueError, match=contains_all("mask", pattern)):
        attend(*qkv(), mask=mask)


@every_function
@pytest.mark.parametrize("shape", [(HKV,), (HQ + 1,), (1, HQ), ()], ids=["kv-heads", "too-many", "2-D", "0-D"])
def test_alibi_slopes_of_wrong_shape_names_alibi_slopes_and_both_shapes(attend: Attend, shape: tuple) -> None:
    slopes = np.ones(shape)
    expected = re.escape(str((HQ,)))
    with pytest.raises(ValueError, match=contains_all("alibi_slopes", re.escape(str(shape)), expected)):
        attend(*qkv(), alibi_slopes=slopes)


@every_function
def test_alibi_slopes_of_integer_dtype_is_a_type_error(attend: Attend) -> None:
    with pytest.raises(TypeError, match=contains_all("alibi_slopes", "int64")):
        attend(*qkv(), alibi_slopes=np.ones(HQ, dtype=np.int64))


# ---- block sizes ----


@tiled_functions
@pytest.mark.parametrize("name", ["block_q", "block_k"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_block_size_that_is_not_a_positive_integer_names_it_and_its_value(
    attend: Attend, name: str, value: Any
) -> None:
    with pytest.raises(WRONG_KIND, match=contains_all(word(name), literal(value))):
        attend(*qkv(), **{name: value})


# ---- backward: do, o, lse ----


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_softmax_vjp_do_of_wrong_shape_names_do_and_both_shapes(layout: str) -> None:
    q, k, v = qkv()
    do = np.zeros((B, T, HQ, DV + 1))
    expected = (B, T, HQ, DV) if layout == "bthd" else (B, HQ, T, DV)
    if layout == "bhtd":
        q, k, v = (np.swapaxes(x, 1, 2) for x in (q, k, v))
        do = np.zeros((B, T, HQ, DV))  # right sizes, wrong layout
    with pytest.raises(ValueError, match=contains_all(word("do"), shape_of(do), re.escape(str(expected)))):
        linattn.softmax_attention_vjp(q, k, v, do, layout=layout)


@pytest.mark.parametrize("name", ["o", "do"])
def test_flash_backward_output_shaped_argument_of_wrong_shape_names_it_and_both_shapes(name: str) -> None:
    q, k, v = qkv()
    good = np.zeros((B, T, HQ, DV))
    args = {"o": good, "do": good, name: np.zeros((B, T, HQ - 1, DV))}
    with pytest.raises(ValueError, match=contains_all(word(name), shape_of(args[name]), shape_of(good))):
        linattn.flash_attention_backward(q, k, v, args["o"], np.zeros((B, HQ, T)), args["do"])


def test_flash_backward_lse_in_time_major_order_names_lse_and_both_shapes() -> None:
    q, k, v = qkv()
    o = np.zeros((B, T, HQ, DV))
    lse = np.zeros((B, T, HQ))  # (B, T, H), not the (B, H, T) the forward returns
    with pytest.raises(ValueError, match=contains_all(word("lse"), shape_of(lse), re.escape(str((B, HQ, T))))):
        linattn.flash_attention_backward(q, k, v, o, lse, o)


@pytest.mark.parametrize("name", ["do", "o", "lse"])
def test_backward_argument_of_integer_dtype_is_a_type_error(name: str) -> None:
    q, k, v = qkv()
    args = {"o": np.zeros((B, T, HQ, DV)), "lse": np.zeros((B, HQ, T)), "do": np.zeros((B, T, HQ, DV))}
    args[name] = args[name].astype(np.int64)
    with pytest.raises(TypeError, match=contains_all(word(name), "int64")):
        linattn.flash_attention_backward(q, k, v, args["o"], args["lse"], args["do"])


def test_softmax_vjp_do_that_is_a_list_is_a_type_error() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=contains_all(word("do"), "list")):
        linattn.softmax_attention_vjp(q, k, v, np.zeros((B, T, HQ, DV)).tolist())


# ---- backend ----


@every_function
def test_unknown_backend_names_backend_the_value_and_the_known_ones(attend: Attend) -> None:
    with pytest.raises(ValueError, match=contains_all("backend", literal("no-such-backend"), "numpy")):
        attend(*qkv(), backend="no-such-backend")


@every_function
def test_backend_that_is_not_a_string_is_a_type_error(attend: Attend) -> None:
    with pytest.raises(TypeError, match=contains_all("backend", "int")):
        attend(*qkv(), backend=3)


@every_function
def test_numpy_backend_refuses_array_api_strict_inputs(attend: Attend) -> None:
    q, k, v = (xps.asarray(x) for x in qkv())
    with pytest.raises(ValueError, match=contains_all("backend", literal("numpy"), "array_api_strict", "run")):
        attend(q, k, v, backend="numpy")


# ---- alibi_slopes(n_heads) ----


@pytest.mark.parametrize("n_heads", [0, -2, 2.5, True, "4"], ids=["zero", "negative", "float", "bool", "str"])
def test_alibi_slopes_of_a_non_positive_integer_names_n_heads(n_heads: Any) -> None:
    with pytest.raises(WRONG_KIND, match=contains_all("n_heads", literal(n_heads))):
        linattn.alibi_slopes(n_heads)


# ---- arguments from a library other than q, k, v's ----


@pytest.mark.parametrize("name", ["mask", "alibi_slopes", "do", "o", "lse"])
def test_argument_from_another_array_library_names_the_argument_and_both_libraries(name: str) -> None:
    q, k, v = qkv()
    arrays = {
        "o": np.zeros((B, T, HQ, DV)),
        "lse": np.zeros((B, HQ, T)),
        "do": np.zeros((B, T, HQ, DV)),
    }
    foreign = {
        "mask": xps.ones((T, S), dtype=xps.bool),
        "alibi_slopes": xps.ones((HQ,), dtype=xps.float64),
        **{key: xps.asarray(value) for key, value in arrays.items()},
    }[name]
    with pytest.raises(TypeError, match=contains_all(word(name), "numpy", "array_api_strict")):
        if name in arrays:
            arrays[name] = foreign
            linattn.flash_attention_backward(q, k, v, arrays["o"], arrays["lse"], arrays["do"])
        else:
            linattn.softmax_attention(q, k, v, **{name: foreign})


@pytest.mark.parametrize("name", ["mask", "alibi_slopes"])
def test_forward_argument_from_another_array_library_is_refused_by_flash_too(name: str) -> None:
    q, k, v = qkv()
    foreign = {"mask": xps.ones((T, S), dtype=xps.bool), "alibi_slopes": xps.ones((HQ,), dtype=xps.float64)}[name]
    with pytest.raises(TypeError, match=contains_all(word(name), "array_api_strict")):
        linattn.flash_attention(q, k, v, **{name: foreign})


def test_softmax_vjp_do_from_another_array_library_names_do() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match=contains_all(word("do"), "array_api_strict")):
        linattn.softmax_attention_vjp(q, k, v, xps.zeros((B, T, HQ, DV), dtype=xps.float64))


# ---- valid edge cases must not raise ----

VALID_OPTIONS = {
    "window-unbounded": {"window": (None, None)},
    "window-zero": {"window": (0, 0)},
    "window-list": {"window": [1, None]},
    "window-numpy-ints": {"window": (np.int64(1), np.int32(0))},
    "mask-t-s": {"mask": np.ones((T, S), dtype=bool)},
    "mask-ones": {"mask": np.ones((1, 1, 1, 1), dtype=bool)},
    "mask-full": {"mask": np.ones((B, HQ, T, S), dtype=bool)},
    "mask-float-minus-inf": {"mask": np.where(np.eye(T, S, dtype=bool), -np.inf, 0.0)},
    "scale-numpy-float": {"scale": np.float32(0.5)},
    "scale-int": {"scale": 2},
    "alibi": {"alibi_slopes": linattn.alibi_slopes(HQ)},
}


@every_function
@pytest.mark.parametrize("case", list(VALID_OPTIONS), ids=list(VALID_OPTIONS))
def test_valid_edge_case_options_are_accepted(attend: Attend, case: str) -> None:
    attend(*qkv(), causal=True, **VALID_OPTIONS[case])


VALID_CU_SEQLENS = {
    "list": [0, 2, 5],
    "tuple": (0, 2, 5),
    "numpy-int32": np.array([0, 2, 5], dtype=np.int32),
    "numpy-ints-in-list": [np.int64(0), np.int64(2), np.int64(5)],
    "empty-segments": [0, 0, 3, 3, 5],
    "one-segment": [0, 5],
}


@every_function
@pytest.mark.parametrize("case", list(VALID_CU_SEQLENS), ids=list(VALID_CU_SEQLENS))
def test_valid_cu_seqlens_forms_are_accepted(attend: Attend, case: str) -> None:
    attend(*qkv(b=1, t=5, s=5), causal=True, cu_seqlens=VALID_CU_SEQLENS[case])


@every_function
def test_bhtd_layout_with_gqa_and_distinct_dims_is_accepted(attend: Attend) -> None:
    q, k, v = (np.swapaxes(x, 1, 2) for x in qkv())
    attend(q, k, v, layout="bhtd", causal=True)
