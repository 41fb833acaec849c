"""Kernelized attention: linear_attention, performer_attention, cosformer_attention, hybrid_attention.

Each method is checked against its formula written here, one query at a time, from
features computed here (not by linattn.feature_maps):

    o_t = Σ_{j∈V(t)} w_tj v_j / (Σ_{j∈V(t)} w_tj + eps)    (or the numerator alone),

with w_tj = s·φ(q_t)·φ(k_j) (times cos(π/2·(t−j)/M) for cosFormer). Comparisons are
judged against the size of what was summed: for each output, Σ|w_tj||v_j| / |den| +
|o_t|·Σ|w_tj| / |den| (normalised) or Σ|w_tj||v_j| (not) — rounding can never exceed a few
ε times that, however much the signed terms cancel, and it is large exactly where the
normaliser is ill-conditioned (the identity map's denominators can be near 0).
"""

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import linattn
from linattn.feature_maps import FEATURE_MAPS, random_projection
from linattn.testing import assert_close, machine_epsilon, numerical_vjp, tolerance
from linattn.testing.strategies import segment_lengths

FD_STEP = 1e-6


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """q, k, v in ``layout``; ``cu`` the cu_seqlens offsets or None."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    layout: str
    causal: bool
    cu: list[int] | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    @property
    def kwargs(self) -> dict:
        return {"layout": self.layout, "causal": self.causal, "cu_seqlens": self.cu}

    def bthd(self, x):
        return x if self.layout == "bthd" else np.swapaxes(x, 1, 2)

    @property
    def n_states(self) -> int:
        return self.q.shape[0] if self.cu is None else len(self.cu) - 1

    def segments(self):
        """(query lo, hi, key lo, hi) of each sequence."""
        if self.cu is not None:
            return [(lo, hi, lo, hi) for lo, hi in itertools.pairwise(self.cu)]
        return [(0, self.bthd(self.q).shape[1], 0, self.bthd(self.k).shape[1])]

    def time_slice(self, x, lo, hi):
        return x[:, lo:hi] if self.layout == "bthd" else x[:, :, lo:hi]


@st.composite
def problems(draw, *, causal=None, varlen=None, max_len=12, max_dim=5, cross=False, max_group=3):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    causal = draw(st.booleans()) if causal is None else causal
    cu = None
    if draw(st.booleans()) if varlen is None else varlen:
        lengths = draw(segment_lengths(max_segments=4, max_length=max_len // 2))
        cu = [0, *np.cumsum(lengths).tolist()]
        batch, T, S = 1, cu[-1], cu[-1]
    else:
        batch, T = draw(st.integers(1, 2)), draw(st.integers(1, max_len))
        S = draw(st.integers(1, max_len)) if cross and not causal else T
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, max_group))
    dk, dv = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    layout = draw(st.sampled_from(["bthd", "bhtd"]))

    def make(length, heads, dim):
        x = rng.standard_normal((batch, length, heads, dim))
        return x if layout == "bthd" else np.ascontiguousarray(np.swapaxes(x, 1, 2))

    return Problem(make(T, hkv * group, dk), make(S, hkv, dk), make(S, hkv, dv), layout, causal, cu, rng)


# --------------------------------------------------------------------------- definitions


def taylor(x):
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return np.concatenate([np.ones_like(x[..., :1]), x / d**0.25, outer / math.sqrt(2 * d)], axis=-1)


# The parameter-free maps written from their papers' formulas, independent of linattn.
FEATURES = {
    "elu+1": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))),
    "relu": lambda x: np.maximum(x, 0.0),
    "identity": lambda x: x,
    "taylor": taylor,
}


def kernelized_by_definition(fq, fk, v, *, causal, normalize, eps, segments, reweight=None):
    """One query at a time. fq (B, T, Hq, m) already scaled, fk (B, S, Hkv, m), v (B, S, Hkv, Dv).

    ``reweight(i, j)`` multiplies w_ij (cosFormer), with i, j positions within the sequence.
    Returns o and the rounding scale of each output (see the module docstring).
    """
    B, T, Hq, _ = fq.shape
    group = Hq // fk.shape[2]
    o = np.zeros((B, T, Hq, v.shape[-1]))
    size = np.zeros_like(o)
    for b, h in itertools.product(range(B), range(Hq)):
        g = h // group
        for q_lo, q_hi, k_lo, k_hi in segments:
            for t in range(q_lo, q_hi):
                keys = np.arange(k_lo, t + 1 if causal else k_hi)
                w = fk[b, keys, g] @ fq[b, t, h]
                w_abs = np.abs(fk[b, keys, g]) @ np.abs(fq[b, t, h])
                if reweight is not None:
                    factor = reweight(t - q_lo, keys - k_lo)
                    w, w_abs = w * factor, w_abs * np.abs(factor)
                num, num_abs = w @ v[b, keys, g], w_abs @ np.abs(v[b, keys, g])
                if normalize:
                    den = w.sum() + eps
                    o[b, t, h] = num / den
                    size[b, t, h] = (num_abs + np.abs(o[b, t, h]) * w_abs.sum()) / abs(den)
                else:
                    o[b, t, h], size[b, t, h] = num, num_abs
    return o, size


def linear_by_definition(p: Problem, feature_map="elu+1", normalize=True, eps=1e-6, scale=None):
    phi = FEATURES[feature_map] if feature_map in FEATURES else FEATURE_MAPS[feature_map].forward
    s = 1.0 if scale is None else scale
    return kernelized_by_definition(phi(p.bthd(p.q)) * s, phi(p.bthd(p.k)), p.bthd(p.v), causal=p.causal,
                                    normalize=normalize, eps=eps, segments=p.segments())


def performer_features(x, W, kind):
    """The unstabilised FAVOR+ features of x (..., Dk) with the default scale 1/√Dk."""
    x = x * x.shape[-1] ** -0.25
    u = x @ W.T
    half_norm = np.sum(x * x, axis=-1, keepdims=True) / 2
    if kind == "positive":
        return np.exp(u - half_norm) / math.sqrt(W.shape[0])
    return np.exp(half_norm) / math.sqrt(W.shape[0]) * np.concatenate([np.sin(u), np.cos(u)], axis=-1)


def performer_by_definition(p: Problem, W, kind="positive", normalize=True, eps=0.0):
    fq, fk = (performer_features(p.bthd(x), W, kind) for x in (p.q, p.k))
    return kernelized_by_definition(fq, fk, p.bthd(p.v), causal=p.causal, normalize=normalize, eps=eps,
                                    segments=p.segments())


def performer_condition(p: Problem, W) -> float:
    """1 + the largest |exponent| of a feature: exp turns its rounding into a relative error."""
    x = np.concatenate([p.bthd(p.q).reshape(-1, W.shape[1]), p.bthd(p.k).reshape(-1, W.shape[1])])
    x = x * W.shape[1] ** -0.25
    return 1.0 + float(np.max(np.abs(x @ W.T), initial=0.0) + np.max(np.sum(x * x, axis=-1), initial=0.0))


def cosformer_by_definition(p: Problem, max_len=None, eps=1e-6):
    """The quadratic form: relu(q_i)·relu(k_j)·cos(π/2·(i − j)/M), normalised."""
    if max_len is None:
        max_len = max(max(qh - ql, kh - kl) for ql, qh, kl, kh in p.segments()) or 1
    reweight = lambda i, j: np.cos(np.pi / 2 * (i - j) / max_len)  # noqa: E731
    relu = FEATURES["relu"]
    return kernelized_by_definition(relu(p.bthd(p.q)), relu(p.bthd(p.k)), p.bthd(p.v), causal=p.causal,
                                    normalize=True, eps=eps, segments=p.segments(), reweight=reweight)


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


def summed_terms(p: Problem, m: int) -> int:
    """Products behind one output: every key's m feature products."""
    return max(1, p.bthd(p.k).shape[1] * m)


def output_dim(feature_map, dk):
    return FEATURE_MAPS[feature_map].output_dim(dk)


# --------------------------------------------------------------------------- linear attention


@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
@settings(max_examples=20)
@given(problems(cross=True), st.booleans(), st.sampled_from([None, 0.3, 1.7]), st.data())
def test_linear_attention_equals_the_per_query_formula(feature_map, p, normalize, scale, data):
    form = data.draw(st.sampled_from(["parallel", "recurrent", "chunked"]))
    chunk = data.draw(st.integers(1, 8))
    o = linattn.linear_attention(p.q, p.k, p.v, feature_map=feature_map, normalize=normalize, scale=scale,
                                 form=form, chunk_size=chunk, **p.kwargs)
    o_def, size = linear_by_definition(p, feature_map, normalize, scale=scale)
    # float64 sums of S·m products, relative to Σ|terms| (and the normaliser's conditioning)
    tol = tolerance(np.float64, summed_terms(p, output_dim(feature_map, p.q.shape[-1])))
    assert_within(p.bthd(o), o_def, tol * size + 1e-300, f"{feature_map} {form}")


@settings(max_examples=30)
@given(problems(causal=True, varlen=False), st.floats(0.05, 2.0))
def test_identity_unnormalised_is_flash_linear_attentions_definition(p, scale):
    o = linattn.linear_attention(p.q, p.k, p.v, feature_map="identity", normalize=False, scale=scale, **p.kwargs)
    q, k, v = (p.bthd(x) for x in (p.q, p.k, p.v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    # FLA's chunk_linear_attn / fused_recurrent_linear_attn: o_t = s·Σ_{j<=t} (q_t·k_j) v_j
    scores = np.einsum("bthd,bshd->bhts", q, k) * np.tril(np.ones((q.shape[1], q.shape[1])))
    desired = scale * np.einsum("bhts,bshe->bthe", scores, v)
    size = scale * np.einsum("bhts,bshe->bthe", np.abs(np.einsum("bthd,bshd->bhts", np.abs(q), np.abs(k))),
                             np.abs(v))
    # float64 sums of T·Dk products, relative to Σ|terms|
    assert_within(p.bthd(o), desired, tolerance(np.float64, summed_terms(p, q.shape[-1])) * size + 1e-300)


@pytest.mark.parametrize("S", [5, 2])
@pytest.mark.parametrize("method", ["linear", "cosformer", "performer"])
def test_non_causal_cross_attention_sees_every_key(method, S):
    # (keys beyond T were once dropped, and cosFormer failed for S < T)
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 3, 1, 4)), rng.standard_normal((1, S, 1, 4)), rng.standard_normal((1, S, 1, 2))
    p = Problem(q, k, v, "bthd", causal=False)
    W = random_projection(8, 4, rng=0)
    if method == "linear":
        o, (o_def, _) = linattn.linear_attention(q, k, v), linear_by_definition(p)
    elif method == "cosformer":
        o, (o_def, _) = linattn.cosformer_attention(q, k, v), cosformer_by_definition(p)
    else:
        o, (o_def, _) = linattn.performer_attention(q, k, v, projection=W), performer_by_definition(p, W)
    # float64 sums of at most 5·8 products of O(1) terms
    np.testing.assert_allclose(o, o_def, rtol=tolerance(np.float64, 40), atol=tolerance(np.float64, 40))


# --------------------------------------------------------------------------- forms, prefix, states


def run_method(method, p: Problem, **kw):
    """Call one method of the family with the problem's arguments."""
    fn = {"linear": linattn.linear_attention, "performer": linattn.performer_attention,
          "cosformer": linattn.cosformer_attention}[method]
    return fn(p.q, p.k, p.v, **p.kwargs, **kw)


def method_options(method, p: Problem):
    """Options of one method and its definition (o, size), and the features per key."""
    dk = p.q.shape[-1]
    if method == "cosformer":
        return {}, cosformer_by_definition(p), 2 * dk, 1.0
    if method == "performer":
        W = random_projection(6, dk, rng=int(p.rng.integers(2**31)))
        return {"projection": W}, performer_by_definition(p, W), 6, performer_condition(p, W)
    fmap = method.split(":")[1]
    return {"feature_map": fmap}, linear_by_definition(p, fmap), output_dim(fmap, dk), 1.0


METHODS = ["linear:elu+1", "linear:relu", "linear:identity", "linear:taylor", "performer", "cosformer"]


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15)
@given(problems(causal=True), st.integers(1, 9))
def test_forms_agree_for_every_chunk_size(method, p, drawn):
    opts, (_, size), m, condition = method_options(method, p)
    name = method.split(":")[0]
    o_par = run_method(name, p, form="parallel", **opts)
    T = p.bthd(p.q).shape[1]
    # float64: each form sums the same S·m products in its own order; the performer's
    # features carry exp's rounding of exponents of size `condition`
    tol = 2 * tolerance(np.float64, summed_terms(p, m), condition)
    for form, chunk in [("recurrent", 1), *(("chunked", c) for c in sorted({1, 3, T + 1, drawn}))]:
        o = run_method(name, p, form=form, chunk_size=chunk, **opts)
        assert_within(p.bthd(o), p.bthd(o_par), tol * size + 1e-300, f"{form} chunk={chunk}")


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15)
@given(problems(causal=True, varlen=False), st.data())
def test_causal_prefix_is_unchanged_by_later_inputs(method, p, data):
    opts, (_, size), m, condition = method_options(method, p)
    name = method.split(":")[0]
    T = p.bthd(p.q).shape[1]
    P = data.draw(st.integers(0, T - 1))
    changed = Problem(*(x.copy() for x in (p.q, p.k, p.v)), p.layout, p.causal)
    for x in (changed.q, changed.k, changed.v):
        p.bthd(x)[:, P + 1:] = p.rng.standard_normal(p.bthd(x)[:, P + 1:].shape) * 3
    chunk = data.draw(st.integers(1, T + 1))
    before = p.bthd(run_method(name, p, chunk_size=chunk, **opts))
    after = p.bthd(run_method(name, changed, chunk_size=chunk, **opts))
    if name == "performer":
        # The key stabiliser c is a max over all keys, later ones included; it cancels from
        # the ratio only to rounding (exp(a − c) is rounded for another c): float64 rounding
        # of the features (exponents of either input's size), relative to the size of the sums
        condition = max(condition, performer_condition(changed, opts["projection"]))
        tol = 2 * tolerance(np.float64, summed_terms(p, m), condition)
        assert_within(after[:, : P + 1], before[:, : P + 1], tol * size[:, : P + 1] + 1e-300)
    else:
        # Bitwise: features are per row (cosFormer's positions and M do not change), the scan's
        # prefix is bitwise causal (tests/test_scan.py), and the normalisation is per row.
        np.testing.assert_array_equal(after[:, : P + 1], before[:, : P + 1])


def states_from_a_prefix(method, p: Problem, opts, length=2):
    """Realistic states, one per sequence: the final states of random prefixes (z a sum of features)."""
    q, k, v = (p.bthd(x) for x in (p.q, p.k, p.v))
    shape = lambda x: (p.n_states, length, *x.shape[2:])  # noqa: E731
    prefix = Problem(*(p.rng.standard_normal(shape(x)) for x in (q, k, v)), "bthd", True)
    return run_method(method, prefix, output_final_state=True, **opts)[1]


def state_size(fk, v, segments):
    """Σ_j |φ(k_j)| |v_j|ᵀ and Σ_j |φ(k_j)| per sequence: what a final state sums, (N, Hkv, m, Dv), (N, Hkv, m)."""
    S = np.stack([np.einsum("bshm,bshe->bhme", np.abs(fk[:, lo:hi]), np.abs(v[:, lo:hi]))
                  for _, _, lo, hi in segments], axis=0)
    z = np.stack([np.abs(fk[:, lo:hi]).sum(axis=1) for _, _, lo, hi in segments], axis=0)
    return S.reshape(-1, *S.shape[2:]), z.reshape(-1, *z.shape[2:])


# The Performer's stabiliser needs normalize=True (a ValueError otherwise, tested below).
STATEFUL = [(m, n) for m in ("linear:elu+1", "linear:relu", "linear:identity", "linear:taylor",
                             "performer:unstabilised", "performer:stabilised") for n in (True, False)
            if not (m == "performer:stabilised" and not n)]


@pytest.mark.parametrize(("method", "normalize"), STATEFUL)
@settings(max_examples=12)
@given(problems(causal=True, varlen=False), st.data())
def test_state_passing_equals_one_run(method, normalize, p, data):
    if method.startswith("performer"):
        name, W = "performer", random_projection(6, p.q.shape[-1], rng=int(p.rng.integers(2**31)))
        opts = {"projection": W, "stabilize": method.endswith(":stabilised")}
        (_, size), condition = performer_by_definition(p, W, normalize=normalize), performer_condition(p, W)
        fk = performer_features(p.bthd(p.k), W, "positive")
    else:
        name, fmap = "linear", method.split(":")[1]
        opts, condition = {"feature_map": fmap}, 1.0
        _, size = linear_by_definition(p, fmap, normalize)
        fk = FEATURES[fmap](p.bthd(p.k))
    opts["normalize"] = normalize
    T = p.bthd(p.q).shape[1]
    split, chunk = data.draw(st.integers(0, T)), data.draw(st.integers(1, T + 1))
    o, final = run_method(name, p, output_final_state=True, chunk_size=chunk, **opts)
    first = Problem(*(p.time_slice(x, 0, split) for x in (p.q, p.k, p.v)), p.layout, True)
    second = Problem(*(p.time_slice(x, split, T) for x in (p.q, p.k, p.v)), p.layout, True)
    o1, mid = run_method(name, first, output_final_state=True, chunk_size=chunk, **opts)
    o2, final2 = run_method(name, second, initial_state=mid, output_final_state=True, chunk_size=chunk, **opts)
    # float64: the two runs round their partial sums elsewhere than the one run; relative to
    # the size of the sums (and the normaliser's conditioning), as everywhere here
    tol = 2 * tolerance(np.float64, summed_terms(p, fk.shape[-1]), condition)
    assert_within(np.concatenate([p.bthd(o1), p.bthd(o2)], axis=1), p.bthd(o), tol * size + 1e-300, "o")
    S_size, z_size = state_size(fk, p.bthd(p.v), p.segments())
    if normalize:
        assert_within(final2[0], final[0], tol * S_size + 1e-300, "S")
        assert_within(final2[1], final[1], tol * z_size + 1e-300, "z")
    else:
        assert_within(final2, final, tol * S_size + 1e-300, "S")


def test_performer_state_passing_with_the_default_stabiliser():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 10, 1, 4)) for _ in range(3))
    kw = dict(projection=random_projection(16, 4, rng=1), causal=True)
    o = linattn.performer_attention(q, k, v, **kw)
    o1, s1 = linattn.performer_attention(q[:, :4], k[:, :4], v[:, :4], output_final_state=True, **kw)
    o2 = linattn.performer_attention(q[:, 4:], k[:, 4:], v[:, 4:], initial_state=s1, **kw)
    # float64 over 10 steps of 16 features. (Each call once subtracted its own key maximum,
    # so a carried state was on another scale: an error of 0.26 here.)
    np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), o, rtol=tolerance(np.float64, 160),
                               atol=tolerance(np.float64, 160) * np.max(np.abs(v)))


@pytest.mark.parametrize("method", ["linear:elu+1", "linear:taylor", "performer", "cosformer"])
@settings(max_examples=15)
@given(problems(causal=True, varlen=True, max_len=14), st.booleans())
def test_cu_seqlens_equals_the_per_segment_loop_with_per_segment_states(method, p, with_state):
    name = method.split(":")[0]
    opts = {"feature_map": method.split(":")[1]} if name == "linear" else {}
    if name == "performer":
        opts["projection"] = random_projection(5, p.q.shape[-1], rng=int(p.rng.integers(2**31)))
    if name == "cosformer":  # the packed default M is the longest sequence; pass it to each alone
        opts["max_len"] = max(1, *(hi - lo for lo, hi in itertools.pairwise(p.cu)))
    state0 = states_from_a_prefix(name, p, opts, length=1) if with_state else None
    o, final = run_method(name, p, initial_state=state0, output_final_state=True, **opts)
    finals = []
    for n, (lo, hi) in enumerate(itertools.pairwise(p.cu)):
        seg = Problem(*(p.time_slice(x, lo, hi) for x in (p.q, p.k, p.v)), p.layout, True)
        seg_state = None if state0 is None else (state0[0][n:n + 1], state0[1][n:n + 1])
        o_seg, f_seg = run_method(name, seg, initial_state=seg_state, output_final_state=True, **opts)
        # the same segment computed by the same calls on the same values
        np.testing.assert_array_equal(p.bthd(o)[:, lo:hi], p.bthd(o_seg), err_msg=f"segment {n}")
        finals.append(f_seg)
    for i, part in enumerate(("S", "z")):
        stacked = np.concatenate([f[i] for f in finals], axis=0)
        assert final[i].shape == stacked.shape == (len(p.cu) - 1, *final[i].shape[1:])
        np.testing.assert_array_equal(final[i], stacked, err_msg=part)


def test_empty_sequence_returns_its_initial_state():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 3, 2, 3)) for _ in range(3))
    S0, z0 = rng.standard_normal((3, 2, 3, 3)), rng.random((3, 2, 3))
    _, (S, z) = linattn.linear_attention(q, k, v, causal=True, cu_seqlens=[0, 0, 3, 3], initial_state=(S0, z0),
                                         output_final_state=True)
    np.testing.assert_array_equal(S[[0, 2]], S0[[0, 2]])  # no steps: the state passes through untouched
    np.testing.assert_array_equal(z[[0, 2]], z0[[0, 2]])


# --------------------------------------------------------------------------- cosFormer


@settings(max_examples=40)
@given(problems(cross=True), st.sampled_from([None, 0, 3]), st.data())
def test_cosformer_linear_form_equals_its_quadratic_definition(p, extra, data):
    longest = max(max(qh - ql, kh - kl) for ql, qh, kl, kh in p.segments())
    max_len = None if extra is None else max(longest, 1) + extra
    form = data.draw(st.sampled_from(["parallel", "recurrent", "chunked"]))
    o = linattn.cosformer_attention(p.q, p.k, p.v, max_len=max_len, form=form, chunk_size=data.draw(
        st.integers(1, 6)), **p.kwargs)
    o_def, size = cosformer_by_definition(p, max_len)
    # float64 sums of S·2Dk products; the cosine weights are in [0, 1]
    assert_within(p.bthd(o), o_def, tolerance(np.float64, summed_terms(p, 2 * p.q.shape[-1])) * size + 1e-300,
                  form)


# --------------------------------------------------------------------------- gradients


def fd_check(forward, vjp, arrays, cotangents, names):
    """vjp(...) == central differences of forward (flattened outputs) for each input."""
    cot = np.concatenate([c.ravel() for c in cotangents])
    expected = numerical_vjp(lambda *xs: np.concatenate([np.ravel(y) for y in forward(*xs)]), arrays, cot,
                             step=FD_STEP)
    got = vjp(*arrays)
    # Central differences with h = 1e-6 of smooth functions of O(1) inputs: truncation
    # ~h²·|f'''| ~ 1e-12 and rounding ~ε/h·Σ|cotangent·output| ~ 1e-9 on these sizes;
    # 1e-7 of the largest entry (at least 1) keeps a margin of ~100 below an O(1) error.
    scale = max([1.0, *(float(np.max(np.abs(e), initial=0.0)) for e in expected)])
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.shape == e.shape, name
        assert_within(g, e, 1e-7 * scale, f"d{name}")


def gradient_problem(seed, layout, causal, shift=0.0, T=4):
    rng = np.random.default_rng(seed)

    def make(heads, dim, offset):
        x = rng.standard_normal((1, T, heads, dim)) + offset
        x = np.where(np.abs(x) < 1e-3, 1e-3, x)  # off the kinks of relu and elu+1 (at 0) by >> h
        return x if layout == "bthd" else np.ascontiguousarray(np.swapaxes(x, 1, 2))

    return Problem(make(2, 3, shift), make(1, 3, shift), make(1, 2, 0.0), layout, causal, rng=rng)


def check_method_gradients(p: Problem, forward_fn, vjp_fn, m, normalised, **kw):
    """Gradients of o (and of the final state, with an initial state) w.r.t. q, k, v (and the state)."""
    rng = p.rng
    do = rng.standard_normal((*p.q.shape[:-1], p.v.shape[-1]))
    if not p.causal:
        fd_check(lambda q, k, v: [forward_fn(q, k, v, causal=False, layout=p.layout, **kw)],
                 lambda q, k, v: vjp_fn(q, k, v, do, causal=False, layout=p.layout, **kw),
                 [p.q, p.k, p.v], [do], ["q", "k", "v"])
        return
    S0 = rng.standard_normal((1, 1, m, p.v.shape[-1]))
    dS = rng.standard_normal(S0.shape)
    if normalised:
        z0, dz = rng.random((1, 1, m)) + 0.5, rng.standard_normal((1, 1, m))  # a positive normaliser state

        def forward(q, k, v, S0, z0):
            o, (S, z) = forward_fn(q, k, v, causal=True, layout=p.layout, initial_state=(S0, z0),
                                   output_final_state=True, **kw)
            return [o, S, z]

        def vjp(q, k, v, S0, z0):
            dq, dk, dv, (dS0, dz0) = vjp_fn(q, k, v, do, causal=True, layout=p.layout, initial_state=(S0, z0),
                                            dfinal_state=(dS, dz), **kw)
            return [dq, dk, dv, dS0, dz0]

        fd_check(forward, vjp, [p.q, p.k, p.v, S0, z0], [do, dS, dz], ["q", "k", "v", "S0", "z0"])
    else:
        def forward(q, k, v, S0):
            o, S = forward_fn(q, k, v, causal=True, layout=p.layout, initial_state=S0, output_final_state=True,
                              normalize=False, **kw)
            return [o, S]

        def vjp(q, k, v, S0):
            return vjp_fn(q, k, v, do, causal=True, layout=p.layout, initial_state=S0, dfinal_state=dS,
                          normalize=False, **kw)

        fd_check(forward, vjp, [p.q, p.k, p.v, S0], [do, dS], ["q", "k", "v", "S0"])


# identity with normalize=True is left out: its signed normaliser can be ~0 at random points
LINEAR_GRADIENT_CASES = [(f, n) for f in FEATURE_MAPS for n in (True, False) if not (f == "identity" and n)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(("feature_map", "normalize"), LINEAR_GRADIENT_CASES)
def test_linear_vjp_equals_central_differences(feature_map, normalize, causal):
    # shifted up so that most features are positive, with some entries below relu's kink
    p = gradient_problem(11, "bhtd" if causal else "bthd", causal, shift=0.7)
    kw = {"feature_map": feature_map, "chunk_size": 3}
    if not causal:
        kw["normalize"] = normalize
    check_method_gradients(p, linattn.linear_attention, linattn.linear_attention_vjp,
                           output_dim(feature_map, 3), normalize, **kw)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize(("kind", "stabilize", "normalize"), [("positive", True, True), ("positive", False, True),
                                                              ("positive", False, False), ("trig", False, False)])
def test_performer_vjp_equals_central_differences(kind, stabilize, normalize, causal):
    # trig features are signed, so only unnormalised (a normaliser near 0 would be ill-posed)
    p = gradient_problem(12, "bthd", causal)
    kw = {"projection": random_projection(5, 3, rng=3), "kind": kind, "stabilize": stabilize, "chunk_size": 2}
    if not causal:
        kw["normalize"] = normalize
    check_method_gradients(p, linattn.performer_attention, linattn.performer_attention_vjp,
                           5 if kind == "positive" else 10, normalize, **kw)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_cosformer_vjp_equals_central_differences(causal):
    # queries and keys shifted up so that every query sees a positive weight (relu)
    p = gradient_problem(13, "bthd", causal, shift=0.7)
    check_method_gradients(p, linattn.cosformer_attention, linattn.cosformer_attention_vjp, 6, True,
                           chunk_size=3, max_len=6)


def test_gradients_under_cu_seqlens_equal_central_differences():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 6, 2, 2)) for _ in range(3))
    do = rng.standard_normal(q.shape)
    kw = dict(causal=True, cu_seqlens=[0, 0, 1, 4, 6], chunk_size=2)
    fd_check(lambda q, k, v: [linattn.linear_attention(q, k, v, **kw)],
             lambda q, k, v: linattn.linear_attention_vjp(q, k, v, do, **kw), [q, k, v], [do], ["q", "k", "v"])


# --------------------------------------------------------------------------- hybrid


@settings(max_examples=25)
@given(problems(causal=True, max_len=10), st.integers(0, 12))
def test_hybrid_with_every_head_local_is_sliding_window_softmax(p, window):
    heads = p.bthd(p.q).shape[2]
    o = linattn.hybrid_attention(p.q, p.k, p.v, local_heads=heads, window=window, layout=p.layout, cu_seqlens=p.cu)
    expected = linattn.softmax_attention(p.q, p.k, p.v, causal=True, window=(window, 0), layout=p.layout,
                                         cu_seqlens=p.cu)
    # the same rows, maybe by the tiled online softmax (FlashAttention) or from heads gathered
    # into a copy: float64 rounding of a softmax row
    assert_within(o, expected, softmax_rounding(p))


def softmax_rounding(p: Problem) -> float:
    """float64 rounding of a softmax row: 8ε·sqrt(S)·(logit size), times max|v| (a weighted mean of v)."""
    q, k = p.bthd(p.q), p.bthd(p.k)
    logits = np.max(np.sum(np.abs(q), axis=-1), initial=0.0) * np.max(np.abs(k), initial=0.0) / math.sqrt(q.shape[-1])
    return tolerance(np.float64, k.shape[1], 1.0 + logits) * float(np.max(np.abs(p.v), initial=0.0))


@settings(max_examples=25)
@given(problems(causal=True, max_len=10), st.integers(0, 12))
def test_hybrid_with_no_local_head_is_linear_attention(p, window):
    o = linattn.hybrid_attention(p.q, p.k, p.v, local_heads=0, window=window, layout=p.layout, cu_seqlens=p.cu,
                                 chunk_size=3)
    expected = linattn.linear_attention(p.q, p.k, p.v, causal=True, layout=p.layout, cu_seqlens=p.cu, chunk_size=3)
    _, size = linear_by_definition(p)
    # float64 sums of S·Dk products (the same call, or the same heads gathered into a copy)
    tol = tolerance(np.float64, summed_terms(p, p.q.shape[-1]))
    assert_within(p.bthd(o), p.bthd(expected), 2 * tol * size + 1e-300)


@settings(max_examples=30)
@given(problems(max_len=10), st.integers(0, 12), st.data())
def test_hybrid_with_mixed_heads_assembles_the_two_per_head(p, window, data):
    heads = p.bthd(p.q).shape[2]
    local = data.draw(st.lists(st.integers(0, heads - 1), unique=True))
    local_heads = data.draw(st.permutations(local)) if data.draw(st.booleans()) else local  # any order
    o = p.bthd(linattn.hybrid_attention(p.q, p.k, p.v, local_heads=local_heads, window=window, causal=p.causal,
                                        layout=p.layout, cu_seqlens=p.cu))
    right = 0 if p.causal else window
    softmax = p.bthd(linattn.softmax_attention(p.q, p.k, p.v, causal=p.causal, window=(window, right),
                                               layout=p.layout, cu_seqlens=p.cu))
    linear = p.bthd(linattn.linear_attention(p.q, p.k, p.v, causal=p.causal, layout=p.layout, cu_seqlens=p.cu))
    _, size = linear_by_definition(p)
    for h in range(heads):
        if h in local:
            # float64: softmax over a subset of heads vs all heads — the same per-head rows
            assert_within(o[:, :, h], softmax[:, :, h], softmax_rounding(p), f"head {h}")
        else:
            # float64 sums of S·Dk products: the global heads run as a smaller batch of heads
            tol = tolerance(np.float64, summed_terms(p, p.q.shape[-1]))
            assert_within(o[:, :, h], linear[:, :, h], 2 * tol * size[:, :, h] + 1e-300, f"head {h}")


# --------------------------------------------------------------------------- Performer approximation


def test_performer_error_falls_as_features_grow():
    rng = np.random.default_rng(2024)
    q, k, v = (rng.standard_normal((1, 64, 1, 8)) * 0.5 for _ in range(3))
    exact = linattn.softmax_attention(q, k, v)

    def mean_error(m):
        errors = [np.linalg.norm(linattn.performer_attention(q, k, v, num_features=m, rng=seed) - exact)
                  / np.linalg.norm(exact) for seed in range(8)]
        return float(np.mean(errors))

    ratio = mean_error(1024) / mean_error(64)
    # The estimator's standard deviation falls as 1/sqrt(m), so 16x the features ideally give
    # 1/4 of the error (orthogonal features only help). 0.5 allows the O(1/m) bias of the
    # ratio estimator and the spread of a mean over 8 draws (~1/sqrt(8) of each mean),
    # while a method whose error did not fall (ratio ~1) still fails.
    assert ratio < 0.5, ratio


@settings(max_examples=25)
@given(problems(max_len=10), st.sampled_from([4, 17]))
def test_performer_stabiliser_changes_outputs_only_by_rounding(p, m):
    W = random_projection(m, p.q.shape[-1], rng=int(p.rng.integers(2**31)))
    kw = dict(projection=W, eps=0.0, feature_eps=0.0, **p.kwargs)
    stable = p.bthd(linattn.performer_attention(p.q, p.k, p.v, stabilize=True, **kw))
    plain = p.bthd(linattn.performer_attention(p.q, p.k, p.v, stabilize=False, **kw))
    _, size = performer_by_definition(p, W)
    # the shift by c cancels exactly in the ratio; only exp's rounding of exponents of
    # different size (up to the `condition`) and of the sums differs
    tol = 2 * tolerance(np.float64, summed_terms(p, m), 2 * performer_condition(p, W))
    assert_within(stable, plain, tol * size + 1e-300)


# --------------------------------------------------------------------------- low precision


LOW_PRECISION_METHODS = {
    "linear": lambda q, k, v, **kw: linattn.linear_attention(q, k, v, **kw),
    "performer": lambda q, k, v, **kw: linattn.performer_attention(q, k, v, projection=random_projection(
        16, q.shape[-1], rng=0), **kw),
    "cosformer": lambda q, k, v, **kw: linattn.cosformer_attention(q, k, v, **kw),
    "hybrid": lambda q, k, v, **kw: linattn.hybrid_attention(q, k, v, local_heads=[0], window=3, **kw),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("method", list(LOW_PRECISION_METHODS))
@settings(max_examples=15)
@given(problems(max_len=16, varlen=False))
def test_low_precision_inputs_return_their_dtype_and_match_float64(method, dtype, p):
    fn = LOW_PRECISION_METHODS[method]
    kw = {"layout": p.layout, "causal": p.causal}
    if method == "hybrid":
        kw["causal"] = True
    low = [x.astype(dtype) for x in (p.q, p.k, p.v)]
    o = fn(*low, **kw)
    assert o.dtype == dtype and np.all(np.isfinite(o))
    desired = fn(*(x.astype(np.float64) for x in low), **kw)  # the same rounded inputs, in float64
    # Computed in float32, then rounded to dtype. Every method here is a weighted mean of v
    # with non-negative weights (elu+1, relu·cos, positive features, softmax), so a relative
    # error δ in each weight moves an output by at most ~2δ·max|v|; δ is float32's rounding
    # of S·m-term sums, times the size of exp's exponents for the Performer and softmax
    # (~|q|·|k|/sqrt(Dk) + |x'|² here); then the final rounding to dtype, ε_dtype·|o|.
    S = p.bthd(p.k).shape[1]
    dk = p.q.shape[-1]
    exponent = 1.0 + float(np.max(np.sum(np.abs(p.bthd(p.q)), axis=-1)) * np.max(np.abs(p.k)) / math.sqrt(dk))
    exponent += float(np.max(np.sum(p.q**2, axis=-1)) + np.max(np.sum(p.k**2, axis=-1)))
    n = S * max(16, 2 * dk)  # at most that many products per output (m <= 16 features per key)
    tol32 = 2 * tolerance(np.float32, n, exponent if method in ("performer", "hybrid") else 1.0)
    eps_out = machine_epsilon(dtype)
    v_max = float(np.max(np.abs(low[2].astype(np.float64)), initial=0.0))
    assert_within(o.astype(np.float64), desired, tol32 * v_max + eps_out * np.abs(desired) + 1e-300)


# --------------------------------------------------------------------------- arguments


def small():
    rng = np.random.default_rng(0)
    return rng.standard_normal((1, 5, 2, 3)), rng.standard_normal((1, 5, 2, 3)), rng.standard_normal((1, 5, 2, 4))


def _call(name, **kw):
    q, k, v = small()
    fns = {"linear": linattn.linear_attention, "performer": linattn.performer_attention,
           "cosformer": linattn.cosformer_attention, "hybrid": linattn.hybrid_attention}
    if name == "performer" and not kw.pop("no_rng", False) and "projection" not in kw:
        kw["rng"] = 0
    if name == "hybrid":
        kw = {"local_heads": 1, "window": 2, **kw}
    shapes = kw.pop("shapes", (None, None, None))
    q, k, v = (x if shape is None else np.zeros(shape) for x, shape in zip((q, k, v), shapes, strict=True))
    return fns[name](q, k, v, **kw)


def _state(shape_s=(1, 2, 3, 4), shape_z=(1, 2, 3)):
    return np.zeros(shape_s), np.ones(shape_z)


BAD_ARGUMENTS = {
    "num_features 0": ("performer", {"num_features": 0}, ValueError, "num_features"),
    "num_features -2": ("performer", {"num_features": -2}, ValueError, "num_features"),
    "num_features 2.0": ("performer", {"num_features": 2.0}, ValueError, "num_features"),
    "unknown feature map": ("linear", {"feature_map": "softplus"}, ValueError, "feature map"),
    "feature map not a name": ("linear", {"feature_map": 3}, TypeError, "feature_map"),
    "negative eps (linear)": ("linear", {"eps": -1e-6}, ValueError, "eps"),
    "negative eps (performer)": ("performer", {"eps": -1.0}, ValueError, "eps"),
    "negative eps (cosformer)": ("cosformer", {"eps": -1e-3}, ValueError, "eps"),
    "negative feature_eps": ("performer", {"feature_eps": -1.0}, ValueError, "eps"),
    "unknown kind": ("performer", {"kind": "gaussian"}, ValueError, "kind"),
    "stabiliser without normaliser": ("performer", {"normalize": False}, ValueError, "stabilize"),
    "projection too wide": ("performer", {"projection": np.zeros((4, 5))}, ValueError, "projection"),
    "projection 1-D": ("performer", {"projection": np.zeros(3)}, ValueError, "projection"),
    "no rng, no projection": ("performer", {"no_rng": True}, TypeError, "rng"),
    "causal T != S": ("linear", {"causal": True, "shapes": ((1, 4, 2, 3), None, None)}, ValueError, "causal"),
    "causal T != S (cosformer)": ("cosformer", {"causal": True, "shapes": ((1, 6, 2, 3), None, None)}, ValueError,
                                  "causal"),
    "state without causal": ("linear", {"initial_state": _state()}, ValueError, "initial_state"),
    "state without causal (unnormalised)": ("linear", {"normalize": False, "initial_state": np.zeros((1, 2, 3, 4))},
                                            ValueError, "initial_state"),
    "S of wrong shape": ("linear", {"causal": True, "initial_state": _state(shape_s=(1, 2, 3, 3))}, ValueError,
                         "initial_state"),
    "z of wrong shape": ("linear", {"causal": True, "initial_state": _state(shape_z=(1, 2, 4))}, ValueError,
                         "initial_state"),
    "state not a pair": ("linear", {"causal": True, "initial_state": np.zeros((1, 2, 3, 4))}, ValueError,
                         "initial_state"),
    "state per query head": ("linear", {"causal": True, "shapes": ((1, 5, 4, 3), None, None),
                                        "initial_state": _state((1, 4, 3, 4), (1, 4, 3))}, ValueError,
                             "initial_state"),
    "performer state of wrong m": ("performer", {"causal": True, "num_features": 7, "initial_state": _state()},
                                   ValueError, "initial_state"),
    "max_len shorter": ("cosformer", {"max_len": 4}, ValueError, "max_len"),
    "max_len 0": ("cosformer", {"max_len": 0}, ValueError, "max_len"),
    "local_heads count too large": ("hybrid", {"local_heads": 3}, ValueError, "local_heads"),
    "local_heads negative count": ("hybrid", {"local_heads": -1}, ValueError, "local_heads"),
    "local_heads index out of range": ("hybrid", {"local_heads": [0, 2]}, ValueError, "local_heads"),
    "local_heads repeated": ("hybrid", {"local_heads": [1, 1]}, ValueError, "local_heads"),
    "local_heads not ints": ("hybrid", {"local_heads": "0"}, TypeError, "local_heads"),
    "negative window": ("hybrid", {"window": -1}, ValueError, "window"),
    "unknown form": ("linear", {"form": "fast"}, ValueError, "form"),
    "chunk_size 0": ("cosformer", {"chunk_size": 0}, ValueError, "chunk_size"),
    "output_final_state without causal": ("linear", {"output_final_state": True}, ValueError, "causal"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_errors_naming_them(case):
    method, kw, error, pattern = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=pattern):
        _call(method, **dict(kw))


@settings(max_examples=30)
@given(st.integers(1, 12), st.data())
def test_cosformer_state_passing_with_start_position(T, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    q, k, v = (rng.standard_normal((1, T, 2, 3)) for _ in range(3))
    split = data.draw(st.integers(0, T))
    kw = dict(causal=True, max_len=T + 2, chunk_size=data.draw(st.integers(1, 5)))
    full = linattn.cosformer_attention(q, k, v, **kw)
    first, state = linattn.cosformer_attention(q[:, :split], k[:, :split], v[:, :split], output_final_state=True, **kw)
    second = linattn.cosformer_attention(q[:, split:], k[:, split:], v[:, split:], initial_state=state,
                                         start_position=split, **kw)
    # float64; the same terms, summed through the state instead of within one call
    assert_close(np.concatenate([first, second], axis=1), full, reduction_length=T)
