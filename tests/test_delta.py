"""DeltaNet and Gated DeltaNet (linattn.delta, linattn.delta_scan, linattn.delta_state).

    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,    o_t = S_tᵀ q_t

Tolerances are judged against a bound M on what each output can be, not against the
output itself (which may cancel to ~0). With |k_t| <= 1, β_t ∈ [0, 2] and g_t <= 0 every
transition e^{g}(I − β k kᵀ) has eigenvalues in [−1, 1], so per value column
|S_t[:, e]| <= |S_0[:, e]| + Σ_{s<=t} β_{s,e}|v_{s,e}| and

    |o_t,e| <= M_t = |q_t| (||S_0||_F + Σ_{s<=t} ||β_s ⊙ v_s||).

A form that sums `w` corrections u_s = β_s(v_s − S̃ᵀk_s) at once (w = the chunk, all of T
for the parallel form, 1 for the loop) forms intermediate sums up to (1 + 2w)·M, since
each |u_s| <= 2(|v_s| + |S|). Rounding those sums of n = (T + 1)(Dk + Dv) products costs
8ε·sqrt(n) of that, and the gates add their exponent condition κ (how much rounding of
the log-decay sums moves each e^{G_t − G_s}, as in test_scan): the tolerance is
ε·(8·sqrt(n) + 2κ)·(1 + 2w)·M.
"""

import itertools
import math
import tracemalloc
from dataclasses import dataclass

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import linattn.delta as delta
import linattn.delta_scan as delta_scan_module
from linattn.compare import compared_methods, run_compare
from linattn.decoding import init_state, step
from linattn.delta_grad import delta_scan_vjp
from linattn.delta_scan import FORMS, delta_scan
from linattn.delta_state import DeltaState, GatedDeltaState
from linattn.testing import machine_epsilon, numerical_vjp, to_numpy, tolerance

EXTREME_GATES = (0.0, -1e-3, -30.0, -1e3)  # none, barely, underflows in a few steps, at once
MODERATE_GATES = (0.0, -1e-3, -0.3)
FD_STEP = 1e-6  # numerical_vjp's default h


# ---------------------------------------------------------------------------------------- helpers


def unit_rows(rng, shape, shrink=True):
    """Rows of norm <= 1: unit vectors, times a factor in [0.5, 1] for half of the draws."""
    x = rng.standard_normal(shape)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    if shrink:
        x = x * np.where(rng.random((*shape[:-1], 1)) < 0.5, 1.0, rng.uniform(0.5, 1.0, (*shape[:-1], 1)))
    return x


def beta_values(rng, shape):
    """[0, 2]: the ends (no write, full overwrite, reflection) and everything in between."""
    fixed = rng.choice([0.0, 1.0, 2.0], size=shape)
    return np.where(rng.random(shape) < 0.3, fixed, rng.uniform(0.0, 2.0, shape))


def gate_values(rng, shape, extreme):
    pool = EXTREME_GATES if extreme else MODERATE_GATES
    fixed = rng.choice(pool, size=shape)
    smooth = -rng.exponential(10.0 if extreme else 0.5, size=shape)
    return np.where(rng.random(shape) < 0.5, fixed, smooth)


@dataclass
class DeltaProblem:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    beta: np.ndarray
    g: np.ndarray | None
    state: np.ndarray | None

    @property
    def T(self):
        return self.q.shape[-2]

    @property
    def kwargs(self):
        return {"g": self.g, "initial_state": self.state}

    def astype(self, dtype):
        cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
        return DeltaProblem(*(cast(x) for x in (self.q, self.k, self.v, self.beta, self.g, self.state)))

    def steps(self, lo, hi, state):
        cut = lambda x: None if x is None else x[..., lo:hi, :]  # noqa: E731
        return DeltaProblem(*(cut(x) for x in (self.q, self.k, self.v, self.beta, self.g)), state)

    def __repr__(self):
        shape = lambda x: None if x is None else x.shape  # noqa: E731
        return (f"DeltaProblem(q={shape(self.q)}, k={shape(self.k)}, v={shape(self.v)}, beta={shape(self.beta)}, "
                f"g={shape(self.g)}, state={shape(self.state)}, dtype={self.q.dtype})")


@st.composite
def delta_problems(draw, *, max_len=40, max_dim=6, gates=None, extreme=None, state=None, min_len=0):
    """q, k (*lead|1, T, Dk); v, β, g, S_0 per value head (*lead, ...): the grouped layout of GVA."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 4)) == 0:
        lead = qk_lead = ()
    else:
        batch = tuple(draw(st.lists(st.integers(1, 2), max_size=1)))
        group = draw(st.integers(1, 3))
        lead = (*batch, group)
        qk_lead = (*batch, 1) if draw(st.booleans()) else lead
    T = draw(st.integers(min_len, max_len))
    dk, dv = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    per_channel = draw(st.booleans())
    gated = draw(st.booleans()) if gates is None else gates
    extreme = draw(st.booleans()) if extreme is None else extreme
    g = gate_values(rng, (*lead, T, 1), extreme) if gated else None
    s0 = rng.standard_normal((*lead, dk, dv)) if (draw(st.booleans()) if state is None else state) else None
    return DeltaProblem(rng.standard_normal((*qk_lead, T, dk)), unit_rows(rng, (*qk_lead, T, dk)),
                        rng.standard_normal((*lead, T, dv)), beta_values(rng, (*lead, T, dv if per_channel else 1)),
                        g, s0)


def delta_by_definition(q, k, v, beta, g=None, initial_state=None):
    """The loop, one step at a time in float64, written independently of linattn's code."""
    lead = np.broadcast_shapes(*(x.shape[:-2] for x in (k, v, beta, g, initial_state) if x is not None))
    T, dk, dv = k.shape[-2], k.shape[-1], v.shape[-1]
    S = np.zeros((*lead, dk, dv)) + (0.0 if initial_state is None else initial_state)
    outputs = []
    for t in range(T):
        if g is not None:
            S = S * np.exp(g[..., t, :])[..., None]
        prediction = np.einsum("...d,...de->...e", k[..., t, :], S)
        u = beta[..., t, :] * (v[..., t, :] - prediction)
        S = S + k[..., t, :, None] * u[..., None, :]
        outputs.append(np.einsum("...d,...de->...e", q[..., t, :], S))
    o_lead = np.broadcast_shapes(q.shape[:-2], lead)
    o = np.stack(outputs, axis=-2) if outputs else np.zeros((*o_lead, 0, dv))
    return np.broadcast_to(o, (*o_lead, T, dv)), S


def output_bound(p):
    """M_t = |q_t| (||S_0||_F + Σ_{s<=t} ||β_s ⊙ v_s||) per output row, and its final value for the state."""
    writes = np.linalg.norm(p.beta * p.v, axis=-1)  # (*lead, T)
    start = 0.0 if p.state is None else np.linalg.norm(p.state, axis=(-2, -1))
    reach = np.asarray(start)[..., None] + np.cumsum(writes, axis=-1)  # bounds ||S_t||_F
    rows = np.linalg.norm(p.q, axis=-1) * reach
    final = np.asarray(start + np.sum(writes, axis=-1))
    return rows[..., None], final[..., None, None]


def exponent_condition(p, window):
    """1 + the largest Σ|g| over `window` consecutive steps + the number of windows (see test_scan)."""
    if p.T == 0 or p.g is None:
        return 1.0
    per_step = np.max(np.abs(p.g).reshape(-1, p.T), axis=0)
    window = max(1, min(window, p.T))
    return 1.0 + float(np.convolve(per_step, np.ones(window), mode="valid").max()) + math.ceil(p.T / window)


def delta_tolerance(p, dtype, window):
    """ε·(8·sqrt(n) + 2κ)·(1 + 2w), relative to M (see the module docstring).

    Two effects add: the rounding of sums of n products whose partial sums reach
    (1 + 2w)·M, and the relative error ε·κ of every decay factor e^{G_t − G_s} (the
    rounding of the log-decay sums) on terms that add up to the same (1 + 2w)·M.
    """
    n = (p.T + 1) * (p.k.shape[-1] + p.v.shape[-1])
    kappa = exponent_condition(p, window)
    return machine_epsilon(dtype) * (8 * math.sqrt(n) + 2 * kappa) * (1 + 2 * min(window, max(p.T, 1)))


def window_of(form, p, chunk):
    return {"recurrent": 1, "parallel": max(p.T, 1), "chunked": chunk}[form]


def assert_within(actual, desired, bound, err_msg=""):
    """|actual − desired| <= bound element by element (bound broadcast); NaN fails."""
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


def chunk_sizes(T, drawn):
    """1, an odd size, the solve's block and one more, one beyond T, and a drawn size."""
    return sorted({1, 3, 16, 17, T + 1, drawn})


# ---------------------------------------------------------------------------------------- forms


@settings(max_examples=100)
@given(delta_problems(), st.integers(1, 45))
def test_every_form_equals_the_definition_for_every_chunk_size(p, drawn_chunk):
    o_def, s_def = delta_by_definition(p.q, p.k, p.v, p.beta, **p.kwargs)
    o_bound, s_bound = output_bound(p)
    for form in FORMS:
        for chunk in chunk_sizes(p.T, drawn_chunk) if form == "chunked" else [drawn_chunk]:
            o, s = delta_scan(p.q, p.k, p.v, p.beta, form=form, chunk_size=chunk, **p.kwargs)
            # float64 rounding of each form against the loop's (module docstring)
            tol = 2 * delta_tolerance(p, np.float64, window_of(form, p, chunk))
            assert_within(o, o_def, tol * o_bound + 1e-300, f"{form} chunk={chunk}: o")
            assert_within(s, s_def, tol * s_bound + 1e-300, f"{form} chunk={chunk}: state")


@settings(max_examples=30)
@given(delta_problems(), st.integers(1, 12), st.integers(1, 3))
def test_chunked_form_in_runs_of_chunks_equals_one_run(p, chunk, per_run):
    whole = delta_scan(p.q, p.k, p.v, p.beta, form="chunked", chunk_size=chunk, **p.kwargs)
    lead = math.prod(np.broadcast_shapes(p.v.shape[:-2], p.beta.shape[:-2], () if p.state is None else
                                         p.state.shape[:-2], () if p.g is None else p.g.shape[:-2]))
    with pytest.MonkeyPatch.context() as mp:  # runs of `per_run` chunks, the state carried between them
        mp.setattr(delta_scan_module, "_CHUNK_BUDGET", per_run * lead * chunk * chunk)
        runs = delta_scan(p.q, p.k, p.v, p.beta, form="chunked", chunk_size=chunk, **p.kwargs)
    o_bound, s_bound = output_bound(p)
    # float64: the same per-chunk operations, batched over fewer chunks at a time
    tol = 2 * delta_tolerance(p, np.float64, chunk)
    assert_within(runs[0], whole[0], tol * o_bound + 1e-300, "o")
    assert_within(runs[1], whole[1], tol * s_bound + 1e-300, "state")


@settings(max_examples=50)
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.sampled_from([(1, 1), (2, 2), (1, 3), (2, 4)]),
       st.booleans(), st.booleans(), st.sampled_from(["bthd", "bhtd"]), st.sampled_from(FORMS))
def test_front_ends_are_the_scan_on_normalised_scaled_grouped_inputs(seed, T, heads, gated, l2norm, layout, form):
    rng = np.random.default_rng(seed)
    H, HV = heads
    q, k = rng.standard_normal((2, 2, T, H, 5))
    v, g = rng.standard_normal((2, T, HV, 3)), gate_values(rng, (2, T, HV), extreme=False)
    beta = beta_values(rng, (2, T, HV))
    if not l2norm:
        k = unit_rows(rng, k.shape)
    s0 = rng.standard_normal((2, HV, 5, 3))
    to_layout = (lambda x: x) if layout == "bthd" else (lambda x: np.swapaxes(x, 1, 2))
    kw = {"scale": 0.7, "initial_state": s0, "output_final_state": True, "use_qk_l2norm": l2norm, "form": form,
          "chunk_size": 4, "layout": layout}
    if gated:
        o, s = delta.gated_delta_rule(*(to_layout(x) for x in (q, k, v, g, beta)), **kw)
    else:
        o, s = delta.delta_rule(*(to_layout(x) for x in (q, k, v, beta)), **kw)
    qn, kn = (x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6) if l2norm else x for x in (q, k))
    # by hand: value head j reads query/key head j // (HV / H); (B, T, H, D) -> (B, H, T, D)
    per_head = lambda x: np.moveaxis(np.repeat(x, HV // H, axis=2), 2, 1)  # noqa: E731
    heads_first = lambda x: np.moveaxis(x, 2, 1)[..., None]  # noqa: E731
    p = DeltaProblem(per_head(qn) * 0.7, per_head(kn), np.moveaxis(v, 2, 1), heads_first(beta),
                     heads_first(g) if gated else None, s0)
    o_def, s_def = delta_by_definition(p.q, p.k, p.v, p.beta, **p.kwargs)
    o_bound, s_bound = output_bound(p)
    # float64: the scan's own tolerance; the norm and scale are the same few roundings in both
    tol = 2 * delta_tolerance(p, np.float64, window_of(form, p, 4))
    assert_within(np.moveaxis(to_layout(o), 2, 1) if layout == "bthd" else o, o_def, tol * o_bound + 1e-300, "o")
    assert_within(s, s_def, tol * s_bound + 1e-300, "state")


@pytest.mark.parametrize("form", FORMS)
def test_zero_beta_never_changes_the_state(form):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 2, 11, 2, 4))
    s0 = rng.standard_normal((2, 2, 4, 4))
    o, s = delta.delta_rule(q, k, v, np.zeros((2, 11, 2)), initial_state=s0, output_final_state=True, form=form,
                            chunk_size=4)
    # every write is 0 · (finite), and S + 0 = S: exact
    np.testing.assert_array_equal(s, s0)
    readout = np.einsum("bthd,bhde->bthe", q / 2.0, s0)  # scale 1/sqrt(4)
    # float64: the same Dk = 4 products summed in another order
    atol = tolerance(np.float64, 4) * np.abs(q).max() * np.abs(s0).max() * 4
    np.testing.assert_allclose(o, readout, rtol=0, atol=atol)


@settings(max_examples=30)
@given(delta_problems(gates=False), st.integers(1, 20))
def test_gated_with_zero_gates_is_the_plain_delta_rule_exactly(p, chunk):
    zero = np.zeros((*p.beta.shape[:-1], 1))
    for form in FORMS:
        plain = delta_scan(p.q, p.k, p.v, p.beta, initial_state=p.state, form=form, chunk_size=chunk)
        gated = delta_scan(p.q, p.k, p.v, p.beta, g=zero, initial_state=p.state, form=form, chunk_size=chunk)
        # e^0 = 1 exactly, so every gated factor multiplies by 1.0: the same numbers, bit for bit
        for a, b in zip(gated, plain, strict=True):
            np.testing.assert_array_equal(a, np.broadcast_to(b, a.shape), err_msg=form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("b", [0.0, 0.3, 1.0, 1.7, 2.0])
def test_one_step_corrects_the_prediction_along_a_unit_key(form, gated, b):
    rng = np.random.default_rng(int(b * 10) + gated)
    k = unit_rows(rng, (1, 1, 1, 5), shrink=False)
    q, v = rng.standard_normal((1, 1, 1, 5)), rng.standard_normal((1, 1, 1, 3))
    s0, g = rng.standard_normal((1, 1, 5, 3)), np.full((1, 1, 1), -0.4)
    beta = np.full((1, 1, 1), b)
    kw = {"initial_state": s0, "output_final_state": True, "form": form}
    _, s1 = delta.gated_delta_rule(q, k, v, g, beta, **kw) if gated else delta.delta_rule(q, k, v, beta, **kw)
    alpha = math.exp(-0.4) if gated else 1.0
    kk = k[0, 0, 0]
    # S_tᵀk = α(1 − β) S_{t−1}ᵀk + β v: the prediction moves a fraction β of the way to v
    # (β = 1 stores v exactly, β = 2 reflects the old prediction about v)
    expected = alpha * (1 - b) * (s0[0, 0].T @ kk) + b * v[0, 0, 0]
    size = alpha * (1 + b) * np.abs(s0).sum(axis=0).max() + b * np.abs(v).max()
    # float64: a few roundings of Dk-term dot products of O(size) terms (and |k|² = 1 ± 2ε)
    np.testing.assert_allclose(s1[0, 0].T @ kk, expected, rtol=0, atol=tolerance(np.float64, 5 * 4) * size)


# ---------------------------------------------------------------------------------------- causality, states


@settings(max_examples=60)
@given(delta_problems(min_len=1), st.data())
def test_causal_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P = data.draw(st.integers(0, p.T - 1))
    chunk = data.draw(st.integers(1, p.T + 2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    changed = DeltaProblem(*(None if x is None else x.copy() for x in (p.q, p.k, p.v, p.beta, p.g)), p.state)
    later = (..., slice(P + 1, None), slice(None))
    changed.q[later] = rng.standard_normal(changed.q[later].shape) * 10
    changed.k[later] = unit_rows(rng, changed.k[later].shape)
    changed.v[later] = rng.standard_normal(changed.v[later].shape) * 10
    changed.beta[later] = beta_values(rng, changed.beta[later].shape)
    if changed.g is not None:
        changed.g[later] = gate_values(rng, changed.g[later].shape, extreme=True)
    for form in FORMS:
        before, _ = delta_scan(p.q, p.k, p.v, p.beta, form=form, chunk_size=chunk, **p.kwargs)
        after, _ = delta_scan(changed.q, changed.k, changed.v, changed.beta, form=form, chunk_size=chunk,
                              **changed.kwargs)
        # Bitwise: later steps enter rows <= P only through exact zeros (masked scores and
        # system entries, the zero upper triangle of the inverted diagonal blocks, rows of
        # the substitution not yet written), and adding 0·finite leaves a sum unchanged.
        np.testing.assert_array_equal(after[..., : P + 1, :], before[..., : P + 1, :], err_msg=form)


@settings(max_examples=60)
@given(delta_problems(), st.data())
def test_state_passing_equals_one_run(p, data):
    split = data.draw(st.integers(0, p.T))
    chunk = data.draw(st.integers(1, p.T + 2))
    o_bound, s_bound = output_bound(p)
    for form in FORMS:
        o, s = delta_scan(p.q, p.k, p.v, p.beta, form=form, chunk_size=chunk, **p.kwargs)
        first = p.steps(0, split, p.state)
        o1, s1 = delta_scan(first.q, first.k, first.v, first.beta, form=form, chunk_size=chunk, **first.kwargs)
        second = p.steps(split, p.T, s1)
        o2, s2 = delta_scan(second.q, second.k, second.v, second.beta, form=form, chunk_size=chunk,
                            **second.kwargs)
        # float64; the two runs round at other places than the one run (both within the bound)
        tol = 2 * delta_tolerance(p, np.float64, window_of(form, p, chunk))
        assert_within(np.concatenate([o1, o2], axis=-2), o, tol * o_bound + 1e-300, f"{form}: o")
        assert_within(s2, s, tol * s_bound + 1e-300, f"{form}: state")


@settings(max_examples=40)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 9), min_size=1, max_size=5), st.sampled_from(FORMS),
       st.booleans(), st.booleans())
def test_cu_seqlens_equals_a_loop_over_the_segments(seed, lengths, form, gated, with_state):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    T, N = int(offsets[-1]), len(lengths)
    q, k = rng.standard_normal((2, 1, T, 1, 4))
    v, g, beta = rng.standard_normal((1, T, 2, 3)), -rng.exponential(0.5, (1, T, 2)), beta_values(rng, (1, T, 2))
    s0 = rng.standard_normal((N, 2, 4, 3)) if with_state else None
    kw = {"form": form, "chunk_size": 3, "use_qk_l2norm": True, "output_final_state": True}

    def run(a, b, state, **extra):
        args = (q[:, a:b], k[:, a:b], v[:, a:b]) + ((g[:, a:b],) if gated else ()) + (beta[:, a:b],)
        fn = delta.gated_delta_rule if gated else delta.delta_rule
        return fn(*args, initial_state=state, **kw, **extra)

    o, s = run(0, T, s0, cu_seqlens=offsets)
    parts = [run(a, b, None if s0 is None else s0[n:n + 1]) for n, (a, b) in enumerate(itertools.pairwise(offsets))]
    # the same code on the same rows (the norm is per token): identical, empty and length-1 segments included
    np.testing.assert_array_equal(o, np.concatenate([x[0] for x in parts], axis=1))
    np.testing.assert_array_equal(s, np.concatenate([x[1] for x in parts], axis=0))


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.booleans(), st.data())
def test_decoding_equals_the_causal_forward(seed, T, gated, data):
    rng = np.random.default_rng(seed)
    H, HV = data.draw(st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 6)]))
    q, k = rng.standard_normal((2, 2, T, H, 4))
    v, g, beta = rng.standard_normal((2, T, HV, 3)), -rng.exponential(0.5, (2, T, HV)), beta_values(rng, (2, T, HV))
    options = {"use_qk_l2norm": True, "scale": 0.9}
    fn = (lambda *a, **kw: delta.gated_delta_rule(q, k, v, g, beta, **kw)) if gated else (
        lambda *a, **kw: delta.delta_rule(q, k, v, beta, **kw))
    full, final = fn(output_final_state=True, **options)
    state = init_state("gated_delta" if gated else "delta", batch=2, heads=H, value_heads=HV, key_dim=4, value_dim=3,
                       **options)
    cuts = sorted({0, T, *data.draw(st.lists(st.integers(0, T), max_size=4))})
    outputs = []
    for a, b in itertools.pairwise(cuts):
        extra = {"beta": beta[:, a:b]} | ({"g": g[:, a:b]} if gated else {})
        o, new = step(state, q[:, a:b], k[:, a:b], v[:, a:b], **extra)
        assert new is not state and type(new) is type(state)
        outputs.append(o)
        state = new
    unit = np.full((1, T, 4), 0.5)  # |q_t| = 0.9 after the norm and scale: bounded with |q| = 1
    p = DeltaProblem(unit, unit, np.moveaxis(v, 2, 1), np.moveaxis(beta, 2, 1)[..., None], None, None)
    o_bound, s_bound = output_bound(p)
    # float64: blocks of any size round like the chunked form with their own chunks
    tol = 2 * delta_tolerance(p, np.float64, T)
    assert_within(np.moveaxis(np.concatenate(outputs, axis=1), 2, 1), np.moveaxis(full, 2, 1), tol * o_bound + 1e-300)
    assert_within(state.final_state, final, tol * s_bound + 1e-300)


def test_a_decoding_state_can_be_branched_and_continues_a_prompt():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 1, 6, 1, 4))
    beta, g = rng.random((1, 6, 1)), -rng.random((1, 6, 1))
    _, prompt = delta.gated_delta_rule(q[:, :4], k[:, :4], v[:, :4], g[:, :4], beta[:, :4], output_final_state=True)
    state = GatedDeltaState.from_final_state(prompt, heads=1)
    a, _ = step(state, q[:, 4:], k[:, 4:], v[:, 4:], beta=beta[:, 4:], g=g[:, 4:])
    b, _ = step(state, q[:, 4:], k[:, 4:], v[:, 4:], beta=beta[:, 4:], g=g[:, 4:])
    np.testing.assert_array_equal(a, b)  # the first step wrote nothing into the state
    np.testing.assert_array_equal(state.S, prompt)
    full = delta.gated_delta_rule(q, k, v, g, beta)
    # float64: two runs of six O(1) steps, chunked differently
    np.testing.assert_allclose(a, full[:, 4:], rtol=0, atol=tolerance(np.float64, 6 * 8) * 16)


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 25), st.sampled_from([(1, 2), (1, 3), (2, 4)]), st.sampled_from(FORMS))
def test_grouped_value_heads_equal_repeated_query_key_heads(seed, T, heads, form):
    rng = np.random.default_rng(seed)
    H, HV = heads
    q, k = rng.standard_normal((2, 1, T, H, 4))
    v, g = rng.standard_normal((1, T, HV, 3)), -rng.exponential(1.0, (1, T, HV))
    beta, s0 = beta_values(rng, (1, T, HV, 3)), rng.standard_normal((1, HV, 4, 3))
    kw = {"initial_state": s0, "output_final_state": True, "use_qk_l2norm": True, "form": form, "chunk_size": 5}
    grouped = delta.gated_delta_rule(q, k, v, g, beta, **kw)
    repeated = delta.gated_delta_rule(np.repeat(q, HV // H, axis=2), np.repeat(k, HV // H, axis=2), v, g, beta, **kw)
    unit = np.full((HV, T, 4), 0.5)  # |q_t| = 1/2 after the norm and the default scale: bounded with 1
    p = DeltaProblem(unit, unit, np.moveaxis(v[0], 1, 0), np.moveaxis(beta[0], 1, 0), None, s0[0])
    o_bound, s_bound = output_bound(p)
    # float64: the same products, shared by broadcasting or repeated (BLAS may block them differently)
    tol = 2 * delta_tolerance(p, np.float64, window_of(form, p, 5))
    assert_within(grouped[0], repeated[0], tol * np.moveaxis(o_bound, 0, 1)[None] + 1e-300, "o")
    assert_within(grouped[1], repeated[1], tol * s_bound[None] + 1e-300, "state")


# ---------------------------------------------------------------------------------------- gradients


def fd_atol(loss_size, T):
    """Central differences: rounding of the loss (ε·|L|/h, with ~T·(Dk+Dv) roundings) plus
    truncation h²/6·|L'''|, with |L'''| <= (2T + 1)³ |L| for a loss of degree <= 2T + 1 in the
    inputs (and exponential in g) at unit scale."""
    return tolerance(np.float64, 64 * (T + 1)) / FD_STEP * loss_size + FD_STEP**2 * (2 * T + 1) ** 3 * loss_size


@settings(max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(0, 5), st.sampled_from([(1, 1), (1, 2), (2, 2)]), st.booleans(),
       st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_front_end_vjp_equals_central_differences(seed, T, heads, gated, per_channel, with_state, l2norm, varlen):
    rng = np.random.default_rng(seed)
    H, HV = heads
    cu = [0, T // 2, T] if varlen else None
    N = 2 if varlen else 1
    q, k = rng.standard_normal((2, 1, T, H, 3))
    if not l2norm:
        k = unit_rows(rng, k.shape)
    v = rng.standard_normal((1, T, HV, 2))
    beta = rng.uniform(0.05, 1.95, (1, T, HV, 2) if per_channel else (1, T, HV))  # h away from [0, 2]'s ends
    g = -rng.uniform(0.01, 2.0, (1, T, HV))  # h away from 0
    s0 = rng.standard_normal((N, HV, 3, 2)) if with_state else None
    do, ds = rng.standard_normal((1, T, HV, 2)), rng.standard_normal((N, HV, 3, 2))
    names = ["q", "k", "v", "beta"] + (["g"] if gated else []) + (["s0"] if with_state else [])
    values = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "s0": s0}
    kw = {"scale": 0.8, "use_qk_l2norm": l2norm, "cu_seqlens": cu}

    def outputs(*arrays):
        x = dict(zip(names, arrays, strict=True))
        args = (x["q"], x["k"], x["v"]) + ((x["g"],) if gated else ()) + (x["beta"],)
        fn = delta.gated_delta_rule if gated else delta.delta_rule
        o, s = fn(*args, initial_state=x.get("s0"), output_final_state=True, form="recurrent", **kw)
        return np.concatenate([o.ravel(), s.ravel()])

    expected = dict(zip(names, numerical_vjp(outputs, [values[n] for n in names],
                                             np.concatenate([do.ravel(), ds.ravel()]), step=FD_STEP), strict=True))
    args = (q, k, v) + ((g,) if gated else ()) + (beta, do)
    fn = delta.gated_delta_rule_vjp if gated else delta.delta_rule_vjp
    grads = fn(*args, initial_state=s0, dfinal_state=ds, chunk_size=2, **kw)
    got = {"q": grads.dq, "k": grads.dk, "v": grads.dv, "beta": grads.dbeta, "g": grads.dg, "s0": grads.dinitial_state}
    assert (grads.dg is None) != gated and (grads.dinitial_state is None) != with_state
    # Σ|do|·M + Σ|ds|·M with M = max|s·q| (||S_0||_F + Σ_t ||β_t ⊙ v_t||) bounding every output and state entry
    q_size = 0.8 * (1.0 if l2norm else float(np.linalg.norm(q, axis=-1).max(initial=0.0)))
    writes = float(np.linalg.norm(beta[..., None] * v if not per_channel else beta * v, axis=-1).max(initial=0.0)) * T
    M = max(q_size, 1.0) * ((0.0 if s0 is None else float(np.linalg.norm(s0, axis=(-2, -1)).max())) + writes)
    loss_size = float((np.abs(do).sum() + np.abs(ds).sum()) * M) + 1.0
    for name in names:
        assert got[name].shape == values[name].shape and got[name].dtype == values[name].dtype, name
        assert_within(got[name], expected[name], fd_atol(loss_size, T), f"d{name}")


@settings(max_examples=30)
@given(delta_problems(max_len=5, max_dim=3, extreme=False), st.integers(1, 6), st.booleans())
def test_scan_vjp_equals_central_differences_with_gates_at_zero(p, chunk, with_dfinal):
    rng = np.random.default_rng(p.T)
    o_def, s_def = delta_by_definition(p.q, p.k, p.v, p.beta, **p.kwargs)
    do = rng.standard_normal(o_def.shape)
    ds = rng.standard_normal(s_def.shape) if with_dfinal else None
    inputs = {n: x for n, x in zip(("q", "k", "v", "beta", "g", "state"), (p.q, p.k, p.v, p.beta, p.g, p.state),
                                   strict=True) if x is not None}
    names = list(inputs)

    def outputs(*arrays):
        x = dict(zip(names, arrays, strict=True))
        o, s = delta_scan(x["q"], x["k"], x["v"], x["beta"], g=x.get("g"), initial_state=x.get("state"),
                          form="recurrent")
        return np.concatenate([np.broadcast_to(o, o_def.shape).ravel(), s.ravel()])

    cotangent = np.concatenate([do.ravel(), (np.zeros_like(s_def) if ds is None else ds).ravel()])
    expected = dict(zip(names, numerical_vjp(outputs, list(inputs.values()), cotangent, step=FD_STEP), strict=True))
    grads = delta_scan_vjp(p.q, p.k, p.v, p.beta, do, dfinal_state=ds, chunk_size=chunk, **p.kwargs)
    got = {"q": grads.dq, "k": grads.dk, "v": grads.dv, "beta": grads.dbeta, "g": grads.dg,
           "state": grads.dinitial_state}
    o_bound, s_bound = output_bound(p)
    loss_size = float(np.sum(np.abs(do) * o_bound) + (0.0 if ds is None else np.sum(np.abs(ds) * s_bound)))
    for name in names:
        assert got[name].shape == inputs[name].shape, name
        # g = 0 exactly in part of the draws: the loop is smooth there (the gate is e^g, no kink)
        assert_within(got[name], expected[name], fd_atol(max(loss_size, 1.0), p.T), f"d{name} chunk={chunk}")


@pytest.mark.parametrize("beta_width", [1, 3])
def test_scan_vjp_counts_the_final_state_cotangent_once_under_gqa(beta_width):
    """q and do with a group axis that the state lacks (GQA): dS_T enters one copy of the state.

    (It once entered every group's reverse loop, so dk, dv, dbeta, dg and dS_0 counted it
    once per group.)
    """
    rng = np.random.default_rng(4)
    T, Dk, Dv, G = 4, 2, 3, 2
    k = rng.standard_normal((2, 1, T, Dk)) / 2
    inputs = {"k": k, "v": rng.standard_normal((2, 1, T, Dv)), "beta": rng.uniform(0, 1, (2, 1, T, beta_width)),
              "g": -rng.uniform(0, 1, (2, 1, T, 1)), "state": rng.standard_normal((2, 1, Dk, Dv))}
    q = rng.standard_normal((2, G, T, Dk))
    do, ds = rng.standard_normal((2, G, T, Dv)), rng.standard_normal((2, 1, Dk, Dv))
    names = list(inputs)

    def outputs(*arrays):
        x = dict(zip(names, arrays, strict=True))
        o, s = delta_scan(q, x["k"], x["v"], x["beta"], g=x["g"], initial_state=x["state"], form="recurrent")
        return np.concatenate([o.ravel(), s.ravel()])

    cotangent = np.concatenate([do.ravel(), ds.ravel()])
    expected = dict(zip(names, numerical_vjp(outputs, list(inputs.values()), cotangent, step=FD_STEP), strict=True))
    grads = delta_scan_vjp(q, inputs["k"], inputs["v"], inputs["beta"], do, g=inputs["g"],
                           initial_state=inputs["state"], dfinal_state=ds)
    got = {"k": grads.dk, "v": grads.dv, "beta": grads.dbeta, "g": grads.dg, "state": grads.dinitial_state}
    # |o|, |S| stay below a few units here (|k| < 2, beta < 1, decaying gates, T = 4).
    loss_size = float(np.abs(do).sum() + np.abs(ds).sum()) * 10
    for name in names:
        assert_within(got[name], expected[name], fd_atol(loss_size, T), f"d{name}")


# ---------------------------------------------------------------------------------------- extremes


@settings(max_examples=100)
@given(delta_problems(gates=True, extreme=True, max_len=30), st.integers(1, 33),
       st.sampled_from(["float32", "float16"]))
def test_extreme_gates_in_low_precision_are_finite_and_match_float64(p, chunk, dtype):
    low = p.astype(dtype)
    low = DeltaProblem(low.q, (low.k.astype(np.float64) * (1 - 4 * np.finfo(dtype).eps)).astype(dtype), low.v,
                       low.beta, low.g, low.state)  # |k| <= 1 after rounding
    exact = low.astype(np.float64)  # the same rounded inputs, in float64
    o_def, s_def = delta_by_definition(exact.q, exact.k, exact.v, exact.beta, **exact.kwargs)
    o_bound, s_bound = output_bound(exact)
    for form in FORMS:
        with np.errstate(over="raise", invalid="raise"):  # no exp(+large), no inf·0
            o, s = delta_scan(*(x.astype(np.float32) for x in (low.q, low.k, low.v, low.beta)), form=form,
                              g=low.g.astype(np.float32),
                              initial_state=None if low.state is None else low.state.astype(np.float32),
                              chunk_size=chunk)
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(s)), form
        # float32 arithmetic (half inputs compute in float32): the module's tolerance with
        # float32's ε, the gates' exponent condition included
        tol = 2 * delta_tolerance(exact, np.float32, window_of(form, exact, chunk))
        floor = (p.T + 1) * float(np.finfo(np.float32).tiny)  # subnormal flush of underflowing terms
        assert_within(o, o_def, tol * o_bound + floor, f"{form} chunk={chunk}: o")
        assert_within(s, s_def, tol * s_bound + floor, f"{form} chunk={chunk}: state")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("form", FORMS)
def test_front_end_dtypes_extreme_gates_and_states(dtype, form):
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 1, 70, 2, 8))
    v = rng.standard_normal((1, 70, 2, 8))
    g = rng.choice(EXTREME_GATES, size=(1, 70, 2))
    beta = beta_values(rng, (1, 70, 2))
    x = [a.astype(dtype) for a in (q, k, v, g, beta)]
    with np.errstate(over="raise", invalid="raise"):
        o, s = delta.gated_delta_rule(*x, use_qk_l2norm=True, output_final_state=True, form=form)
    compute = np.float32 if dtype == "float16" else np.dtype(dtype)
    assert o.dtype == np.dtype(dtype) and s.dtype == compute  # states kept in at least float32
    exact_o, exact_s = delta.gated_delta_rule(*(a.astype(np.float64) for a in x), use_qk_l2norm=True,
                                              output_final_state=True, form="recurrent")
    unit = np.full((2, 70, 8), 8**-0.5)  # |q_t| < 1 after the norm and scale: bounded with 1
    p = DeltaProblem(unit, unit, np.moveaxis(x[2][0].astype(np.float64), 1, 0),
                     np.moveaxis(x[4][0].astype(np.float64), 1, 0)[..., None], np.moveaxis(g[0], 1, 0)[..., None], None)
    o_bound, s_bound = output_bound(p)
    window = window_of(form, p, 64)
    # the compute dtype's rounding (module docstring), the norm's few roundings in it, and
    # the final rounding of o to float16
    tol = 2 * delta_tolerance(p, compute, window)
    out_round = np.finfo(dtype).eps * np.abs(exact_o)
    assert_within(o, exact_o, tol * np.moveaxis(o_bound, 0, 1)[None] + out_round, "o")
    assert_within(s, exact_s, tol * s_bound[None], "state")


def test_chunked_memory_is_linear_in_length():
    T, D = 16384, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, T, D), dtype=np.float32) for _ in range(3))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta, g = rng.random((1, T, 1), dtype=np.float32), -rng.random((1, T, 1), dtype=np.float32)
    tracemalloc.start()
    try:
        o, _ = delta_scan(q, k, v, beta, g=g, chunk_size=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert o.shape == (1, T, D) and o.dtype == np.float32 and np.all(np.isfinite(o))
    # The chunked form holds a few (T/C, C, C) arrays (the decay, the system L, the scores,
    # temporaries), each T·C floats = 4 MiB here, and a few T·D ones (1 MiB); 16 of the
    # former is 64 MiB, 16x below the 1 GiB of one T×T float32 array, which nothing may allocate.
    assert peak < 16 * T * 64 * 4, f"peak {peak / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------- array API, compare


@pytest.mark.parametrize("form", FORMS)
def test_runs_on_array_api_strict(form):
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 9, 1, 3))
    v, g, beta, s0 = (rng.standard_normal((1, 9, 2, 2)), -rng.random((1, 9, 2)), rng.random((1, 9, 2, 2)),
                      rng.standard_normal((1, 2, 3, 2)))
    args = (q, k, v, g, beta)
    kw = {"form": form, "chunk_size": 4, "use_qk_l2norm": True, "output_final_state": True}
    got = delta.gated_delta_rule(*(xs.asarray(a) for a in args), initial_state=xs.asarray(s0), **kw)
    want = delta.gated_delta_rule(*args, initial_state=s0, **kw)
    for a, b in zip(got, want, strict=True):
        assert isinstance(a, xs._array_object.Array)
        np.testing.assert_array_equal(to_numpy(a), b)  # the same float64 operations in the same order
    do = np.cos(np.arange(want[0].size, dtype=np.float64)).reshape(want[0].shape)
    grads = delta.gated_delta_rule_vjp(*(xs.asarray(a) for a in args), xs.asarray(do), initial_state=xs.asarray(s0))
    grads_np = delta.gated_delta_rule_vjp(*args, do, initial_state=s0)
    for name in ("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"):
        np.testing.assert_array_equal(to_numpy(getattr(grads, name)), getattr(grads_np, name), err_msg=name)


def test_compare_measures_the_delta_rules_against_their_recurrence():
    rows = run_compare([9, 70], dim=8, heads=2, methods=["delta", "gated_delta"], repeats=1)
    assert {r.method for r in rows} == {"delta", "gated_delta"}
    for r in rows:
        assert r.error_against == "definition"
        # float32 inputs, chunked, against the float64 loop on the same values: rounding only
        # (relative Frobenius error; 8ε32·sqrt(T·D)·(1 + 2C) is 4e-3 at T = 70, C = 64)
        assert r.rel_error < tolerance(np.float32, 70 * 16, 129), r
    with pytest.raises(ValueError, match="causal"):  # no non-causal delta rule: refused, not approximated
        run_compare([8], methods=["delta"], causal=False, repeats=1)
    method = compared_methods()["gated_delta"]
    assert not method.supports_noncausal
    q = np.ones((1, 4, 2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="causal"):
        method.run(q, q, q, causal=False)


# ---------------------------------------------------------------------------------------- arguments


def _args(B=1, T=5, H=2, HV=4, Dk=3, Dv=2):
    rng = np.random.default_rng(0)
    return {"q": rng.standard_normal((B, T, H, Dk)), "k": rng.standard_normal((B, T, H, Dk)),
            "v": rng.standard_normal((B, T, HV, Dv)), "g": -rng.random((B, T, HV)), "beta": rng.random((B, T, HV))}


def _call(fn, a, **kw):
    if fn == "gated":
        return delta.gated_delta_rule(a["q"], a["k"], a["v"], a["g"], a["beta"], **kw)
    if fn == "plain":
        return delta.delta_rule(a["q"], a["k"], a["v"], a["beta"], **kw)
    do = np.ones((*a["v"].shape[:-1], a["v"].shape[-1])) if "do" not in kw else kw.pop("do")
    return delta.gated_delta_rule_vjp(a["q"], a["k"], a["v"], a["g"], a["beta"], do, **kw)


BAD = [
    ({"beta": lambda a: a["beta"] - 0.5}, {}, "beta"),  # negative
    ({"beta": lambda a: a["beta"] + 2.1}, {}, "beta"),  # above 2
    ({"beta": lambda a: np.where(a["beta"] > 0.5, np.nan, a["beta"])}, {}, "beta"),
    ({"beta": lambda a: a["beta"][..., :3]}, {}, "beta"),  # one value head short
    ({"beta": lambda a: a["beta"][..., None] * np.ones(3)}, {}, "beta"),  # per channel, but Dv = 2
    ({"g": lambda a: -a["g"]}, {}, "g"),  # positive log-decay
    ({"g": lambda a: a["g"] * np.inf}, {}, "g"),  # −inf
    ({"g": lambda a: a["g"] * np.nan}, {}, "g"),
    ({"g": lambda a: a["g"][:, :4]}, {}, "g"),  # one step short
    ({"k": lambda a: a["k"][..., :2]}, {}, "q and k"),
    ({"v": lambda a: a["v"][:, :3]}, {}, "v"),
    ({"v": lambda a: a["v"][:, :, :3]}, {}, "value heads"),  # HV = 3 is not a multiple of H = 2
    ({"q": lambda a: a["q"][0]}, {}, "q"),  # 3-D
    ({}, {"initial_state": np.zeros((1, 2, 3, 2))}, "initial_state"),  # H heads, not HV
    ({}, {"cu_seqlens": [0, 2, 4]}, "cu_seqlens"),  # does not end at T = 5
    ({}, {"form": "quadratic"}, "form"),
    ({}, {"chunk_size": 0}, "chunk_size"),
    ({}, {"layout": "tbhd"}, "layout"),
]


@pytest.mark.parametrize("fn", ["gated", "plain", "vjp"])
@pytest.mark.parametrize(("edit", "kwargs", "name"), BAD)
def test_bad_arguments_raise_value_error_naming_them(fn, edit, kwargs, name):
    a = _args()
    if fn == "plain" and "g" in edit:
        return  # the plain rule takes no g
    if fn == "vjp" and "form" in kwargs:
        return  # the VJP has no forms
    a.update({key: f(a) for key, f in edit.items()})
    with pytest.raises(ValueError, match=name):
        _call(fn, a, **kwargs)


def test_vjp_rejects_cotangents_of_the_wrong_shape():
    a = _args()
    with pytest.raises(ValueError, match="do"):
        _call("vjp", a, do=np.ones((1, 5, 2, 2)))
    with pytest.raises(ValueError, match="dfinal_state"):
        _call("vjp", a, initial_state=np.zeros((1, 4, 3, 2)), dfinal_state=np.zeros((1, 4, 2, 3)))


def test_cu_seqlens_needs_a_batch_of_one():
    a = _args(B=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _call("gated", a, cu_seqlens=[0, 5])


@pytest.mark.parametrize(("kwargs", "exc"), [
    ({"scale": "big"}, TypeError), ({"use_qk_l2norm": 1}, TypeError), ({"output_final_state": "yes"}, TypeError),
])
def test_bad_option_types(kwargs, exc):
    with pytest.raises(exc):
        _call("gated", _args(), **kwargs)


def test_integer_inputs_are_a_type_error():
    a = _args()
    a["q"] = np.ones(a["q"].shape, dtype=np.int64)
    with pytest.raises(TypeError, match="q"):
        _call("gated", a)


def test_decoding_states_check_their_inputs():
    state = init_state("delta", batch=1, heads=2, value_heads=4, key_dim=3, value_dim=2)
    a = _args()
    with pytest.raises(TypeError, match="beta"):
        step(state, a["q"], a["k"], a["v"])
    with pytest.raises(ValueError, match="g="):
        step(state, a["q"], a["k"], a["v"], beta=a["beta"], g=a["g"])
    with pytest.raises(ValueError, match="v must have shape"):
        step(state, a["q"], a["k"], a["v"][:, :, :2], beta=a["beta"][:, :, :2])
    gated = init_state("gated_delta", batch=1, heads=2, value_heads=4, key_dim=3, value_dim=2)
    assert isinstance(state, DeltaState) and isinstance(gated, GatedDeltaState)
    with pytest.raises(TypeError, match="g="):
        step(gated, a["q"], a["k"], a["v"], beta=a["beta"])
    with pytest.raises(TypeError, match="dtype"):
        step(gated, *(x.astype(np.float32) for x in (a["q"], a["k"], a["v"])), beta=a["beta"], g=a["g"])
    with pytest.raises(ValueError, match="value_heads"):
        init_state("delta", batch=1, heads=2, value_heads=3, key_dim=3, value_dim=2)
