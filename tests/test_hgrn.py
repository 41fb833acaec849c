"""hgrn (linattn.hgrn): against flash-linear-attention's naive_recurrent_hgrn, written here as a loop.

    h_t = e^{g_t} ⊙ h_{t−1} + x_t,    o_t = h_t      (elementwise over D, no heads)

Tolerances: see tests/gated_cases.py; every output is a sum of at most T + 1 terms.
"""

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from gated_cases import (
    FD_STEP,
    FORMS,
    assert_within,
    bound,
    check_cu_seqlens,
    check_fd,
    check_state_passing,
    chunk_sizes,
    condition,
    fd_atol,
    half_precision_bound,
    log_decays,
    packings,
    sequences,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn.compare import compared_methods, run_compare
from linattn.decoding import init_state, step
from linattn.hgrn import HGRNState, hgrn, hgrn_vjp
from linattn.testing import numerical_vjp, tolerance


@dataclass
class HGRN:
    PER_TIME = ("x", "g")  # the arrays with a time axis
    x: np.ndarray
    g: np.ndarray
    state: np.ndarray | None = None
    cu: list | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def T(self):
        return self.x.shape[1]

    def run(self, dtype=None, **kw):
        cast = (lambda a: a) if dtype is None else (lambda a: None if a is None else a.astype(dtype))
        return hgrn(cast(self.x), cast(self.g), initial_state=cast(self.state), cu_seqlens=self.cu, **kw)

    def bthd(self, x):
        return x  # (B, T, D): no heads, already time-major

    @property
    def kappa(self):
        return condition(self.T, self.g)

    @property
    def terms(self):
        return self.T + 1


def naive_recurrent_hgrn(p: HGRN, absolute=False):
    """FLA's naive_recurrent_hgrn (fla/ops/hgrn/naive.py), per sequence."""
    f = np.abs if absolute else (lambda a: a)
    x = f(p.x)
    B, T, D = x.shape
    o = np.zeros_like(x)
    seqs = sequences(B, T, p.cu)
    final = np.zeros((len(seqs), D))
    for n, b, lo, hi in seqs:
        h = np.zeros(D) if p.state is None else f(p.state[n]).copy()
        for t in range(lo, hi):
            h = np.exp(p.g[b, t]) * h + x[b, t]
            o[b, t] = h
        final[n] = h
    return o, final


@st.composite
def hgrn_problems(draw, *, extreme=False, varlen=None, max_len=14, state=None, min_len=0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, T, cu = draw(packings(max_len=max_len, varlen=varlen))
    if T < min_len:
        batch, T, cu = batch, min_len, None
    D = draw(st.integers(1, 6))
    p = HGRN(rng.standard_normal((batch, T, D)), log_decays(rng, (batch, T, D), extreme), cu=cu, rng=rng)
    if draw(st.booleans()) if state is None else state:
        p.state = rng.standard_normal((batch if cu is None else len(cu) - 1, D))
    return p


@settings(max_examples=40)
@given(hgrn_problems(), st.integers(1, 15))
def test_hgrn_equals_flas_naive_recurrence_in_every_form(p, drawn):
    o_def, h_def = naive_recurrent_hgrn(p)
    o_mag, h_mag = naive_recurrent_hgrn(p, absolute=True)
    for form in FORMS:
        for chunk in chunk_sizes(p.T, drawn) if form == "chunked" else [drawn]:
            o, h = p.run(form=form, chunk_size=chunk, output_final_state=True)
            # float64 sums of <= T + 1 decayed inputs; exponents summed over <= T steps
            assert_within(o, o_def, bound(np.float64, o_mag, p.terms, p.kappa), f"{form} {chunk}: o")
            assert_within(h, h_def, bound(np.float64, h_mag, p.terms, p.kappa), f"{form} {chunk}: state")


@settings(max_examples=20)
@given(hgrn_problems(varlen=False, min_len=1), st.data())
def test_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P = data.draw(st.integers(0, p.T - 1))
    changed = replace(p, x=p.x.copy(), g=p.g.copy())
    changed.x[:, P + 1:] = p.rng.standard_normal(changed.x[:, P + 1:].shape) * 10
    changed.g[:, P + 1:] = log_decays(p.rng, changed.g[:, P + 1:].shape, extreme=True)
    chunk = data.draw(st.integers(1, p.T + 1))
    for form in FORMS:
        before, after = (x.run(form=form, chunk_size=chunk) for x in (p, changed))
        # the scan is bitwise causal (tests/test_scan.py)
        np.testing.assert_array_equal(after[:, : P + 1], before[:, : P + 1], err_msg=form)


@settings(max_examples=20)
@given(hgrn_problems(varlen=False), st.data())
def test_state_passing_equals_one_run(p, data):
    split, chunk = data.draw(st.integers(0, p.T)), data.draw(st.integers(1, p.T + 1))
    check_state_passing(p, split, chunk, naive_recurrent_hgrn)


@settings(max_examples=20)
@given(hgrn_problems(varlen=True), st.sampled_from(FORMS))
def test_cu_seqlens_equals_the_per_segment_loop(p, form):
    check_cu_seqlens(p, form)


@settings(max_examples=15)
@given(hgrn_problems(varlen=False), st.data())
def test_decoding_equals_the_causal_forward(p, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, p.T - 1)), max_size=3))) | {0, p.T})
    B, _, D = p.x.shape
    state = init_state("hgrn", batch=B, dim=D) if p.state is None else HGRNState.from_final_state(p.state)
    outputs = []
    for lo, hi in itertools.pairwise(cuts):
        o, state = step(state, None, None, p.x[:, lo:hi], g=p.g[:, lo:hi])
        outputs.append(o)
    o_full, h_full = p.run(output_final_state=True)
    o_mag, h_mag = naive_recurrent_hgrn(p, absolute=True)
    # float64: blocks chunked per block against one chunked run
    assert_within(np.concatenate(outputs, axis=1), o_full, 2 * bound(np.float64, o_mag, p.terms, p.kappa))
    assert_within(state.final_state, h_full, 2 * bound(np.float64, h_mag, p.terms, p.kappa))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("cu", "with_state"), [(None, True), (None, False), ([0, 2, 2, 5], True)])
def test_vjp_equals_central_differences_for_every_input(form, cu, with_state):
    rng = np.random.default_rng(9)
    T = 5 if cu is None else cu[-1]
    p = HGRN(rng.standard_normal((1, T, 3)), -rng.random((1, T, 3)), cu=cu, rng=rng)
    if with_state:
        p.state = rng.standard_normal((1 if cu is None else len(cu) - 1, 3))
    names = ["x", "g", *(["state"] if with_state else [])]
    o, h = p.run(output_final_state=True)
    do, dh = rng.standard_normal(o.shape), rng.standard_normal(h.shape)

    def forward(*arrays):
        o, h = replace(p, **dict(zip(names, arrays, strict=True))).run(form="parallel", output_final_state=True)
        return np.concatenate([o.ravel(), h.ravel()])

    expected = numerical_vjp(forward, [getattr(p, n) for n in names], np.concatenate([do.ravel(), dh.ravel()]),
                             step=FD_STEP)
    got = hgrn_vjp(p.x, p.g, do, initial_state=p.state, dfinal_state=dh, cu_seqlens=cu, form=form, chunk_size=2)
    o_mag, h_mag = naive_recurrent_hgrn(p, absolute=True)
    loss = float(np.sum(np.abs(do) * o_mag) + np.sum(np.abs(dh) * h_mag))
    check_fd([got.dx, got.dg, *([got.dinitial_state] if with_state else [])], expected, names,
             fd_atol(loss, p.T, p.kappa, p.terms))
    assert with_state or got.dinitial_state is None


@settings(max_examples=25)
@given(hgrn_problems(extreme=True, varlen=False), st.sampled_from([np.float32, np.float16]), st.integers(1, 15))
def test_extreme_gates_in_low_precision_stay_finite_and_match_float64(p, dtype, chunk):
    rounded = replace(p, **{n: None if getattr(p, n) is None else getattr(p, n).astype(dtype).astype(np.float64)
                            for n in ("x", "g", "state")})
    o_def, _ = naive_recurrent_hgrn(rounded)
    o_mag, _ = naive_recurrent_hgrn(rounded, absolute=True)
    for form in FORMS:
        with np.errstate(over="raise", invalid="raise"):
            o, h = p.run(dtype, form=form, chunk_size=chunk, output_final_state=True)
        assert o.dtype == dtype and h.dtype == np.float32
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(h)), form
        if dtype == np.float32:
            # float32 sums and exponents (κ: the gates summed over T), relative to Σ|terms|
            limit = bound(np.float32, o_mag, p.terms, rounded.kappa, (p.T + 1) * float(np.finfo(np.float32).tiny))
        else:
            limit = half_precision_bound(o_mag, o_def, p.terms, rounded.kappa, p.T)
        assert_within(o, o_def, limit, f"{form} {dtype.__name__}")


@pytest.mark.parametrize(("x", "g", "kw", "error", "match"), [
    (np.zeros((2, 5, 3)), np.ones((2, 5, 3)), {}, ValueError, "g must hold finite log-decays <= 0"),
    (np.zeros((2, 5, 3)), np.zeros((2, 5, 4)), {}, ValueError, r"g must have shape \(2, 5, 3\) to match x \(2, 5, 3\)"),
    (np.zeros((2, 5, 1, 3)), np.zeros((2, 5, 1, 3)), {}, ValueError, "x must be 3-D"),
    (np.zeros((2, 5, 3)), np.zeros((2, 5, 3)), {"initial_state": np.zeros((2, 4))}, ValueError,
     r"initial_state must have shape \(2, 3\)"),
    (np.zeros((1, 5, 3)), np.zeros((1, 5, 3)), {"cu_seqlens": [0, 6]}, ValueError, "cu_seqlens"),
    (np.zeros((2, 5, 3), dtype=np.int32), np.zeros((2, 5, 3)), {}, TypeError, "x must have a real floating"),
])
def test_bad_arguments_raise_naming_them(x, g, kw, error, match):
    with pytest.raises(error, match=match):
        hgrn(x, g, **kw)


def test_step_takes_the_input_as_v():
    state = init_state("hgrn", batch=1, dim=2)
    x, g = np.ones((1, 1, 2)), np.zeros((1, 1, 2))
    with pytest.raises(TypeError, match="None, None, x"):
        step(state, x, None, None, g=g)
    o, after = step(state, None, None, x, g=g)
    np.testing.assert_array_equal(o, x)  # h = 0·1 + x, exactly
    assert not state.h.any() and after.h.shape == (1, 2)  # the old state is untouched


def test_compare_measures_the_chunked_form_against_the_recurrent_definition():
    assert compared_methods()["hgrn"].reference is not None
    [row] = run_compare([40], dim=8, heads=2, dtype="float64", methods=["hgrn"], repeats=1)
    # float64: two forms of the same sums of <= 41 terms
    assert row.error_against == "definition" and row.rel_error < tolerance(np.float64, 41, 40)
