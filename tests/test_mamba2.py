"""mamba2 (linattn.mamba2): against the SSD recurrence written here, and against simple GLA under the mapping.

    Δ = f(dt + dt_bias),   h_t = e^{Δ_t A} h_{t−1} + Δ_t B_t x_tᵀ,   y_t = h_tᵀ C_t + D ⊙ x_t

per head h, with B and C of group h // (H/G). Tolerances: see tests/gated_cases.py.
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
    packings,
    sequences,
    to_layout,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn.compare import compared_methods, run_compare
from linattn.decoding import step
from linattn.gated import simple_gla
from linattn.mamba2 import Mamba2State, mamba2, mamba2_vjp
from linattn.testing import numerical_vjp, tolerance

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "state")
PER_TIME = ("x", "dt", "B", "C")  # the arrays with a time axis (moved by the layout)


@dataclass
class SSD:
    PER_TIME = PER_TIME
    """Inputs in (batch, T, H, ·) order; ``layout`` is how they are passed."""

    x: np.ndarray
    dt: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray | None = None
    dt_bias: np.ndarray | None = None
    state: np.ndarray | None = None
    softplus: bool = False
    cu: list | None = None
    layout: str = "bthd"
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def T(self):
        return self.x.shape[1]

    def arrays(self, dtype=None):
        cast = (lambda a: a) if dtype is None else (lambda a: None if a is None else a.astype(dtype))
        return {n: (to_layout(cast(getattr(self, n)), self.layout) if n in PER_TIME else cast(getattr(self, n)))
                for n in NAMES}

    def run(self, dtype=None, **kw):
        a = self.arrays(dtype)
        return mamba2(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], dt_bias=a["dt_bias"],
                      dt_softplus=self.softplus, initial_state=a["state"], cu_seqlens=self.cu, layout=self.layout, **kw)

    def bthd(self, y):
        return y if self.layout == "bthd" else np.swapaxes(y, 1, 2)

    def delta(self):
        d = self.dt + (0.0 if self.dt_bias is None else self.dt_bias)
        return np.logaddexp(0.0, d) if self.softplus else d

    @property
    def kappa(self):
        return condition(self.T, self.delta() * np.abs(self.A))

    @property
    def terms(self):
        return self.T * self.B.shape[-1] + self.B.shape[-1] + 1


def ssd_by_definition(p: SSD, absolute=False):
    """The SSD recurrence one step at a time, as mamba-ssm's reference scan: (y, final states (N, H, N, P))."""
    f = np.abs if absolute else (lambda a: a)
    x, B, C = f(p.x), f(p.B), f(p.C)
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    delta = p.delta()
    D = np.zeros((H, P)) if p.D is None else np.broadcast_to(f(p.D).reshape(H, -1), (H, P))
    y = np.zeros_like(x)
    seqs = sequences(batch, T, p.cu)
    final = np.zeros((len(seqs), H, N, P))
    for n, b, lo, hi in seqs:
        for h in range(H):
            g = h // (H // G)
            state = np.zeros((N, P)) if p.state is None else f(p.state[n, h]).copy()
            for t in range(lo, hi):
                state = np.exp(delta[b, t, h] * p.A[h]) * state + delta[b, t, h] * np.outer(B[b, t, g], x[b, t, h])
                y[b, t, h] = state.T @ C[b, t, g] + D[h] * x[b, t, h]
            final[n, h] = state
    return y, final


@st.composite
def ssd_problems(draw, *, extreme=False, varlen=None, max_len=10, state=None, min_len=0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, T, cu = draw(packings(max_len=max_len, varlen=varlen))
    if T < min_len:
        batch, T, cu = batch, min_len, None
    G, ratio = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H, P, N = G * ratio, draw(st.integers(1, 3)), draw(st.integers(1, 3))
    softplus = draw(st.booleans())
    with_bias = draw(st.booleans())
    if extreme:
        A = -rng.choice([0.0, 1e-3, 1.0, 30.0, 1e3], size=H)
    else:
        A = -rng.exponential(0.5, size=H)
    # softplus maps any dt to Δ > 0; without it Δ = dt + dt_bias must be >= 0
    dt = rng.standard_normal((batch, T, H)) if softplus else rng.random((batch, T, H)) + 0.05
    p = SSD(rng.standard_normal((batch, T, H, P)), dt, A, rng.standard_normal((batch, T, G, N)),
            rng.standard_normal((batch, T, G, N)), softplus=softplus, cu=cu,
            layout=draw(st.sampled_from(["bthd", "bhtd"])), rng=rng)
    p.dt_bias = (rng.standard_normal(H) if softplus else rng.random(H)) if with_bias else None
    d_kind = draw(st.sampled_from(["none", "head", "channel"]))
    p.D = None if d_kind == "none" else rng.standard_normal(H if d_kind == "head" else (H, P))
    if draw(st.booleans()) if state is None else state:
        p.state = rng.standard_normal((batch if cu is None else len(cu) - 1, H, N, P))
    return p


@settings(max_examples=40)
@given(ssd_problems(), st.integers(1, 11))
def test_mamba2_equals_the_ssd_recurrence_in_every_form(p, drawn):
    y_def, h_def = ssd_by_definition(p)
    y_mag, h_mag = ssd_by_definition(p, absolute=True)
    for form in FORMS:
        for chunk in chunk_sizes(p.T, drawn) if form == "chunked" else [drawn]:
            y, h = p.run(form=form, chunk_size=chunk, output_final_state=True)
            # float64 sums of T·N products (and the skip), the exponents Δ·A summed over <= T steps
            assert_within(p.bthd(y), y_def, bound(np.float64, y_mag, p.terms, p.kappa), f"{form} {chunk}: y")
            assert_within(h, h_def, bound(np.float64, h_mag, p.terms, p.kappa), f"{form} {chunk}: state")


@settings(max_examples=25)
@given(ssd_problems(varlen=False), st.sampled_from(FORMS))
def test_mamba2_is_simple_gla_with_q_C_k_B_v_x_dt_g_A_dt(p, form):
    H, P = p.x.shape[2:]
    G = p.B.shape[2]
    delta = p.delta()
    heads = lambda a: np.repeat(a, H // G, axis=2)  # noqa: E731 (group g -> its H/G heads)
    o, S = simple_gla(heads(p.C), heads(p.B), p.x * delta[..., None], delta * p.A, scale=1.0,
                      initial_state=p.state, output_final_state=True, form=form, chunk_size=4)
    D = 0.0 if p.D is None else np.broadcast_to(p.D.reshape(H, -1), (H, P))
    y, h = p.run(form=form, chunk_size=4, output_final_state=True)
    y_mag, h_mag = ssd_by_definition(p, absolute=True)
    # float64: the same scan, with q and k repeated per head instead of broadcast
    assert_within(p.bthd(y), o + D * p.x, 2 * bound(np.float64, y_mag, p.terms, p.kappa))
    assert_within(h, S, 2 * bound(np.float64, h_mag, p.terms, p.kappa))


@settings(max_examples=20)
@given(ssd_problems(varlen=False, min_len=1), st.data())
def test_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P_ = data.draw(st.integers(0, p.T - 1))
    changed = replace(p, x=p.x.copy(), dt=p.dt.copy(), B=p.B.copy(), C=p.C.copy())
    for a in (changed.x, changed.B, changed.C):
        a[:, P_ + 1:] = p.rng.standard_normal(a[:, P_ + 1:].shape) * 10
    changed.dt[:, P_ + 1:] = p.rng.random(changed.dt[:, P_ + 1:].shape) * 50
    chunk = data.draw(st.integers(1, p.T + 1))
    for form in FORMS:
        before, after = (p.bthd(s.run(form=form, chunk_size=chunk)) for s in (p, changed))
        # the scan is bitwise causal and every other step (softplus, the skip) is per row
        np.testing.assert_array_equal(after[:, : P_ + 1], before[:, : P_ + 1], err_msg=form)


@settings(max_examples=20)
@given(ssd_problems(varlen=False), st.data())
def test_state_passing_equals_one_run(p, data):
    split, chunk = data.draw(st.integers(0, p.T)), data.draw(st.integers(1, p.T + 1))
    check_state_passing(p, split, chunk, ssd_by_definition)


@settings(max_examples=20)
@given(ssd_problems(varlen=True), st.sampled_from(FORMS))
def test_cu_seqlens_equals_the_per_segment_loop(p, form):
    check_cu_seqlens(p, form)


@settings(max_examples=15)
@given(ssd_problems(varlen=False), st.data())
def test_decoding_equals_the_causal_forward(p, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, p.T - 1)), max_size=3))) | {0, p.T})
    batch, _, H, P = p.x.shape
    N = p.B.shape[3]
    options = {"A": p.A, "D": p.D, "dt_bias": p.dt_bias, "dt_softplus": p.softplus}
    state = (Mamba2State.initial(batch=batch, heads=H, head_dim=P, state_dim=N, **options) if p.state is None
             else Mamba2State.from_final_state(p.state, **options))
    outputs = []
    for lo, hi in itertools.pairwise(cuts):
        cut = lambda name, lo=lo, hi=hi: to_layout(getattr(p, name)[:, lo:hi], p.layout)  # noqa: E731
        y, state = step(state, cut("C"), cut("B"), cut("x"), dt=cut("dt"), layout=p.layout)
        outputs.append(p.bthd(y))
    y_full, h_full = p.run(output_final_state=True)
    y_mag, h_mag = ssd_by_definition(p, absolute=True)
    # float64: blocks chunked per block against one chunked run
    assert_within(np.concatenate(outputs, axis=1), p.bthd(y_full), 2 * bound(np.float64, y_mag, p.terms, p.kappa))
    assert_within(state.final_state, h_full, 2 * bound(np.float64, h_mag, p.terms, p.kappa))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("softplus", "d_shape", "cu", "layout"), [
    (True, (2,), None, "bthd"), (False, (2, 2), None, "bhtd"), (True, None, [0, 2, 2, 5], "bthd"),
])
def test_vjp_equals_central_differences_for_every_input(form, softplus, d_shape, cu, layout):
    rng = np.random.default_rng(11)
    T = 4 if cu is None else cu[-1]
    p = SSD(rng.standard_normal((1, T, 2, 2)), rng.random((1, T, 2)) + 0.1, -rng.random(2) - 0.1,
            rng.standard_normal((1, T, 1, 2)), rng.standard_normal((1, T, 1, 2)),
            D=None if d_shape is None else rng.standard_normal(d_shape), dt_bias=rng.random(2),
            state=rng.standard_normal((1 if cu is None else len(cu) - 1, 2, 2, 2)), softplus=softplus, cu=cu,
            layout=layout, rng=rng)
    names = [n for n in NAMES if getattr(p, n) is not None]
    y, h = p.run(output_final_state=True)
    dy, dh = rng.standard_normal(y.shape), rng.standard_normal(h.shape)

    def forward(*arrays):
        values = {n: (np.swapaxes(a, 1, 2) if n in PER_TIME and layout == "bhtd" else a)
                  for n, a in zip(names, arrays, strict=True)}
        y, h = replace(p, **values).run(form="parallel", output_final_state=True)
        return np.concatenate([y.ravel(), h.ravel()])

    a = p.arrays()
    expected = numerical_vjp(forward, [a[n] for n in names], np.concatenate([dy.ravel(), dh.ravel()]), step=FD_STEP)
    got = mamba2_vjp(a["x"], a["dt"], a["A"], a["B"], a["C"], dy, D=a["D"], dt_bias=a["dt_bias"],
                     dt_softplus=softplus, initial_state=a["state"], dfinal_state=dh, cu_seqlens=cu, layout=layout,
                     form=form, chunk_size=3)
    fields = {"x": got.dx, "dt": got.ddt, "A": got.dA, "B": got.dB, "C": got.dC, "D": got.dD,
              "dt_bias": got.ddt_bias, "state": got.dinitial_state}
    y_mag, h_mag = ssd_by_definition(p, absolute=True)
    loss = float(np.sum(np.abs(p.bthd(dy)) * y_mag) + np.sum(np.abs(dh) * h_mag))
    check_fd([fields[n] for n in names], expected, names, fd_atol(loss, p.T, p.kappa, p.terms))
    assert all(fields[n] is None for n in fields if n not in names)


@settings(max_examples=25)
@given(ssd_problems(extreme=True, varlen=False), st.sampled_from([np.float32, np.float16]), st.integers(1, 11))
def test_extreme_decays_in_low_precision_stay_finite_and_match_float64(p, dtype, chunk):
    rounded = replace(p, **{n: None if getattr(p, n) is None else getattr(p, n).astype(dtype).astype(np.float64)
                            for n in NAMES})
    y_def, _ = ssd_by_definition(rounded)
    y_mag, _ = ssd_by_definition(rounded, absolute=True)
    for form in FORMS:
        with np.errstate(over="raise", invalid="raise"):
            y, h = p.run(dtype, form=form, chunk_size=chunk, output_final_state=True)
        assert y.dtype == dtype and h.dtype == np.float32
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(h)), form
        if dtype == np.float32:
            # float32 sums and exponents (κ: Δ·|A| summed over T), relative to Σ|terms|;
            # Δ itself (the softplus) is one more rounded input of every exponent
            limit = bound(np.float32, y_mag, p.terms, rounded.kappa, (p.T + 1) * float(np.finfo(np.float32).tiny))
        else:
            limit = half_precision_bound(y_mag, y_def, p.terms, rounded.kappa, p.T)
        assert_within(p.bthd(y), y_def, limit, f"{form} {dtype.__name__}")


def _good():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 5, 4, 3)), rng.random((2, 5, 4)), -rng.random(4), rng.standard_normal((2, 5, 2, 6)),
            rng.standard_normal((2, 5, 2, 6)))


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"A": np.ones(4)}, ValueError, "A must hold finite values <= 0"),
    ({"A": np.full(4, np.nan)}, ValueError, "A must hold"),
    ({"dt": -np.ones((2, 5, 4))}, ValueError, r"dt \(plus dt_bias.* must hold finite step sizes"),
    ({"dt": np.zeros((2, 5, 3))}, ValueError, r"dt must have shape \(2, 5, 4\) to match x \(2, 5, 4, 3\)"),
    ({"A": np.zeros(3)}, ValueError, r"A must have shape \(4,\)"),
    ({"B": np.zeros((2, 5, 3, 6))}, ValueError, "B and C must have the same shape"),
    ({"B": np.zeros((2, 5, 3, 6)), "C": np.zeros((2, 5, 3, 6))}, ValueError, "multiple of the groups"),
    ({"B": np.zeros((2, 4, 2, 6)), "C": np.zeros((2, 4, 2, 6))}, ValueError, "same batch size and length"),
    ({"x": np.zeros((2, 5, 4))}, ValueError, "x must be 4-D"),
    ({"x": np.zeros((2, 5, 4, 3), dtype=np.float32)}, TypeError, "share one dtype"),
    ({"D": np.zeros(3)}, ValueError, r"D must have shape \(4,\)"),
    ({"dt_bias": np.zeros((4, 1))}, ValueError, r"dt_bias must have shape \(4,\)"),
    ({"initial_state": np.zeros((2, 4, 3, 6))}, ValueError, r"initial_state must have shape \(2, 4, 6, 3\)"),
    ({"form": "quick"}, ValueError, "form"),
])
def test_bad_arguments_raise_naming_them(change, error, match):
    x, dt, A, B, C = _good()
    args = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    args.update({k: v for k, v in change.items() if k in args})
    kw = {k: v for k, v in change.items() if k not in args}
    with pytest.raises(error, match=match):
        mamba2(args["x"], args["dt"], args["A"], args["B"], args["C"], **kw)


def test_softplus_makes_negative_dt_a_valid_step():
    x, dt, A, B, C = _good()
    y = mamba2(x, -dt, A, B, C, dt_softplus=True)  # softplus(−dt) > 0
    assert np.all(np.isfinite(y))


def test_compare_measures_the_chunked_form_against_the_recurrent_definition():
    assert compared_methods()["mamba2"].reference is not None
    [row] = run_compare([40], dim=8, heads=2, dtype="float64", methods=["mamba2"], repeats=1)
    # float64: two forms of the same sums of 40·8 products
    assert row.error_against == "definition" and row.rel_error < tolerance(np.float64, 320, 40)
