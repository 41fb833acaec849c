"""The linear family (NumPy backend): time and memory over T, so linear growth is visible.

Each method runs through linattn.compare's registry (the same fixed settings as
``linattn compare``: Performer with 256 orthogonal features and seed 0, cosFormer with
M = T, hybrid with half the heads local, window 64), causal, B=1, H=4, D=64, float32.
``flash`` is the exact reference in O(T) memory for comparison; exact ``softmax`` is
left out above T = 2048, where its T×T scores dominate (see bench_softmax).
"""


import numpy as np

import linattn  # imported for its side effect: every method registers itself
from linattn.compare import compared_methods

from ._memory import traced_peak_bytes

B, H, D = 1, 4, 64
METHODS = ("linear", "performer", "cosformer", "hybrid", "flash")
LENGTHS = (512, 2048, 8192)


def _inputs(T, n):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((B, T, H, D), dtype=np.float32) for _ in range(n)]


class Forward:
    """Causal forward: time and peak traced allocation (tracemalloc)."""

    params = (METHODS, LENGTHS)
    param_names = ("method", "T")
    timeout = 180

    def setup(self, method, T):
        self.run = compared_methods()[method].run
        self.run(*_inputs(8, 3), causal=True)  # warm-up: lazy imports are not measured
        self.q, self.k, self.v = _inputs(T, 3)

    def time_forward(self, method, T):
        self.run(self.q, self.k, self.v, causal=True)

    def track_peak_traced_bytes(self, method, T):
        self.run(self.q, self.k, self.v, causal=True)  # untraced first: one-time allocations are not counted
        return traced_peak_bytes(lambda: self.run(self.q, self.k, self.v, causal=True))

    track_peak_traced_bytes.unit = "bytes"


class LinearBackward:
    """Causal linear attention (elu+1, normalised): the VJP by three chunked scans."""

    params = (LENGTHS,)
    param_names = ("T",)
    timeout = 180

    def setup(self, T):
        self.q, self.k, self.v, self.do = _inputs(T, 4)
        linattn.linear_attention_vjp(*_inputs(8, 4), causal=True)

    def time_backward(self, T):
        linattn.linear_attention_vjp(self.q, self.k, self.v, self.do, causal=True)
