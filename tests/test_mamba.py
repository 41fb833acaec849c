"""Mamba (S6) selective scan (linattn.mamba): forms, definition, states, varlen, decoding, VJPs, extremes.

    Δ_t = softplus(δ_t + δ_bias),  h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t u_t B_t,  y_t = (C_tᵀ h_t + D u_t)·silu(z_t)

As in test_scan, every comparison is judged against the *magnitude* of what was summed:
the definition run on |u|, |B|, |C|, |h_0| (Δ ≥ 0 and the decays are positive already),
plus |D u|, times |silu(z)|. Any summation order of the same terms differs from another by
a few ε times that sum; the log-decays Δ·A add a condition number because each form
rounds their sums over its window (the chunk) differently.
"""

import itertools
import math
from dataclasses import dataclass, fields, replace

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linattn import decoding
from linattn.compare import compared_methods, run_compare
from linattn.mamba import FORMS, MambaState, compare_problem, selective_scan, selective_scan_vjp
from linattn.testing import numerical_vjp, to_numpy, tolerance

# Δ·A = 0 (no decay), barely any, one that underflows in a few float32 steps, one at once.
EXTREME_LOG_DECAYS = (0.0, -1e-3, -30.0, -1e3)
FD_STEP = 1e-6  # numerical_vjp's default h
OPTIONAL = ("D", "z", "delta_bias", "initial_state")


@dataclass
class Problem:
    u: np.ndarray
    delta: np.ndarray
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray | None = None
    z: np.ndarray | None = None
    delta_bias: np.ndarray | None = None
    delta_softplus: bool = False
    initial_state: np.ndarray | None = None

    @property
    def args(self):
        return self.u, self.delta, self.A, self.B, self.C

    @property
    def kwargs(self):
        return {name: getattr(self, name) for name in (*OPTIONAL, "delta_softplus")}

    @property
    def L(self) -> int:
        return self.u.shape[-1]

    @property
    def N(self) -> int:
        return self.A.shape[-1]

    def astype(self, dtype) -> "Problem":
        return replace(self, **{f.name: getattr(self, f.name).astype(dtype) for f in fields(self)
                                if isinstance(getattr(self, f.name), np.ndarray)})

    def steps(self, lo: int, hi: int, state=None) -> "Problem":
        """Steps lo..hi−1 from ``state``: the time-varying arrays cut, the parameters kept."""
        cut = lambda x: x if x is None or x.ndim == 2 else x[..., lo:hi]  # noqa: E731
        return replace(self, u=cut(self.u), delta=cut(self.delta), B=cut(self.B), C=cut(self.C), z=cut(self.z),
                       initial_state=state)

    def time_step(self) -> np.ndarray:
        dt = self.delta.astype(np.float64) + (0.0 if self.delta_bias is None else self.delta_bias[:, None])
        return np.logaddexp(0.0, dt) if self.delta_softplus else dt

    def __repr__(self) -> str:
        shape = lambda x: None if x is None else x.shape  # noqa: E731
        return (f"Problem(u={self.u.shape}, A={self.A.shape}, B={self.B.shape}, C={self.C.shape}, "
                f"{', '.join(f'{n}={shape(getattr(self, n))}' for n in OPTIONAL)}, "
                f"softplus={self.delta_softplus}, dtype={self.u.dtype})")


@st.composite
def problems(draw, *, max_len=12, max_channels=6, max_state=4, max_batch=2, min_len=0, extreme=None, smooth=False,
             optional=None):
    """A selective-scan problem: B and C each constant (D, N), shared (B, N, L) or grouped (B, G, N, L).

    ``smooth``: A <= −0.05 and Δ >= 0.05 away from the softplus, so that ±h keeps Δ·A <= 0 (VJP tests).
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, channels = draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels))
    N, L = draw(st.integers(1, max_state)), draw(st.integers(min_len, max_len))
    divisors = [g for g in range(1, channels + 1) if channels % g == 0]

    def projection():
        kind = draw(st.sampled_from(["constant", "shared", "grouped"]))
        if kind == "constant":
            return rng.standard_normal((channels, N))
        if kind == "shared":
            return rng.standard_normal((batch, N, L))
        return rng.standard_normal((batch, draw(st.sampled_from(divisors)), N, L))

    p = Problem(rng.standard_normal((batch, channels, L)), np.zeros((batch, channels, L)), np.zeros((channels, N)),
                projection(), projection())
    extreme = (draw(st.booleans()) if extreme is None else extreme) and not smooth
    present = {name: draw(st.booleans()) if optional is None else optional for name in OPTIONAL}
    if extreme:  # Δ = 1 mostly, so that Δ·A takes the listed values; smooth values in between
        p.A = np.where(rng.random((channels, N)) < 0.5, rng.choice(EXTREME_LOG_DECAYS, size=(channels, N)),
                       -rng.exponential(10.0, size=(channels, N)))
        p.delta = np.where(rng.random(p.u.shape) < 0.7, 1.0, rng.choice([0.0, 0.5, 2.0], size=p.u.shape))
        present["delta_bias"] = False
    else:
        p.A = -np.exp(rng.standard_normal((channels, N))) - (0.05 if smooth else 0.0)
        p.delta_softplus = draw(st.booleans())
        if p.delta_softplus:
            p.delta = rng.standard_normal(p.u.shape)
        else:  # Δ = δ + δ_bias >= 0 without the softplus
            p.delta = rng.exponential(0.5, size=p.u.shape) + (0.05 if smooth else 0.0)
    if present["delta_bias"]:
        p.delta_bias = rng.standard_normal(channels) if p.delta_softplus else rng.exponential(0.5, size=channels)
    if present["D"]:
        p.D = rng.standard_normal(channels)
    if present["z"]:
        p.z = rng.standard_normal(p.u.shape)
    if present["initial_state"]:
        p.initial_state = rng.standard_normal((batch, channels, N))
    return p


def per_channel(X, batch, channels, L):
    """B or C as (batch, D, N, L), each channel's own copy (mamba-ssm: repeat "B G N L -> B (G H) N L")."""
    if X.ndim == 2:
        return np.broadcast_to(X[None, :, :, None], (batch, channels, X.shape[-1], L))
    if X.ndim == 3:
        X = X[:, None]
    return np.repeat(X, channels // X.shape[1], axis=1)


def by_definition(p: Problem, dt=None):
    """The recurrence, one step at a time, in float64 (independent of linattn's code)."""
    u, A = p.u.astype(np.float64), p.A.astype(np.float64)
    dt = p.time_step() if dt is None else dt
    batch, channels, L = u.shape
    Bc, Cc = (per_channel(X.astype(np.float64), batch, channels, L) for X in (p.B, p.C))
    h = np.zeros((batch, channels, p.N))
    if p.initial_state is not None:
        h = h + p.initial_state
    y = np.zeros((batch, channels, L))
    for t in range(L):
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        y[:, :, t] = np.einsum("bdn,bdn->bd", h, Cc[..., t])
    if p.D is not None:
        y = y + p.D[:, None] * u
    if p.z is not None:
        z = p.z.astype(np.float64)
        y = y * z / (1.0 + np.exp(-z))
    return y, h


def magnitude(p: Problem):
    """Σ|terms| behind each output and state entry: the definition on absolute values."""
    absolute = lambda x: None if x is None else np.abs(x).astype(np.float64)  # noqa: E731
    bare = Problem(absolute(p.u), p.delta, p.A, absolute(p.B), absolute(p.C), D=absolute(p.D),
                   initial_state=absolute(p.initial_state))
    y, h = by_definition(bare, dt=p.time_step())  # Δ >= 0 and e^{ΔA} > 0 already
    if p.z is not None:
        z = p.z.astype(np.float64)
        y = y * np.abs(z / (1.0 + np.exp(-z)))
    return y, h


def condition(p: Problem, window: int) -> float:
    """1 + the largest Σ|Δ·A| over `window` consecutive steps + the number of windows.

    A form that sums log-decays over a window of steps rounds their sum with an absolute
    error ~ε·Σ|g|, which exp turns into a relative error of every term (as in test_scan).
    """
    if p.L == 0:
        return 1.0
    per_step = np.max(p.time_step()[..., None] * np.abs(p.A.astype(np.float64))[:, None, :], axis=(0, 1, 3))
    window = max(1, min(window, p.L))
    return 1.0 + float(np.convolve(per_step, np.ones(window), mode="valid").max()) + math.ceil(p.L / window)


def tol(p: Problem, dtype, window: int) -> float:
    """8ε·sqrt(n)·κ relative to Σ|terms|, n = L·N + N products summed per output."""
    return tolerance(dtype, p.L * p.N + p.N, condition(p, window))


def window_of(form: str, chunk: int, L: int) -> int:
    return {"parallel": L, "chunked": chunk, "recurrent": 1}[form]


def assert_within(actual, desired, bound, err_msg=""):
    """|actual − desired| <= bound, element by element; NaN fails."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{err_msg}: shapes differ: {actual.shape} vs {desired.shape}"
    err = np.abs(actual.astype(np.float64) - desired)
    bad = ~(err <= np.broadcast_to(bound, err.shape))
    if bad.any():
        worst = np.unravel_index(int(np.argmax(np.where(bad, err, -1.0))), err.shape)
        raise AssertionError(f"{err_msg}: {int(bad.sum())} of {err.size} outside the bound; worst at {worst}: "
                             f"actual {actual[worst]!r}, desired {desired[worst]!r}, "
                             f"bound {np.broadcast_to(bound, err.shape)[worst]!r}")


def run(p: Problem, **kw):
    return selective_scan(*p.args, **p.kwargs, output_final_state=True, **kw)


def chunk_sizes(L, drawn):
    """1, an odd size, one beyond L, and a drawn size (lengths that are not a multiple of it)."""
    return sorted({1, 3, L + 1, drawn})


# ---------------------------------------------------------------------------------------- forms


@settings(max_examples=150)
@given(problems(), st.integers(1, 13))
def test_every_form_equals_the_per_step_definition(p, drawn_chunk):
    y_def, h_def = by_definition(p)
    y_mag, h_mag = magnitude(p)
    for form in FORMS:
        for chunk in chunk_sizes(p.L, drawn_chunk) if form == "chunked" else [drawn_chunk]:
            y, h = run(p, form=form, chunk_size=chunk)
            # float64 rounding of sums of L·N products, with the exponent rounding of the
            # window this form sums log-decays over
            bound = tol(p, np.float64, window_of(form, chunk, p.L))
            assert_within(y, y_def, bound * y_mag + 1e-300, f"{form} chunk={chunk}: y")
            assert_within(h, h_def, bound * h_mag + 1e-300, f"{form} chunk={chunk}: final state")


@settings(max_examples=100)
@given(problems(max_len=10))
def test_chunked_equals_recurrent_for_every_chunk_size(p):
    y_rec, h_rec = run(p, form="recurrent")
    y_mag, h_mag = magnitude(p)
    for chunk in range(1, p.L + 3):
        y, h = run(p, form="chunked", chunk_size=chunk)
        # float64; each form within its own rounding of the exact sums
        bound = tol(p, np.float64, chunk) + tol(p, np.float64, 1)
        assert_within(y, y_rec, bound * y_mag + 1e-300, f"chunk={chunk}: y")
        assert_within(h, h_rec, bound * h_mag + 1e-300, f"chunk={chunk}: final state")


def test_groups_are_consecutive_channels_as_in_mamba_ssm():
    # B of G = 2 groups over D = 4 channels: channels 0, 1 read group 0 (zeros), 2, 3 group 1
    # (mamba-ssm: repeat "B G N L -> B (G H) N L"), so channels 0 and 1 see no input.
    rng = np.random.default_rng(0)
    u, delta = rng.standard_normal((2, 1, 4, 5))
    B = np.stack([np.zeros((3, 5)), rng.standard_normal((3, 5))])[None]
    C = rng.standard_normal((1, 3, 5))
    for form in FORMS:
        y = selective_scan(u, np.abs(delta), -np.ones((4, 3)), B, C, form=form, chunk_size=2)
        assert not y[:, :2].any() and y[:, 2:].all(), form  # exact zeros: 0·finite terms only


# ---------------------------------------------------------------------------------------- causality and states


@settings(max_examples=100)
@given(problems(min_len=1), st.data())
def test_causal_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P = data.draw(st.integers(0, p.L - 1))
    chunk = data.draw(st.integers(1, p.L + 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    changed = replace(p, **{name: getattr(p, name).copy() for name in ("u", "delta", "B", "C", "z")
                            if getattr(p, name) is not None})
    for name in ("u", "B", "C", "z"):
        x = getattr(changed, name)
        if x is not None and x.ndim >= 3:
            x[..., P + 1:] = rng.standard_normal(x[..., P + 1:].shape) * 10
    changed.delta[..., P + 1:] = rng.exponential(30.0, size=changed.delta[..., P + 1:].shape)  # >= 0 either way
    for form in FORMS:
        before, _ = run(p, form=form, chunk_size=chunk)
        after, _ = run(changed, form=form, chunk_size=chunk)
        # Bitwise: rows <= P are computed by the same operations on the same values; later
        # steps enter only through exact zeros (masked decays, exp(-inf)), as in test_scan.
        np.testing.assert_array_equal(after[..., : P + 1], before[..., : P + 1], err_msg=form)


@settings(max_examples=100)
@given(problems(), st.data())
def test_state_passing_equals_one_run(p, data):
    split = data.draw(st.integers(0, p.L))
    chunk = data.draw(st.integers(1, p.L + 2))
    y_mag, h_mag = magnitude(p)
    for form in FORMS:
        y, h = run(p, form=form, chunk_size=chunk)
        y1, h1 = run(p.steps(0, split, p.initial_state), form=form, chunk_size=chunk)
        y2, h2 = run(p.steps(split, p.L, h1), form=form, chunk_size=chunk)
        # float64; the two runs round partial sums at other places than the one run does
        bound = 2 * tol(p, np.float64, p.L)
        assert_within(np.concatenate([y1, y2], axis=-1), y, bound * y_mag + 1e-300, f"{form}: y")
        assert_within(h2, h, bound * h_mag + 1e-300, f"{form}: final state")


def test_zero_steps_return_no_outputs_and_the_initial_state():
    rng = np.random.default_rng(1)
    u, B = np.zeros((2, 3, 0)), np.zeros((2, 4, 0))
    h0 = rng.standard_normal((2, 3, 4))
    for form in FORMS:
        y, h = selective_scan(u, u, -np.ones((3, 4)), B, B, initial_state=h0, output_final_state=True, form=form)
        assert y.shape == (2, 3, 0)
        np.testing.assert_array_equal(h, h0)  # nothing happened to it
        y, h = selective_scan(u, u, -np.ones((3, 4)), B, B, output_final_state=True, form=form)
        assert h.shape == (2, 3, 4) and not h.any()


# ---------------------------------------------------------------------------------------- varlen


@settings(max_examples=60)
@given(problems(max_batch=1, max_len=0), st.lists(st.integers(0, 6), min_size=1, max_size=4), st.booleans(),
       st.data())
def test_cu_seqlens_equals_a_loop_over_the_segments(template, lengths, with_states, data):
    # Empty and length-1 segments included; B and C of any form, packed along L.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    L, channels, N = sum(lengths), template.u.shape[1], template.N
    grow = lambda x: x if x is None or x.ndim == 2 else rng.standard_normal((*x.shape[:-1], L))  # noqa: E731
    p = replace(template, u=grow(template.u), B=grow(template.B), C=grow(template.C), z=grow(template.z),
                delta=np.abs(grow(template.delta)), initial_state=None)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    states = rng.standard_normal((len(lengths), channels, N)) if with_states else None
    y_mag, _ = magnitude(replace(p, initial_state=None if states is None else np.abs(states).max(0, keepdims=True)))
    dy = rng.standard_normal(p.u.shape)
    ds = rng.standard_normal((len(lengths), channels, N))
    for form in FORMS:
        chunk = data.draw(st.integers(1, 7))
        packed = replace(p, initial_state=states)
        y, h = run(packed, form=form, chunk_size=chunk, cu_seqlens=offsets)
        g = selective_scan_vjp(*packed.args, dy, **packed.kwargs, dfinal_state=ds, form=form, chunk_size=chunk,
                               cu_seqlens=list(offsets))
        assert h.shape == (len(lengths), channels, N)
        sums = {name: 0.0 for name in ("dA", "dD", "ddelta_bias", "dB", "dC")}
        for n, (lo, hi) in enumerate(itertools.pairwise(offsets)):
            seg = p.steps(lo, hi, None if states is None else states[n:n + 1])
            y_def, h_def = by_definition(seg)
            # float64; a segment is a run of its own: the definition's rounding on it
            bound = tol(seg, np.float64, max(seg.L, 1)) * 2
            assert_within(y[..., lo:hi], y_def, bound * y_mag[..., lo:hi] + 1e-300, f"{form}: y of segment {n}")
            _, h_mag = magnitude(seg)
            assert_within(h[n:n + 1], h_def, bound * h_mag + 1e-300, f"{form}: state of segment {n}")
            # the gradient of each segment is that of its own run (summed for shared parameters)
            gs = selective_scan_vjp(*seg.args, dy[..., lo:hi], **seg.kwargs, dfinal_state=ds[n:n + 1], form=form,
                                    chunk_size=chunk)
            for name in ("du", "ddelta", "dz"):
                if getattr(g, name) is not None:
                    np.testing.assert_allclose(getattr(g, name)[..., lo:hi], getattr(gs, name), rtol=1e-9,
                                               atol=1e-9, err_msg=f"{form}: {name} of segment {n}")
            if states is not None:  # O(1) values summed in the same order: rounding of a few terms
                np.testing.assert_allclose(g.dinitial_state[n:n + 1], gs.dinitial_state, rtol=1e-9, atol=1e-9)
            for name in sums:
                part = getattr(gs, name)
                if name in ("dB", "dC") and getattr(p, name[1:]).ndim >= 3:
                    np.testing.assert_allclose(getattr(g, name)[..., lo:hi], part, rtol=1e-9, atol=1e-9)
                elif part is not None:
                    sums[name] = sums[name] + part
        for name, total in sums.items():
            if getattr(g, name) is not None and not (name in ("dB", "dC") and getattr(p, name[1:]).ndim >= 3):
                # float64; the same per-segment terms summed in another order (O(1) values, O(10) terms)
                np.testing.assert_allclose(getattr(g, name), total, rtol=1e-9, atol=1e-9, err_msg=f"{form}: {name}")


# ---------------------------------------------------------------------------------------- decoding


@settings(max_examples=100)
@given(problems(), st.data())
def test_decoding_reproduces_the_causal_forward(p, data):
    y_full, h_full = run(p)
    y_mag, h_mag = magnitude(p)
    state = decoding.init_state("mamba", batch=p.u.shape[0], A=p.A, D=p.D, delta_bias=p.delta_bias,
                                delta_softplus=p.delta_softplus, initial_state=p.initial_state)
    start = state
    outputs, t = [], 0
    while t < p.L:
        n = data.draw(st.integers(1, p.L - t))  # token by token, in blocks, or a whole prefill
        seg = p.steps(t, t + n)
        if data.draw(st.booleans()):
            y, state = state.step(seg.u, seg.delta, seg.B, seg.C, z=seg.z)
        else:  # the generic entry point, tokens by name
            y, state = decoding.step(state, None, None, None, u=seg.u, delta=seg.delta, B=seg.B, C=seg.C, z=seg.z)
        outputs.append(y)
        t += n
    y = np.concatenate(outputs, axis=-1) if outputs else np.zeros_like(y_full)
    # float64; the chunked forward and the stepped recurrence each within their rounding
    bound = tol(p, np.float64, 64) + tol(p, np.float64, 1)
    assert_within(y, y_full, bound * y_mag + 1e-300, "y")
    assert_within(state.h, h_full, bound * h_mag + 1e-300, "state")
    assert state.position == p.L and start.position == 0
    np.testing.assert_array_equal(start.h, np.zeros_like(start.h) if p.initial_state is None else p.initial_state)


def test_decoding_rejects_attention_tokens_and_mismatched_ones():
    state = MambaState.initial(batch=2, A=-np.ones((3, 4)))
    x = np.ones((2, 1, 3, 4))
    with pytest.raises(TypeError, match=r"step\(state, None, None, None, u=\.\.\."):
        decoding.step(state, x, x, x)
    with pytest.raises(TypeError, match=r"missing \['C'\]"):
        decoding.step(state, None, None, None, u=np.ones((2, 3, 1)), delta=np.ones((2, 3, 1)), B=np.ones((2, 4, 1)))
    with pytest.raises(ValueError, match="batch B = 2"):
        state.step(np.ones((1, 3, 1)), np.ones((1, 3, 1)), np.ones((1, 4, 1)), np.ones((1, 4, 1)))
    # a float32 state (A in float32) fed float64 tokens would compute in float64
    with pytest.raises(TypeError, match="create the state with dtype=float64"):
        MambaState.initial(batch=1, A=-np.ones((3, 4), np.float32)).step(
            np.ones((1, 3, 1)), np.ones((1, 3, 1)), np.ones((1, 4, 1)), np.ones((1, 4, 1)))
    with pytest.raises(ValueError, match="A must be <= 0"):
        MambaState.initial(batch=1, A=np.ones((3, 4)))


# ---------------------------------------------------------------------------------------- gradients


@settings(max_examples=50)
@given(problems(max_len=5, max_channels=3, max_state=3, smooth=True), st.integers(1, 6), st.data())
def test_vjp_equals_numerical_vjp_for_every_input(p, chunk, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    y_def, h_def = by_definition(p)
    dy = rng.standard_normal(y_def.shape)
    ds = rng.standard_normal(h_def.shape) if data.draw(st.booleans()) else None
    names = ["u", "delta", "A", "B", "C", *(n for n in OPTIONAL if getattr(p, n) is not None)]

    def outputs(*arrays):
        y, h = run(replace(p, **dict(zip(names, arrays, strict=True))), form="recurrent")
        return np.concatenate([y.ravel(), h.ravel()])

    cotangent = np.concatenate([dy.ravel(), (np.zeros_like(h_def) if ds is None else ds).ravel()])
    expected = dict(zip(names, numerical_vjp(outputs, [getattr(p, n) for n in names], cotangent, step=FD_STEP),
                        strict=True))
    # Central differences: truncation ~h²·|L'''| is negligible for a smooth loss; rounding is
    # the forward's error, 8ε·√n·κ·Σ|terms| per output (κ: a window of all of L), over h.
    y_mag, h_mag = magnitude(p)
    loss_size = float(np.sum(np.abs(dy) * y_mag) + (0.0 if ds is None else np.sum(np.abs(ds) * h_mag)))
    atol = tol(p, np.float64, p.L) / FD_STEP * max(loss_size, 1.0)
    for form in FORMS:
        g = selective_scan_vjp(*p.args, dy, **p.kwargs, dfinal_state=ds, form=form, chunk_size=chunk)
        got = {"u": g.du, "delta": g.ddelta, "A": g.dA, "B": g.dB, "C": g.dC, "D": g.dD, "z": g.dz,
               "delta_bias": g.ddelta_bias, "initial_state": g.dinitial_state}
        for name, value in got.items():
            if name not in names:
                assert value is None, f"{form}: d{name} for an absent input"
                continue
            assert value.shape == getattr(p, name).shape, f"{form}: d{name} shape"
            assert_within(value, expected[name], atol, f"{form} chunk={chunk}: d{name}")


# ---------------------------------------------------------------------------------------- extremes and dtypes


@settings(max_examples=100)
@given(problems(extreme=True, optional=True), st.integers(1, 13))
def test_extreme_log_decays_give_finite_outputs_and_gradients(p, chunk):
    for dtype in (np.float32, np.float64):
        x = p.astype(dtype)
        for form in FORMS:
            with np.errstate(over="raise", invalid="raise"):  # no exp(+large), no inf·0
                y, h = run(x, form=form, chunk_size=chunk)
                g = selective_scan_vjp(*x.args, np.ones_like(y), **x.kwargs, dfinal_state=np.ones_like(h), form=form,
                                       chunk_size=chunk)
            assert y.dtype == dtype and h.dtype == dtype
            assert np.all(np.isfinite(y)) and np.all(np.isfinite(h)), form
            for name in ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dinitial_state"):
                assert np.all(np.isfinite(getattr(g, name))), f"{form}: {name}"


@settings(max_examples=100)
@given(problems(), st.integers(1, 13))
def test_float32_and_float16_inputs_match_the_float64_definition(p, chunk):
    for dtype in (np.float32, np.float16):
        low = p.astype(dtype)
        exact = low.astype(np.float64)  # the same (rounded) inputs, computed in float64
        y_def, h_def = by_definition(exact)
        y_mag, h_mag = magnitude(exact)
        for form in FORMS:
            y, h = run(low, form=form, chunk_size=chunk)
            assert y.dtype == dtype and h.dtype == np.float32  # outputs in the input dtype, states in float32
            # Computed in float32 (half precision is computed in float32): 8ε·sqrt(n)·κ of
            # the sums relative to Σ|terms|, κ the exponent rounding of the form's window,
            # plus float32 subnormals; float16 outputs add their own rounding, ε16·|y|, and
            # the subnormal spacing 2^-24 below float16's smallest normal.
            bound = tol(exact, np.float32, window_of(form, chunk, p.L)) * y_mag + (p.L + 1) * np.finfo(np.float32).tiny
            if dtype == np.float16:
                bound = bound + float(np.finfo(np.float16).eps) * np.abs(y_def) + 2.0**-24
            assert_within(y, y_def, bound, f"{dtype.__name__} {form}: y")
            h_bound = tol(exact, np.float32, window_of(form, chunk, p.L)) * h_mag + (p.L + 1) * np.finfo(
                np.float32).tiny
            assert_within(h, h_def, h_bound, f"{dtype.__name__} {form}: final state")


# L = 7 leaves a shorter last chunk, whose slice must stop at T: the array API leaves
# out-of-bounds slice stops unspecified and array-api-strict rejects them.
@pytest.mark.parametrize("L", [6, 7])
def test_runs_on_array_api_strict(L):
    rng = np.random.default_rng(3)
    u, delta, z, dy = rng.standard_normal((4, 2, 4, L))
    A, B, C = -np.exp(rng.standard_normal((4, 3))), rng.standard_normal((2, 2, 3, L)), rng.standard_normal((4, 3))
    kw = {"D": rng.standard_normal(4), "delta_bias": rng.standard_normal(4), "delta_softplus": True,
          "initial_state": rng.standard_normal((2, 4, 3))}
    strict = lambda d: {k: xs.asarray(v) if isinstance(v, np.ndarray) else v for k, v in d.items()}  # noqa: E731
    arrays = (u, delta, A, B, C)
    for form in ("chunked", "recurrent"):
        y, h = selective_scan(*arrays, z=z, **kw, output_final_state=True, form=form, chunk_size=3)
        ys, hs = selective_scan(*(xs.asarray(x) for x in arrays), z=xs.asarray(z), **strict(kw),
                                output_final_state=True, form=form, chunk_size=3)
        # the same operations on the same float64 values in the same order
        np.testing.assert_array_equal(to_numpy(ys), y)
        np.testing.assert_array_equal(to_numpy(hs), h)
        g = selective_scan_vjp(*arrays, dy, z=z, **kw, form=form, chunk_size=3)
        gs = selective_scan_vjp(*(xs.asarray(x) for x in arrays), xs.asarray(dy), z=xs.asarray(z), **strict(kw),
                                form=form, chunk_size=3)
        for f in fields(g):
            np.testing.assert_array_equal(to_numpy(getattr(gs, f.name)), getattr(g, f.name), err_msg=f.name)


# ---------------------------------------------------------------------------------------- arguments


def _good():
    rng = np.random.default_rng(0)
    return {"u": rng.standard_normal((2, 4, 5)), "delta": rng.random((2, 4, 5)), "A": -rng.random((4, 3)),
            "B": rng.standard_normal((2, 3, 5)), "C": rng.standard_normal((2, 2, 3, 5))}


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"A": np.full((4, 3), 0.5)}, ValueError, r"A must be <= 0 everywhere"),
    ({"delta": -np.ones((2, 4, 5))}, ValueError, r"time step .* must be >= 0"),
    ({"delta_bias": -np.full(4, 2.0)}, ValueError, r"time step .* must be >= 0"),
    ({"u": np.zeros((4, 5))}, ValueError, r"u must be 3-D \(B, D, L\)"),
    ({"delta": np.zeros((2, 4, 6))}, ValueError, r"delta must have shape \(2, 4, 5\)"),
    ({"A": -np.ones((5, 3))}, ValueError, r"A must have shape \(D, N\) with D = 4"),
    ({"B": np.zeros((2, 2, 5))}, ValueError, r"B must have shape .* got \(2, 2, 5\)"),  # N = 2, not 3
    ({"B": np.zeros((2, 3, 3, 5))}, ValueError, r"B must have shape .*G dividing D = 4"),  # 3 groups of 4 channels
    ({"C": np.zeros((1, 3, 5))}, ValueError, r"C must have shape"),  # batch 1, not 2
    ({"C": np.zeros((2, 3, 4))}, ValueError, r"C must have shape"),  # one step short
    ({"C": np.zeros((3, 4))}, ValueError, r"C must have shape"),  # (N, D), not (D, N)
    ({"D": np.zeros((2, 4))}, ValueError, r"D must have shape \(4,\)"),
    ({"z": np.zeros((2, 4, 1))}, ValueError, r"z must have shape \(2, 4, 5\)"),
    ({"delta_bias": np.zeros(3)}, ValueError, r"delta_bias must have shape \(4,\)"),
    ({"initial_state": np.zeros((2, 3, 4))}, ValueError, r"initial_state must have shape \(B, D, N\) = \(2, 4, 3\)"),
    ({"form": "quadratic"}, ValueError, "form must be one of"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
    ({"delta_softplus": 1}, TypeError, "delta_softplus must be a bool"),
    ({"cu_seqlens": [0, 5]}, ValueError, "cu_seqlens needs a batch of one"),
    ({"A": -np.ones((4, 3), dtype=np.int64)}, TypeError, "A must have a real floating dtype"),
    ({"A": -np.ones((4, 3), dtype=np.complex128)}, TypeError, "A must have a real floating dtype"),
    ({"backend": "cuda-nope"}, ValueError, "backend must be one of"),
])
def test_bad_arguments_raise_naming_them(change, error, match):
    kw = {**_good(), **change}
    with pytest.raises(error, match=match):
        selective_scan(**kw)
    with pytest.raises(error, match=match):
        selective_scan_vjp(**kw, dy=np.ones((2, 4, 5)))


def test_bad_cu_seqlens_and_states_under_cu_seqlens():
    good = {k: v[:1] if k in ("u", "delta", "B", "C") else v for k, v in _good().items()}
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length T=5"):
        selective_scan(**good, cu_seqlens=[0, 2, 4])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(number of sequences, D, N\) = \(2, 4, 3\)"):
        selective_scan(**good, cu_seqlens=[0, 2, 5], initial_state=np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"dfinal_state must have the final state's shape \(2, 4, 3\)"):
        selective_scan_vjp(**good, dy=np.ones((1, 4, 5)), cu_seqlens=[0, 2, 5], dfinal_state=np.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match=r"dy must have the shape of u \(1, 4, 5\)"):
        selective_scan_vjp(**good, dy=np.ones((1, 4, 4)))


# ---------------------------------------------------------------------------------------- compare


def test_compare_entry_is_deterministic_and_measured_against_its_float64_definition():
    method = compared_methods()["mamba"]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 24, 2, 4)).astype(np.float32) for _ in range(3))
    o = method.run(q, k, v, causal=True)
    assert o.shape == v.shape and o.dtype == np.float32
    np.testing.assert_array_equal(method.run(q, k, v, causal=True), o)  # fixed draws: repeatable
    wide = [x.astype(np.float64) for x in (q, k, v)]
    desired = method.reference(*wide, causal=True)
    problem = compare_problem(*wide)
    assert problem["A"].shape == (8, 4) and problem["B"].shape == (1, 2, 4, 24)
    np.testing.assert_array_equal(problem["A"][0], [-1.0, -2.0, -3.0, -4.0])  # S4D-real, as mamba-ssm
    # float32 computation of the float64 definition on the same inputs: Δ·|A| <= 0.2·4 per
    # step here, so the exponent condition stays O(L); relative to the output's norm
    bound = tolerance(np.float32, 24 * 4 + 4, 1 + 24)
    assert np.linalg.norm(o - desired) <= bound * np.linalg.norm(desired)
    with pytest.raises(ValueError, match="causal only"):
        method.run(q, k, v, causal=False)
    [row] = run_compare([16], dim=4, heads=2, methods=["mamba"], repeats=1)
    assert row.error_against == "definition" and row.rel_error < 1e-5  # float32 rounding only
