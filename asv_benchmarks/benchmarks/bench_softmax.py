"""Exact softmax attention vs FlashAttention-2 (NumPy backend): time and memory.

``softmax_attention`` forms the full (T, T) score matrix per head, so its memory grows as
O(T²); ``flash_attention`` works one (64 × 64) tile at a time, so beyond the inputs and
outputs its memory grows as O(T). ``track_peak_traced_bytes`` shows that directly (the
peak of NumPy allocations during one call); ``peakmem_forward`` shows it in the process's
peak resident set size, which also includes the interpreter, NumPy and the inputs.

Shapes: causal self-attention, B=1, H=4, D=64, float32, T from 256 to 2048.
"""


import numpy as np

import linattn

from ._memory import traced_peak_bytes

B, H, D = 1, 4, 64
DTYPE = np.float32
METHODS = ("softmax", "flash")


def _inputs(T, n):
    """n arrays of shape (B, T, H, D), the same for every method at a given T."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((B, T, H, D), dtype=DTYPE) for _ in range(n)]


def _warm_up():
    """Run each method once at a tiny size, so one-time work is not measured.

    linattn imports its array-API namespace (array_api_compat.numpy, ~0.1 s) lazily, on the
    first call; without this, ``--quick`` runs (one call, no warm-up) would time it.
    """
    q, k, v, do = _inputs(8, 4)
    o, lse = linattn.flash_attention(q, k, v, causal=True)
    linattn.flash_attention_backward(q, k, v, o, lse, do, causal=True)
    linattn.softmax_attention(q, k, v, causal=True)
    linattn.softmax_attention_vjp(q, k, v, do, causal=True)


def _forward(method, q, k, v):
    if method == "softmax":
        return linattn.softmax_attention(q, k, v, causal=True)
    return linattn.flash_attention(q, k, v, causal=True)


class Forward:
    """Forward pass, causal: time, peak RSS and peak traced allocation."""

    params = (METHODS, (256, 512, 1024, 2048))
    param_names = ("method", "T")
    timeout = 120

    def setup(self, method, T):
        _warm_up()
        self.q, self.k, self.v = _inputs(T, 3)

    def time_forward(self, method, T):
        _forward(method, self.q, self.k, self.v)

    def peakmem_forward(self, method, T):
        _forward(method, self.q, self.k, self.v)

    def track_peak_traced_bytes(self, method, T):
        _forward(method, self.q, self.k, self.v)  # untraced first: one-time allocations are not counted
        return traced_peak_bytes(lambda: _forward(method, self.q, self.k, self.v))

    track_peak_traced_bytes.unit = "bytes"


class Backward:
    """Backward pass, causal: the direct VJP vs the tiled FlashAttention-2 backward."""

    params = (METHODS, (256, 1024))
    param_names = ("method", "T")
    timeout = 120

    def setup(self, method, T):
        _warm_up()
        self.q, self.k, self.v, self.do = _inputs(T, 4)
        if method == "flash":
            self.o, self.lse = linattn.flash_attention(self.q, self.k, self.v, causal=True)

    def time_backward(self, method, T):
        if method == "softmax":
            linattn.softmax_attention_vjp(self.q, self.k, self.v, self.do, causal=True)
        else:
            linattn.flash_attention_backward(self.q, self.k, self.v, self.o, self.lse, self.do, causal=True)
