"""Shared pieces of the gated-recurrence tests (test_gated, test_mamba2, test_rwkv, test_hgrn).

Every comparison is judged against the *magnitude* of what was summed: the definition
run on |inputs| (the decays e^g are positive already), as in tests/test_scan.py. Two
orders of summing the same terms differ by at most a few ε times that sum, however much
the signed terms cancel; the gates add a condition number, because each form rounds the
exponents G_t − G_s (sums of log-decays) differently: an absolute error of ε·Σ|g| in an
exponent is a relative error of the same size in its factor.
"""

import itertools
from dataclasses import replace

import numpy as np
from hypothesis import strategies as st

from linattn.testing import machine_epsilon, tolerance
from linattn.testing.strategies import segment_lengths

# No decay, barely any, e^-1, a decay that underflows within a few steps in float32, and
# one that underflows at once in any dtype.
EXTREME_GATES = (0.0, -1e-3, -1.0, -30.0, -1e3)
MODERATE_GATES = (0.0, -1e-3, -1.0)
FORMS = ("parallel", "recurrent", "chunked")
FD_STEP = 1e-6  # numerical_vjp's default h


def log_decays(rng, shape, extreme=False):
    """Half from the fixed set, half −Exp(·), so that every size in between occurs."""
    pool = EXTREME_GATES if extreme else MODERATE_GATES
    fixed = rng.choice(pool, size=shape)
    smooth = -rng.exponential(10.0 if extreme else 0.5, size=shape)
    return np.where(rng.random(shape) < 0.5, fixed, smooth)


def condition(T, *gates, time_axis=1):
    """1 + the largest Σ|g| over all T steps of any channel + T (see the module docstring).

    Every form sums log-decays over at most T steps (the parallel form over all of them),
    so ε times this bounds the relative rounding of any decay factor; T covers the
    products of per-chunk decays.
    """
    total = 0.0
    for g in gates:
        if g is not None and g.size:
            total = max(total, float(np.max(np.sum(np.abs(g), axis=time_axis))))
    return 1.0 + total + T


def bound(dtype, magnitude, terms, kappa, floor=1e-300):
    """8ε·sqrt(terms)·κ times the magnitude of each output (tolerance of linattn.testing)."""
    return tolerance(dtype, terms, kappa) * magnitude + floor


def half_precision_bound(magnitude, desired, terms, kappa, T):
    """float16 inputs computed in float32 and rounded to float16 at the end.

    float32 arithmetic (as `bound`), the final rounding of each output to float16
    (ε16·|o|), and float16's subnormal spacing 2^-24 for outputs that small; the inputs
    themselves are rounded before the float64 reference sees them, so they add nothing.
    """
    return (bound(np.float32, magnitude, terms, kappa) + machine_epsilon(np.float16) * np.abs(desired)
            + (T + 1) * 2.0**-24)


def assert_within(actual, desired, limit, err_msg=""):
    """|actual − desired| <= limit element by element (limit broadcast); NaN fails."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{err_msg}: shapes differ: {actual.shape} vs {desired.shape}"
    err = np.abs(actual.astype(np.float64) - desired)
    limit = np.broadcast_to(limit, err.shape)
    bad = ~(err <= limit)
    if bad.any():
        ratio = np.where(bad, np.nan_to_num(err / np.maximum(limit, 1e-300), nan=np.inf), 0.0)
        worst = np.unravel_index(int(np.argmax(ratio)), err.shape)
        raise AssertionError(f"{err_msg}: {int(bad.sum())} of {err.size} elements outside the bound; worst at "
                             f"{worst}: actual {actual[worst]!r}, desired {desired[worst]!r}, bound {limit[worst]!r}")


@st.composite
def packings(draw, *, max_len=12, varlen=None):
    """(batch, T, cu_seqlens): a batch of 1–2 sequences, or sequences packed with cu_seqlens.

    Packed sequences include empty and length-1 ones (segment_lengths draws them).
    """
    if draw(st.booleans()) if varlen is None else varlen:
        lengths = draw(segment_lengths(max_segments=4, max_length=max(1, max_len // 2)))
        cu = [0, *np.cumsum(lengths).tolist()]
        return 1, cu[-1], cu
    return draw(st.integers(1, 2)), draw(st.integers(1, max_len)), None


def sequences(batch, T, cu):
    """(state index, batch index, lo, hi) of every sequence."""
    if cu is None:
        return [(b, b, 0, T) for b in range(batch)]
    return [(n, 0, lo, hi) for n, (lo, hi) in enumerate(itertools.pairwise(cu))]


def chunk_sizes(T, drawn):
    """1, an odd size, one beyond T, and a drawn size (lengths that are not a multiple of it)."""
    return sorted({1, 3, T + 1, drawn})


def to_layout(x, layout):
    """(B, T, H, ...) -> the layout's order (copied, so that the strides are the caller's)."""
    return x if layout == "bthd" else np.ascontiguousarray(np.swapaxes(x, 1, 2))


def from_layout(x, layout):
    return x if layout == "bthd" else np.swapaxes(x, 1, 2)


def check_fd(vjp_grads, fd_grads, names, atol):
    """Each analytic gradient against central differences, shapes first."""
    for name, got, expected in zip(names, vjp_grads, fd_grads, strict=True):
        assert got is not None, f"d{name} missing"
        assert got.shape == expected.shape, f"d{name}: shape {got.shape}, expected {expected.shape}"
        assert_within(got, expected, atol, f"d{name}")


def fd_atol(loss_size, T, kappa, terms):
    """Central differences with h = 1e-6 of a loss that is multilinear in the arrays and a sum
    of exponentials in the gates: truncation ~h²·|L| (negligible); rounding: the forward's
    error, 8ε·sqrt(terms)·κ of the loss' size, divided by h."""
    return tolerance(np.float64, terms, kappa) / FD_STEP * max(loss_size, 1.0)


def sliced(p, lo, hi, **changes):
    """The problem ``p`` with its per-time arrays (``p.PER_TIME``) cut to steps [lo, hi)."""
    cut = {name: None if getattr(p, name) is None else getattr(p, name)[:, lo:hi] for name in p.PER_TIME}
    return replace(p, **cut, **changes)


def check_state_passing(p, split, chunk, by_definition):
    """run(x1 ++ x2) == run(x2, initial_state=final(run(x1))), outputs and final state.

    ``by_definition(p, absolute=True)`` gives the magnitudes (outputs, state) of the terms
    summed, which set the float64 bound.
    """
    o, S = p.run(chunk_size=chunk, output_final_state=True)
    o1, mid = sliced(p, 0, split).run(chunk_size=chunk, output_final_state=True)
    o2, S2 = sliced(p, split, p.T, state=mid).run(chunk_size=chunk, output_final_state=True)
    o_mag, s_mag = by_definition(p, absolute=True)
    # float64: the two runs round their partial sums elsewhere than the one run
    assert_within(np.concatenate([p.bthd(o1), p.bthd(o2)], axis=1), p.bthd(o),
                  2 * bound(np.float64, o_mag, p.terms, p.kappa), "o")
    assert_within(S2, S, 2 * bound(np.float64, s_mag, p.terms, p.kappa), "state")


def check_cu_seqlens(p, form):
    """A packed batch equals the loop over its sequences, each with its own initial state."""
    o, S = p.run(form=form, chunk_size=3, output_final_state=True)
    for n, _, lo, hi in sequences(1, p.T, p.cu):
        alone = sliced(p, lo, hi, cu=None, state=None if p.state is None else p.state[n:n + 1])
        o_seg, S_seg = alone.run(form=form, chunk_size=3, output_final_state=True)
        # the same calls on the same values (empty and length-1 segments included)
        np.testing.assert_array_equal(p.bthd(o)[:, lo:hi], alone.bthd(o_seg), err_msg=f"segment {n}")
        np.testing.assert_array_equal(S[n:n + 1], S_seg, err_msg=f"segment {n} state")
