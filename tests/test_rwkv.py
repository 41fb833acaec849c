"""rwkv6 (linattn.rwkv): against flash-linear-attention's naive_recurrent_rwkv6, written here as a loop.

    o_t = s·(S_{t−1} + Diag(u) k_t v_tᵀ)ᵀ r_t,    S_t = Diag(e^{w_t}) S_{t−1} + k_t v_tᵀ

(the exclusive readout: o_t reads the state before k_t v_tᵀ). Tolerances: see
tests/gated_cases.py.
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
    to_layout,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn.compare import compared_methods, run_compare
from linattn.decoding import init_state, step
from linattn.rwkv import RWKV6State, rwkv6, rwkv6_vjp
from linattn.testing import numerical_vjp, tolerance

PER_TIME = ("r", "k", "v", "w")


@dataclass
class RWKV:
    PER_TIME = PER_TIME  # the arrays with a time axis
    r: np.ndarray
    k: np.ndarray
    v: np.ndarray
    w: np.ndarray
    u: np.ndarray
    state: np.ndarray | None = None
    scale: float | None = None
    cu: list | None = None
    layout: str = "bthd"
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def T(self):
        return self.r.shape[1]

    @property
    def s(self):
        return self.r.shape[-1] ** -0.5 if self.scale is None else self.scale

    def arrays(self, dtype=None):
        cast = (lambda a: a) if dtype is None else (lambda a: None if a is None else a.astype(dtype))
        return [to_layout(cast(getattr(self, n)), self.layout) for n in PER_TIME] + [cast(self.u)]

    def run(self, dtype=None, **kw):
        state = None if self.state is None else (self.state if dtype is None else self.state.astype(dtype))
        return rwkv6(*self.arrays(dtype), scale=self.scale, initial_state=state, cu_seqlens=self.cu,
                     layout=self.layout, **kw)

    def bthd(self, x):
        return x if self.layout == "bthd" else np.swapaxes(x, 1, 2)

    @property
    def kappa(self):
        return condition(self.T, self.w)

    @property
    def terms(self):
        return (self.T + 1) * self.r.shape[-1]


def naive_recurrent_rwkv6(p: RWKV, absolute=False):
    """FLA's naive_recurrent_rwkv6 (fla/ops/rwkv6/recurrent_naive.py), per query head of each key/value head."""
    f = np.abs if absolute else (lambda a: a)
    r, k, v, u = f(p.r), f(p.k), f(p.v), f(p.u)
    B, T, Hq, K = r.shape
    Hkv, V = k.shape[2], v.shape[3]
    G = Hq // Hkv
    o = np.zeros((B, T, Hq, V))
    seqs = sequences(B, T, p.cu)
    final = np.zeros((len(seqs), Hkv, K, V))
    for n, b, lo, hi in seqs:
        for h in range(Hkv):
            state = np.zeros((K, V)) if p.state is None else f(p.state[n, h]).copy()
            for t in range(lo, hi):
                kv = np.outer(k[b, t, h], v[b, t, h])
                for j in range(G):
                    q = r[b, t, h * G + j] * p.s
                    o[b, t, h * G + j] = ((state + u[h][:, None] * kv) * q[:, None]).sum(axis=0)
                state = state * np.exp(p.w[b, t, h])[:, None] + kv
            final[n, h] = state
    return o, final


@st.composite
def rwkv_problems(draw, *, extreme=False, varlen=None, max_len=12, state=None, min_len=0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, T, cu = draw(packings(max_len=max_len, varlen=varlen))
    if T < min_len:
        batch, T, cu = batch, min_len, None
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dk, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    p = RWKV(rng.standard_normal((batch, T, hkv * group, dk)), rng.standard_normal((batch, T, hkv, dk)),
             rng.standard_normal((batch, T, hkv, dv)), log_decays(rng, (batch, T, hkv, dk), extreme),
             rng.standard_normal((hkv, dk)), cu=cu, scale=draw(st.sampled_from([None, 1.0])),
             layout=draw(st.sampled_from(["bthd", "bhtd"])), rng=rng)
    if draw(st.booleans()) if state is None else state:
        p.state = rng.standard_normal((batch if cu is None else len(cu) - 1, hkv, dk, dv))
    return p


@settings(max_examples=40)
@given(rwkv_problems(), st.integers(1, 13))
def test_rwkv6_equals_flas_naive_recurrence_in_every_form(p, drawn):
    o_def, s_def = naive_recurrent_rwkv6(p)
    o_mag, s_mag = naive_recurrent_rwkv6(p, absolute=True)
    for form in FORMS:
        for chunk in chunk_sizes(p.T, drawn) if form == "chunked" else [drawn]:
            o, S = p.run(form=form, chunk_size=chunk, output_final_state=True)
            # float64 sums of T·Dk products and the bonus; exponents summed over <= T steps
            assert_within(p.bthd(o), o_def, bound(np.float64, o_mag, p.terms, p.kappa), f"{form} {chunk}: o")
            assert_within(S, s_def, bound(np.float64, s_mag, p.terms, p.kappa), f"{form} {chunk}: state")


def test_the_first_output_is_the_bonus_and_the_state_read_before_the_update():
    rng = np.random.default_rng(1)
    r, k, v = (rng.standard_normal((1, 1, 1, 2)) for _ in range(3))
    w, u, S0 = -rng.random((1, 1, 1, 2)), rng.standard_normal((1, 2)), rng.standard_normal((1, 1, 2, 2))
    o = rwkv6(r, k, v, w, u, scale=1.0, initial_state=S0)
    # o_0 = S_{-1}ᵀ r_0 (not decayed by w_0, no k_0 v_0ᵀ) + (r_0·(u⊙k_0)) v_0: exact up to two roundings
    expected = S0[0, 0].T @ r[0, 0, 0] + (r[0, 0, 0] * u[0] * k[0, 0, 0]).sum() * v[0, 0, 0]
    np.testing.assert_allclose(o[0, 0, 0], expected, rtol=tolerance(np.float64, 4), atol=tolerance(np.float64, 4))


def test_rwkv_own_decay_parameter_converts_by_minus_exp():
    rng = np.random.default_rng(2)
    r, k, v = (rng.standard_normal((1, 6, 1, 3)) for _ in range(3))
    w_raw, u = rng.standard_normal((1, 6, 1, 3)), rng.standard_normal((1, 3))
    # RWKV-6 decays the state by exp(−exp(w_raw)) per step: that is e^w with w = −exp(w_raw)
    S, outputs = np.zeros((3, 3)), []
    for t in range(6):
        kv = np.outer(k[0, t, 0], v[0, t, 0])
        outputs.append((S + u[0][:, None] * kv).T @ r[0, t, 0])
        S = np.exp(-np.exp(w_raw[0, t, 0]))[:, None] * S + kv
    o = rwkv6(r, k, v, -np.exp(w_raw), u, scale=1.0)
    # float64 over 6 steps of 3 products
    np.testing.assert_allclose(o[0, :, 0], np.array(outputs), rtol=tolerance(np.float64, 24),
                               atol=tolerance(np.float64, 24))


@settings(max_examples=20)
@given(rwkv_problems(varlen=False, min_len=1), st.data())
def test_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P = data.draw(st.integers(0, p.T - 1))
    changed = replace(p, r=p.r.copy(), k=p.k.copy(), v=p.v.copy(), w=p.w.copy())
    for a in (changed.r, changed.k, changed.v):
        a[:, P + 1:] = p.rng.standard_normal(a[:, P + 1:].shape) * 10
    changed.w[:, P + 1:] = log_decays(p.rng, changed.w[:, P + 1:].shape, extreme=True)
    chunk = data.draw(st.integers(1, p.T + 1))
    for form in FORMS:
        before, after = (p.bthd(x.run(form=form, chunk_size=chunk)) for x in (p, changed))
        # row t reads the scan's row t − 1 (whose query is r_t) and the bonus of step t alone
        np.testing.assert_array_equal(after[:, : P + 1], before[:, : P + 1], err_msg=form)


@settings(max_examples=20)
@given(rwkv_problems(varlen=False), st.data())
def test_state_passing_equals_one_run(p, data):
    split, chunk = data.draw(st.integers(0, p.T)), data.draw(st.integers(1, p.T + 1))
    check_state_passing(p, split, chunk, naive_recurrent_rwkv6)


@settings(max_examples=20)
@given(rwkv_problems(varlen=True), st.sampled_from(FORMS))
def test_cu_seqlens_equals_the_per_segment_loop(p, form):
    check_cu_seqlens(p, form)


@settings(max_examples=15)
@given(rwkv_problems(varlen=False), st.data())
def test_decoding_equals_the_causal_forward(p, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, p.T - 1)), max_size=3))) | {0, p.T})
    B, _, _, K = p.r.shape
    Hkv, V = p.k.shape[2], p.v.shape[3]
    state = (init_state("rwkv6", batch=B, kv_heads=Hkv, key_dim=K, value_dim=V, u=p.u, scale=p.scale)
             if p.state is None else RWKV6State.from_final_state(p.state, u=p.u, scale=p.scale))
    outputs = []
    for lo, hi in itertools.pairwise(cuts):
        r, k, v, w = (to_layout(getattr(p, n)[:, lo:hi], p.layout) for n in PER_TIME)
        o, state = step(state, r, k, v, w=w, layout=p.layout)
        outputs.append(p.bthd(o))
    o_full, S_full = p.run(output_final_state=True)
    o_mag, s_mag = naive_recurrent_rwkv6(p, absolute=True)
    # float64: blocks chunked per block against one chunked run
    assert_within(np.concatenate(outputs, axis=1), p.bthd(o_full), 2 * bound(np.float64, o_mag, p.terms, p.kappa))
    assert_within(state.final_state, S_full, 2 * bound(np.float64, s_mag, p.terms, p.kappa))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("cu", "layout", "with_state"), [
    (None, "bthd", True), (None, "bhtd", False), ([0, 1, 1, 4], "bthd", True),
])
def test_vjp_equals_central_differences_for_every_input(form, cu, layout, with_state):
    rng = np.random.default_rng(5)
    T = 4 if cu is None else cu[-1]
    p = RWKV(rng.standard_normal((1, T, 2, 2)), rng.standard_normal((1, T, 1, 2)), rng.standard_normal((1, T, 1, 2)),
             -rng.random((1, T, 1, 2)), rng.standard_normal((1, 2)), scale=0.9, cu=cu, layout=layout, rng=rng)
    if with_state:
        p.state = rng.standard_normal((1 if cu is None else len(cu) - 1, 1, 2, 2))
    names = [*PER_TIME, "u", *(["state"] if with_state else [])]
    o, S = p.run(output_final_state=True)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(S.shape)

    def forward(*arrays):
        values = {n: (np.swapaxes(a, 1, 2) if n in PER_TIME and layout == "bhtd" else a)
                  for n, a in zip(names, arrays, strict=True)}
        o, S = replace(p, **values).run(form="parallel", output_final_state=True)
        return np.concatenate([o.ravel(), S.ravel()])

    inputs = [*p.arrays(), *([p.state] if with_state else [])]
    expected = numerical_vjp(forward, inputs, np.concatenate([do.ravel(), dS.ravel()]), step=FD_STEP)
    got = rwkv6_vjp(*p.arrays(), do, scale=p.scale, initial_state=p.state, dfinal_state=dS, cu_seqlens=cu,
                    layout=layout, form=form, chunk_size=3)
    o_mag, s_mag = naive_recurrent_rwkv6(p, absolute=True)
    loss = float(np.sum(np.abs(p.bthd(do)) * o_mag) + np.sum(np.abs(dS) * s_mag))
    fields = [got.dr, got.dk, got.dv, got.dw, got.du, *([got.dinitial_state] if with_state else [])]
    check_fd(fields, expected, names, fd_atol(loss, p.T, p.kappa, p.terms))
    assert with_state or got.dinitial_state is None


@settings(max_examples=25)
@given(rwkv_problems(extreme=True, varlen=False), st.sampled_from([np.float32, np.float16]), st.integers(1, 13))
def test_extreme_decays_in_low_precision_stay_finite_and_match_float64(p, dtype, chunk):
    rounded = replace(p, **{n: None if getattr(p, n) is None else getattr(p, n).astype(dtype).astype(np.float64)
                            for n in (*PER_TIME, "u", "state")})
    o_def, _ = naive_recurrent_rwkv6(rounded)
    o_mag, _ = naive_recurrent_rwkv6(rounded, absolute=True)
    for form in FORMS:
        with np.errstate(over="raise", invalid="raise"):
            o, S = p.run(dtype, form=form, chunk_size=chunk, output_final_state=True)
        assert o.dtype == dtype and S.dtype == np.float32
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(S)), form
        if dtype == np.float32:
            # float32 sums and exponents (κ: the gates summed over T), relative to Σ|terms|
            limit = bound(np.float32, o_mag, p.terms, rounded.kappa, (p.T + 1) * float(np.finfo(np.float32).tiny))
        else:
            limit = half_precision_bound(o_mag, o_def, p.terms, rounded.kappa, p.T)
        assert_within(p.bthd(o), o_def, limit, f"{form} {dtype.__name__}")


def _good():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((2, 5, 2, 3)), rng.standard_normal((2, 5, 2, 2)),
            -rng.random((2, 5, 2, 3)), rng.standard_normal((2, 3)))


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"w": np.ones((2, 5, 2, 3))}, ValueError, "w must hold finite log-decays <= 0"),
    ({"w": np.zeros((2, 5, 4, 3))}, ValueError, r"w must have shape \(2, 5, 2, 3\).*r \(2, 5, 4, 3\)"),
    ({"u": np.zeros((4, 3))}, ValueError, r"u must have shape \(2, 3\)"),
    ({"u": np.full((2, 3), np.inf)}, ValueError, "u must hold finite values"),
    ({"k": np.zeros((2, 5, 3, 3))}, ValueError, "same number of heads|multiple"),
    ({"initial_state": np.zeros((2, 2, 2, 3))}, ValueError, r"initial_state must have shape \(2, 2, 3, 2\)"),
    ({"chunk_size": 1.5}, ValueError, "chunk_size"),
])
def test_bad_arguments_raise_naming_them(change, error, match):
    r, k, v, w, u = _good()
    args = {"r": r, "k": k, "v": v, "w": w, "u": u}
    args.update({n: a for n, a in change.items() if n in args})
    with pytest.raises(error, match=match):
        rwkv6(*args.values(), **{n: a for n, a in change.items() if n not in args})


def test_step_needs_the_decays():
    r, k, v, _, u = _good()
    state = init_state("rwkv6", batch=2, kv_heads=2, key_dim=3, value_dim=2, u=u)
    with pytest.raises(TypeError, match="w="):
        step(state, r, k, v)


def test_compare_measures_the_chunked_form_against_the_recurrent_definition():
    assert compared_methods()["rwkv6"].reference is not None
    [row] = run_compare([40], dim=8, heads=2, dtype="float64", methods=["rwkv6"], repeats=1)
    # float64: two forms of the same sums of 40·8 products
    assert row.error_against == "definition" and row.rel_error < tolerance(np.float64, 320, 40)
