"""The gated recurrences (NumPy backend): the chunked forms' time and memory over T, and their VJPs.

simple GLA, RetNet, Mamba-2, GLA, RWKV-6 and HGRN run through linattn.compare's
registry, with the fixed gates ``linattn compare`` gives them (log-decays in
[−1/2, −1/16]; Mamba-2 with G = H groups; HGRN on the H·D channels of v), causal, B=1,
H=4, D=64, float32, chunks of 64. Their time should grow linearly in T;
``docs/scripts/perf_gated.py`` compares it with the matrix products the chunked form
needs at T = 16384.
"""


import numpy as np

import linattn.gated  # each module registers its methods with linattn.compare
import linattn.hgrn
import linattn.mamba2
import linattn.rwkv
from linattn.compare import compared_methods

from ._memory import traced_peak_bytes

B, H, D = 1, 4, 64
METHODS = ("simple_gla", "retention", "mamba2", "gla", "rwkv6", "hgrn")
LENGTHS = (512, 2048, 8192)


def _inputs(T, n):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((B, T, H, D), dtype=np.float32) for _ in range(n)]


class GatedForward:
    """Chunked forward: time and peak traced allocation (tracemalloc)."""

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
        return traced_peak_bytes(lambda: self.run(self.q, self.k, self.v, causal=True))

    track_peak_traced_bytes.unit = "bytes"


class GatedBackward:
    """The VJPs of simple GLA and GLA (chunked): three more scans of the same form."""

    params = (("simple_gla", "gla"), LENGTHS)
    param_names = ("method", "T")
    timeout = 180

    def setup(self, method, T):
        self.q, self.k, self.v, self.do = _inputs(T, 4)
        rng = np.random.default_rng(1)
        if method == "gla":
            self.gate = -rng.random((B, T, H, D), dtype=np.float32) / 4
            self.vjp = linattn.gated.gla_vjp
        else:
            self.gate = -rng.random((B, T, H), dtype=np.float32) / 4
            self.vjp = linattn.gated.simple_gla_vjp

    def time_backward(self, method, T):
        self.vjp(self.q, self.k, self.v, self.gate, self.do)
