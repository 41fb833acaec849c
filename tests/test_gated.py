"""simple_gla, retention, gla (linattn.gated): against their recurrence written here, and each other.

    S_t = (e^{gk_t} e^{gv_t}ᵀ) ⊙ S_{t−1} + k_t v_tᵀ,    o_t = s·S_tᵀ q_t

with gk a scalar per step (simple GLA, g), a constant per head (RetNet, g_gamma) or a
vector over Dk (GLA), and gv over Dv (GLA). Tolerances: see tests/gated_cases.py.
"""

import itertools
from dataclasses import dataclass, field, replace

import array_api_strict as xs
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

import linattn
from linattn.compare import compared_methods, run_compare
from linattn.decoding import init_state, step
from linattn.gated import (
    GLAState,
    RetentionState,
    SimpleGLAState,
    gla,
    gla_vjp,
    retention,
    retention_log_decays,
    retention_vjp,
    simple_gla,
    simple_gla_vjp,
)
from linattn.testing import numerical_vjp, to_numpy, tolerance

GATES = ("none", "step", "gamma", "key", "key+value", "value")


@dataclass
class Problem:
    PER_TIME = ("q", "k", "v", "g", "gk", "gv")  # the arrays with a time axis
    """Inputs in (B, T, H, D) order (float64); ``layout`` is how they are passed."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kind: str
    g: np.ndarray | None = None
    g_gamma: np.ndarray | None = None
    gk: np.ndarray | None = None
    gv: np.ndarray | None = None
    state: np.ndarray | None = None
    scale: float | None = None
    cu: list | None = None
    layout: str = "bthd"
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def T(self):
        return self.q.shape[1]

    @property
    def s(self):
        return self.q.shape[-1] ** -0.5 if self.scale is None else self.scale

    @property
    def gla(self):
        return self.kind in ("key", "key+value", "value")

    def args(self, dtype=None):
        """The positional inputs of the method, in the layout (and dtype)."""
        cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.astype(dtype))
        arrays = [to_layout(cast(x), self.layout) for x in (self.q, self.k, self.v)]
        gate = self.gk if self.gla else self.g
        return [*arrays, None if gate is None else to_layout(cast(gate), self.layout)]

    def kwargs(self, dtype=None):
        cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.astype(dtype))
        kw = {"scale": self.scale, "initial_state": cast(self.state), "cu_seqlens": self.cu, "layout": self.layout}
        if self.gla:
            kw["gv"] = None if self.gv is None else to_layout(cast(self.gv), self.layout)
        else:
            kw["g_gamma"] = cast(self.g_gamma)
        return kw

    def run(self, dtype=None, **kw):
        fn = gla if self.gla else simple_gla
        return fn(*self.args(dtype), **self.kwargs(dtype), **kw)

    def vjp(self, do, **kw):
        fn = gla_vjp if self.gla else simple_gla_vjp
        return fn(*self.args(), to_layout(do, self.layout), **self.kwargs(), **kw)

    def bthd(self, x):
        return x if self.layout == "bthd" else np.swapaxes(x, 1, 2)

    def gates(self):
        return [x for x in (self.g, self.gk, self.gv) if x is not None] + (
            [] if self.g_gamma is None else [np.broadcast_to(self.g_gamma, (1, self.T, self.g_gamma.shape[0]))])

    @property
    def kappa(self):
        return condition(self.T, *self.gates())

    @property
    def terms(self):
        return self.T * self.q.shape[-1] + self.q.shape[-1]


@st.composite
def problems(draw, *, kinds=GATES, extreme=False, varlen=None, max_len=12, max_dim=4, state=None, min_len=0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, T, cu = draw(packings(max_len=max_len, varlen=varlen))
    if T < min_len:
        batch, T, cu = batch, min_len, None
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dk, dv = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    kind = draw(st.sampled_from(kinds))
    p = Problem(rng.standard_normal((batch, T, hkv * group, dk)), rng.standard_normal((batch, T, hkv, dk)),
                rng.standard_normal((batch, T, hkv, dv)), kind, cu=cu,
                layout=draw(st.sampled_from(["bthd", "bhtd"])), scale=draw(st.sampled_from([None, 0.7])), rng=rng)
    if kind == "step":
        p.g = log_decays(rng, (batch, T, hkv), extreme)
    elif kind == "gamma":
        p.g_gamma = log_decays(rng, (hkv,), extreme)
    elif kind in ("key", "key+value"):
        p.gk = log_decays(rng, (batch, T, hkv, dk), extreme)
    if kind in ("key+value", "value"):
        p.gv = log_decays(rng, (batch, T, hkv, dv), extreme)
    n = batch if cu is None else len(cu) - 1
    if draw(st.booleans()) if state is None else state:
        p.state = rng.standard_normal((n, hkv, dk, dv))
    return p


def by_definition(p: Problem, absolute=False):
    """The recurrence one step at a time (o in (B, T, Hq, Dv), final states (N, Hkv, Dk, Dv))."""
    f = np.abs if absolute else (lambda x: x)
    q, k, v = f(p.q), f(p.k), f(p.v)
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    gk = np.zeros((B, T, Hkv, Dk))
    if p.g is not None:
        gk = gk + p.g[..., None]
    if p.g_gamma is not None:
        gk = gk + p.g_gamma[:, None]
    if p.gk is not None:
        gk = p.gk
    gv = np.zeros((B, T, Hkv, Dv)) if p.gv is None else p.gv
    o = np.zeros((B, T, Hq, Dv))
    seqs = sequences(B, T, p.cu)
    final = np.zeros((len(seqs), Hkv, Dk, Dv))
    for n, b, lo, hi in seqs:
        for h in range(Hkv):
            S = np.zeros((Dk, Dv)) if p.state is None else f(p.state[n, h]).copy()
            for t in range(lo, hi):
                S = np.exp(gk[b, t, h])[:, None] * np.exp(gv[b, t, h])[None, :] * S + np.outer(k[b, t, h], v[b, t, h])
                for j in range(G):
                    o[b, t, h * G + j] = p.s * (S.T @ q[b, t, h * G + j])
            final[n, h] = S
    return o, final


# --------------------------------------------------------------------------------------- definition, forms


@settings(max_examples=40)
@given(problems(), st.integers(1, 13))
def test_every_form_equals_the_recurrence(p, drawn):
    o_def, s_def = by_definition(p)
    o_mag, s_mag = by_definition(p, absolute=True)
    for form in FORMS:
        for chunk in chunk_sizes(p.T, drawn) if form == "chunked" else [drawn]:
            o, S = p.run(form=form, chunk_size=chunk, output_final_state=True)
            # float64 sums of T·Dk products; the exponents of the gates summed over <= T steps
            assert_within(p.bthd(o), o_def, bound(np.float64, o_mag, p.terms, p.kappa), f"{p.kind} {form} {chunk}: o")
            assert_within(S, s_def, bound(np.float64, s_mag, p.terms, p.kappa), f"{p.kind} {form} {chunk}: state")


@settings(max_examples=30)
@given(problems(varlen=False), st.integers(1, 13))
def test_forms_agree_for_every_chunk_size_and_length(p, drawn):
    o_par, s_par = p.run(form="parallel", output_final_state=True)
    o_mag, s_mag = by_definition(p, absolute=True)
    kappa, terms = p.kappa, p.terms
    for form, chunk in [("recurrent", 1), *(("chunked", c) for c in chunk_sizes(p.T, drawn))]:
        o, S = p.run(form=form, chunk_size=chunk, output_final_state=True)
        # float64; each differs from the exact sums by at most the definition's rounding
        assert_within(p.bthd(o), p.bthd(o_par), 2 * bound(np.float64, o_mag, terms, kappa), f"{form} {chunk}: o")
        assert_within(S, s_par, 2 * bound(np.float64, s_mag, terms, kappa), f"{form} {chunk}: state")


@settings(max_examples=25)
@given(problems(kinds=("step", "gamma", "key", "key+value"), state=False, varlen=False), st.integers(1, 9))
def test_zero_gates_are_unnormalised_linear_attention(p, chunk):
    zero = lambda x: None if x is None else np.zeros_like(x)  # noqa: E731
    p = replace(p, g=zero(p.g), g_gamma=zero(p.g_gamma), gk=zero(p.gk), gv=zero(p.gv))
    o = p.run(chunk_size=chunk)
    q, k, v = (to_layout(x, p.layout) for x in (p.q, p.k, p.v))
    o_lin = linattn.linear_attention(q, k, v, feature_map="identity", normalize=False, scale=p.s, causal=True,
                                     layout=p.layout, chunk_size=chunk)
    o_mag, _ = by_definition(p, absolute=True)
    # the same scan, once with exact-0 gates (e^0 = 1 exactly): float64 rounding of the sums
    assert_within(p.bthd(o), p.bthd(o_lin), 2 * bound(np.float64, o_mag, p.terms, 1.0))


@settings(max_examples=25)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(1, 4), st.sampled_from(FORMS), st.booleans())
def test_retention_equals_its_decay_matrix_form(seed, T, heads, form, given_gamma):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, T, heads, 3)) for _ in range(3))
    log_gamma = -rng.random(heads) if given_gamma else np.log(1 - 2.0 ** (-5 - np.arange(heads)))
    o = retention(q, k, v, g_gamma=log_gamma if given_gamma else None, form=form, chunk_size=4)
    t = np.arange(T)
    for h in range(heads):
        # RetNet's parallel retention: (Q Kᵀ ⊙ D) V / sqrt(d), D_ts = γ^{t−s} for s <= t
        D = np.where(t[:, None] >= t[None, :], np.exp(log_gamma[h]) ** np.abs(t[:, None] - t[None, :]), 0.0)
        scores = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, h]) * D
        desired = scores @ v[:, :, h] / np.sqrt(3)
        size = (np.einsum("btd,bsd->bts", np.abs(q[:, :, h]), np.abs(k[:, :, h])) * D) @ np.abs(v[:, :, h])
        # float64: γ^{t−s} by a power here, e^{Σ log γ} there: ~T roundings of the exponent
        assert_within(o[:, :, h], desired, bound(np.float64, size / np.sqrt(3), 3 * T, 1.0 + T))


def test_retention_default_decays_are_the_papers():
    np.testing.assert_array_equal(retention_log_decays(4), np.log1p(-(2.0 ** -np.arange(5, 9))))


# --------------------------------------------------------------------------------------- causality, states


@settings(max_examples=25)
@given(problems(varlen=False, min_len=1), st.data())
def test_prefix_is_bitwise_unchanged_by_later_inputs(p, data):
    P = data.draw(st.integers(0, p.T - 1))
    chunk = data.draw(st.integers(1, p.T + 1))
    changed = replace(p, q=p.q.copy(), k=p.k.copy(), v=p.v.copy(), g=None if p.g is None else p.g.copy(),
                      gk=None if p.gk is None else p.gk.copy(), gv=None if p.gv is None else p.gv.copy())
    for x in (changed.q, changed.k, changed.v):
        x[:, P + 1:] = p.rng.standard_normal(x[:, P + 1:].shape) * 10
    for g in (changed.g, changed.gk, changed.gv):
        if g is not None:
            g[:, P + 1:] = log_decays(p.rng, g[:, P + 1:].shape, extreme=True)
    for form in FORMS:
        before, after = (p.bthd(x.run(form=form, chunk_size=chunk)) for x in (p, changed))
        # the scan is bitwise causal (tests/test_scan.py) and the front end is per row
        np.testing.assert_array_equal(after[:, : P + 1], before[:, : P + 1], err_msg=form)


@settings(max_examples=25)
@given(problems(varlen=False), st.data())
def test_state_passing_equals_one_run(p, data):
    split, chunk = data.draw(st.integers(0, p.T)), data.draw(st.integers(1, p.T + 1))
    check_state_passing(p, split, chunk, by_definition)


@settings(max_examples=25)
@given(problems(varlen=True), st.sampled_from(FORMS))
def test_cu_seqlens_equals_the_per_segment_loop(p, form):
    check_cu_seqlens(p, form)


def test_empty_sequences_return_their_initial_state():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 3, 2, 3)) for _ in range(3))
    S0 = rng.standard_normal((3, 2, 3, 3))
    for gate in (-rng.random((1, 3, 2)), None):
        _, S = simple_gla(q, k, v, gate, initial_state=S0, cu_seqlens=[0, 0, 3, 3], output_final_state=True)
        np.testing.assert_array_equal(S[[0, 2]], S0[[0, 2]])  # no step: untouched


# --------------------------------------------------------------------------------------- decoding


@settings(max_examples=20)
@given(problems(varlen=False, kinds=("none", "step", "gamma", "key", "key+value")), st.data())
def test_decoding_equals_the_causal_forward(p, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, p.T - 1)), max_size=3))) | {0, p.T})
    B, _, _, Dk = p.q.shape
    Hkv, Dv = p.k.shape[2], p.v.shape[3]
    sizes = {"batch": B, "kv_heads": Hkv, "key_dim": Dk, "value_dim": Dv, "scale": p.scale}
    if p.gla:
        state = init_state("gla", **sizes)
    else:
        state = init_state("simple_gla", **sizes, g_gamma=p.g_gamma)
    if p.state is not None:
        state = type(state).from_final_state(p.state, scale=p.scale, **({} if p.gla else {"g_gamma": p.g_gamma}))
    o_full = p.bthd(p.run())
    outputs = []
    for lo, hi in itertools.pairwise(cuts):
        args = [to_layout(p.bthd(x)[:, lo:hi], p.layout) for x in p.args()[:3]]
        gates = {}
        if p.g is not None:
            gates["g"] = to_layout(p.g[:, lo:hi], p.layout)
        if p.gk is not None:
            gates["gk"] = to_layout(p.gk[:, lo:hi], p.layout)
        if p.gv is not None:
            gates["gv"] = to_layout(p.gv[:, lo:hi], p.layout)
        o, state = step(state, *args, layout=p.layout, **gates)
        outputs.append(p.bthd(o))
    o_mag, s_mag = by_definition(p, absolute=True)
    # float64: blocks of the sequence, chunked per block, against one chunked run
    assert_within(np.concatenate(outputs, axis=1), o_full, 2 * bound(np.float64, o_mag, p.terms, p.kappa))
    assert_within(state.final_state, p.run(output_final_state=True)[1], 2 * bound(np.float64, s_mag, p.terms, p.kappa))


def test_retention_state_decodes_with_the_default_decays():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 5, 2, 3)) for _ in range(3))
    state = RetentionState.initial(batch=1, kv_heads=2, key_dim=3, value_dim=3)
    outputs = []
    for t in range(5):
        o, state = step(state, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        outputs.append(o)
    # float64, five O(1) steps
    np.testing.assert_allclose(np.concatenate(outputs, axis=1), retention(q, k, v), rtol=tolerance(np.float64, 15),
                               atol=tolerance(np.float64, 15))
    assert isinstance(state, SimpleGLAState) and isinstance(init_state("gla", batch=1, kv_heads=1, key_dim=1,
                                                                       value_dim=1), GLAState)


# --------------------------------------------------------------------------------------- gradients


def _gradient_problem(kind, seed, layout, with_state, cu=None):
    rng = np.random.default_rng(seed)
    T = 4 if cu is None else cu[-1]
    p = Problem(rng.standard_normal((1, T, 2, 2)), rng.standard_normal((1, T, 1, 2)),
                rng.standard_normal((1, T, 1, 3)), kind, layout=layout, scale=0.8, cu=cu, rng=rng)
    p.g = -rng.random((1, T, 1)) if kind == "step" else None
    p.g_gamma = -rng.random(1) if kind == "gamma" else None
    p.gk = -rng.random((1, T, 1, 2)) if kind in ("key", "key+value") else None
    p.gv = -rng.random((1, T, 1, 3)) if kind in ("key+value", "value") else None
    n = 1 if cu is None else len(cu) - 1
    p.state = rng.standard_normal((n, 1, 2, 3)) if with_state else None
    return p


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("kind", "layout", "with_state", "cu"), [
    ("step", "bthd", True, None), ("gamma", "bhtd", True, None), ("none", "bthd", False, None),
    ("key", "bhtd", True, None), ("key+value", "bthd", True, None), ("value", "bhtd", False, None),
    ("step", "bthd", True, [0, 2, 2, 5]), ("key+value", "bthd", True, [0, 3, 4]),
])
def test_vjp_equals_central_differences_for_every_input(kind, layout, with_state, cu, form):
    p = _gradient_problem(kind, 7, layout, with_state, cu)
    names = ["q", "k", "v"] + [n for n in ("g", "g_gamma", "gk", "gv", "state") if getattr(p, n) is not None]
    o, S = p.run(output_final_state=True)
    do, dS = p.rng.standard_normal(o.shape), p.rng.standard_normal(S.shape)

    def forward(*arrays):
        x = replace(p, **dict(zip(names, [p.bthd(a) if n in ("q", "k", "v", "g", "gk", "gv") else a
                                          for n, a in zip(names, arrays, strict=True)], strict=True)))
        o, S = x.run(form="parallel", output_final_state=True)
        return np.concatenate([o.ravel(), S.ravel()])

    inputs = [to_layout(getattr(p, n), layout) if n in ("q", "k", "v", "g", "gk", "gv") else getattr(p, n)
              for n in names]
    expected = numerical_vjp(forward, inputs, np.concatenate([do.ravel(), dS.ravel()]), step=FD_STEP)
    got = p.vjp(p.bthd(do), form=form, chunk_size=3, dfinal_state=dS)
    fields = {"q": got.dq, "k": got.dk, "v": got.dv, "state": got.dinitial_state}
    fields.update({"g": got.dg, "g_gamma": got.dg_gamma} if not p.gla else {"gk": got.dgk, "gv": got.dgv})
    o_mag, s_mag = by_definition(p, absolute=True)
    loss_size = float(np.sum(np.abs(p.bthd(do)) * o_mag) + np.sum(np.abs(dS) * s_mag))
    check_fd([fields[n] for n in names], expected, names, fd_atol(loss_size, p.T, p.kappa, p.terms))
    absent = [n for n in fields if n not in names]
    assert all(fields[n] is None for n in absent), absent


def test_retention_vjp_gives_dg_gamma_only_when_given():
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 4, 2, 2)) for _ in range(4))
    assert retention_vjp(q, k, v, do).dg_gamma is None
    gamma = retention_log_decays(2)
    grads = retention_vjp(q, k, v, do, g_gamma=gamma)
    expected = simple_gla_vjp(q, k, v, None, do, g_gamma=gamma)
    np.testing.assert_array_equal(grads.dg_gamma, expected.dg_gamma)  # the same call


# --------------------------------------------------------------------------------------- extremes, dtypes


@settings(max_examples=30)
@given(problems(kinds=("step", "gamma", "key", "key+value", "value"), extreme=True, varlen=False),
       st.sampled_from([np.float32, np.float16]), st.integers(1, 13))
def test_extreme_gates_in_low_precision_stay_finite_and_match_float64(p, dtype, chunk):
    rounded = replace(p, **{n: None if getattr(p, n) is None else getattr(p, n).astype(dtype).astype(np.float64)
                            for n in ("q", "k", "v", "g", "g_gamma", "gk", "gv", "state")})
    o_def, _ = by_definition(rounded)
    o_mag, _ = by_definition(rounded, absolute=True)
    for form in FORMS:
        with np.errstate(over="raise", invalid="raise"):  # no exp of a positive number, no inf·0
            o, S = p.run(dtype, form=form, chunk_size=chunk, output_final_state=True)
        assert o.dtype == dtype and S.dtype == np.float32, form
        assert np.all(np.isfinite(o)) and np.all(np.isfinite(S)), form
        if dtype == np.float32:
            # float32 sums and exponents (κ: the gates summed over T), relative to Σ|terms|;
            # plus terms that underflow below float32's smallest normal number
            limit = bound(np.float32, o_mag, p.terms, rounded.kappa, (p.T + 1) * float(np.finfo(np.float32).tiny))
        else:
            limit = half_precision_bound(o_mag, o_def, p.terms, rounded.kappa, p.T)
        assert_within(p.bthd(o), o_def, limit, f"{form} {dtype.__name__}")


# --------------------------------------------------------------------------------------- array API


@pytest.mark.parametrize("form", FORMS)
def test_every_gated_method_runs_on_array_api_strict(form):
    from linattn.hgrn import hgrn, hgrn_vjp
    from linattn.mamba2 import mamba2, mamba2_vjp
    from linattn.rwkv import rwkv6, rwkv6_vjp

    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal(s) for s in ((1, 7, 2, 3), (1, 7, 1, 3), (1, 7, 1, 2), (1, 7, 2, 2)))
    g, gk, gv, u = -rng.random((1, 7, 1)), -rng.random((1, 7, 1, 3)), -rng.random((1, 7, 1, 2)), rng.random((1, 3))
    S0 = rng.standard_normal((2, 1, 3, 2))
    x, dt, A, B = rng.standard_normal((1, 7, 2, 3)), rng.random((1, 7, 2)), -rng.random(2), rng.standard_normal(
        (1, 7, 1, 3))
    kw = {"form": form, "chunk_size": 3}
    calls = [
        lambda a: simple_gla(a["q"], a["k"], a["v"], a["g"], initial_state=a["S0"], cu_seqlens=a["cu"],
                             output_final_state=True, **kw),
        lambda a: gla_vjp(a["q"], a["k"], a["v"], a["gk"], a["do"], gv=a["gv"], **kw),
        lambda a: retention(a["q"], a["k"], a["v"], **kw),
        lambda a: rwkv6_vjp(a["q"], a["k"], a["v"], a["gk"], a["u"], a["do"], initial_state=a["S0"],
                            cu_seqlens=a["cu"], **kw),
        lambda a: hgrn_vjp(a["x3"], -a["x3"] ** 2, a["x3"], **kw),
        lambda a: mamba2_vjp(a["x"], a["dt"], a["A"], a["B"], a["B"], a["x"], D=a["A"], dt_softplus=True, **kw),
        lambda a: (rwkv6(a["q"], a["k"], a["v"], a["gk"], a["u"], **kw), hgrn(a["x3"], -a["x3"] ** 2, **kw),
                   mamba2(a["x"], a["dt"], a["A"], a["B"], a["B"], **kw)),
    ]
    arrays = {"q": q, "k": k, "v": v, "do": do, "g": g, "gk": gk, "gv": gv, "u": u, "S0": S0, "x": x, "dt": dt,
              "A": A, "B": B, "x3": x[..., 0]}
    strict = {name: xs.asarray(a) for name, a in arrays.items()}
    arrays["cu"], strict["cu"] = [0, 3, 7], xs.asarray(np.array([0, 3, 7]))
    def flat(result):
        if not isinstance(result, tuple):
            return [result]
        return [leaf for part in result for leaf in flat(part)]

    for call in calls:
        for a, b in zip(flat(call(strict)), flat(call(arrays)), strict=True):
            # the same operations on the same float64 values in the same order
            assert (a is None) == (b is None)
            if a is not None:
                assert isinstance(a, xs._array_object.Array)
                np.testing.assert_array_equal(to_numpy(a), b)


# --------------------------------------------------------------------------------------- arguments


def _good():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((2, 5, 2, 3)), rng.standard_normal((2, 5, 2, 2))
    return q, k, v, -rng.random((2, 5, 2)), -rng.random((2, 5, 2, 3))


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g[:, :4]), ValueError,
     r"g must have shape \(2, 5, 2\).*q \(2, 5, 4, 3\)"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, g_gamma=g[0, 0]), ValueError, "at most one of g"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, -g), ValueError, "g must hold finite log-decays <= 0"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g * np.nan), ValueError, "NaN"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g * np.inf), ValueError, "g must hold finite"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g_gamma=np.ones(2)), ValueError, "g_gamma must hold"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g_gamma=np.zeros(4)), ValueError, r"g_gamma must have shape \(2,\)"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g.astype(np.int64)), TypeError, "g must have a real floating"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, layout="bhtd"), ValueError, "T == S"),
    (lambda q, k, v, g, gk: simple_gla(q, k[:, :4], v[:, :4], g), ValueError, "T == S|same length"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, form="fast"), ValueError, "form"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, chunk_size=0), ValueError, "chunk_size"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, initial_state=np.zeros((2, 4, 3, 2))), ValueError,
     r"initial_state must have shape \(2, 2, 3, 2\)"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, cu_seqlens=[0, 5]), ValueError, "batch of one"),
    (lambda q, k, v, g, gk: simple_gla(q, k, v, g, scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v, g, gk: gla(q, k, v, gk[..., :2]), ValueError,
     r"gk must have shape \(2, 5, 2, 3\).*k \(2, 5, 2, 3\)"),
    (lambda q, k, v, g, gk: gla(q, k, v, 1 + gk), ValueError, "gk must hold finite log-decays"),
    (lambda q, k, v, g, gk: gla(q, k, v, gk, gv=gk), ValueError,
     r"gv must have shape \(2, 5, 2, 2\).*v \(2, 5, 2, 2\)"),
    (lambda q, k, v, g, gk: retention(q, k, v, g_gamma=np.zeros(3)), ValueError, "g_gamma must have shape"),
    (lambda q, k, v, g, gk: simple_gla_vjp(q, k, v, g, np.zeros((2, 5, 4, 3))), ValueError, "do must have shape"),
    (lambda q, k, v, g, gk: gla_vjp(q, k, v, gk, np.zeros((2, 5, 4, 2)), dfinal_state=np.zeros(3)), ValueError,
     "dfinal_state must have shape"),
])
def test_bad_arguments_raise_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call(*_good())


def test_decoding_states_check_their_tokens():
    q, k, v, g, _ = _good()
    state = init_state("simple_gla", batch=2, kv_heads=2, key_dim=3, value_dim=2)
    with pytest.raises(ValueError, match="kv_heads=2"):
        step(state, q, k[:, :, :1], v[:, :, :1], g=g[:, :, :1])
    with pytest.raises(TypeError, match="dtype"):
        step(state, q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), g=g)
    gamma_state = init_state("simple_gla", batch=2, kv_heads=2, key_dim=3, value_dim=2, g_gamma=np.zeros(2))
    with pytest.raises(ValueError, match="at most one"):
        step(gamma_state, q, k, v, g=g)
    with pytest.raises(ValueError, match="g_gamma must hold"):
        init_state("retention", batch=1, kv_heads=2, key_dim=3, value_dim=2, g_gamma=np.ones(2))


# --------------------------------------------------------------------------------------- compare


@pytest.mark.parametrize("name", ["simple_gla", "retention", "gla"])
def test_compare_measures_the_chunked_form_against_the_recurrent_definition(name):
    assert compared_methods()[name].reference is not None
    [row] = run_compare([40], dim=8, heads=2, dtype="float64", methods=[name], repeats=1)
    assert row.error_against == "definition"
    # float64: two forms of the same sums of 40·8 products
    assert row.rel_error < tolerance(np.float64, 320, 40)
    assert not compared_methods()[name].supports_noncausal
    with pytest.raises(ValueError, match="causal"):
        compared_methods()[name].run(*_good()[:3], causal=False)
