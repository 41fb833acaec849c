"""Mamba (S6) selective scan (NumPy backend): the forms, the backward pass and a decoding step.

B = 1, D = 512 channels, N = 16, float32, Mamba-like inputs (Δ = softplus(δ + δ_bias) with
dt in [1e-3, 0.1], A = −(1..N)), as docs/scripts/perf_mamba.py. The recurrent form is the
fast one on a CPU; the chunked form (linattn.scan.causal_scan with Dk = N, Dv = 1 and a
per-key log-decay) does about C times its arithmetic, so chunk 64 runs on short lengths only.
"""


import numpy as np

import linattn.mamba  # noqa: F401 (registers "mamba" for init_state)
from linattn.decoding import init_state, step
from linattn.mamba import selective_scan, selective_scan_vjp

from ._memory import traced_peak_bytes

D, N = 512, 16
FORMS = ("recurrent", "chunked-8", "chunked-64")
LENGTHS = (256, 1024, 4096)


def _problem(T):
    rng = np.random.default_rng(0)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), D))
    return {
        "u": rng.standard_normal((1, D, T), dtype=np.float32),
        "delta": (rng.standard_normal((1, D, T)) * 0.5).astype(np.float32),
        "A": -np.broadcast_to(np.arange(1, N + 1, dtype=np.float32), (D, N)).copy(),
        "B": rng.standard_normal((1, N, T), dtype=np.float32),
        "C": rng.standard_normal((1, N, T), dtype=np.float32),
        "D": np.ones(D, np.float32),
        "delta_bias": np.log(np.expm1(dt)).astype(np.float32),
        "delta_softplus": True,
    }


def _form(name):
    form, _, chunk = name.partition("-")
    return {"form": form, "chunk_size": int(chunk or 64)}


class Forward:
    """selective_scan: time and peak traced allocation (tracemalloc)."""

    params = (FORMS, LENGTHS)
    param_names = ("form", "T")
    timeout = 300
    number = 1
    repeat = 3

    def setup(self, form, T):
        if form == "chunked-64" and T > 1024:
            raise NotImplementedError  # ~5 s per 1024 steps: asv skips it
        self.options = _form(form)
        selective_scan(**_problem(8), **self.options)  # warm-up: lazy imports are not measured
        self.problem = _problem(T)

    def time_forward(self, form, T):
        selective_scan(**self.problem, **self.options)

    def track_peak_traced_bytes(self, form, T):
        return traced_peak_bytes(lambda: selective_scan(**self.problem, **self.options))

    track_peak_traced_bytes.unit = "bytes"


class Backward:
    """selective_scan_vjp (the scan's VJP, recurrent form): every input's gradient."""

    params = (LENGTHS,)
    param_names = ("T",)
    timeout = 300
    number = 1
    repeat = 3

    def setup(self, T):
        self.problem = _problem(T)
        self.dy = np.ones((1, D, T), np.float32)
        selective_scan_vjp(**_problem(8), dy=np.ones((1, D, 8), np.float32), form="recurrent")

    def time_backward(self, T):
        selective_scan_vjp(**self.problem, dy=self.dy, form="recurrent")


class DecodeStep:
    """One token through a MambaState (B = 1, D = 512, N = 16): the per-token cost of generation."""

    def setup(self):
        p = _problem(1)
        self.state = init_state("mamba", batch=1, A=p["A"], D=p["D"], delta_bias=p["delta_bias"],
                                delta_softplus=True, dtype=np.float32)
        self.token = {name: p[name] for name in ("u", "delta", "B", "C")}
        step(self.state, None, None, None, **self.token)

    def time_step(self):
        step(self.state, None, None, None, **self.token)
