"""Tests of linattn.testing: tolerances, assert_close, reference, and the hypothesis strategies."""

from __future__ import annotations

import math
import warnings
from typing import Any

import array_api_strict as xps
import numpy as np
import pytest
from hypothesis import given, settings

import linattn
from linattn.testing import CloseReport, assert_close, compare, machine_epsilon, reference, tolerance
from linattn.testing.strategies import AttentionProblem, attention_problems, segment_lengths

EPSILONS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


# ---- machine_epsilon and tolerance ----


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_machine_epsilon_is_numpys_epsilon(dtype: Any) -> None:
    assert machine_epsilon(dtype) == np.finfo(dtype).eps
    assert machine_epsilon(np.dtype(dtype)) == np.finfo(dtype).eps
    assert machine_epsilon(np.dtype(dtype).name) == np.finfo(dtype).eps


def test_machine_epsilon_of_bfloat16_by_name_is_two_to_the_minus_seven() -> None:
    assert machine_epsilon("bfloat16") == 2.0**-7


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, "int8", np.complex128])
def test_machine_epsilon_rejects_non_real_floating_dtypes(dtype: Any) -> None:
    with pytest.raises(TypeError, match="dtype"):
        machine_epsilon(dtype)


@pytest.mark.parametrize("name", list(EPSILONS))
@pytest.mark.parametrize(("n", "condition"), [(1, 1.0), (16, 1.0), (64, 4.0), (0, 2.0)])
def test_tolerance_is_eight_epsilon_sqrt_n_times_condition(name: str, n: int, condition: float) -> None:
    # Powers of two throughout, so the formula's value is exact and compared with ==.
    expected = 8 * EPSILONS[name] * math.sqrt(max(n, 1)) * condition
    assert tolerance(name, reduction_length=n, condition=condition) == expected


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_tolerance_accepts_numpy_dtypes_like_their_names(dtype: Any) -> None:
    assert tolerance(dtype, 10, 3.0) == tolerance(np.dtype(dtype).name, 10, 3.0)
    # A product of four factors: at most a few roundings apart from the formula written out.
    assert tolerance(dtype, 10, 3.0) == pytest.approx(8 * np.finfo(dtype).eps * math.sqrt(10) * 3.0, rel=1e-15)


@pytest.mark.parametrize(
    ("n", "condition", "name"), [(-1, 1.0, "reduction_length"), (4, 0.5, "condition"), (4, math.nan, "condition")]
)
def test_tolerance_rejects_negative_lengths_and_conditions_below_one(n: int, condition: float, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        tolerance(np.float32, n, condition)


# ---- assert_close and compare ----


def test_assert_close_passes_on_equal_arrays() -> None:
    d = np.random.default_rng(0).standard_normal((3, 4, 5))
    report = assert_close(d.copy(), d)
    assert report.passed
    assert report.max_abs_error == 0.0
    assert report.rel_rms_error == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_assert_close_passes_on_rounded_copies_of_float64_data(dtype: Any) -> None:
    d = np.random.default_rng(1).standard_normal((8, 50))
    # Rounding to dtype changes each element by at most eps/2 relative, far inside 8·eps.
    assert assert_close(d.astype(dtype), d).passed


def test_assert_close_fails_on_a_perturbation_beyond_tolerance_and_reports_where() -> None:
    d = np.random.default_rng(2).standard_normal((3, 4)) + 2.0
    a = d.copy()
    # 1e-6 is ~1e9 times the float64 tolerance 8·2^-52·max|d|, so this element must fail.
    a[2, 1] += 1e-6
    with pytest.raises(AssertionError) as info:
        assert_close(a, d, err_msg="attention output")
    message = str(info.value)
    assert message.startswith("attention output: ")
    assert "max abs error" in message
    assert "relative RMS error" in message
    assert "(2, 1)" in message
    assert compare(a, d).worst_index == (2, 1)


def test_worst_index_is_the_largest_error_relative_to_its_allowance() -> None:
    d = np.array([[1000.0, 1.0], [1.0, 1.0]])
    a = d.copy()
    a[0, 0] += 1e-9  # a larger absolute error, but small next to |d| = 1000
    a[1, 1] += 5e-10  # a smaller absolute error on a value of 1
    # Pure relative tolerance: allowances 1e-9 at |d| = 1000 and 1e-12 at |d| = 1, so ratios 1 and 500.
    report = compare(a, d, rtol=1e-12, atol=0.0)
    assert report.worst_index == (1, 1)
    assert report.max_abs_error == pytest.approx(1e-9, rel=1e-3)  # float64 rounding of 1000 + 1e-9


@pytest.mark.parametrize(("actual_shape", "desired_shape"), [((1, 3), (3,)), ((1,), (3,)), ((3, 1), (3, 3))])
def test_assert_close_fails_on_shape_mismatch_without_broadcasting(actual_shape: tuple, desired_shape: tuple) -> None:
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.ones(actual_shape), np.ones(desired_shape))


def test_assert_close_fails_on_nan_in_actual() -> None:
    d = np.array([1.0, 2.0, 3.0])
    a = d.copy()
    a[1] = np.nan
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(a, d)


def test_assert_close_fails_on_nan_in_both() -> None:
    d = np.array([1.0, np.nan])
    with pytest.raises(AssertionError):
        assert_close(d.copy(), d)


def test_equal_minus_infinities_agree() -> None:
    d = np.array([-np.inf, 0.5, -np.inf, 2.0])  # an lse of -inf marks a query that sees no key
    report = assert_close(d.copy(), d)
    assert report.passed
    assert report.max_abs_error == 0.0


def test_equal_minus_infinities_agree_without_runtime_warnings() -> None:
    d = np.array([-np.inf, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(d.copy(), d)


@pytest.mark.parametrize(("actual", "desired"), [(np.inf, -np.inf), (-np.inf, np.inf), (np.inf, 1.0), (1.0, -np.inf)])
def test_assert_close_fails_on_different_infinities(actual: float, desired: float) -> None:
    with pytest.raises(AssertionError, match="max abs error inf"):
        assert_close(np.array([actual, 1.0]), np.array([desired, 1.0]))


def test_close_report_fields_describe_the_comparison() -> None:
    d = np.array([1.0, -2.0, 4.0])
    a = np.array([1.0, -2.0, 4.5])
    report = compare(a, d)
    assert isinstance(report, CloseReport)
    assert not report.passed
    assert report.max_abs_error == 0.5
    # ||a - d|| / ||d|| = 0.5 / sqrt(1 + 4 + 16), up to the rounding of two norms.
    assert report.rel_rms_error == pytest.approx(0.5 / math.sqrt(21.0), rel=1e-14)
    assert report.worst_index == (2,)
    assert report.actual_at_worst == 4.5
    assert report.desired_at_worst == 4.0
    assert report.rtol == tolerance(np.float64)
    assert report.atol == tolerance(np.float64) * 4.0  # the absolute part scales with max|desired|
    assert report.shape == (3,)
    assert "1 of 3" in report.message
    assert compare(d.copy(), d).message == ""


def test_default_dtype_is_the_lower_precision_of_the_two() -> None:
    d = np.linspace(-1.0, 1.0, 7)
    assert compare(d.astype(np.float32), d).rtol == tolerance(np.float32)
    assert compare(d.astype(np.float16), d.astype(np.float32)).rtol == tolerance(np.float16)
    assert compare(d, d).rtol == tolerance(np.float64)


def test_dtype_override_sets_the_tolerance() -> None:
    d = np.random.default_rng(3).standard_normal(100)
    # A relative error of 1e-9: far beyond float64's 8·eps (2e-15), far inside float32's (1e-6).
    a = d * (1 + 1e-9)
    with pytest.raises(AssertionError):
        assert_close(a, d)
    report = assert_close(a, d, dtype=np.float32)
    assert report.rtol == tolerance(np.float32)


def test_reduction_length_and_condition_scale_the_tolerance() -> None:
    d = np.ones(4)
    assert compare(d, d, reduction_length=64, condition=3.0).rtol == tolerance(np.float64, 64, 3.0)


def test_explicit_rtol_and_atol_override_the_derived_ones() -> None:
    d = np.array([1.0, 2.0])
    # An error of 0.01 passes only through the explicit atol (0.02); the derived one is ~1e-15.
    report = compare(d + 0.01, d, rtol=0.0, atol=0.02)
    assert (report.rtol, report.atol) == (0.0, 0.02)
    assert report.passed


# ---- reference ----


def _qkv(dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    return tuple(rng.standard_normal((1, 6, 2, 4)).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_reference_computes_in_float64_from_low_precision_numpy_inputs(dtype: Any) -> None:
    q, k, v = _qkv(dtype)
    o = reference(linattn.softmax_attention, q, k, v, causal=True)
    assert isinstance(o, np.ndarray)
    assert o.dtype == np.float64
    wide = (x.astype(np.float64) for x in (q, k, v))
    np.testing.assert_array_equal(o, linattn.softmax_attention(*wide, causal=True))


def test_reference_converts_array_api_strict_inputs_to_float64_numpy() -> None:
    q, k, v = _qkv(np.float32)
    o, lse = reference(linattn.flash_attention, *(xps.asarray(x) for x in (q, k, v)), causal=True)
    for x in (o, lse):
        assert isinstance(x, np.ndarray)
        assert x.dtype == np.float64
    wide = (x.astype(np.float64) for x in (q, k, v))
    expected_o, expected_lse = linattn.flash_attention(*wide, causal=True)
    np.testing.assert_array_equal(o, expected_o)
    np.testing.assert_array_equal(lse, expected_lse)


def test_reference_passes_masks_and_cu_seqlens_through_and_sets_the_numpy_backend() -> None:
    seen: dict[str, Any] = {}

    def spy(q: Any, k: Any, v: Any, *, mask: Any = None, cu_seqlens: Any = None, backend: Any = None) -> Any:
        seen.update(q=q, mask=mask, cu_seqlens=cu_seqlens, backend=backend)
        return q

    q, k, v = _qkv(np.float16)
    mask = np.random.default_rng(5).random((6, 6)) < 0.5
    cu_seqlens = np.array([0, 2, 6], dtype=np.int32)
    reference(spy, q, k, v, mask=mask, cu_seqlens=cu_seqlens)
    assert seen["q"].dtype == np.float64
    assert seen["mask"].dtype == np.bool_
    np.testing.assert_array_equal(seen["mask"], mask)
    assert seen["cu_seqlens"].dtype == np.int32
    np.testing.assert_array_equal(seen["cu_seqlens"], cu_seqlens)
    assert seen["backend"] == "numpy"

    reference(spy, q, k, v, mask=xps.asarray(mask), cu_seqlens=[0, 2, 6])
    assert isinstance(seen["mask"], np.ndarray)
    assert seen["mask"].dtype == np.bool_
    assert seen["cu_seqlens"] == [0, 2, 6]


def test_reference_keeps_a_backend_the_caller_gives_and_adds_none_where_unknown() -> None:
    seen: dict[str, Any] = {}

    def with_backend(q: Any, *, backend: Any = None) -> Any:
        seen["backend"] = backend
        return q

    def without_backend(q: Any) -> Any:
        return q

    q = np.ones((2, 2), dtype=np.float32)
    reference(with_backend, q, backend="reference")
    assert seen["backend"] == "reference"
    assert reference(without_backend, q).dtype == np.float64


# ---- strategies ----


def _sizes(p: AttentionProblem) -> dict[str, int]:
    time_axis, head_axis = (1, 2) if p.layout == "bthd" else (2, 1)
    return {
        "T": p.q.shape[time_axis],
        "S": p.k.shape[time_axis],
        "Hq": p.q.shape[head_axis],
        "Hkv": p.k.shape[head_axis],
        "Dk": p.q.shape[-1],
        "Dv": p.v.shape[-1],
    }


def _features(p: AttentionProblem) -> set[str]:
    n = _sizes(p)
    found = set()
    if n["T"] == 1:
        found.add("T == 1")
    if n["S"] != n["T"]:
        found.add("S != T")
    if n["Dk"] != n["Dv"]:
        found.add("Dk != Dv")
    if n["Hq"] > n["Hkv"]:
        found.add("GQA")
    if n["Hkv"] == 1 and n["Hq"] > 1:
        found.add("MQA")
    mask = p.kwargs.get("mask")
    if mask is not None:
        found.add("bool mask" if mask.dtype == np.bool_ else "float mask")
    window = p.kwargs.get("window")
    if window is not None:
        found.add("window")
        if None in window:
            found.add("window with an unbounded side")
    if p.kwargs.get("alibi_slopes") is not None:
        found.add("alibi")
    cu_seqlens = p.kwargs.get("cu_seqlens")
    if cu_seqlens is not None:
        lengths = np.diff(cu_seqlens)
        if np.any(lengths == 0):
            found.add("cu_seqlens with an empty segment")
        if np.any(lengths == 1):
            found.add("cu_seqlens with a length-1 segment")
    if p.magnitude > 1:
        found.add("large magnitude")
    if p.layout == "bhtd":
        found.add("bhtd layout")
    return found


INTERESTING_CASES = {
    "T == 1", "S != T", "Dk != Dv", "GQA", "MQA", "bool mask", "float mask", "window",
    "window with an unbounded side", "alibi", "cu_seqlens with an empty segment",
    "cu_seqlens with a length-1 segment", "large magnitude", "bhtd layout",
}


@settings(max_examples=60, deadline=None)
@given(attention_problems())
def test_attention_problems_are_accepted_by_softmax_attention(p: AttentionProblem) -> None:
    o, lse = linattn.softmax_attention(p.q, p.k, p.v, return_lse=True, **p.kwargs)
    n = _sizes(p)
    assert o.shape == (*p.q.shape[:3], n["Dv"])
    assert lse.shape == (p.q.shape[0], n["Hq"], n["T"])
    assert not np.isnan(o).any()


@settings(max_examples=20, deadline=None)
@given(attention_problems(dtype=np.float32))
def test_attention_problems_use_the_requested_dtype(p: AttentionProblem) -> None:
    arrays = [p.q, p.k, p.v, p.kwargs.get("alibi_slopes")]
    mask = p.kwargs.get("mask")
    if mask is not None and mask.dtype != np.bool_:
        arrays.append(mask)
    assert all(x.dtype == np.float32 for x in arrays if x is not None)


def test_attention_problems_reach_every_interesting_case() -> None:
    seen: set[str] = set()

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(attention_problems())
    def record(p: AttentionProblem) -> None:
        seen.update(_features(p))

    record()
    assert INTERESTING_CASES <= seen, f"never drawn: {sorted(INTERESTING_CASES - seen)}"


@settings(max_examples=50, deadline=None)
@given(segment_lengths())
def test_segment_lengths_are_non_empty_lists_of_non_negative_ints(lengths: list[int]) -> None:
    assert isinstance(lengths, list)
    assert 1 <= len(lengths) <= 4
    assert all(isinstance(n, int) and 0 <= n <= 12 for n in lengths)


@settings(max_examples=30, deadline=None)
@given(segment_lengths(max_segments=2, max_length=3))
def test_segment_lengths_respect_their_bounds(lengths: list[int]) -> None:
    assert 1 <= len(lengths) <= 2
    assert all(0 <= n <= 3 for n in lengths)
