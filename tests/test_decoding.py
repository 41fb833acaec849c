"""Decoding states (linattn.decoding): every step equals the causal forward on the whole sequence."""

import itertools
import math
from dataclasses import dataclass, fields

import array_api_strict as xs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import linattn
from linattn import feature_maps as fmaps
from linattn.decoding import (
    METHODS,
    CosformerState,
    HybridState,
    LinearState,
    PerformerState,
    SoftmaxState,
    init_state,
    performer_key_shift,
    step,
)
from linattn.testing import assert_close, to_numpy, tolerance

# Each example runs a forward and up to a dozen steps: half or all of the profile's examples keeps
# the file within ~15 s on 2 cores (the "thorough" profile scales them up too).
FEW, SOME = settings.default.max_examples // 2, settings.default.max_examples


@dataclass
class TokenSequence:
    q: np.ndarray  # (B, T, Hq, Dk)
    k: np.ndarray  # (B, T, Hkv, Dk)
    v: np.ndarray  # (B, T, Hkv, Dv)
    bounds: list[int]  # 0 = b_0 < b_1 < ... = T: the blocks fed to step; the first may be a long prefill

    @property
    def sizes(self):
        B, _, _, Dk = self.q.shape
        return {"batch": B, "kv_heads": self.k.shape[2], "key_dim": Dk, "value_dim": self.v.shape[3]}

    @property
    def length(self):
        return self.q.shape[1]


@st.composite
def sequences(draw, min_len=1, max_len=9, max_group=3):
    """Random q, k, v (GQA included, dims not powers of two) and a split into a prefill and blocks."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    B, T = draw(st.integers(1, 2)), draw(st.integers(min_len, max_len))
    hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, max_group))
    dk, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    prefill = draw(st.integers(0, T))
    rest = range(prefill + 1, T)
    cuts = set(rest) if draw(st.booleans()) else draw(st.sets(st.sampled_from(rest))) if len(rest) else set()
    bounds = sorted({0, prefill, T} | cuts)
    return TokenSequence(rng.standard_normal((B, T, hkv * group, dk)), rng.standard_normal((B, T, hkv, dk)),
                         rng.standard_normal((B, T, hkv, dv)), bounds)


def decode(state, seq, bounds=None):
    """Feed seq block by block; return the joined outputs and the last state."""
    outputs = []
    for lo, hi in itertools.pairwise(seq.bounds if bounds is None else bounds):
        o, state = step(state, seq.q[:, lo:hi], seq.k[:, lo:hi], seq.v[:, lo:hi])
        outputs.append(o)
    return np.concatenate(outputs, axis=1), state


def prompt_and_rest(seq):
    """A prompt for the forward (P >= 1 tokens) and the bounds of the blocks decoded after it (at least one)."""
    P = seq.bounds[1] if len(seq.bounds) > 2 else seq.length - 1
    return P, [P, *(b for b in seq.bounds if b > P)]


def heads_first(x):
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3))


def kernel_condition(fq, fk, v, o, *, normalize, eps, envelopes=None, rows=slice(None)):
    """The output's sensitivity to rounding, relative to max|o| over the compared ``rows``.

    fq (B, Hq, T, m) scaled query features, fk (B, Hkv, T, m), v (B, T, Hkv, Dv), o (B, T, Hq, Dv).
    The sums N_t = Σ_j (φ(q_t)·φ(k_j)) v_j and D_t = Σ_j φ(q_t)·φ(k_j), rounded, move by about
    ε·Σ_j Σ_i e_q,ti e_k,ji |v_j| and ε·Σ_j Σ_i e_q,ti e_k,ji, with e the features' error envelopes
    (|φ| for features computed to a relative ε), so o_t = N_t / (D_t + eps) moves by about
    ε·(Σ_j E_tj |v_j| + |o_t| Σ_j E_tj) / |D_t + eps| (unnormalised: ε·Σ_j E_tj |v_j|); large where
    features cancel (identity, taylor and trig features take either sign).
    """
    eq, ek = (np.abs(fq), np.abs(fk)) if envelopes is None else envelopes
    group = fq.shape[1] // fk.shape[1]
    fk, ek, vh = np.repeat(fk, group, axis=1), np.repeat(ek, group, axis=1), np.repeat(heads_first(v), group, axis=1)
    causal = np.tril(np.ones((fq.shape[2], fq.shape[2])))
    E = (eq @ ek.swapaxes(-1, -2)) * causal
    spread = E @ np.abs(vh)  # (B, Hq, T, Dv)
    if normalize:
        D = ((fq @ fk.swapaxes(-1, -2)) * causal).sum(-1, keepdims=True) + eps
        spread = (spread + np.abs(heads_first(o)) * E.sum(-1, keepdims=True)) / np.abs(D)
    top = float(np.max(np.abs(o[:, rows])))
    return max(1.0, float(np.max(spread[:, :, rows])) / top) if top > 0 else 1.0


def softmax_condition(q, k, v, o, scale):
    """Logit magnitude (the softmax's condition for absolute logit errors) times max|v| / max|o|."""
    group = q.shape[2] // k.shape[2]
    logits = np.einsum("bthd,bshd->bhts", q, np.repeat(k, group, axis=2)) * scale
    visible = np.tril(np.ones((q.shape[1], q.shape[1]), dtype=bool))
    top = float(np.max(np.abs(o)))
    return max(1.0, float(np.max(np.abs(logits[..., visible])))) * max(1.0, float(np.max(np.abs(v))) / top)


# ---------------------------------------------------------------------------------------
# Decoding equals the causal forward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_map", list(fmaps.FEATURE_MAPS))
@settings(max_examples=FEW)
@given(seq=sequences(), normalize=st.booleans(), eps=st.sampled_from([1e-6, 0.1]),
       scale=st.sampled_from([None, 0.3]))
def test_linear_decoding_equals_the_causal_forward(feature_map, seq, normalize, eps, scale):
    options = {"feature_map": feature_map, "normalize": normalize, "eps": eps, "scale": scale}
    o, _ = decode(LinearState.initial(**seq.sizes, **options), seq)
    full = linattn.linear_attention(seq.q, seq.k, seq.v, causal=True, **options)
    fm = fmaps.get_feature_map(feature_map)
    fq = fm(heads_first(seq.q)) * (1.0 if scale is None else scale)
    kappa = kernel_condition(fq, fm(heads_first(seq.k)), seq.v, full, normalize=normalize, eps=eps)
    # the same sums grouped by block instead of by chunk: rounding of T-term sums, amplified by κ
    assert_close(o, full, reduction_length=seq.length, condition=kappa)


PERFORMER_CASES = [
    {"kind": "positive"},  # running key maximum
    {"kind": "positive", "stabilize": False, "feature_eps": 0.1, "eps": 0.1},
    {"kind": "positive", "stabilize": False, "normalize": False},
    {"kind": "trig", "eps": 0.1},
]


@pytest.mark.parametrize("options", PERFORMER_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@settings(max_examples=FEW)
@given(seq=sequences(), features=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_performer_decoding_equals_the_causal_forward(options, seq, features, seed):
    W = fmaps.random_projection(features, seq.q.shape[3], rng=seed)
    o, _ = decode(PerformerState.initial(**seq.sizes, projection=W, **options), seq)
    full = linattn.performer_attention(seq.q, seq.k, seq.v, projection=W, causal=True, **options)
    assert_close(o, full, reduction_length=seq.length, condition=performer_condition(seq, W, full, options),
                 err_msg="with the stabiliser, the key constants cancel: rounding of T-term sums times κ "
                         "(and one rounding per rescale of the running maximum, at most T)")


def performer_condition(seq, W, o, options, rows=slice(None)):
    """κ from the forward's own features (decoding's differ by one factor per row, which cancels in the ratio).

    FAVOR features are functions of u = W x' (x' = x / Dk^{1/4}) and |x'|², whose rounding is absolute:
    ε·s with s_i = Σ_d |W_id x'_d|, and ε·|x'|². Positive features exp(u − |x'|²/2 − c) therefore carry a
    relative error ε·(1 + s + |x'|² + max s) (c is one of the u's); trigonometric ones A·sin u, A·cos u with
    A = exp(|x'|²/2)/√r an absolute error ε·A·(1 + s + |x'|²).
    """
    kind, fe = options.get("kind", "positive"), options.get("feature_eps", 0.0)
    feats, envelopes = [], []
    for x, role in ((seq.q, "query"), (seq.k, "key")):
        x = heads_first(x)
        xs_ = x * x.shape[-1] ** -0.25
        spread = np.abs(xs_) @ np.abs(W).T
        norm2 = np.sum(xs_ * xs_, axis=-1, keepdims=True)
        if kind == "trig":
            phi = fmaps.favor_trig(x, W)
            bound = np.exp(norm2 / 2) / math.sqrt(W.shape[0]) * (1 + spread + norm2)
            envelopes.append(np.concatenate([bound, bound], axis=-1))
        else:
            phi = fmaps.favor_positive(x, W, role=role, stabilize=options.get("stabilize", True), eps=fe)
            envelopes.append(phi * (1 + spread + norm2 + spread.max()))
        feats.append(phi)
    return kernel_condition(*feats, seq.v, o, normalize=options.get("normalize", True), eps=options.get("eps", 0.0),
                            envelopes=envelopes, rows=rows)


@pytest.mark.parametrize("forward", ["stateless", "carrying-a-state"])
@settings(max_examples=FEW)
@given(seq=sequences(), features=st.integers(1, 9), seed=st.integers(0, 2**16),
       feature_eps=st.sampled_from([0.0, 1e-4, 0.1]), eps=st.sampled_from([0.0, 0.1]))
def test_performer_with_the_forwards_key_constant_reproduces_it_for_any_eps(forward, seq, features, seed,
                                                                             feature_eps, eps):
    # With eps > 0 a key constant c would not cancel; the causal forward uses none (c = 0), whether or
    # not it returns a state, so that future keys cannot reach past outputs. Fixed at c = 0, decoding
    # computes the very same features, so it reproduces the forward for any eps.
    W = fmaps.random_projection(features, seq.q.shape[3], rng=seed)
    options = {"feature_eps": feature_eps, "eps": eps}
    carrying = forward == "carrying-a-state"
    c = 0.0
    state = PerformerState.initial(**seq.sizes, projection=W, key_stabilizer="fixed", key_shift=c, **options)
    o, _ = decode(state, seq)
    full = linattn.performer_attention(seq.q, seq.k, seq.v, projection=W, causal=True, output_final_state=carrying,
                                       **options)
    full = full[0] if carrying else full
    # same features up to one rounding (the shift is applied in two factors), same sums by block
    assert_close(o, full, reduction_length=seq.length, condition=performer_condition(seq, W, full, options))


@settings(max_examples=FEW)
@given(seq=sequences(), seed=st.integers(0, 2**16))
def test_running_key_shift_is_the_maximum_over_the_keys_so_far(seq, seed):
    W = fmaps.random_projection(5, seq.q.shape[3], rng=seed)
    state = PerformerState.initial(**seq.sizes, projection=W)
    assert np.all(state.key_shift == -np.inf)  # no key yet
    for lo, hi in itertools.pairwise(seq.bounds):
        _, state = step(state, seq.q[:, lo:hi], seq.k[:, lo:hi], seq.v[:, lo:hi])
        if hi > 0:
            # the same Dk-term dot products, which BLAS may round differently for blocks of another shape
            assert_close(state.key_shift, performer_key_shift(seq.k[:, :hi], W), reduction_length=seq.q.shape[3])


@settings(max_examples=SOME)
@given(seq=sequences(), extra=st.integers(0, 5), eps=st.sampled_from([1e-6, 0.1]))
def test_cosformer_decoding_equals_the_causal_forward(seq, extra, eps):
    M = seq.length + extra
    o, state = decode(CosformerState.initial(**seq.sizes, max_len=M, eps=eps), seq)
    full = linattn.cosformer_attention(seq.q, seq.k, seq.v, causal=True, max_len=M, eps=eps)
    assert state.position == seq.length
    positions = np.arange(seq.length)
    fq, fk = (fmaps.cosformer_features(fmaps.relu(heads_first(x)), positions, M) for x in (seq.q, seq.k))
    # nonnegative weights, rounding of T-term sums
    assert_close(o, full, reduction_length=seq.length,
                 condition=kernel_condition(fq, fk, seq.v, full, normalize=True, eps=eps))


@st.composite
def hybrid_setups(draw):
    seq = draw(sequences(max_len=12))
    hq = seq.q.shape[2]
    local = draw(st.one_of(st.integers(0, hq), st.sets(st.integers(0, hq - 1)).map(sorted)))
    return seq, local, draw(st.integers(0, 5))


@settings(max_examples=SOME)
@given(setup=hybrid_setups())
def test_hybrid_decoding_equals_hybrid_attention(setup):
    seq, local, window = setup
    hq = seq.q.shape[2]
    state = HybridState.initial(**seq.sizes, q_heads=hq, local_heads=local, window=window)
    o, _ = decode(state, seq)
    full = linattn.hybrid_attention(seq.q, seq.k, seq.v, local_heads=local, window=window)
    local_idx = state.local_heads
    global_idx = [h for h in range(hq) if h not in local_idx]
    if local_idx:
        # the same window of keys, by block: rounding of sums of at most w + 1 terms, softmax-conditioned
        kappa = softmax_condition(seq.q[:, :, list(local_idx)], np.repeat(seq.k, hq // seq.k.shape[2], axis=2)[
            :, :, list(local_idx)], seq.v, full[:, :, list(local_idx)], 1 / math.sqrt(seq.q.shape[3]))
        assert_close(o[:, :, list(local_idx)], full[:, :, list(local_idx)], reduction_length=window + 1,
                     condition=kappa)
    if global_idx:
        fm = fmaps.get_feature_map("elu+1")
        group = hq // seq.k.shape[2]
        fk = fm(heads_first(np.repeat(seq.k, group, axis=2)[:, :, global_idx]))
        v = np.repeat(seq.v, group, axis=2)[:, :, global_idx]
        kappa = kernel_condition(fm(heads_first(seq.q[:, :, global_idx])), fk, v, full[:, :, global_idx],
                                 normalize=True, eps=1e-6)
        # linear attention over the whole past: rounding of T-term sums
        assert_close(o[:, :, global_idx], full[:, :, global_idx], reduction_length=seq.length, condition=kappa)


@settings(max_examples=SOME)
@given(seq=sequences(), max_len=st.one_of(st.none(), st.integers(0, 3)), scale=st.sampled_from([None, 0.7]))
def test_softmax_decoding_equals_causal_softmax_attention(seq, max_len, scale):
    max_len = None if max_len is None else seq.length + max_len
    o, state = decode(SoftmaxState.initial(**seq.sizes, max_len=max_len, scale=scale), seq)
    full = linattn.softmax_attention(seq.q, seq.k, seq.v, causal=True, scale=scale)
    assert state.keys.shape[1] == (seq.length if max_len is None else max_len)
    kappa = softmax_condition(seq.q, seq.k, seq.v, full, 1 / math.sqrt(seq.q.shape[3]) if scale is None else scale)
    # every row sees the same keys; blocks change only how BLAS groups the T-term sums
    assert_close(o, full, reduction_length=seq.length, condition=kappa)


# ---------------------------------------------------------------------------------------
# Continuing the forward's final state
# ---------------------------------------------------------------------------------------


@settings(max_examples=SOME)
@given(seq=sequences(min_len=2), feature_map=st.sampled_from(list(fmaps.FEATURE_MAPS)), normalize=st.booleans())
def test_linear_decoding_continues_the_forwards_final_state(seq, feature_map, normalize):
    P, rest = prompt_and_rest(seq)  # the prompt, run by the forward
    options = {"feature_map": feature_map, "normalize": normalize}
    _, final = linattn.linear_attention(seq.q[:, :P], seq.k[:, :P], seq.v[:, :P], causal=True,
                                        output_final_state=True, **options)
    o, state = decode(LinearState.from_final_state(final, **options), seq, rest)
    full = linattn.linear_attention(seq.q, seq.k, seq.v, causal=True, **options)
    fm = fmaps.get_feature_map(feature_map)
    fq, fk = fm(heads_first(seq.q)), fm(heads_first(seq.k))
    kappa = kernel_condition(fq, fk, seq.v, full, normalize=normalize, eps=1e-6, rows=slice(P, None))
    # a state summed by the forward's chunks, then by blocks: rounding of T-term sums
    assert_close(o, full[:, P:], reduction_length=seq.length, condition=kappa)
    _, whole = linattn.linear_attention(seq.q, seq.k, seq.v, causal=True, output_final_state=True, **options)
    # S = Σ φ(k_t) v_tᵀ and z = Σ φ(k_t) are plain sums of T terms, rounded relative to the
    # terms' magnitudes (Σ|φ(k_t)||v_t|, Σ|φ(k_t)|), which a cancelling sum falls far below.
    fk_abs, v_abs = np.abs(to_numpy(fk)), np.abs(heads_first(seq.v))
    scales = (np.einsum("bhtk,bhtv->bhkv", fk_abs, v_abs), np.sum(fk_abs, axis=-2))
    parts = (state.final_state, whole, scales) if normalize else ((state.final_state,), (whole,), scales[:1])
    for got, want, scale in zip(*parts, strict=True):
        tol = tolerance("float64", seq.length)
        assert_close(got, want, rtol=tol, atol=tol * float(np.max(scale)))


@settings(max_examples=SOME)
@given(seq=sequences(min_len=2), seed=st.integers(0, 2**16), key_stabilizer=st.sampled_from(["running", "fixed"]))
def test_performer_decoding_continues_the_forwards_final_state(seq, seed, key_stabilizer):
    P, rest = prompt_and_rest(seq)
    W = fmaps.random_projection(6, seq.q.shape[3], rng=seed)
    _, final = linattn.performer_attention(seq.q[:, :P], seq.k[:, :P], seq.v[:, :P], projection=W, causal=True,
                                           output_final_state=True)
    # the forward's states are on the unstabilised scale, c = 0 (from_final_state's default)
    state = PerformerState.from_final_state(final, projection=W, key_stabilizer=key_stabilizer)
    o, state = decode(state, seq, rest)
    full, whole = linattn.performer_attention(seq.q, seq.k, seq.v, projection=W, causal=True,
                                              output_final_state=True)
    # key constants cancel (eps = 0): rounding of T-term sums times κ
    assert_close(o, full[:, P:], reduction_length=seq.length,
                 condition=performer_condition(seq, W, full, {"kind": "positive"}, rows=slice(P, None)))
    for got, want in zip(state.final_state, whole, strict=True):
        # S and z are sums of T positive terms; e^{c}·(e^{−c}·S) adds two roundings
        assert_close(got, want, reduction_length=seq.length)


@settings(max_examples=FEW)
@given(seq=sequences(min_len=2), seed=st.integers(0, 2**16), method=st.sampled_from(["linear", "performer"]))
def test_the_forward_continues_decodings_final_state(seq, seed, method):
    P, _ = prompt_and_rest(seq)
    W = fmaps.random_projection(5, seq.q.shape[3], rng=seed)
    forward, state = {
        "linear": (linattn.linear_attention, LinearState.initial(**seq.sizes)),
        "performer": (lambda *a, **kw: linattn.performer_attention(*a, projection=W, **kw),
                      PerformerState.initial(**seq.sizes, projection=W)),
    }[method]
    _, state = decode(state, seq, [0, *(b for b in seq.bounds if 0 < b < P), P])
    o = forward(seq.q[:, P:], seq.k[:, P:], seq.v[:, P:], causal=True, initial_state=state.final_state)
    full = forward(seq.q, seq.k, seq.v, causal=True)
    if method == "linear":
        fm = fmaps.get_feature_map("elu+1")
        kappa = kernel_condition(fm(heads_first(seq.q)), fm(heads_first(seq.k)), seq.v, full, normalize=True,
                                 eps=1e-6, rows=slice(P, None))
    else:
        kappa = performer_condition(seq, W, full, {"kind": "positive"}, rows=slice(P, None))
    # a state summed by blocks, then the rest by the forward's chunks: rounding of T-term sums times κ
    assert_close(o, full[:, P:], reduction_length=seq.length, condition=kappa)


@settings(max_examples=SOME)
@given(seq=sequences(min_len=2), extra=st.integers(0, 3))
def test_cosformer_decoding_continues_the_forwards_final_state_at_its_position(seq, extra):
    (P, rest), M = prompt_and_rest(seq), seq.length + extra
    _, final = linattn.cosformer_attention(seq.q[:, :P], seq.k[:, :P], seq.v[:, :P], causal=True, max_len=M,
                                           output_final_state=True)
    o, _ = decode(CosformerState.from_final_state(final, max_len=M, position=P), seq, rest)
    full = linattn.cosformer_attention(seq.q, seq.k, seq.v, causal=True, max_len=M)
    positions = np.arange(seq.length)
    fq, fk = (fmaps.cosformer_features(fmaps.relu(heads_first(x)), positions, M) for x in (seq.q, seq.k))
    # nonnegative weights, rounding of T-term sums
    assert_close(o, full[:, P:], reduction_length=seq.length,
                 condition=kernel_condition(fq, fk, seq.v, full, normalize=True, eps=1e-6, rows=slice(P, None)))


# ---------------------------------------------------------------------------------------
# The ring buffer
# ---------------------------------------------------------------------------------------


@settings(max_examples=SOME)
@given(seq=sequences(max_len=14), window=st.integers(0, 5), local=st.integers(1, 6))
def test_ring_buffer_holds_the_last_window_tokens_in_slot_position_mod_window(seq, window, local):
    hq = seq.q.shape[2]
    state = HybridState.initial(**seq.sizes, q_heads=hq, local_heads=min(local, hq), window=window)
    kv = list(state.local_kv_heads)
    for lo, hi in itertools.pairwise(seq.bounds):
        _, state = step(state, seq.q[:, lo:hi], seq.k[:, lo:hi], seq.v[:, lo:hi])
        assert state.keys.shape == (seq.q.shape[0], window, len(kv), seq.q.shape[3])
        assert state.values.shape == (seq.q.shape[0], window, len(kv), seq.v.shape[3])
        filled = set()
        for j in range(max(0, hi - window), hi):
            # copies, never arithmetic: bit for bit
            np.testing.assert_array_equal(state.keys[:, j % window], seq.k[:, j][:, kv])
            np.testing.assert_array_equal(state.values[:, j % window], seq.v[:, j][:, kv])
            filled.add(j % window)
        for slot in set(range(window)) - filled:  # not yet written: still the zeros of the initial ring
            assert not np.any(state.keys[:, slot])


def test_ring_buffer_memory_does_not_grow_with_the_number_of_steps():
    rng = np.random.default_rng(0)
    state = HybridState.initial(batch=1, q_heads=4, kv_heads=2, key_dim=3, value_dim=2, local_heads=[0, 3],
                                window=4)
    cache = SoftmaxState.initial(batch=1, kv_heads=2, key_dim=3, value_dim=2)

    def nbytes(s):
        arrays = [getattr(s, f.name) for f in fields(s)]
        arrays += [s.linear.S, s.linear.z] if getattr(s, "linear", None) is not None else []
        return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))

    start = nbytes(state)
    for _ in range(60):
        q = rng.standard_normal((1, 1, 4, 3))
        k, v = rng.standard_normal((1, 1, 2, 3)), rng.standard_normal((1, 1, 2, 2))
        _, state = step(state, q, k, v)
        _, cache = step(cache, q, k, v)
        assert nbytes(state) == start
    assert state.position == 60 and state.keys.shape[1] == 4
    assert cache.keys.shape[1] == 60  # the exact softmax cache, by contrast, grows with every token


# ---------------------------------------------------------------------------------------
# Functional: no mutation, branching
# ---------------------------------------------------------------------------------------


def make_state(method, seq, **extra):
    hq = seq.q.shape[2]
    options = {
        "linear": {},
        "performer": {"projection": fmaps.random_projection(4, seq.q.shape[3], rng=0)},
        "cosformer": {"max_len": seq.length + 2},
        "hybrid": {"q_heads": hq, "local_heads": (hq + 1) // 2, "window": 2},
        "softmax": {},
    }[method]
    return init_state(method, **seq.sizes, **options, **extra)


def snapshot(state):
    """Copies of every array a state holds (nested linear state included)."""
    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, LinearState):
            out.update({f"linear.{k}": v for k, v in snapshot(value).items()})
        elif isinstance(value, np.ndarray):
            out[f.name] = value.copy()
        else:
            out[f.name] = value
    return out


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=FEW)
@given(seq=sequences(min_len=3), data=st.data())
def test_step_never_modifies_its_state_and_branches_are_independent(method, seq, data):
    split = data.draw(st.integers(1, seq.length - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    prefix = TokenSequence(seq.q, seq.k, seq.v, [0, split])
    _, shared = decode(make_state(method, seq), prefix)
    before = snapshot(shared)
    # branch A: the sequence's own continuation; branch B: other tokens from the same state
    o_a, _ = decode(shared, seq, [split, seq.length])
    other = TokenSequence(*(np.concatenate([x[:, :split], rng.standard_normal(x[:, split:].shape)], axis=1)
                           for x in (seq.q, seq.k, seq.v)), [split, seq.length])
    o_b, _ = decode(shared, other)
    o_a_again, _ = decode(shared, seq, [split, seq.length])
    after = snapshot(shared)
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[name], value, err_msg=name)  # untouched, bit for bit
        else:
            assert after[name] == value, name
    # the same operations on the same state: identical, whatever was stepped in between
    np.testing.assert_array_equal(o_a_again, o_a)
    o_b_fresh, _ = decode(decode(make_state(method, other), prefix)[1], other)
    np.testing.assert_array_equal(o_b, o_b_fresh)


# ---------------------------------------------------------------------------------------
# Layouts, dtypes, libraries, empty steps
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_bhtd_layout_equals_bthd_transposed(method):
    rng = np.random.default_rng(1)
    seq = TokenSequence(rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((2, 5, 2, 3)),
                        rng.standard_normal((2, 5, 2, 2)), [0, 2, 3, 5])
    o, _ = decode(make_state(method, seq), seq)
    t = (0, 2, 1, 3)
    other, outputs = make_state(method, seq), []
    for lo, hi in itertools.pairwise(seq.bounds):
        o_t, other = step(other, *(x[:, lo:hi].transpose(t) for x in (seq.q, seq.k, seq.v)), layout="bhtd")
        outputs.append(o_t.transpose(t))
    # the same arithmetic on transposed copies; BLAS may block the products differently
    assert_close(np.concatenate(outputs, axis=1), o, reduction_length=seq.length)


@pytest.mark.parametrize("method", METHODS)
def test_decoding_runs_on_array_api_strict(method):
    rng = np.random.default_rng(2)
    seq = TokenSequence(rng.standard_normal((1, 4, 2, 3)), rng.standard_normal((1, 4, 1, 3)),
                        rng.standard_normal((1, 4, 1, 2)), [0, 1, 3, 4])
    o_np, _ = decode(make_state(method, seq), seq)
    state = make_state(method, seq, xp=xs)
    outputs = []
    for lo, hi in itertools.pairwise(seq.bounds):
        o, state = step(state, *(xs.asarray(x[:, lo:hi]) for x in (seq.q, seq.k, seq.v)))
        assert isinstance(o, xs._array_object.Array)
        outputs.append(to_numpy(o))
    # array-api-strict runs the same NumPy operations in the same order
    np.testing.assert_array_equal(np.concatenate(outputs, axis=1), o_np)


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_tokens_keep_a_float32_state_and_get_their_dtype_back(method):
    rng = np.random.default_rng(3)
    seq = TokenSequence(*(rng.standard_normal((1, 3, 2, 4)).astype(np.float16) for _ in range(3)), [0, 2, 3])
    o, state = decode(make_state(method, seq, dtype=np.float16), seq)
    assert o.dtype == np.float16
    arrays = [a for a in snapshot(state).values() if isinstance(a, np.ndarray) and a.dtype.kind == "f"]
    assert arrays and all(a.dtype == np.float32 for a in arrays)
    ref = TokenSequence(*(x.astype(np.float32) for x in (seq.q, seq.k, seq.v)), seq.bounds)
    o32, _ = decode(make_state(method, ref, dtype=np.float32), ref)
    # float16 tokens are exactly representable in float32: the same float32 math, then one cast
    np.testing.assert_array_equal(o, o32.astype(np.float16))


@pytest.mark.parametrize("method", METHODS)
def test_a_step_of_zero_tokens_returns_an_empty_output_and_the_same_state(method):
    rng = np.random.default_rng(4)
    seq = TokenSequence(rng.standard_normal((2, 0, 2, 3)), rng.standard_normal((2, 0, 1, 3)),
                        rng.standard_normal((2, 0, 1, 2)), [0, 0])
    state = make_state(method, TokenSequence(seq.q, seq.k, seq.v, [0]))
    o, after = step(state, seq.q, seq.k, seq.v)
    assert o.shape == (2, 0, 2, 2) and after is state


def test_init_state_builds_each_methods_initial_state():
    sizes = {"batch": 1, "kv_heads": 1, "key_dim": 2, "value_dim": 3}
    assert isinstance(init_state("linear", **sizes), LinearState)
    assert isinstance(init_state("softmax", **sizes), SoftmaxState)
    state = init_state("linear", **sizes, feature_map="taylor", normalize=False)
    assert state.S.shape == (1, 1, 7, 3) and state.z is None and state.final_state is state.S


# ---------------------------------------------------------------------------------------
# Errors name the argument
# ---------------------------------------------------------------------------------------


SIZES = {"batch": 2, "kv_heads": 2, "key_dim": 3, "value_dim": 4}


def tokens(batch=2, n=1, q_heads=4, kv_heads=2, key_dim=3, value_dim=4, k_len=None, dtype=np.float64):
    return (np.ones((batch, n, q_heads, key_dim), dtype), np.ones((batch, n if k_len is None else k_len, kv_heads,
                                                                    key_dim), dtype),
            np.ones((batch, n if k_len is None else k_len, kv_heads, value_dim), dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("bad", "error", "match"), [
    ({"q_heads": 3}, ValueError, "multiple of the key/value heads"),
    ({"kv_heads": 1, "q_heads": 2}, ValueError, "kv_heads=2"),
    ({"key_dim": 5}, ValueError, "Dk=5"),
    ({"value_dim": 2}, ValueError, "value_dim=4"),
    ({"batch": 3}, ValueError, "batch=2"),
    ({"k_len": 2}, ValueError, "same number n of new tokens"),
    ({"dtype": np.float32}, TypeError, "dtype=float32"),
])
def test_tokens_that_do_not_fit_the_state_are_rejected_naming_the_argument(method, bad, error, match):
    options = {"performer": {"projection": np.ones((2, 3))}, "cosformer": {"max_len": 4},
               "hybrid": {"q_heads": 4, "local_heads": 2, "window": 1}}.get(method, {})
    state = init_state(method, **SIZES, **options)
    with pytest.raises(error, match=match):
        step(state, *tokens(**bad))


def test_a_cosformer_step_past_max_len_is_rejected():
    state = CosformerState.initial(**SIZES, max_len=3)
    _, state = step(state, *tokens(n=2))
    with pytest.raises(ValueError, match=r"max_len=3 exceeded: the state is at position 2 and 2 more"):
        step(state, *tokens(n=2))
    with pytest.raises(ValueError, match="position must be <= max_len"):
        CosformerState.from_final_state(state.final_state, max_len=3, position=4)


def test_a_preallocated_softmax_cache_rejects_tokens_past_max_len():
    state = SoftmaxState.initial(**SIZES, max_len=2)
    _, state = step(state, *tokens(n=2))
    with pytest.raises(ValueError, match="max_len=2 exceeded"):
        step(state, *tokens(n=1))


def test_hybrid_rejects_a_negative_window_and_a_wrong_query_head_count():
    with pytest.raises(ValueError, match="window must be a non-negative integer, got -1"):
        HybridState.initial(**SIZES, q_heads=4, local_heads=1, window=-1)
    with pytest.raises(ValueError, match="q_heads must be a multiple of kv_heads"):
        HybridState.initial(**SIZES, q_heads=3, local_heads=1, window=1)
    state = HybridState.initial(**SIZES, q_heads=4, local_heads=1, window=1)
    with pytest.raises(ValueError, match="q_heads=4"):
        step(state, *tokens(q_heads=6))


def test_bad_states_and_options_are_rejected_naming_the_argument():
    with pytest.raises(ValueError, match="method must be one of"):
        init_state("no-such-method", **SIZES)
    with pytest.raises(TypeError, match=r"state must be a linattn\.decoding state"):
        step({"S": 0}, *tokens())
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        init_state("linear", **{**SIZES, "batch": 0})
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        init_state("linear", **SIZES, dtype=np.int32)
    with pytest.raises(ValueError, match=r"final_state must be a pair \(S, z\)"):
        LinearState.from_final_state(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"final_state\[1\] \(z\) must have shape"):
        LinearState.from_final_state((np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 3))))
    state = LinearState.initial(**SIZES, feature_map="taylor")
    with pytest.raises(ValueError, match="maps to 31 features, but the state has m=13"):
        step(state, *tokens(key_dim=5))


def test_performer_options_that_cannot_decode_exactly_are_rejected():
    W = np.ones((2, 3))
    with pytest.raises(ValueError, match="key_stabilizer='running' needs feature_eps=0"):
        PerformerState.initial(**SIZES, projection=W, feature_eps=1e-6)
    with pytest.raises(ValueError, match="stabilize=True needs normalize=True"):
        PerformerState.initial(**SIZES, projection=W, normalize=False)
    with pytest.raises(ValueError, match="key_shift is required"):
        PerformerState.initial(**SIZES, projection=W, key_stabilizer="fixed")
    with pytest.raises(ValueError, match="key_shift is only used by positive features with stabilize=True"):
        PerformerState.initial(**SIZES, projection=W, kind="trig", key_shift=0.0)
    with pytest.raises(ValueError, match=r"key_shift must be a number or have shape \(B, Hkv\) = \(2, 2\)"):
        PerformerState.initial(**SIZES, projection=W, key_stabilizer="fixed", key_shift=np.zeros(2))
    with pytest.raises(ValueError, match=r"projection must have shape \(r, Dk\) with r >= 1 and Dk=3"):
        PerformerState.initial(**SIZES, projection=np.ones((2, 4)))
    with pytest.raises(ValueError, match="key_stabilizer must be one of"):
        PerformerState.initial(**SIZES, projection=W, key_stabilizer="max")
