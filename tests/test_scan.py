"""The causal scan primitive (linattn.scan): its three forms, its gates, its states, its VJP.

    S_t = (e^{gk_t} e^{gv_t}ᵀ) ⊙ S_{t−1} + k_t v_tᵀ,    o_t = S_tᵀ q_t

Every comparison below is judged against the *magnitude* of what was summed: the same
scan run on |q|, |k|, |v|, |S_0| (the decays are positive, so that is Σ|terms| for each
output). Any summation order of the same terms differs from another by at most a few ε
times that sum, however much the signed terms cancel; the gates add a condition number,
below, because each form rounds the exponents G_t − G_s differently.
"""

import math
import tracemalloc
from dataclasses import dataclass

import array_api_compat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn import scan as scan_module
from linattn.scan import FORMS, causal_scan, causal_scan_vjp, noncausal_scan
from linattn.testing import numerical_vjp, tolerance

# The extreme-gate set: no decay, barely any, e^-1, a decay that underflows within a few
# steps in float32 (e^-90 is subnormal), and one that underflows at once in any dtype.
EXTREME_GATES = (0.0, -1e-3, -1.0, -30.0, -1e3)
MODERATE_GATES = (0.0, -1e-3, -1.0)
# "step": one log-decay per step (..., T, 1); "key": per key dim (..., T, Dk); "value": gv
# (..., T, Dv); and the two combinations the primitive allows.
GATE_KINDS = ("none", "step", "key", "value", "key+value", "step+value")
FD_STEP = 1e-6  # numerical_vjp's default h


@dataclass
class ScanProblem:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    gk: np.ndarray | None
    gv: np.ndarray | None
    state: np.ndarray | None

    @property
    def T(self) -> int:
        return self.q.shape[-2]

    @property
    def kwargs(self) -> dict:
        return {"gk": self.gk, "gv": self.gv, "initial_state": self.state}

    def astype(self, dtype) -> "ScanProblem":
        cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
        return ScanProblem(*(cast(x) for x in (self.q, self.k, self.v, self.gk, self.gv, self.state)))

    def steps(self, lo: int, hi: int, state=None) -> "ScanProblem":
        """Steps lo..hi−1, starting from ``state``."""
        cut = lambda x: None if x is None else x[..., lo:hi, :]  # noqa: E731
        return ScanProblem(*(cut(x) for x in (self.q, self.k, self.v, self.gk, self.gv)), state)

    def __repr__(self) -> str:
        shape = lambda x: None if x is None else x.shape  # noqa: E731
        return (f"ScanProblem(q={shape(self.q)}, k={shape(self.k)}, v={shape(self.v)}, gk={shape(self.gk)}, "
                f"gv={shape(self.gv)}, state={shape(self.state)}, dtype={self.q.dtype})")


def gate_values(rng, shape, extreme):
    """Log-decays: half from the fixed set, half -Exp(·) so that every size in between occurs."""
    pool = EXTREME_GATES if extreme else MODERATE_GATES
    fixed = rng.choice(pool, size=shape)
    smooth = -rng.exponential(10.0 if extreme else 0.5, size=shape)
    return np.where(rng.random(shape) < 0.5, fixed, smooth)


@st.composite
def scan_problems(draw, *, max_len=40, max_dim=7, gates=GATE_KINDS, extreme=None, state=None, min_len=0,
                  max_batch=2, max_group=3):
    """q (*lead, T, Dk), k (*kv_lead, T, Dk), v (*kv_lead, T, Dv): kv_lead is 1 on the group axis under GQA.

    Gates and the initial state are per key/value head (kv_lead) or per query head (lead).
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 5)) == 0:
        lead = kv_lead = ()
    else:
        batch = tuple(draw(st.lists(st.integers(1, max_batch), max_size=2)))
        group = draw(st.integers(1, max_group))
        lead = (*batch, group)
        kv_lead = (*batch, 1) if draw(st.booleans()) else lead
    T = draw(st.integers(min_len, max_len))
    dk, dv = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(gates))
    extreme = draw(st.booleans()) if extreme is None else extreme
    gate_lead = draw(st.sampled_from([kv_lead, lead]))
    gk = gv = None
    if kind.startswith("step"):
        gk = gate_values(rng, (*gate_lead, T, 1), extreme)
    elif kind.startswith("key"):
        gk = gate_values(rng, (*gate_lead, T, dk), extreme)
    if kind.endswith("value"):
        gv = gate_values(rng, (*gate_lead, T, dv), extreme)
    s0 = None
    if draw(st.booleans()) if state is None else state:
        s0 = rng.standard_normal((*draw(st.sampled_from([kv_lead, lead])), dk, dv))
    return ScanProblem(rng.standard_normal((*lead, T, dk)), rng.standard_normal((*kv_lead, T, dk)),
                       rng.standard_normal((*kv_lead, T, dv)), gk, gv, s0)


def scan_by_definition(q, k, v, gk=None, gv=None, initial_state=None):
    """The recurrence, one step at a time, in float64 (independent of linattn's code).

    o has the leading shape of everything broadcast; the state that of everything but q.
    """
    state_arrays = [x for x in (k, v, gk, gv, initial_state) if x is not None]
    state_lead = np.broadcast_shapes(*(x.shape[:-2] for x in state_arrays))
    T, dk, dv = k.shape[-2], k.shape[-1], v.shape[-1]
    S = np.zeros((*state_lead, dk, dv))
    if initial_state is not None:
        S = S + initial_state
    outputs = []
    for t in range(T):
        decay = np.ones((dk, dv))
        if gk is not None:
            decay = decay * np.exp(gk[..., t, :])[..., :, None]
        if gv is not None:
            decay = decay * np.exp(gv[..., t, :])[..., None, :]
        S = decay * S + k[..., t, :, None] * v[..., t, None, :]
        outputs.append(np.einsum("...d,...de->...e", q[..., t, :], S))
    o_lead = np.broadcast_shapes(q.shape[:-2], state_lead)
    o = np.stack(outputs, axis=-2) if outputs else np.zeros((*o_lead, 0, dv))
    return np.broadcast_to(o, (*o_lead, T, dv)), S


def magnitude(p: ScanProblem):
    """Σ|terms| behind each output and each state entry: the definition on absolute values."""
    absolute = lambda x: None if x is None else np.abs(x).astype(np.float64)  # noqa: E731
    # the decays e^g are positive already
    return scan_by_definition(absolute(p.q), absolute(p.k), absolute(p.v), p.gk, p.gv, absolute(p.state))


def exponent_condition(p: ScanProblem, window: int) -> float:
    """1 + the largest Σ|g| over `window` consecutive steps + the number of windows.

    A form that sums log-decays over a window of steps (the chunk; all of T for the
    parallel form) rounds G_t − G_s with an absolute error ~ε·Σ|g|, which exp turns into a
    relative error of every term; products of per-window decays add ~ε per window.
    """
    T = p.T
    if T == 0:
        return 1.0
    per_step = np.zeros(T)
    for g in (p.gk, p.gv):
        if g is not None:
            per_step = per_step + np.max(np.abs(g).reshape(-1, T, g.shape[-1]), axis=(0, 2))
    window = max(1, min(window, T))
    sums = np.convolve(per_step, np.ones(window), mode="valid")
    return 1.0 + float(sums.max()) + math.ceil(T / window)


def scan_tolerance(p: ScanProblem, dtype, window: int) -> float:
    """8ε·sqrt(n)·κ relative to Σ|terms|, n = T·Dk + Dk products summed per output."""
    return tolerance(dtype, p.T * p.k.shape[-1] + p.k.shape[-1], exponent_condition(p, window))


def assert_within(actual, desired, bound, err_msg=""):
    """|actual − desired| <= bound, element by element (bound broadcast); NaN fails."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{err_msg}: shapes differ: {actual.shape} vs {desired.shape}"
    err = np.abs(actual.astype(np.float64) - desired)
    bound = np.broadcast_to(bound, err.shape)
    bad = ~(err <= bound)
    if bad.any():
        ratio = np.where(bad, np.nan_to_num(err / np.maximum(bound, 1e-300), nan=np.inf), 0.0)
        worst = np.unravel_index(int(np.argmax(ratio)), err.shape)
        raise AssertionError(f"{err_msg}: {int(bad.sum())} of {err.size} elements outside the bound; worst at "
                             f"{worst}: actual {actual[worst]!r}, desired {desired[worst]!r}, bound {bound[worst]!r}")


def as_state_shape(state, shape):
    """The final state in the definition's shape (that of k, v, the gates and S_0 broadcast).

    Some forms return a state with size 1 where per-query-head gates have more (T <= 1,
    see test_final_state_shape_does_not_depend_on_the_form_or_length); the values agree
    after broadcasting, which is what the value tests below judge.
    """
    if state.shape == shape:
        return state
    index = tuple(slice(0, 1) if n == 1 else slice(None) for n in shape)
    first = state[index]
    np.testing.assert_array_equal(state, np.broadcast_to(first, state.shape))
    return np.broadcast_to(first, shape)


def chunk_sizes(T, drawn):
    """1, an odd size, one beyond T, and a drawn size (lengths that are not a multiple of it)."""
    return sorted({1, 3, T + 1, drawn})


# ---------------------------------------------------------------------------------------- forms


@settings(max_examples=60)
@given(scan_problems(), st.integers(1, 45))
def test_every_form_equals_the_per_step_definition(p, drawn_chunk):
    o_def, s_def = scan_by_definition(p.q, p.k, p.v, **p.kwargs)
    o_mag, s_mag = magnitude(p)
    for form in FORMS:
        for chunk in chunk_sizes(p.T, drawn_chunk) if form == "chunked" else [drawn_chunk]:
            o, s = causal_scan(p.q, p.k, p.v, form=form, chunk_size=chunk, **p.kwargs)
            # float64 rounding of sums of T·Dk products, with the exponent rounding of the
            # window this form sums log-decays over (chunk, all of T, or none)
            window = {"parallel": p.T, "chunked": chunk, "recurrent": 1}[form]
            tol = scan_tolerance(p, np.float64, window)
            assert_within(o, o_def, tol * o_mag + 1e-300, f"{form} chunk={chunk}: o")
            assert_within(as_state_shape(s, s_def.shape), s_def, tol * s_mag + 1e-300, f"{form} chunk={chunk}: state")


@settings(max_examples=60)
@given(scan_problems(), st.integers(1, 45))
def test_forms_agree_for_every_chunk_size(p, drawn_chunk):
    o_par, s_par = causal_scan(p.q, p.k, p.v, form="parallel", **p.kwargs)
    o_rec, s_rec = causal_scan(p.q, p.k, p.v, form="recurrent", **p.kwargs)
    o_mag, s_mag = magnitude(p)
    # float64; both differ from the exact sums by the parallel form's rounding at most
    tol = 2 * scan_tolerance(p, np.float64, p.T)
    assert_within(o_rec, o_par, tol * o_mag + 1e-300, "recurrent vs parallel: o")
    s_par = as_state_shape(s_par, s_mag.shape)
    assert_within(as_state_shape(s_rec, s_mag.shape), s_par, tol * s_mag + 1e-300, "recurrent vs parallel: state")
    for chunk in chunk_sizes(p.T, drawn_chunk):
        o, s = causal_scan(p.q, p.k, p.v, form="chunked", chunk_size=chunk, **p.kwargs)
        assert_within(o, o_par, tol * o_mag + 1e-300, f"chunked {chunk} vs parallel: o")
        assert_within(as_state_shape(s, s_mag.shape), s_par, tol * s_mag + 1e-300,
                      f"chunked {chunk} vs parallel: state")


def test_chunked_final_state_is_per_key_value_head_under_gqa():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 4))
    k, v = rng.standard_normal((2, 1, 5, 4)), rng.standard_normal((2, 1, 5, 2))
    for form in FORMS:
        # one state per key/value head, shared by its group (the chunked form once kept a
        # copy per query head and ran its inter-chunk recurrence G times)
        assert causal_scan(q, k, v, form=form, chunk_size=2)[1].shape == (2, 1, 4, 2), form


@pytest.mark.parametrize("T", [0, 1, 2, 5])
def test_final_state_shape_does_not_depend_on_the_form_or_length(T):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, T, 3)), rng.standard_normal((1, T, 3)), rng.standard_normal((1, T, 2))
    gk = -rng.random((2, T, 1))  # a decay per query head (k and v shared, as Mamba-2's groups)
    shapes = {form: causal_scan(q, k, v, gk=gk, form=form)[1].shape for form in FORMS}
    assert set(shapes.values()) == {(2, 3, 2)}, shapes  # the state's dims: k, v, the gates, S_0


@settings(max_examples=40)
@given(scan_problems(min_len=1), st.data())
def test_causal_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P = data.draw(st.integers(0, p.T - 1))
    chunk = data.draw(st.integers(1, p.T + 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    changed = ScanProblem(*(None if x is None else x.copy() for x in (p.q, p.k, p.v, p.gk, p.gv)), p.state)
    for x in (changed.q, changed.k, changed.v):
        x[..., P + 1:, :] = rng.standard_normal(x[..., P + 1:, :].shape) * 10
    for g in (changed.gk, changed.gv):
        if g is not None:
            g[..., P + 1:, :] = gate_values(rng, g[..., P + 1:, :].shape, extreme=True)
    for form in FORMS:
        before, _ = causal_scan(p.q, p.k, p.v, form=form, chunk_size=chunk, **p.kwargs)
        after, _ = causal_scan(changed.q, changed.k, changed.v, form=form, chunk_size=chunk, **changed.kwargs)
        # Bitwise: rows <= P are computed by the same operations on the same values in the
        # same order; later steps enter only as products with an exact 0 (a masked score, or
        # exp(-inf)), and adding ±0 leaves a sum unchanged. Prefix sums of gates are sequential.
        np.testing.assert_array_equal(after[..., : P + 1, :], before[..., : P + 1, :], err_msg=form)


@settings(max_examples=40)
@given(scan_problems(), st.data())
def test_state_passing_equals_one_run(p, data):
    split = data.draw(st.integers(0, p.T))
    chunk = data.draw(st.integers(1, p.T + 2))
    o_mag, s_mag = magnitude(p)
    for form in FORMS:
        o, s = causal_scan(p.q, p.k, p.v, form=form, chunk_size=chunk, **p.kwargs)
        first = p.steps(0, split, p.state)
        o1, s1 = causal_scan(first.q, first.k, first.v, form=form, chunk_size=chunk, **first.kwargs)
        second = p.steps(split, p.T, s1)
        o2, s2 = causal_scan(second.q, second.k, second.v, form=form, chunk_size=chunk, **second.kwargs)
        # float64; the two runs round partial sums at other places than the one run does
        tol = 2 * scan_tolerance(p, np.float64, p.T)
        assert_within(np.concatenate([o1, o2], axis=-2), o, tol * o_mag + 1e-300, f"{form}: o")
        assert_within(as_state_shape(s2, s_mag.shape), as_state_shape(s, s_mag.shape), tol * s_mag + 1e-300,
                      f"{form}: state")


def test_zero_steps_return_no_outputs_and_the_initial_state():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 0, 3)), rng.standard_normal((2, 0, 3)), rng.standard_normal((2, 0, 5))
    s0 = rng.standard_normal((2, 3, 5))
    for form in FORMS:
        o, s = causal_scan(q, k, v, form=form, initial_state=s0, gk=np.zeros((2, 0, 1)))
        assert o.shape == (2, 0, 5)
        np.testing.assert_array_equal(s, s0)  # nothing happened to it
        o, s = causal_scan(q, k, v, form=form)
        assert o.shape == (2, 0, 5) and s.shape == (2, 3, 5) and not s.any()


# ---------------------------------------------------------------------------------------- extremes


@settings(max_examples=40)
@given(scan_problems(extreme=True, gates=GATE_KINDS[1:]), st.integers(1, 45))
def test_extreme_gates_give_finite_outputs_and_gradients(p, chunk):
    for dtype in (np.float32, np.float64):
        x = p.astype(dtype)
        for form in FORMS:
            with np.errstate(over="raise", invalid="raise"):  # no exp(+large), no inf·0
                o, s = causal_scan(x.q, x.k, x.v, form=form, chunk_size=chunk, **x.kwargs)
                g = causal_scan_vjp(x.q, x.k, x.v, np.ones_like(o), form=form, chunk_size=chunk,
                                    dfinal_state=np.ones_like(s) if x.state is not None else None, **x.kwargs)
            assert o.dtype == dtype and s.dtype == dtype
            assert np.all(np.isfinite(o)) and np.all(np.isfinite(s)), form
            assert all(np.all(np.isfinite(d)) for d in (g.dq, g.dk, g.dv, g.dgk, g.dgv, g.dinitial_state)
                       if d is not None), form


@settings(max_examples=40)
@given(scan_problems(), st.integers(1, 45))
def test_float32_inputs_match_the_float64_definition(p, chunk):
    p32 = p.astype(np.float32)
    exact = p32.astype(np.float64)  # the same (rounded) inputs, computed in float64
    o_def, s_def = scan_by_definition(exact.q, exact.k, exact.v, **exact.kwargs)
    o_mag, s_mag = magnitude(exact)
    for form in FORMS:
        o, s = causal_scan(p32.q, p32.k, p32.v, form=form, chunk_size=chunk, **p32.kwargs)
        assert o.dtype == np.float32 and s.dtype == np.float32
        # No form ever evaluates exp of a positive number (every exponent is a G_t − G_s with
        # s <= t, or a single gate), so nothing overflows and every factor is a correctly
        # rounded number in [0, 1]. What float32 adds: 8ε·sqrt(n) rounding of the sums, times
        # the exponent condition of the form's window (ε·Σ|g| absolute error in G_t − G_s,
        # e.g. 1e3·C·ε for a chunk holding a −1e3 gate), relative to Σ|terms|; plus
        # subnormal flush below float32's smallest normal for terms that underflow.
        window = {"parallel": p.T, "chunked": chunk, "recurrent": 1}[form]
        tol = scan_tolerance(p, np.float32, window)
        floor = (p.T + 1) * float(np.finfo(np.float32).tiny)
        assert_within(o, o_def, tol * o_mag + floor, f"{form}: o")
        assert_within(as_state_shape(s, s_def.shape), s_def, tol * s_mag + floor, f"{form}: state")


# ---------------------------------------------------------------------------------------- non-causal


@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.integers(0, 12), st.integers(0, 12), st.integers(1, 7), st.integers(1, 7),
       st.booleans())
def test_noncausal_scan_equals_q_kt_v(seed, T, S, dk, dv, gqa):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, 3, T, dk))
    k = rng.standard_normal((2, 1 if gqa else 3, S, dk))
    v = rng.standard_normal((2, 1 if gqa else 3, S, dv))
    desired = np.einsum("...ts,...se->...te", np.einsum("...td,...sd->...ts", q, k), v)
    size = np.einsum("...ts,...se->...te", np.abs(q) @ np.abs(np.swapaxes(k, -1, -2)), np.abs(v))
    for form in FORMS:
        o = noncausal_scan(q, k, v, form=form)
        # float64: Q(KᵀV) and (QKᵀ)V sum the same S·Dk products in another order
        assert_within(o, desired, tolerance(np.float64, S * dk) * size + 1e-300, form)


# ---------------------------------------------------------------------------------------- gradients


def scan_loss_parts(p: ScanProblem):
    """The inputs a VJP differentiates, by name (None left out)."""
    names = ("q", "k", "v", "gk", "gv", "state")
    return {n: getattr(p, n) for n in names if getattr(p, n) is not None}


@settings(max_examples=25)
@given(scan_problems(max_len=6, max_dim=3, max_batch=1), st.integers(1, 7), st.data())
def test_vjp_equals_central_differences_for_every_form(p, chunk, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    o_def, s_def = scan_by_definition(p.q, p.k, p.v, **p.kwargs)
    do = rng.standard_normal(o_def.shape)
    ds = rng.standard_normal(s_def.shape) if data.draw(st.booleans()) else None
    inputs = scan_loss_parts(p)
    names = list(inputs)

    def outputs(*arrays):
        x = dict(zip(names, arrays, strict=True))
        o, s = causal_scan(x["q"], x["k"], x["v"], gk=x.get("gk"), gv=x.get("gv"), initial_state=x.get("state"),
                           form="parallel")
        return np.concatenate([o.ravel(), np.broadcast_to(s, s_def.shape).ravel()])  # (T = 0: see as_state_shape)

    cotangent = np.concatenate([do.ravel(), (np.zeros_like(s_def) if ds is None else ds).ravel()])
    expected = dict(zip(names, numerical_vjp(outputs, list(inputs.values()), cotangent, step=FD_STEP),
                        strict=True))
    # Central differences: the loss L = <do, o> + <ds, S> is multilinear in q, k, v, S_0 and a
    # sum of exponentials in each gate, so truncation is ~h²/6·|L| (negligible). Rounding: the
    # forward's error, 8ε·√n·κ·Σ|terms| per output (κ: the parallel form's prefix sums of
    # log-decays, which also round the ±h step of a gate to ε·Σ|g|), divided by h.
    o_mag, s_mag = magnitude(p)
    loss_size = float(np.sum(np.abs(do) * o_mag) + (0.0 if ds is None else np.sum(np.abs(ds) * s_mag)))
    atol = scan_tolerance(p, np.float64, p.T) / FD_STEP * max(loss_size, 1.0)
    for form in FORMS:
        g = causal_scan_vjp(p.q, p.k, p.v, do, dfinal_state=ds, form=form, chunk_size=chunk, **p.kwargs)
        got = {"q": g.dq, "k": g.dk, "v": g.dv, "gk": g.dgk, "gv": g.dgv, "state": g.dinitial_state}
        for name in ("q", "k", "v", "gk", "gv", "state"):
            if name not in inputs:
                assert got[name] is None, f"{form}: d{name} for an absent input"
                continue
            assert got[name].shape == inputs[name].shape, f"{form}: d{name} shape"
            assert_within(got[name], expected[name], atol, f"{form} chunk={chunk}: d{name}")


@pytest.mark.parametrize("form", FORMS)
def test_gate_gradient_counts_the_final_state_once_under_gqa(form):
    # T = 1 from a zero state: g_0 multiplies S_{-1} = 0, so dL/dg_0 = 0 exactly.
    q = np.array([[[0.1]], [[-0.5]]])  # two query heads sharing one key/value head
    k, v, gk = np.array([[[0.4]]]), np.array([[[1.3]]]), np.array([[[-1.0]]])
    g = causal_scan_vjp(q, k, v, np.ones((2, 1, 1)), gk=gk, dfinal_state=np.ones((1, 1, 1)), form=form)
    assert g.dgk.shape == (1, 1, 1)
    # q·dq − k·dk + ΣdS⊙S cancels exactly in exact arithmetic: rounding of O(1) terms
    # (the chunked form once counted ΣdS⊙S per query head here and gave 0.52)
    np.testing.assert_allclose(g.dgk, 0.0, atol=tolerance(np.float64, 4))


@pytest.mark.parametrize("form", FORMS)
def test_gate_gradient_with_gates_per_query_head_and_shared_keys(form):
    # T = 1 from a zero state: g_0 multiplies S_{-1} = 0, so dL/dg_0 = 0 exactly.
    q = np.array([[[0.36]], [[1.3]]])  # two query heads, each with its own gate
    k, v, gk = np.array([[[0.95]]]), np.array([[[-0.7]]]), np.array([[[-1.0]], [[-0.01]]])
    g = causal_scan_vjp(q, k, v, np.ones((2, 1, 1)), gk=gk, form=form)
    # each head's q·dq − k·dk cancels exactly in exact arithmetic: rounding of O(1) terms (this
    # once subtracted k ⊙ (dk summed over the group) from every head and gave [0.8645, 0.2394])
    np.testing.assert_allclose(g.dgk, np.zeros((2, 1, 1)), atol=tolerance(np.float64, 4))


@pytest.mark.parametrize("form", FORMS)
def test_dk_dv_with_a_state_per_query_head_and_shared_keys(form):
    q, k, v = np.array([[[1.0]], [[2.0]]]), np.array([[[1.0]]]), np.array([[[1.0]]])
    s0, do, ds = np.zeros((2, 1, 1)), np.ones((2, 1, 1)), np.ones((2, 1, 1))
    # L = Σ_h do_h q_h (s0_h + k v) + ds_h (s0_h + k v), so dL/dk = Σ_h (q_h + 1) v = 5 = dL/dv
    g = causal_scan_vjp(q, k, v, do, initial_state=s0, dfinal_state=ds, form=form)
    # small integers throughout: exact (the final-state term was once added after the group
    # sum, counting the group-summed part once per head: 8.0)
    np.testing.assert_array_equal(g.dk, [[[5.0]]])
    np.testing.assert_array_equal(g.dv, [[[5.0]]])


def numpy_gate_gradient(a, b, c, d, end, summed, round_b=False, round_d=False):
    """The backend primitive "gate_gradient" in NumPy, summed in another order than the reference's."""
    r = a * b - c * d
    if summed:
        r = r.sum(axis=-1, keepdims=True)
    suffix = np.flip(np.cumsum(np.flip(r, axis=-2), axis=-2), axis=-2)
    dg = suffix if end is None else suffix + end[..., None, :]
    if round_b or round_d:
        return dg, b.astype(a.dtype) if round_b else None, d.astype(c.dtype) if round_d else None
    return dg


@settings(max_examples=40)
@given(scan_problems(max_len=9, max_dim=4, gates=("step", "key", "value", "key+value", "step+value")), st.booleans(),
       st.data())
def test_a_backends_gate_gradient_kernel_replaces_the_references_sums(p, with_final, data):
    """A backend's "gate_gradient" kernel gets the gates' gradients where its operands share a shape.

    The test backend runs the reference scans and a NumPy gate_gradient; its gradients must
    equal the reference backend's, and the kernel must be asked for exactly the gates whose
    read and written operands have one shape (no GQA broadcast between q and k, o and v).
    """
    from linattn import backends

    calls = []

    def kernel(a, b, c, d, end, summed):
        calls.append((a.shape, c.shape, None if end is None else end.shape, summed))
        return numpy_gate_gradient(a, b, c, d, end, summed)

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    o, s = causal_scan(p.q, p.k, p.v, **p.kwargs)
    do = rng.standard_normal(o.shape)
    ds = rng.standard_normal(s.shape) if with_final else None
    want = causal_scan_vjp(p.q, p.k, p.v, do, dfinal_state=ds, backend="numpy", **p.kwargs)
    with pytest.MonkeyPatch.context() as patch:
        test_backend = backends.Backend("gate-kernel-test", array_api_compat.is_numpy_namespace,
                                        {"gate_gradient": kernel})
        patch.setitem(backends._REGISTRY, test_backend.name, test_backend)
        got = causal_scan_vjp(p.q, p.k, p.v, do, dfinal_state=ds, backend="gate-kernel-test", **p.kwargs)
    # float64 sums of the same O(T·D) terms in two orders: 8ε·sqrt(n) of the terms' magnitude
    size = 1.0 + sum(float(np.sum(np.abs(x))) for x in (want.dq, want.dk, want.dv) if x is not None) * (
        1.0 + float(np.max(np.abs(p.q), initial=0.0) + np.max(np.abs(p.k), initial=0.0) +
                    np.max(np.abs(p.v), initial=0.0) + np.max(np.abs(o), initial=0.0)))
    bound = tolerance(np.float64, max(p.T, 1) * 8) * size
    expected_calls = 0
    for name, (x, y) in (("dgk", (p.q, p.k)), ("dgv", (o, p.v))):
        gate = p.gk if name == "dgk" else p.gv
        if gate is None:
            assert getattr(got, name) is None
            continue
        assert getattr(got, name).shape == gate.shape and getattr(got, name).dtype == getattr(want, name).dtype
        assert_within(getattr(got, name), getattr(want, name), bound, name)
        expected_calls += x.shape == np.broadcast_shapes(x.shape, y.shape) == y.shape
    for name in ("dq", "dk", "dv", "dinitial_state"):
        if getattr(want, name) is not None:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert len(calls) == expected_calls, calls


def rounding_scan_kernel(calls: list, reverse: bool):
    """A "causal_scan" kernel that sums in float64 and rounds o to its inputs' float32 unless asked ``wide``.

    So the CuPy kernels treat 16-bit data; ``calls`` records (direction, wide) per call.
    """
    def kernel(q, k, v, gk, gv, state0, wide=False):
        calls.append(("reversed" if reverse else "forward", wide))
        prepare = lambda x: None if x is None else (np.flip(x, axis=-2) if reverse else x).astype(np.float64)  # noqa: E731
        chunked = scan_module._FORMS["chunked"]  # the reference form (the public one checks gate widths)
        o, s = chunked(np, *(prepare(x) for x in (q, k, v, gk, gv)),
                       None if state0 is None else state0.astype(np.float64), 64)
        o = np.flip(o, axis=-2) if reverse else o
        return (o if wide else o.astype(np.float32)), s.astype(np.float32)
    return kernel


@pytest.mark.parametrize("with_final", [False, True])
@pytest.mark.parametrize("gates", GATE_KINDS)
@settings(max_examples=10)
@given(data=st.data())
def test_gate_gradients_sum_the_scans_unrounded_outputs(gates, with_final, data):
    """The VJP asks the scans whose outputs enter a gate gradient for them unrounded (``wide``).

    A gate's gradient sums q ⊙ dq − k ⊙ dk (o ⊙ do − v ⊙ dv) over all later steps, terms that
    cancel: rounding dq, dk (o, dv) first would dominate its error in 16 bits. The test
    backend's scans round to the float32 inputs' dtype unless asked ``wide``; the VJP must
    ask exactly the dq and dk scans for a key gate and the o and dv scans for a value gate,
    hand the gate kernel those unrounded gradients, and return every gradient in float32.
    """
    from linattn import backends

    calls, gate_calls = [], []

    def gate_kernel(a, b, c, d, end, summed, **rounding):
        result = numpy_gate_gradient(a, b, c, d, end, summed, **rounding)
        gate_calls.append(("dgk" if a is p32.q else "dgv", (b.dtype, d.dtype), rounding, result))
        return result

    p = data.draw(scan_problems(max_len=9, max_dim=4, gates=(gates,)))  # every gate kind, with and without dS_T
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    o, s = causal_scan(p.q, p.k, p.v, **p.kwargs)
    do = rng.standard_normal(o.shape)
    ds = rng.standard_normal(s.shape) if with_final else None
    want = causal_scan_vjp(p.q, p.k, p.v, do, dfinal_state=ds, backend="numpy", **p.kwargs)
    p32 = p.astype(np.float32)
    with pytest.MonkeyPatch.context() as patch:
        test_backend = backends.Backend("wide-scan-test", array_api_compat.is_numpy_namespace, {
            "causal_scan": rounding_scan_kernel(calls, reverse=False),
            "causal_scan_reversed": rounding_scan_kernel(calls, reverse=True), "gate_gradient": gate_kernel})
        patch.setitem(backends._REGISTRY, test_backend.name, test_backend)
        got = causal_scan_vjp(p32.q, p32.k, p32.v, do.astype(np.float32),
                              dfinal_state=None if ds is None else ds.astype(np.float32), backend="wide-scan-test",
                              **p32.kwargs)
    key, value = p.gk is not None, p.gv is not None
    expected = [("forward", key), ("reversed", key), ("reversed", value)]
    if value or ((key or value) and with_final):  # the forward scan, for o or the final state
        expected.insert(0, ("forward", value))
    assert calls == expected
    # the kernel reads the unrounded gradients and rounds those the VJP returns: dq, dk; dv
    for gate, dtypes, rounding, result in gate_calls:
        assert dtypes == (np.float64, np.float64), (gate, dtypes)
        assert rounding == {"round_b": gate == "dgk", "round_d": True}, (gate, rounding)
        for name, copy in zip(("dq", "dk") if gate == "dgk" else ("dv",), result[1:] if gate == "dgk" else result[2:],
                              strict=True):
            assert getattr(got, name) is copy, name
    # float32 inputs: each gradient's float64 sums (of the float32 data, with the final-state
    # terms in float32) are rounded once; those terms are O(T·D) products of the values'
    # magnitude, as in the test above
    size = 1.0 + sum(float(np.sum(np.abs(x))) for x in (want.dq, want.dk, want.dv)) * (
        1.0 + float(np.max(np.abs(p.q), initial=0.0) + np.max(np.abs(p.k), initial=0.0) +
                    np.max(np.abs(p.v), initial=0.0) + np.max(np.abs(o), initial=0.0)))
    bound = tolerance(np.float32, max(p.T, 1) * 8) * size
    for name in ("dq", "dk", "dv", "dgk", "dgv", "dinitial_state"):
        if getattr(want, name) is None:
            assert getattr(got, name) is None, name
            continue
        assert getattr(got, name).dtype == np.float32, name
        assert_within(getattr(got, name), getattr(want, name), bound, name)


def test_vjp_sums_dk_and_dv_over_the_query_group():
    rng = np.random.default_rng(5)
    q, do = rng.standard_normal((3, 4, 2)), rng.standard_normal((3, 4, 2))
    k, v = rng.standard_normal((1, 4, 2)), rng.standard_normal((1, 4, 2))
    gk = -rng.random((1, 4, 2))
    for form in FORMS:
        grouped = causal_scan_vjp(q, k, v, do, gk=gk, form=form, chunk_size=3)
        each = [causal_scan_vjp(q[i:i + 1], k, v, do[i:i + 1], gk=gk, form=form, chunk_size=3) for i in range(3)]
        # float64; the group sum of three O(1) gradients, summed in another order
        tol = tolerance(np.float64, 12)
        for name in ("dk", "dv", "dgk"):
            separate = sum(getattr(g, name) for g in each)
            np.testing.assert_allclose(getattr(grouped, name), separate, rtol=tol, atol=tol * 10, err_msg=name)


# ---------------------------------------------------------------------------------------- arguments


def _arrays():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 4))


@pytest.mark.parametrize("fn", [causal_scan, lambda q, k, v, **kw: causal_scan_vjp(q, k, v, v[..., :, :] * 0 + 1,
                                                                                      **kw)],
                         ids=["forward", "vjp"])
@pytest.mark.parametrize(("kwargs", "name"), [
    ({"form": "quadratic"}, "form"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": -3}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"gk": np.zeros((2, 5, 2))}, "gk"),  # neither 1 nor Dk = 3 wide
    ({"gk": np.zeros((2, 5, 4))}, "gk"),  # Dv wide, not Dk
    ({"gk": np.zeros((2, 4, 1))}, "gk"),  # one step short
    ({"gk": np.zeros(5)}, "gk"),  # no time axis
    ({"gv": np.zeros((2, 5, 1))}, "gv"),  # gv is per value dim only
    ({"gv": np.zeros((2, 5, 3))}, "gv"),
])
def test_bad_arguments_raise_value_error_naming_them(fn, kwargs, name):
    q, k, v = _arrays()
    with pytest.raises(ValueError, match=name):
        fn(q, k, v, **kwargs)


def test_noncausal_scan_rejects_an_unknown_form():
    q, k, v = _arrays()
    with pytest.raises(ValueError, match="form"):
        noncausal_scan(q, k, v, form="chunky")


# ---------------------------------------------------------------------------------------- memory


@pytest.mark.parametrize("gates", ["none", "key"])
def test_chunked_memory_is_linear_in_length(gates):
    T, D, chunk = 65536, 64, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, T, D), dtype=np.float32) for _ in range(3))
    gk = -rng.random((1, T, D), dtype=np.float32) if gates == "key" else None
    tracemalloc.start()
    try:
        o, _ = causal_scan(q, k, v, gk=gk, form="chunked", chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert o.shape == (1, T, D) and o.dtype == np.float32
    # With C = D = 64, one T·D float32 array, the intra-chunk scores (T·C) and the chunk
    # states (T/C·D²) are each 16 MiB. The chunked form holds about ten such at once: the
    # output, the intra-chunk output and scores (and the masked copy), the local, carried
    # and stacked chunk states, the state readout, and for vector gates ~3 slices of the
    # decay tensor, each capped at 2^22 elements (16 MiB). 160 MiB is 100x below the
    # 16 GiB of one T×T float32 array, which nothing may allocate.
    one = T * D * 4
    assert peak < 10 * one, f"peak {peak / 2**20:.0f} MiB"
