"""DeltaNet / Gated DeltaNet (NumPy backend): the chunked WY/UT form over T, its loop, its VJP.

B=1, H=4, D=64, float32, L2-normalised q and k (use_qk_l2norm), β = sigmoid(z) and
g = logsigmoid(z)/8 from linattn.delta.compare_gates (what ``linattn compare`` feeds).
The chunked forward should grow linearly in T; the recurrent form and the VJP (the
reverse-mode loop, the reference) are Python loops over T and are timed at small T only.
"""


import numpy as np

import linattn.delta as delta

from ._memory import traced_peak_bytes

B, H, D = 1, 4, 64
LENGTHS = (512, 2048, 8192)
SHORT = (256, 1024)


def _inputs(T):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, H, D), dtype=np.float32) for _ in range(3))
    beta, g = (x.astype(np.float32) for x in delta.compare_gates(B, T, H))
    return q, k, v, g, beta


def _run(gated, q, k, v, g, beta, **kw):
    if gated:
        return delta.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, **kw)
    return delta.delta_rule(q, k, v, beta, use_qk_l2norm=True, **kw)


class Chunked:
    """Forward, chunked (C = 64): time and peak traced allocation."""

    params = ((False, True), LENGTHS)
    param_names = ("gated", "T")
    timeout = 180

    def setup(self, gated, T):
        _run(gated, *_inputs(8))  # warm-up: lazy imports are not measured
        self.inputs = _inputs(T)

    def time_forward(self, gated, T):
        _run(gated, *self.inputs)

    def track_peak_traced_bytes(self, gated, T):
        return traced_peak_bytes(lambda: _run(gated, *self.inputs))

    track_peak_traced_bytes.unit = "bytes"


class Recurrent:
    """Forward by the loop (the definition and the decoding form)."""

    params = ((False, True), SHORT)
    param_names = ("gated", "T")
    timeout = 180

    def setup(self, gated, T):
        self.inputs = _inputs(T)

    def time_forward(self, gated, T):
        _run(gated, *self.inputs, form="recurrent")


class Backward:
    """The VJP of the gated rule: reverse-mode loop with states recomputed from checkpoints."""

    params = (SHORT,)
    param_names = ("T",)
    timeout = 180

    def setup(self, T):
        self.inputs = _inputs(T)
        self.do = np.random.default_rng(1).standard_normal((B, T, H, D)).astype(np.float32)

    def time_vjp(self, T):
        q, k, v, g, beta = self.inputs
        delta.gated_delta_rule_vjp(q, k, v, g, beta, self.do, use_qk_l2norm=True)
